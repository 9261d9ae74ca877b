from __future__ import annotations

import pytest
import torch
from torch import nn

import decoderscope as ds
from decoderscope.taps import OUTPUT, probe, resolve_layers, tapped
from decoderscope.testing import gaussian_case, index_data, vae_for


def _no_hooks(module: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in module.modules())


class Boom(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("kaboom")


class TupleOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, str]:
        return self.lin(x), "extra"


class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.lin(torch.tanh(self.lin(z)))


def test_one_pass_captures_every_layer_and_cleans_up() -> None:
    dec = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    dec.train()
    dec[1].eval()  # a mixed mode must come back as it was
    before = {k: v.clone() for k, v in dec.state_dict().items()}
    calls = []
    dec.register_forward_pre_hook(lambda m, i: calls.append(1))
    n_user_hooks = len(dec._forward_pre_hooks)
    with tapped(dec, ["0", "2", OUTPUT]) as tap:
        out = tap(torch.randn(5, 4))
        assert not dec.training  # inspected in eval mode
    assert set(out) == {"0", "2", OUTPUT}
    assert out["0"].shape == (5, 8) and out["2"].shape == (5, 3)
    assert len(calls) == 1  # one forward pass for all layers
    assert dec.training and not dec[1].training and dec[0].training
    assert len(dec._forward_pre_hooks) == n_user_hooks
    assert all(not m._forward_hooks for m in dec.modules())
    assert all(torch.equal(before[k], v) for k, v in dec.state_dict().items())


def test_decoder_raising_midway_names_layers_and_leaves_no_hook() -> None:
    dec = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), Boom(), nn.Linear(4, 2))
    dec.train()
    with pytest.raises(ds.DecoderError, match=r"RuntimeError: kaboom.*had run: 0, 1"):
        with tapped(dec, ["0", "1", "3"]) as tap:
            tap(torch.randn(3, 4))
    assert _no_hooks(dec)
    assert dec.training and all(m.training for m in dec.modules())


def test_decoder_raising_inside_inspect_restores_model() -> None:
    mu, lv = gaussian_case(d=4, n=20)
    dec = nn.Sequential(nn.Linear(4, 4), Boom())
    dec.train()
    before = {k: v.clone() for k, v in dec.state_dict().items()}
    with pytest.raises(ds.DecoderError, match="kaboom"):
        ds.inspect(vae_for(mu, lv, dec), index_data(20), random_inits=0, seeds=1, device="cpu")
    assert _no_hooks(dec) and dec.training
    assert all(torch.equal(before[k], v) for k, v in dec.state_dict().items())


def test_unknown_layer_lists_valid_names() -> None:
    dec = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    found = probe(dec, torch.randn(2, 4))
    with pytest.raises(
        ds.LayerError, match=r"unknown layer 'net\.7'; valid names are: 0, 1, output"
    ):
        resolve_layers(dec, ["net.7"], found)


def test_globs_and_default_layers() -> None:
    dec = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh())
    found = probe(dec, torch.randn(2, 4))
    assert found.default_layers() == ["0", "2", OUTPUT]  # output differs from last Linear
    assert resolve_layers(dec, ["[02]"], found) == ["0", "2"]
    last_linear = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    assert probe(last_linear, torch.randn(2, 4)).default_layers() == ["0", "2"]


def test_module_called_twice_is_an_error() -> None:
    dec = Twice()
    with pytest.raises(ds.LayerError, match="'lin' was called more than once"):
        with tapped(dec, ["lin"]) as tap:
            tap(torch.randn(2, 4))
    assert _no_hooks(dec)
    # left out of the defaults, with a note
    assert probe(dec, torch.randn(2, 4)).default_layers() == [OUTPUT]


def test_layer_that_never_fires() -> None:
    class Skips(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return self.used(z)

    dec = Skips()
    with pytest.raises(ds.LayerError, match="'unused' never ran"):
        with tapped(dec, ["used", "unused"]) as tap:
            tap(torch.randn(2, 4))
    assert _no_hooks(dec)


def test_non_tensor_output_and_first_tensor_rule() -> None:
    class NoTensor(nn.Module):
        def forward(self, x: torch.Tensor) -> str:
            return "nothing"

    class Dec(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pair = TupleOut()
            self.bad = NoTensor()

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            h, _ = self.pair(z)
            self.bad(h)
            return h

    dec = Dec()
    with tapped(dec, ["pair"]) as tap:
        assert tap(torch.randn(2, 4))["pair"].shape == (2, 4)
    with pytest.raises(ds.LayerError, match="'bad' returned str with no tensor"):
        with tapped(dec, ["bad"]) as tap:
            tap(torch.randn(2, 4))
    assert _no_hooks(dec)


def test_a_pass_stops_after_the_last_layer_read() -> None:
    """Inside `reading(keys)` each decoder stops after the last of those keys' layers (what
    follows it never runs, even past the decoder's own `except Exception`); a layer read beyond
    it runs that decoder again, whole, with the values of an unhinted pass. Hooks are gone
    afterwards."""
    from decoderscope.estimators.batches import reading
    from decoderscope.estimators.jacobian import jacobians
    from decoderscope.joint import decoder_features, keyed

    class Guarded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 12), nn.Tanh(), nn.Linear(12, 3))
            self.after = 0  # passes that got past the body

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            try:
                h = self.body(z)
            except Exception:
                h = torch.zeros(z.shape[0], 3)
            self.after += 1
            return h

    dec = Guarded()
    names = ["body.0", "body.2"]
    z = torch.randn(5, 4)
    with tapped(dec, names) as tap:
        assert set(tap(z, last="body.0")) == {"body.0"} and dec.after == 0
        feats = decoder_features([tap], names)
        with reading([keyed(0, "body.0")]):
            out = feats(z)
            first = out[keyed(0, "body.0")]
            assert dec.after == 0
            later = out[keyed(0, "body.2")]  # a second, whole pass
            assert dec.after == 1
        whole = feats(z)
        assert torch.equal(first, whole[keyed(0, "body.0")])
        assert torch.equal(later, whole[keyed(0, "body.2")])
        # Gauss-Newton's Jacobian passes stop too, in forward mode (body.0: 12 features > 2 d)
        # and in reverse mode (body.2: 3), and their Jacobians are the layers' own
        after, got = dec.after, {}
        for name in ("body.0", "body.2"):
            key = keyed(0, name)
            width = int(whole[key].shape[1])
            got[name] = jacobians(feats, [key], torch.zeros(5, dtype=torch.long), z, (4,), width)
        assert dec.after == after
    assert _no_hooks(dec)
    for name, part in (("body.0", dec.body[:1]), ("body.2", dec.body)):
        want = torch.stack([torch.autograd.functional.jacobian(part, zi) for zi in z])
        assert torch.allclose(got[name][1], want.transpose(1, 2), atol=1e-6)
