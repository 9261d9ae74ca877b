"""Training machinery: per-critic best parameters for early stopping."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from decoderscope.estimators.train import _BestKeeper


def test_best_keeper_keeps_each_members_best_parameters() -> None:
    critic = nn.Module()
    critic.w = nn.Parameter(torch.tensor([[1.0, 1.0], [2.0, 2.0]]))  # members 0 and 1
    keeper = _BestKeeper([SimpleNamespace(critic=critic)])  # type: ignore[list-item]
    with torch.no_grad():
        critic.w.copy_(torch.tensor([[3.0, 3.0], [4.0, 4.0]]))  # trained before the first check
    assert keeper.update([torch.tensor([1.0, 1.0])], tol=0.1)  # first check: saves as they are
    with torch.no_grad():
        critic.w.copy_(torch.tensor([[5.0, 5.0], [6.0, 6.0]]))
    # member 0 improves by less than tol (saved, but not counted); member 1 gets worse
    assert not keeper.update([torch.tensor([0.95, 1.5])], tol=0.1)
    with torch.no_grad():
        critic.w.copy_(torch.tensor([[7.0, 7.0], [8.0, 8.0]]))
    keeper.restore()
    assert torch.equal(critic.w, torch.tensor([[5.0, 5.0], [4.0, 4.0]]))


def test_inverse_blur_above_threshold_is_diagnosed() -> None:
    from decoderscope.diagnostics import BLUR_WARNING, diagnose
    from decoderscope.report import Estimate, Exact, LayerResult, VariantResult

    est = Estimate(1.0, 0.01, 3)
    latent = LayerResult("latent", "latent", (4,), est, est, est, exact=Exact(1.0, 0.0, 1.0))

    def row(name: str, blur: float) -> LayerResult:
        return LayerResult(name, "Linear", (4,), est, est, est, inverse_blur=blur)

    variant = VariantResult(
        "trained", 3, (latent, row("0", BLUR_WARNING / 2), row("1", 2 * BLUR_WARNING))
    )
    found = [d for d in diagnose([variant], 1000) if "learned inverse" in d.message]
    assert [d.layer for d in found] == ["1"]
    assert "blur worth 0.50 nats" in found[0].message


def test_inverse_blur_is_reported_and_survives_json() -> None:
    import decoderscope as ds
    from tests.helpers import gaussian_case, index_data, vae_for

    mu, lv = gaussian_case(d=4, n=200, kl=2.0)
    dec = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    settings = ds.Settings(steps=60, regression_steps=100, eval_samples=512, pair_samples=128)
    report = ds.inspect(
        vae_for(mu, lv, dec), index_data(200), random_inits=0, seeds=1, settings=settings
    )
    rows = report.variant("trained").layers
    assert rows[1].inverse_blur is not None and rows[1].inverse_blur < 0.05  # a linear layer
    assert rows[2].inverse_blur is not None and rows[2].inverse_blur > rows[1].inverse_blur
    assert ds.Report.from_json(report.to_json()) == report


class _Scale(nn.Module):
    """A module with parameters of its own and no reset_parameters()."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((4, 4), 0.5))
        self.bias = nn.Parameter(torch.full((4,), 2.0))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.weight + self.bias


def test_reinit_fallback_for_modules_without_reset_parameters() -> None:
    from decoderscope.reinit import reinitialised

    dec = nn.Sequential(nn.Linear(4, 4), _Scale())
    before = {k: v.clone() for k, v in dec.state_dict().items()}
    state = torch.random.get_rng_state()
    copy, fallback = reinitialised(dec, seed=3)
    assert fallback == ["1"]
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    for k, v in dec.state_dict().items():
        assert torch.equal(v, before[k])  # the original is untouched
    w, b = copy[1].weight.detach(), copy[1].bias.detach()
    assert not torch.equal(w, before["1.weight"]) and not torch.equal(b, before["1.bias"])
    assert float(w.abs().max()) <= 0.5 + 1e-6  # Kaiming-uniform(a=sqrt(5)): bound 1/sqrt(4)
    assert float(b.abs().max()) <= 0.5 + 1e-6  # uniform(+-1/sqrt(4))
    again, _ = reinitialised(dec, seed=3)
    assert torch.equal(again[1].weight, w)  # seeded


def test_reinit_fallback_is_diagnosed_in_the_report() -> None:
    import decoderscope as ds
    from tests.helpers import gaussian_case, index_data, vae_for

    mu, lv = gaussian_case(d=4, n=100, kl=2.0)
    settings = ds.Settings(steps=20, regression_steps=20, eval_samples=256, pair_samples=64)
    report = ds.inspect(
        vae_for(mu, lv, nn.Sequential(nn.Linear(4, 4), _Scale())),
        index_data(100),
        random_inits=1,
        seeds=1,
        settings=settings,
    )
    notes = [d for d in report.diagnostics if "fallback" in d.message]
    assert len(notes) == 1 and notes[0].variant == "random" and notes[0].layer == "1"
