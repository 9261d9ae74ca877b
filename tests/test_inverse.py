"""Gauss-Newton refinement of the learned inverse through the decoder (`estimators.inverse`)."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import cast

import pytest
import torch
from torch import nn

import decoderscope as ds
from decoderscope.estimators import inverse, refinement
from decoderscope.estimators import run as run_module
from decoderscope.estimators.groups import Members
from decoderscope.estimators.inverse import refine
from decoderscope.estimators.jacobian import jacobians, reverse_mode
from decoderscope.sampling import Posterior
from decoderscope.taps import tapped
from decoderscope.testing import (
    Fold,
    OpaqueLeaky,
    gaussian_case,
    index_data,
    leaky_mlp,
    vae_for,
    within,
)


def _leaky_chain(d: int, seed: int) -> nn.Module:
    """Its activations hidden from the graph: read through the refined inverse, not as a chain
    known injective (tests/test_units.py checks that reading)."""
    torch.manual_seed(seed)
    return leaky_mlp(d, 2, opaque=True)


def test_gauss_newton_inverts_an_injective_leaky_relu_chain() -> None:
    # two LeakyReLUs deep, square random layers: locally ill-conditioned, so a regression R(h)
    # is imprecise there (squared error ~0.1 per unit); the decoder's own Jacobians are exact
    dec = _leaky_chain(16, seed=7)
    z = torch.randn(512, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h = dec(z)
    start = z + 0.3 * torch.randn(z.shape, generator=torch.Generator().manual_seed(1))
    r = refine(lambda x: {"h": dec(x)}, (16,), ["h"], start[None], h[None], steps=20)[0]
    moved = (r != start).any(dim=1)
    assert moved.float().mean() > 0.99
    assert (r[moved] - z[moved]).abs().max() < 1e-2
    # samples that did not converge keep their start
    assert torch.equal(r[~moved], start[~moved])


def _relu_mlp() -> nn.Module:
    torch.manual_seed(11)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())


@pytest.mark.parametrize("restarts", [0, inverse.RESTARTS])
def test_restarts_solve_what_a_relu_mlp_leaves_unsolved(
    restarts: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the second ReLU of a wide MLP: injective here (Jacobian of rank 16 at every sample), but
    # Gauss-Newton from a rough start (z + noise of 1.0) stalls in local minima where units
    # switched off on the way or crawls along kinks: 93.9% solved without restarts, 99.7% with
    monkeypatch.setattr(inverse, "RESTARTS", restarts)
    dec = _relu_mlp()
    z = 1.2 * torch.randn(2000, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h = dec(z)
    start = z + torch.randn(z.shape, generator=torch.Generator().manual_seed(1))
    r = refine(lambda x: {"h": dec(x)}, (16,), ["h"], start[None], h[None], steps=80)[0]
    solved = ((r - z).abs().max(dim=1).values < 1e-2).float().mean()
    if restarts:
        assert solved > 0.99
    else:
        assert solved < 0.97  # what the restarts are for


def _rows_per_call(monkeypatch: pytest.MonkeyPatch, name: str, arg: int) -> list[int]:
    """Wrap `inverse.<name>` to record the rows (first dimension) of its positional argument
    `arg` at every call; returns the list it fills."""
    rows: list[int] = []
    real = getattr(inverse, name)

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        rows.append(int(args[arg].shape[0]))
        return real(*args, **kwargs)

    monkeypatch.setattr(inverse, name, counting)
    return rows


def test_restarts_try_the_best_starts_first_and_the_rest_only_where_they_fail(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each sample's first FIRST_RESTARTS starts run first; its other starts only if those
    leave it unsolved (the diffusers AutoencoderKL: the restarts were 17% of its inspection)."""
    dec = _relu_mlp()
    z = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        target = dec(z)
    solved = _rows_per_call(monkeypatch, "solve", 4)
    feats = lambda x: {"h": dec(x)}  # noqa: E731
    member = torch.zeros(3, dtype=torch.long)
    again = inverse._Again(feats, (16,), ["h"], member, target, torch.ones(1, dtype=torch.bool),
                           torch.Generator().manual_seed(0))  # fmt: skip
    lost = torch.full((3, 5, 16), math.nan)  # starts Gauss-Newton cannot solve from
    near = z.unsqueeze(1) + 1e-3 * torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(2))
    won, at = inverse._restart(again, torch.arange(3), near)
    assert solved == [3 * inverse.FIRST_RESTARTS] and bool(won.all())
    assert torch.allclose(at, z, atol=1e-3)
    solved.clear()
    starts = torch.cat([lost[:, :2], near[:, 2:]], dim=1)  # the first two of each fail
    won, at = inverse._restart(again, torch.arange(3), starts)
    assert solved == [6, 9] and bool(won.all())
    assert torch.allclose(at, z, atol=1e-3)


