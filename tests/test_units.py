"""Unit tests of the small pieces every estimate rests on: bridge levels and their samples, the
whitening maps, pooling over runs, the random streams, and the planning step's choice of
reader."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

import decoderscope as ds
from decoderscope.estimators.whitening import (
    WHITEN_MAX_WIDTH,
    Standardize,
    Whiten,
    fit_map,
)
from decoderscope.sampling import (
    Posterior,
    bridge_grid,
    expected_log_bridge,
    sample_levels,
    stream_seed,
)
from decoderscope.testing import OpaqueLeaky, gaussian_case, index_data, vae_for


def test_bridge_grid_splits_the_latent_kl_evenly() -> None:
    mu, logvar = gaussian_case(d=8, n=400, kl=9.0, seed=2)
    post = Posterior(mu, logvar)
    grid = bridge_grid(post, nats_per_bridge=2.0, max_bridges=16)
    assert grid[0] == 0.0 and grid[-1] == 1.0
    assert len(grid) - 1 == math.ceil(9.0 / 2.0)  # 9 nats, 2 per bridge: 5 heads
    assert all(a < b for a, b in zip(grid, grid[1:], strict=False))
    phi = [float(expected_log_bridge(a, mu.double(), logvar.double()).mean()) for a in grid]
    shares = [b - a for a, b in zip(phi, phi[1:], strict=False)]
    assert sum(shares) == pytest.approx(9.0, abs=1e-3)  # phi(1) - phi(0) is the KL
    assert max(shares) - min(shares) < 1e-6
    assert len(bridge_grid(post, 0.1, 4)) == 5  # capped at max_bridges


def test_sample_levels_draws_the_prior_and_the_posterior_at_the_ends() -> None:
    mu = torch.tensor([[2.0, -1.0]]).expand(50000, 2)
    logvar = torch.tensor([[math.log(0.25), 0.0]]).expand(50000, 2)
    levels = torch.tensor([0.0, 0.5, 1.0])
    z = sample_levels(mu, logvar, levels, torch.Generator().manual_seed(0))
    assert z.shape == (3, 50000, 2)
    torch.testing.assert_close(z[0].mean(0), torch.zeros(2), atol=0.02, rtol=0)
    torch.testing.assert_close(z[0].var(0), torch.ones(2), atol=0.03, rtol=0)
    torch.testing.assert_close(z[2].mean(0), torch.tensor([2.0, -1.0]), atol=0.02, rtol=0)
    torch.testing.assert_close(z[2].var(0), torch.tensor([0.25, 1.0]), atol=0.03, rtol=0)
    # a = 0.5: mean a mu, variance a^2 sigma^2 + 1 - a^2
    torch.testing.assert_close(z[1].mean(0), torch.tensor([1.0, -0.5]), atol=0.02, rtol=0)
    torch.testing.assert_close(z[1].var(0), torch.tensor([0.8125, 1.0]), atol=0.03, rtol=0)


def test_whitening_gives_unit_covariance_and_drops_only_rounding_directions() -> None:
    g = torch.Generator().manual_seed(1)
    z = torch.randn(8192, 4, generator=g)
    h = z @ torch.randn(4, 6, generator=g) + 3.0  # rank 4 in 6 features
    white = fit_map(h)
    assert isinstance(white, Whiten) and white.rank == 4
    y = white(h)
    torch.testing.assert_close(torch.cov(y.T), torch.eye(4), atol=1e-4, rtol=0)
    assert float(y.mean(0).abs().max()) < 1e-4
    wide = torch.randn(256, WHITEN_MAX_WIDTH * 5, generator=g)  # too wide to decompose
    assert isinstance(fit_map(wide), Standardize)
    assert isinstance(fit_map(torch.randn(100, 1, generator=g)), Standardize)  # one feature


def test_estimate_pool_uses_the_spread_over_runs_or_one_runs_error() -> None:
    one = ds.Estimate.pool([2.0], [0.3])
    assert (one.mean, one.se, one.n) == (2.0, 0.3, 1)
    three = ds.Estimate.pool([1.0, 2.0, 3.0], [9.0, 9.0, 9.0])  # MC errors ignored for n > 1
    assert (three.mean, three.n) == (2.0, 3)
    assert three.se == pytest.approx(1.0 / math.sqrt(3))


def test_stream_seeds_are_stable_distinct_and_not_the_seed_itself() -> None:
    assert stream_seed(0, "run") == stream_seed(0, "run")
    assert len({stream_seed(0, "run"), stream_seed(0, "exact"), stream_seed(1, "run")}) == 3
    assert stream_seed(0, "run") != 0


CHEAP = ds.Settings(
    steps=200,
    regression_steps=400,
    eval_samples=512,
    pair_samples=128,
    exact_samples=2048,
    preimage_samples=128,
)


def _methods(build: Callable[[], nn.Module], settings: ds.Settings = CHEAP) -> dict[str, str]:
    mu, logvar = gaussian_case(d=4, n=300, kl=3.0, seed=1)
    torch.manual_seed(3)
    decoder = build()
    report = ds.inspect(
        vae_for(mu, logvar, decoder),
        index_data(300),
        layers=[n for n, _ in decoder.named_modules() if n],
        random_inits=0,
        seeds=1,
        device="cpu",
        settings=settings,
        progress=False,
    )
    return {r.name: str(r.method) for r in report.variant("trained").layers}


def test_the_plan_reads_each_layer_the_way_that_applies() -> None:
    """Linear: affine; a LeakyReLU after it: by the graph injective, so the latent's values; the
    same activation hidden from the graph: inverted exactly; a bottleneck narrower than the
    latent: a critic; a GELU layer as wide as the latent that folds: its preimages."""
    methods = _methods(
        lambda: nn.Sequential(nn.Linear(4, 4), OpaqueLeaky(), nn.Linear(4, 2), nn.ReLU())
    )
    assert methods == {
        "latent": "inverse",
        "0": "affine",
        "1": "inverse",
        "2": "critic",
        "3": "critic",
    }
    known = _methods(lambda: nn.Sequential(nn.Linear(4, 4), nn.LeakyReLU(0.2)))
    assert known == {"latent": "inverse", "0": "affine", "1": "injective"}
    folds = _methods(lambda: nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 4)))
    assert folds == {"latent": "inverse", "0": "affine", "1": "preimages", "2": "preimages"}


def test_without_early_stopping_no_layer_keeps_its_warm_start() -> None:
    settings = ds.Settings(**{**CHEAP.as_dict(), "patience": 0, "steps": 50})
    methods = _methods(lambda: nn.Sequential(nn.Linear(4, 4), OpaqueLeaky()), settings)
    assert methods == {"latent": "critic", "0": "affine", "1": "critic"}


def test_a_saturated_activation_is_not_read_as_keeping_the_latent() -> None:
    """Tanh after a full-rank Linear is injective, and read as the latent's values, while its
    float32 features still move with every latent direction; scaled so that tanh rounds to +-1
    on most samples (pre-activations ~ +-400), it no longer does (`saturation.py`)."""

    def tanh_layer(scale: float) -> nn.Module:
        layer = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
        with torch.no_grad():
            layer[0].weight.mul_(scale)
        return layer

    assert _methods(lambda: tanh_layer(1.0))["1"] == "injective"
    assert _methods(lambda: tanh_layer(400.0))["1"] not in ("injective", "affine")


def test_resolved_steps_follow_the_jacobian_and_the_rounding() -> None:
    from decoderscope.estimators.saturation import EPS32, required_steps, resolved_steps
    from decoderscope.sampling import Posterior

    post = Posterior(torch.zeros(50, 2), torch.full((50, 2), math.log(0.01)))  # std 0.1
    gen = torch.Generator().manual_seed(0)
    # h = (3 z1, 0.5 z2): the least resolved direction moves h by 0.5 * 0.1 per std, in steps
    # of eps32 (|h| < 1)
    steps = resolved_steps(lambda z: {"h": z * torch.tensor([3.0, 0.5])}, ["h"], post, gen)
    assert steps["h"] == pytest.approx(0.05 / EPS32, rel=1e-4)
    flat = resolved_steps(lambda z: {"h": z[:, :1].expand(-1, 2) * 1.0}, ["h"], post, gen)
    assert flat["h"] < 1e-3  # z2 is lost
    assert required_steps(16) == pytest.approx(math.sqrt(16 / 0.24))
