"""Layers that are functions of another chosen layer alone (`dependence.determined`), and the
readings data processing carries upstream from them (`plan.imply`)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import decoderscope as ds
from decoderscope.dependence import determined
from decoderscope.estimators import run as run_module
from decoderscope.taps import tapped
from decoderscope.testing import OpaqueLeaky, gaussian_case, index_data, vae_for, within


class _Residual(nn.Module):
    """x + c(act(b(act(a(x))))): `b` and `c` read nothing but the branch; the sum also reads x."""

    def __init__(self, w: int) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(w, w), nn.Linear(w, w), nn.Linear(w, w)
        self.act = OpaqueLeaky()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.c(self.act(self.b(self.act(self.a(x)))))


def _decoder(d: int, w: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d, w), _Residual(w), OpaqueLeaky(), nn.Linear(w, w))


def test_a_layer_is_determined_by_those_it_reads_alone_and_not_across_a_skip() -> None:
    dec = _decoder(4, 8)
    names = ["0", "1.a", "1.b", "1.c", "3", "output"]
    with tapped(dec, names) as tap:
        found = determined(tap, names, (4,), torch.device("cpu"))
    assert found == {
        "0": frozenset(names[1:]),
        "1.a": frozenset({"1.b", "1.c"}),
        "1.b": frozenset({"1.c"}),
        "1.c": frozenset(),  # `3` reads the skip connection's x as well
        "3": frozenset({"output"}),
    }
    assert not any(m._forward_hooks for m in dec.modules())  # the hooks are gone


def test_a_layer_a_later_one_read_at_the_latents_values_depends_on_is_read_at_them_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`1.c` is solved through the decoder (`inverse`) and reads only `1.b`, so `1.b` holds the
    latent's values: read in closed form, its inverse never refined."""
    d = 4
    mu, lv = gaussian_case(d=d, n=300, kl=4.0, sigma=math.exp(-4.0 / d))
    refined: list[str] = []
    real_refine = run_module.refine

    def counting(feats_of, shape, names, r, h, steps, nearest):  # type: ignore[no-untyped-def]
        refined.extend(n.split("/")[-1] for n in names)
        return real_refine(feats_of, shape, names, r, h, steps, nearest)

    monkeypatch.setattr(run_module, "refine", counting)

    def no_runs(*_args: object) -> None:
        raise AssertionError("a layer read in closed form needs no estimator runs to attribute")

    # its attribution is read like an affine layer's, from the latent's basis
    monkeypatch.setattr("decoderscope.sections.CoalitionRuns", no_runs)
    vae = vae_for(mu, lv, _decoder(d, 8))
    layers = ["1.b", "1.c"]
    report = ds.inspect(
        vae, index_data(300), layers=layers, random_inits=0, seeds=1, attribution=True
    )
    trained = report.variant("trained")
    exact = trained.layer("latent").exact
    assert exact is not None
    assert [trained.layer(n).method for n in layers] == ["injective", "inverse"]
    row = trained.layer("1.b")
    assert (row.kl.mean, row.aggregate_kl.mean) == pytest.approx((exact.kl, exact.aggregate_kl))
    assert within(row.mi.mean, exact.mi, share=0.1)
    assert row.attribution is not None
    assert sum(row.attribution.to_dict()["kl"]) == pytest.approx(row.kl.mean)
    # each try prices `1.c` first; once refined it settles `1.b`, which is then neither priced
    # nor evaluated (the try at check 0, from R's affine start, refines neither)
    carried = list(refined)
    assert carried[0] == "1.c"
    # without the dependence test `1.b` is read for itself: priced at every try, and evaluated
    monkeypatch.setattr("decoderscope.joint.determined", lambda *_: {})
    refined.clear()
    again = ds.inspect(vae, index_data(300), layers=layers, random_inits=0, seeds=1)
    assert again.variant("trained").layer("1.b").method == "inverse"
    assert refined.count("1.b") > carried.count("1.b")


def test_layers_that_determine_no_later_one_are_priced_together(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`1.c` (the residual branch: `3` also reads the skip) and `3` determine no later chosen
    layer, so the regression phase prices their refinement in one wave: one Gauss-Newton solve
    through the decoder for both, not one each."""
    d = 4
    mu, lv = gaussian_case(d=d, n=300, kl=4.0, sigma=math.exp(-4.0 / d))
    calls: list[list[str]] = []
    real_refine = run_module.refine

    def counting(feats_of, shape, names, r, h, steps, nearest):  # type: ignore[no-untyped-def]
        calls.append(sorted({n.split("/")[-1] for n in names}))
        return real_refine(feats_of, shape, names, r, h, steps, nearest)

    monkeypatch.setattr(run_module, "refine", counting)
    ds.inspect(
        vae_for(mu, lv, _decoder(d, 8)), index_data(300), layers=["1.c", "3"], random_inits=0,
        seeds=1,
    )  # fmt: skip
    assert calls[0] == ["1.c", "3"]
