"""Folding layers read from their preimages (`estimators/preimages.py`) against exact truth."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch
from torch import nn

import decoderscope as ds
from decoderscope.estimators import search as search_module
from decoderscope.estimators.cost import row_flops
from decoderscope.estimators.exact import exact_latent
from decoderscope.estimators.preimages import (
    MIN_COVERAGE,
    PREIMAGE_PHASE,
    STABLE,
    Bank,
    Found,
    aggregate_terms,
    check,
    own_terms,
    values,
)
from decoderscope.estimators.search import (
    Solutions,
    gram_eigenvalues,
    rank_deficient,
    reading_flops,
    search,
    weigh,
)
from decoderscope.sampling import Posterior
from decoderscope.testing import (
    fold_truth,
    folded_truth,
    gaussian_case,
    index_data,
    vae_for,
    within,
)


def _abs_found(z: torch.Tensor) -> Found:
    """Every preimage of h = |z| [A, d]: all 2^d sign patterns, |det J| = 1."""
    d = z.shape[1]
    signs = 1.0 - 2.0 * (torch.arange(2**d).unsqueeze(1).bitwise_right_shift(torch.arange(d)) & 1)
    pre = z.abs().double().unsqueeze(1) * signs.double()  # [A, 2^d, d]
    log_weight = -0.5 * pre.pow(2).sum(2)
    return Found(pre, log_weight)


def test_sums_over_all_preimages_are_exact() -> None:
    """Given every preimage, the sums are the exact log-ratios: h = |z| in 3 dimensions (8
    preimages each) against the folded-normal truth."""
    mu, lv = gaussian_case(d=3, n=200, kl=4.0, sigma=0.4, seed=2)
    g = torch.Generator().manual_seed(5)
    idx = torch.randint(200, (6000,), generator=g)
    z = mu[idx] + (0.5 * lv[idx]).exp() * torch.randn(6000, 3, generator=g)
    found = _abs_found(z)
    own = own_terms(found, mu[idx], lv[idx])
    agg = aggregate_terms(_abs_found(z[:2000]), mu, lv)
    kl, agg_kl, mi = folded_truth(mu, lv)
    assert abs(float(own.mean()) - kl) < 0.05
    assert abs(float(agg.mean()) - agg_kl) < 0.05
    assert abs(float((own[:2000] - agg).mean()) - mi) < 0.05
    # one preimage only (the sample's own z): the latent's log-ratio, which is higher
    assert float(own_terms(found.columns([0]), mu[idx], lv[idx]).mean()) < kl + 1e-9
    alone = Found(z.double().unsqueeze(1), found.log_weight[:, :1])
    assert float(own_terms(alone, mu[idx], lv[idx]).mean()) > kl + 0.5


# (seed, bias shift) of the Linear before the fold, d = 6 at KL 5: the GELU layer loses 0.39
# nats (5.7 preimages found per value), the SiLU one 0.02 (1.6; its second preimages are
# improbable, so the sums must weight them right; a critic read such a layer 0.5-0.8 low).
# Folding harder (GELU, shift -0.5: 10 preimages, loses 0.65) the search without the own z and
# hops missed some and the check failed, leaving it to a critic
FOLDING = {"gelu": (9, -0.25), "silu": (9, 0.0)}
HARDER = -0.5


def _folding_linear(d: int, act: str, shift: float | None = None) -> nn.Linear:
    seed, usual = FOLDING[act]
    shift = usual if shift is None else shift
    torch.manual_seed(seed)
    lin = nn.Linear(d, d)
    with torch.no_grad():
        lin.bias += shift
    return lin


def _truth(mu: torch.Tensor, lv: torch.Tensor, lin: nn.Linear, act: str) -> tuple[float, ...]:
    return fold_truth(mu, lv, lin.weight.detach(), lin.bias.detach(), act, 4000, 1000)


@pytest.mark.parametrize("shift", [None, HARDER])
def test_search_reads_a_gelu_layer(shift: float | None) -> None:
    """v = GELU(W z + b), d = 6 at KL 5 (many values have several preimages; more with the
    harder fold): the check passes and the values agree with the enumerated truth within
    max(0.15, 5%)."""
    d = 6
    mu, lv = gaussian_case(d=d, n=500, kl=5.0, sigma=math.exp(-5.0 / d), seed=3)
    lin = _folding_linear(d, "gelu", shift)
    post = Posterior(mu, lv)

    def feats_of(z: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"v": nn.functional.gelu(lin(z))}

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        bank = Bank(feats_of, "v", post, g)
        result = check(feats_of, "v", bank, post, g)
        assert result.passed, result
        assert result.preimages > 1.2  # it does fold
        exact = exact_latent(post, 8000, g)
        got = values(feats_of, "v", bank, post, 2048, 512, g, exact)
    truth = _truth(mu, lv, lin, "gelu")
    assert truth[0] < exact.kl - 0.3  # the folds lose information
    for est, want in zip((got.kl, got.aggregate_kl, got.mi), truth, strict=True):
        assert within(est, want), (got, truth)
    assert got.preimage_coverage is not None and got.preimage_coverage >= MIN_COVERAGE


def test_singular_solutions_are_not_preimages() -> None:
    """h = (z_0, relu(z_1)) at h = (0.3, 0): every z_1 <= 0 solves it, J is singular there, and
    1 / vol J is infinite, so such a solution must not count (it once swamped every true
    preimage's weight, by e^180). At h = (0.3, 0.5) the one preimage counts with J = I. A
    singular solution hides no other: (0.3, 0.004), within SAME of the singular (0.3, -0.001),
    is weighed in its place."""

    def feats_of(z: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"h": torch.stack([z[:, 0], torch.relu(z[:, 1])], dim=1)}

    target = torch.tensor([[0.3, 0.0], [0.3, 0.5]])
    start = torch.tensor([[0.3, -1.0], [0.2, 0.4]])
    found = weigh(feats_of, (2,), "h", 2, search(feats_of, (2,), "h", target, start.unsqueeze(1)))
    assert found.log_weight[0, 0] == -math.inf
    assert torch.allclose(found.z[1, 0], torch.tensor([0.3, 0.5], dtype=torch.float64), atol=1e-5)
    assert float(found.log_weight[1, 0]) == pytest.approx(-0.5 * (0.3**2 + 0.5**2), abs=1e-5)
    near = torch.tensor([[[0.3, -0.001], [0.3, 0.004]]], dtype=torch.float64)
    found = weigh(feats_of, (2,), "h", 2, Solutions(near, torch.ones(1, 2, dtype=torch.bool)))
    assert found.log_weight[0, 0] == -math.inf
    assert float(found.log_weight[0, 1]) == pytest.approx(-0.5 * (0.3**2 + 0.004**2), abs=1e-6)


def test_only_distinct_solutions_are_weighed(monkeypatch: pytest.MonkeyPatch) -> None:
    """`weigh` decomposes J^T J only at the solutions it keeps, and keeps what weighing every
    solution and then dropping duplicates keeps, with the same weights: a GELU layer on d = 6
    from 20 starts per value (half land on a preimage found before)."""
    lin = _folding_linear(6, "gelu", HARDER)

    def feats_of(z: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"v": nn.functional.gelu(lin(z))}

    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        h = feats_of(torch.randn(64, 6, generator=g))["v"]
        sol = search(feats_of, (6,), "v", h, torch.randn(64, 20, 6, generator=g))
    rows = sol.ok.nonzero(as_tuple=True)
    eig = gram_eigenvalues(feats_of, (6,), "v", sol.z[rows], 6)
    every = torch.full(sol.ok.shape, -math.inf, dtype=torch.float64)
    every[rows] = torch.where(
        rank_deficient(eig),
        -math.inf,
        -0.5 * sol.z[rows].pow(2).sum(1) - 0.5 * eig.log().sum(1),
    )
    want = Found(sol.z, every).distinct()
    decomposed = []

    def counting(*args: object) -> torch.Tensor:
        decomposed.append(args[3].shape[0])  # type: ignore[attr-defined]
        return gram_eigenvalues(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(search_module, "gram_eigenvalues", counting)
    got = weigh(feats_of, (6,), "v", 6, sol)
    assert torch.equal(got.log_weight.isfinite(), want.log_weight.isfinite())
    kept = want.log_weight.isfinite()
    assert torch.allclose(got.log_weight[kept], want.log_weight[kept], rtol=0, atol=1e-9)
    assert int(kept.sum()) < 0.6 * int(sol.ok.sum())  # duplicates: ~7.5 preimages per value
    assert sum(decomposed) == int(kept.sum())  # no rank-deficient one here: one pass


def test_check_rejects_many_equal_preimages() -> None:
    """|z| has 2^d equally probable preimages per value. At d = 8 (256) the search finds a
    quarter of the samples' z unaided, and doubling the starts finds more preimages, lowering
    p(h)'s estimate: the change test fails. At d = 16 (65536) it finds z for few samples: the
    coverage test fails at once."""

    def feats_of(z: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"h": z.abs()}

    for d, failing in ((8, "change"), (16, "coverage")):
        mu, lv = gaussian_case(d=d, n=300, kl=4.0, sigma=0.5, seed=1)
        post = Posterior(mu, lv)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            result = check(feats_of, "h", Bank(feats_of, "h", post, g), post, g)
        assert not result.passed
        if failing == "change":
            assert result.coverage >= MIN_COVERAGE, result
            assert result.change < 0 and abs(result.change) + 2 * result.change_se > STABLE
        else:
            assert result.coverage < MIN_COVERAGE and math.isinf(result.change), result


def _silu_case() -> tuple[ds.VAE, torch.Tensor, torch.Tensor, torch.Tensor, nn.Sequential]:
    """Linear(6, 6), SiLU, Linear(6, 6) on posteriors of KL 5, N = 500: the VAE, its data, the
    posteriors' mu and logvar, and the decoder."""
    d = 6
    mu, lv = gaussian_case(d=d, n=500, kl=5.0, sigma=math.exp(-5.0 / d), seed=3)
    dec = nn.Sequential(_folding_linear(d, "silu"), nn.SiLU(), nn.Linear(d, d))
    return vae_for(mu, lv, dec), index_data(500), mu, lv, dec


def _inspect_silu(
    settings: ds.Settings,
) -> tuple[ds.Report, torch.Tensor, torch.Tensor, nn.Sequential]:
    """`inspect` of layer 2 of `_silu_case`'s decoder (one seed): the report, the posteriors'
    mu and logvar, and the decoder."""
    vae, data, mu, lv, dec = _silu_case()
    rep = ds.inspect(
        vae,
        data,
        layers=["2"],
        random_inits=0,
        seeds=1,
        device="cpu",
        settings=settings,
        progress=False,
    )
    return rep, mu, lv, dec


def test_inspect_reads_folding_layers_from_preimages() -> None:
    """Through `inspect`: a Linear-SiLU-Linear decoder's last layer is read from its preimages
    (row.preimages, an info diagnostic, no blur warning) and matches the truth."""
    rep, mu, lv, dec = _inspect_silu(ds.Settings(eval_samples=2048))
    row = rep.variant("trained").layer("2")
    assert row.preimages is not None and row.preimage_coverage is not None
    assert row.preimage_coverage > 0.95
    assert row.critic_accuracy is None and row.inverse_blur is None
    truth = _truth(mu, lv, dec[0], "silu")
    for est, want in zip((row.kl, row.aggregate_kl, row.mi), truth, strict=True):
        assert within(est.mean, want), (row, truth)
    assert any("folding layers" in x.message for x in rep.diagnostics)
    assert not any(x.layer == "2" and "blur" in x.message for x in rep.diagnostics)
    assert ds.Report.from_json(rep.to_json()) == rep


def test_a_folding_layer_is_checked_once_its_refinement_is_settled_and_its_r_stops(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A re-initialised copy of the demo's decoder: its GELU layer `2` folds, so the refinement
    lands on other preimages and is settled `unrefinable` at the phase's first try (check 0,
    from R's least-squares start). The layer is checked there, once, and passes; its R(h) then
    stops fitting, so the regression phase ends at that check, before any step (it ran 2500
    steps when the check came after the phase). The check and the readings report progress."""
    from decoderscope import pipeline
    from decoderscope.demo import DemoVAE, train_demo
    from decoderscope.estimators import plan

    checked: list[str] = []
    real_check = plan.check

    def counted(feats_of, name, *args, **kwargs):  # type: ignore[no-untyped-def]
        checked.append(name)
        return real_check(feats_of, name, *args, **kwargs)

    monkeypatch.setattr(plan, "check", counted)
    steps: list[tuple[str, int, int]] = []

    @contextmanager
    def recorded(_enabled: bool) -> Iterator[Callable[[str], Callable[[str, int, int], None]]]:
        yield lambda _label: lambda *step: steps.append(step)

    monkeypatch.setattr(pipeline, "_progress", recorded)
    model, data = train_demo(0, steps=300)
    torch.manual_seed(1)
    model.decoder = DemoVAE().decoder
    settings = ds.Settings(eval_samples=512)
    rep = ds.inspect(
        model, data, layers=["2"], random_inits=0, seeds=2, device="cpu", settings=settings,
    )  # fmt: skip
    assert rep.variant("trained").layer("2").method == "preimages"
    assert checked == ["0/2"]  # decoder 0's layer `2`
    assert rep.settings["regression_steps_run"] == 0
    # the check (one layer) and the preimage readings (one per seed) show as phases of their own
    assert [s for s in steps if s[0] == plan.FOLD_PHASE] == [
        (plan.FOLD_PHASE, 0, 1),
        (plan.FOLD_PHASE, 1, 1),
    ]
    assert [s for s in steps if s[0] == PREIMAGE_PHASE] == [
        (PREIMAGE_PHASE, 1, 2),
        (PREIMAGE_PHASE, 2, 2),
    ]


def test_row_flops_counts_the_decoder_pass() -> None:
    """Two Linear(6, 6) maps: 2 x 6 x 6 multiply-adds each per row, the SiLU between is free."""
    dec = nn.Sequential(nn.Linear(6, 6), nn.SiLU(), nn.Linear(6, 6))
    assert row_flops(lambda z: {"2": dec(z)}, "2", (6,), torch.device("cpu")) == 144
    # each of the 1 + 2 + 1 + 2 x 2 x 4 x 2 x 4 = 141 starts of a sample: 30 steps of 6 copies
    assert reading_flops(6, 6, 144, 10) == 10 * 141 * 30 * 6 * 144


def test_costly_preimage_search_is_left_to_the_critic() -> None:
    """A folding layer whose search would take more than `preimage_flops` is not searched: its
    critic reads it, the row carries the projected FLOPs, and an info line says why."""
    d = 6
    rep = _inspect_silu(ds.Settings(preimage_flops=1e9))[0]
    row = rep.variant("trained").layer("2")
    assert row.method == "critic" and row.preimages is None
    # the decoder's own pass (144 FLOPs a row) over one reading and the check, whitening aside
    assert row.preimage_flops is not None
    assert row.preimage_flops >= reading_flops(d, d, 144, 2 * 1024) > 1e9
    note = next(x.message for x in rep.diagnostics if "preimage_flops" in x.message)
    assert f"2 ({row.preimage_flops:.1e})" in note
    assert ds.Report.from_json(rep.to_json()) == rep
    with pytest.raises(ds.ArgumentError, match="preimage_flops must be a positive number, got 0"):
        ds.Settings(preimage_flops=0)