def test_a_step_that_settles_a_sample_needs_no_confirming_jacobian_pass(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Near a solution of a smooth decoder the Jacobian just used gives the confirming step:
    the same solutions with fewer Jacobian passes."""
    torch.manual_seed(3)
    dec = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh())
    z = torch.randn(256, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h = dec(z)
    start = z + 0.1 * torch.randn(z.shape, generator=torch.Generator().manual_seed(1))
    rows = _rows_per_call(monkeypatch, "jacobians", 3)
    got = {}
    for predict in (False, True):
        rows.clear()
        member = torch.zeros(256, dtype=torch.long)
        jitter = torch.Generator().manual_seed(0)
        out, done, _ = inverse.solve(
            lambda x: {"h": dec(x)}, (8,), ["h"], member, start, h, 40, jitter, predict
        )
        got[predict] = (out, done, sum(rows))
    assert bool(got[True][1].all()) and bool(got[False][1].all())
    assert (got[True][0] - z).abs().max() < 1e-4
    assert (got[True][0] - got[False][0]).abs().max() < 1e-4
    assert got[True][2] <= 0.8 * got[False][2]


def test_gauss_newton_finds_a_preimage_not_the_latent_on_a_folding_layer() -> None:
    # h = |z| loses every sign: from a start of the wrong sign the iteration converges to the
    # wrong preimage, which is why the estimator uses the refinement only where it measurably
    # locates z better than R(h)
    z = torch.randn(256, 4, generator=torch.Generator().manual_seed(0)) + 2.0
    r = refine(lambda x: {"h": x.abs()}, (4,), ["h"], -0.9 * z[None], z.abs()[None], steps=8)[0]
    assert torch.allclose(r, -z, atol=1e-4)


def test_deep_leaky_relu_chain_reads_the_latent_values_at_every_layer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # injective, so every layer holds the latent's values; without the refinement the held-out
    # 16-d version of this chain reads its last layer 1.0 nats low (KL 7.7), far outside the
    # stated tolerance checked here
    mu, lv = gaussian_case(d=8, n=400, kl=6.0, sigma=math.exp(-6.0 / 8))
    dec = _leaky_chain(8, seed=4)
    refined_rows = _count_evaluation_refinement(monkeypatch)
    report = ds.inspect(
        vae_for(mu, lv, dec), index_data(400), random_inits=0, seeds=1, device="cpu"
    )
    # the evaluation refines the first refined_samples of 4096, once (fewer than the pair
    # samples: the layer's MI terms are read on those rows too);
    # the accuracy diagnostic does not refine the rows of layers read as `inverse`; layer `2`,
    # which `4` reads z through alone, holds the latent's values as `4` does (`plan.imply`)
    settings = ds.Settings()
    assert refined_rows == {"4": settings.refined_samples}
    assert _accuracy_left_out(report, ("4",))
    trained = report.variant("trained")
    assert trained.layer("2").method == "injective"
    exact = trained.layer("latent").exact
    assert exact is not None
    for name in ("0", "2", "4"):
        row = trained.layer(name)
        for est, truth in zip(
            (row.kl, row.aggregate_kl, row.mi),
            (exact.kl, exact.aggregate_kl, exact.mi),
            strict=True,
        ):
            assert within(est.mean, truth), (name, est, truth)
    assert trained.layer("4").inverse_blur is not None
    assert trained.layer("4").inverse_blur <= 0.01


def _count_evaluation_refinement(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Rows refined through the decoder per layer during the evaluation (filled as it runs)."""
    counts: dict[str, int] = {}
    evaluating = [False]
    real_refine, real_evaluate = run_module.refine, run_module.evaluate

    def counting_refine(feats_of, shape, names, r, h, steps, nearest):  # type: ignore[no-untyped-def]
        if evaluating[0]:
            for name in names:
                key = name.split("/")[-1]
                counts[key] = counts.get(key, 0) + r.shape[1]
        return real_refine(feats_of, shape, names, r, h, steps, nearest)

    def flagged_evaluate(*args, **kwargs):  # type: ignore[no-untyped-def]
        evaluating[0] = True
        try:
            return real_evaluate(*args, **kwargs)
        finally:
            evaluating[0] = False

    monkeypatch.setattr(run_module, "refine", counting_refine)
    monkeypatch.setattr(run_module, "evaluate", flagged_evaluate)
    return counts


def _accuracy_left_out(report: ds.Report, names: tuple[str, ...]) -> bool:
    rows = [report.variant("trained").layer(n) for n in names]
    return all(r.method == "inverse" and r.critic_accuracy is None for r in rows)


def test_a_folding_layer_is_not_read_as_if_it_kept_the_latent() -> None:
    # |z| is not injective: the refinement lands on preimages of the wrong sign, prices worse
    # than R(h) and is not used, so the layer is not read at the latent's values. Its 16
    # equally probable preimages fail the preimage check too, so a critic reads it (1000 steps:
    # the default 12000 add 15-45 s or more and change nothing here)
    mu, lv = gaussian_case(d=4, n=300, kl=4.0, sigma=0.5, seed=1)
    report = ds.inspect(
        vae_for(mu, lv, Fold()),
        index_data(300),
        random_inits=0,
        seeds=1,
        device="cpu",
        settings=ds.Settings(steps=1000),
    )
    row = report.variant("trained").layer("output")
    assert row.inverse_blur is not None and row.inverse_blur > 1.0
    assert row.preimages is None
    assert row.kl.mean < report.variant("trained").layer("latent").kl.mean - 1.0


class _Doubler(torch.autograd.Function):
    """x -> 2x with a backward but no forward-mode rule (jvp)."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return 2 * x

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return 2 * grad


class _NoForwardAD(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = _Doubler.apply(x)
        return out


def test_a_decoder_without_forward_mode_ad_is_read_with_the_learned_inverse() -> None:
    mu, lv = gaussian_case(d=4, n=200, kl=3.0, sigma=0.5)
    torch.manual_seed(0)
    # 12 features > 2 x 4 latent units: the Jacobians would be taken in forward mode
    dec = nn.Sequential(nn.Linear(4, 12), nn.Tanh(), _NoForwardAD(), nn.Linear(12, 12))
    settings = ds.Settings(steps=100, eval_samples=512, pair_samples=128, regression_steps=200)
    with pytest.warns(RuntimeWarning, match="cannot run in forward-mode AD.*newton_steps=0"):
        report = ds.inspect(
            vae_for(mu, lv, dec), index_data(200), random_inits=0, seeds=1, settings=settings
        )
    assert report.variant("trained").layer("3").kl.mean > 0


def test_jacobians_match_autograd_in_reverse_and_forward_mode() -> None:
    # a layer at most as wide as the latent takes reverse mode, a wider one forward mode
    torch.manual_seed(0)
    narrow, wide = (
        nn.Sequential(nn.Linear(4, 4), nn.Tanh()),
        nn.Sequential(nn.Linear(4, 12), nn.ELU()),
    )
    assert reverse_mode(4, 4) and not reverse_mode(12, 4)
    z = torch.randn(5, 4)
    for name, net in (("narrow", narrow), ("wide", wide)):
        feats = {"narrow": lambda x: {"narrow": narrow(x)}, "wide": lambda x: {"wide": wide(x)}}[
            name
        ]
        width = net[0].out_features
        value, jt = jacobians(feats, [name], torch.zeros(5, dtype=torch.long), z, (4,), width)
        for i in range(5):
            truth = torch.autograd.functional.jacobian(net, z[i])  # [D, d]
            assert torch.allclose(jt[i], truth.T, atol=1e-5), name
        with torch.no_grad():
            assert torch.allclose(value, net(z), atol=1e-6)


class _OldStyleSoftplus(torch.autograd.Function):
    """Softplus as an autograd.Function in the old style (ctx in forward): forward-mode AD runs
    its jvp, but torch.func cannot transform it (no setup_context)."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def, override]
        ctx.save_for_forward(x)
        return nn.functional.softplus(x)

    @staticmethod
    def jvp(ctx, t):  # type: ignore[no-untyped-def, override]
        (x,) = ctx.saved_tensors
        return t * torch.sigmoid(x)


class _OldStyle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(4, 12)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return _OldStyleSoftplus.apply(self.up(z))


def test_forward_mode_jacobians_of_a_decoder_vmap_cannot_batch_take_copies() -> None:
    from decoderscope.estimators import jacobian

    torch.manual_seed(0)
    net, z = _OldStyle(), torch.randn(5, 4)
    with tapped(net, ["output"]) as tap:
        _, jt = jacobians(tap, ["output"], torch.zeros(5, dtype=torch.long), z, (4,), 12)
    assert tap in jacobian._UNBATCHED  # tried once, then copies from the start
    with torch.no_grad():
        slope = torch.sigmoid(net.up(z))  # [5, 12]
    for i in range(5):
        truth = slope[i].unsqueeze(1) * net.up.weight  # [D, d]
        assert torch.allclose(jt[i], truth.T, atol=1e-5)


class _Attention(nn.Module):
    """Self-attention over 4 tokens of 3 features made from z: a fused CPU kernel by default,
    which has no forward-mode derivative."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(4, 12)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.up(z).view(-1, 1, 4, 3)  # [batch, heads, tokens, features]
        return nn.functional.scaled_dot_product_attention(x, x, x).flatten(1)


def test_forward_mode_jacobians_run_through_attention() -> None:
    torch.manual_seed(0)
    net, z = _Attention(), torch.randn(5, 4)
    value, jt = jacobians(
        lambda x: {"a": net(x)}, ["a"], torch.zeros(5, dtype=torch.long), z, (4,), 12
    )
    for i in range(5):
        truth = torch.autograd.functional.jacobian(net, z[i : i + 1])[0, :, 0]  # [D, d]
        assert torch.allclose(jt[i], truth.T, atol=1e-5)


class _StridedNorm(nn.Module):
    """A GroupNorm fed a permuted (non-contiguous) tensor, as diffusers' AutoencoderKL feeds one
    after its attention block."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.norm = nn.Linear(4, 32), nn.GroupNorm(2, 4)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.norm(self.up(z).view(-1, 2, 4, 4).permute(0, 3, 1, 2))


def test_forward_mode_jacobians_run_through_a_group_norm_of_a_strided_input() -> None:
    torch.manual_seed(0)
    net, z = _StridedNorm(), torch.randn(5, 4)
    with tapped(net, ["norm"]) as tap:
        _, jt = jacobians(tap, ["norm"], torch.zeros(5, dtype=torch.long), z, (4,), 32)
    for i in range(5):
        truth = torch.autograd.functional.jacobian(net, z[i : i + 1])  # [1, 4, 2, 4, 1, 4]
        assert torch.allclose(jt[i], truth.reshape(32, 4).T, atol=1e-5)
    assert all(not m._forward_pre_hooks for m in net.modules())


def test_refined_runs_are_reproducible_and_leave_the_callers_rng_alone() -> None:
    mu, lv = gaussian_case(d=4, n=100, kl=3.0, sigma=0.5)
    dec = nn.Sequential(nn.Linear(4, 4), OpaqueLeaky(), nn.Linear(4, 4))
    settings = ds.Settings(eval_samples=512, pair_samples=128, regression_steps=400)

    def run() -> ds.Report:
        return ds.inspect(
            vae_for(mu, lv, dec),
            index_data(100),
            random_inits=0,
            seeds=1,
            seed=3,
            device="cpu",
            settings=settings,
        )

    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    first = run()
    assert torch.equal(torch.rand(3), expected)
    blur = first.variant("trained").layer("2").inverse_blur
    assert blur is not None and blur <= 0.01  # the refined inverse was used
    assert run().to_json() == first.to_json()


def test_a_refinement_that_settles_nothing_is_tried_again_only_once_r_improves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A member whose refined inverse prices better than R(h) but not within regression_tol is
    priced again only after R's price has fallen by more than regression_tol (a refinement
    starts from R(h)); one within tol is refined and never tried again."""
    post = Posterior(torch.zeros(8, 4), torch.zeros(8, 4))
    settings = ds.Settings()
    tol = settings.regression_tol
    g = cast(
        Members,
        SimpleNamespace(
            keys=[("a", 0), ("b", 0)],
            width=4,
            refiner=lambda *args: None,
            refined=set(),
            unrefinable=set(),
            tried={},
        ),
    )
    priced: list[list[int]] = []

    def fake_price(g_: Members, chosen: list[int], *args: object) -> torch.Tensor:
        priced.append(chosen)
        return torch.tensor([{0: 0.2, 1: 0.5 * tol}[k] for k in chosen])

    monkeypatch.setattr(refinement, "_refined_price", fake_price)
    prices = torch.tensor([2.0, 1.0])
    refinement.try_refinement(g, prices, [], post, settings, 1, 8)
    assert priced == [[0, 1]] and g.refined == {("b", 0)} and g.tried == {("a", 0): 2.0}
    assert float(prices[1]) == pytest.approx(0.5 * tol)  # the refined member takes its price
    for r_price, again in ((2.0 - 0.5 * tol, False), (2.0 - 2 * tol, True)):
        prices = torch.tensor([r_price, 0.5 * tol])
        assert refinement.refinable(g, prices, post, settings) == ([0] if again else [])


def test_samples_left_unsolved_restart_from_the_nearest_bank_draws(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Samples whose start lies deep in tanh's flat tail are left unsolved; given `nearest`
    (latent draws whose values lie near h: here stand-ins near the preimage), it restarts from
    them and are solved. The neighbour restarts are off, so the bank's are what solves them."""
    monkeypatch.setattr(inverse, "RESTARTS", 0)
    torch.manual_seed(0)
    z = torch.randn(64, 2)

    def feats_of(x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"h": torch.tanh(x)}

    h = feats_of(z)["h"]
    start = z + 0.05 * torch.randn(64, 2)
    start[:3] = 8.0  # three starts in the flat tail (slope ~1e-7)
    alone = refine(feats_of, (2,), ["h"], start[None], h[None], 80)[0]
    unsolved = int(((alone - z).abs().amax(1) > 1.0).sum())
    assert unsolved >= 2  # (z > 0 is reached from 8: the tail's slope points the right way)
    asked: list[list[str]] = []

    def nearest(layers: list[str], hh: torch.Tensor) -> torch.Tensor:
        asked.append(list(layers))
        return torch.atanh(hh).unsqueeze(1) + 0.3 * torch.randn(hh.shape[0], 2, 2)

    both = refine(feats_of, (2,), ["h"], start[None], h[None], 80, nearest)[0]
    assert asked == [["h"] * unsolved]
    assert torch.allclose(both, z, atol=1e-3)


