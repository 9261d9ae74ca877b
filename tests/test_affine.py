"""Layers affine in the latent: detection, and exact values against independent truth."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import decoderscope as ds
from decoderscope.estimators.affine import affine_fit, affine_values
from decoderscope.estimators.exact import exact_latent
from decoderscope.sampling import Posterior
from decoderscope.testing import gaussian_case, gaussian_linear_truth, index_data, vae_for


@pytest.mark.parametrize(("d", "k", "kl"), [(12, 5, 6.0), (64, 16, 20.0)])
def test_values_match_the_gaussian_truth(d: int, k: int, kl: float) -> None:
    # Linear(64, 16) at latent KL 20 read 4.55 / 0.15 / 4.40 with a critic (truth 4.98 / 0.41
    # / 4.57, docs/accuracy.md); the exact path has no such error
    mu, lv = gaussian_case(d=d, n=1000, kl=kl, sigma=max(math.exp(-kl / d), 0.05), seed=2)
    a = torch.randn(k, d, generator=torch.Generator().manual_seed(3))
    truth = gaussian_linear_truth(mu, lv, a, samples=50_000)  # MI to ~0.01
    post = Posterior(mu, lv)
    z = torch.randn(4096, d, generator=torch.Generator().manual_seed(4))
    fit = affine_fit((z @ a.T + 0.5).float(), z, ds.Settings().affine_tol)
    assert fit is not None and fit.rank == k
    g = torch.Generator().manual_seed(5)
    exact = exact_latent(post, 16384, g)
    for control in (exact, None):
        v = affine_values(post, fit.basis, 16384, g, control)
        assert abs(v.kl - truth[0]) < 1e-4  # closed form both ways
        assert v.mi_se < 0.02
        assert abs(v.mi - truth[2]) < 0.02 + 3 * v.mi_se, (control is None, v, truth)
        assert abs(v.aggregate_kl - truth[1]) < 0.02 + 3 * v.aggregate_kl_se


def test_full_rank_and_constant_layers() -> None:
    mu, lv = gaussian_case(d=6, n=200, kl=4.0)
    post = Posterior(mu, lv)
    g = torch.Generator().manual_seed(0)
    exact = exact_latent(post, 4096, g)
    z = torch.randn(2048, 6, generator=g)
    full = affine_fit(z @ torch.randn(6, 9, generator=g), z, ds.Settings().affine_tol)
    assert full is not None and full.rank == 6
    v = affine_values(post, full.basis, 1024, g, exact)
    assert (v.kl, v.aggregate_kl, v.mi) == (exact.kl, exact.aggregate_kl, exact.mi)
    # the same values computed, not copied: the general path without the latent's
    w = affine_values(post, full.basis, 8192, g, None)
    assert abs(w.kl - exact.kl) < 1e-6 and abs(w.mi - exact.mi) < 4 * w.mi_se + 0.02
    const = affine_fit(torch.full((2048, 3), 2.0), z, ds.Settings().affine_tol)
    assert const is not None and const.rank == 0
    zero = affine_values(post, const.basis, 1024, g, exact)
    assert (zero.kl, zero.aggregate_kl, zero.mi) == (0.0, 0.0, 0.0)


def test_nonlinear_layers_are_not_affine() -> None:
    z = torch.randn(4096, 16, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    with torch.no_grad():
        assert affine_fit(lin(z), z, ds.Settings().affine_tol) is not None
        assert (
            affine_fit(nn.Linear(3, 8)(nn.Linear(16, 3)(z)), z, ds.Settings().affine_tol).rank == 3
        )  # type: ignore[union-attr]
        assert (
            affine_fit(nn.functional.leaky_relu(lin(z), 0.2), z, ds.Settings().affine_tol) is None
        )
        assert affine_fit(nn.functional.gelu(lin(z)), z, ds.Settings().affine_tol) is None
        # tanh of pre-activations with std 0.12 leaves 1.7e-4 of each feature's variance: not
        # affine at the default 1e-6; with std 0.006, 1.2e-9: affine to float32 precision
        tol = ds.Settings().affine_tol
        assert affine_fit(torch.tanh(0.2 * lin(z)), z, tol) is None
        assert affine_fit(torch.tanh(0.01 * lin(z)), z, tol) is not None


class _Kink(nn.Module):
    """relu(z + 6): linear wherever the prior puts its mass, bent where z < -6."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.relu(z + 6.0)


def test_a_layer_bent_only_under_the_posteriors_is_not_taken_for_affine() -> None:
    n = 200
    mu, lv = gaussian_case(d=4, n=n, kl=3.0, sigma=0.5)
    mu[: n // 2, 0] = -8.0  # half the posteriors sit beyond the kink in unit 0
    z = torch.randn(4096, 4, generator=torch.Generator().manual_seed(0))
    assert (
        affine_fit(_Kink()(z), z, ds.Settings().affine_tol) is not None
    )  # the prior alone cannot tell
    settings = ds.Settings(steps=60, regression_steps=100, eval_samples=512, pair_samples=128)
    dec = nn.Sequential(nn.Identity(), _Kink(), nn.Linear(4, 4))
    report = ds.inspect(
        vae_for(mu, lv, dec),
        index_data(n),
        layers=["1", "2"],
        random_inits=0,
        seeds=1,
        settings=settings,
    )
    for name in ("1", "2"):
        row = report.variant("trained").layer(name)
        assert row.affine_rank is None and row.critic_accuracy is not None


def test_rank_reducing_layer_at_high_kl_through_inspect() -> None:
    # the held-out case a critic could not read within max(0.15, 5%) (1.74x the tolerance)
    n, d = 1000, 64
    mu, lv = gaussian_case(d=d, n=n, kl=20.0, sigma=math.exp(-20.0 / d), seed=3)
    torch.manual_seed(7)
    dec = nn.Sequential(nn.Linear(d, 16), nn.Tanh())
    report = ds.inspect(vae_for(mu, lv, dec), index_data(n), layers=["0"], random_inits=1, seeds=1)
    truth = gaussian_linear_truth(mu, lv, dec[0].weight.detach())
    for variant in ("trained", "random"):
        row = report.variant(variant).layer("0")
        assert row.affine_rank == 16
        if variant == "trained":
            for est, t in zip((row.kl, row.aggregate_kl, row.mi), truth, strict=True):
                assert abs(est.mean - t) <= 0.05 + 2 * est.se, (est, t)
    info = [x.message for x in report.diagnostics if "affine in the 64 latent units" in x.message]
    assert len(info) == 2 and "0 (rank 16)" in info[0]