def test_a_square_jacobians_step_is_the_normal_equations_step_and_a_singular_one_falls_back() -> (
    None
):
    """J^-1 res by LU where J is square: the normal equations' step where J is well
    conditioned; a singular J (LU fails) still gets the damped normal equations' finite step."""
    from decoderscope.estimators.newton import newton_step, normal_step

    g = torch.Generator().manual_seed(0)
    d = 6
    q, _ = torch.linalg.qr(torch.randn(8, d, d, generator=g))
    jt = q * torch.linspace(1.0, 3.0, d)  # singular values 1..3
    res = torch.randn(8, d, generator=g)
    eye = torch.eye(d, dtype=torch.float64)
    step = newton_step(jt, res, eye)
    assert torch.allclose(step, normal_step(jt, res, eye), atol=1e-5)
    assert torch.allclose(jt.transpose(1, 2) @ step.unsqueeze(2), res.unsqueeze(2), atol=1e-5)
    jt[0, :, 0] = 0.0  # J's first row zero: singular
    jt[0, 0] = 0.0
    step = newton_step(jt, res, eye)
    assert step.isfinite().all()
    assert torch.allclose(step[0], normal_step(jt[:1], res[:1], eye)[0])
    rect = torch.randn(3, d, d + 2, generator=g)  # wider than the latent: normal equations
    r = torch.randn(3, d + 2, generator=g)
    assert torch.equal(newton_step(rect, r, eye), normal_step(rect, r, eye))


def test_the_evaluations_refined_batches_are_a_progress_phase_of_their_own() -> None:
    """Rows refined through the decoder cost far more than the rest: the batches that refine
    (the first max(pair_samples, refined_samples) rows with the exact control variate, every
    batch without it) and the others are separate phases, so each one's time left is read
    from batches like it."""
    from decoderscope.estimators.evaluate import EVAL_PHASE, REFINED_PHASE, _reporter

    settings = ds.Settings(eval_samples=1024, pair_samples=256, refined_samples=512)
    run = SimpleNamespace(settings=settings)  # batches of 256: 4, the first 2 refined
    refined = [SimpleNamespace(refined={("1", 0)})]
    steps: list[tuple[str, int, int]] = []

    def record(phase: str, done: int, total: int) -> None:
        steps.append((phase, done, total))

    for groups, exact, want in (
        (refined, object(), [(REFINED_PHASE, 1, 2), (REFINED_PHASE, 2, 2), (EVAL_PHASE, 1, 2)]),
        (refined, None, [(REFINED_PHASE, k, 4) for k in (1, 2, 3)]),
        ([SimpleNamespace(refined=set())], object(), [(EVAL_PHASE, k, 4) for k in (1, 2, 3)]),
    ):
        steps.clear()
        report = _reporter(run, groups, exact, record)  # type: ignore[arg-type]
        for k in range(3):
            report(k)
        assert steps == want


def test_a_layer_too_wide_to_whiten_is_still_solved_through_the_decoder(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A 640-wide layer of rank above WHITEN_MAX_WIDTH is standardised, not whitened; it is
    refined all the same (SOLVE_MAX_WIDTH) and read at the latent's values. Refined only on
    whitened layers it went to a critic: KL 5.92 against 6.00, 37 s instead of 3. Its critic
    group (it alone) reads no KL term past the refined rows, so the critic runs on the
    evaluation's first batch and the accuracy diagnostic's rows, not on all 16 batches."""
    torch.manual_seed(0)
    d = 8
    dec = nn.Sequential(
        nn.Linear(d, 16), OpaqueLeaky(), nn.Linear(16, 640), OpaqueLeaky(), nn.Linear(640, 640)
    )
    mu, lv = gaussian_case(d=d, n=300, kl=6.0, sigma=math.exp(-6.0 / d))
    reads: list[int] = []  # critic readings of the group holding layer `4`
    real_logits = Members.logits

    def counted(g, *args, **kwargs):  # type: ignore[no-untyped-def]
        reads.extend(1 for name, _ in g.keys if name.endswith("/4"))
        return real_logits(g, *args, **kwargs)

    monkeypatch.setattr(Members, "logits", counted)
    report = ds.inspect(
        vae_for(mu, lv, dec), index_data(300), layers=["4"], random_inits=0, seeds=1, device="cpu"
    )
    assert 0 < len(reads) <= 2
    trained = report.variant("trained")
    row, exact = trained.layer("4"), trained.layer("latent").exact
    assert exact is not None
    assert row.method == "inverse" and row.inverse_blur is not None and row.inverse_blur <= 0.01
    for est, truth in zip(
        (row.kl, row.aggregate_kl, row.mi), (exact.kl, exact.aggregate_kl, exact.mi), strict=True
    ):
        assert within(est.mean, truth, share=0.1), (est, truth)
