"""The exact latent values against independent computations."""

from __future__ import annotations

import math

import torch

from decoderscope.estimators.exact import conditional_kl, exact_latent
from decoderscope.sampling import Posterior
from decoderscope.testing import fold_truth, gaussian_case, gaussian_linear_truth


def test_conditional_kl_matches_torch_distributions() -> None:
    mu, lv = gaussian_case(d=5, n=40, kl=3.0)
    q = torch.distributions.Normal(mu, (0.5 * lv).exp())
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    want = torch.distributions.kl_divergence(q, p).sum(1)
    assert torch.allclose(conditional_kl(Posterior(mu, lv)).float(), want, atol=1e-5)


def test_mi_against_mixture_log_prob() -> None:
    mu, lv = gaussian_case(d=3, n=50, kl=3.0)
    g = torch.Generator().manual_seed(1)
    ex = exact_latent(Posterior(mu, lv), 40000, g)
    comp = torch.distributions.Independent(torch.distributions.Normal(mu, (0.5 * lv).exp()), 1)
    mix = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(torch.ones(50)), comp
    )
    prior = torch.distributions.Independent(
        torch.distributions.Normal(torch.zeros(3), torch.ones(3)), 1
    )
    torch.manual_seed(2)
    z = mix.sample((40000,))
    agg = float((mix.log_prob(z) - prior.log_prob(z)).mean())
    assert abs(ex.aggregate_kl - agg) < 0.03
    assert abs(ex.kl - float(conditional_kl(Posterior(mu, lv)).mean())) < 1e-9
    assert ex.mi_se < 0.01


def test_mi_limits() -> None:
    g = torch.Generator().manual_seed(0)
    one = exact_latent(Posterior(torch.ones(1, 2), torch.zeros(1, 2)), 1000, g)
    assert abs(one.mi) < 1e-9  # a single data point carries no information
    far = Posterior(torch.arange(20.0).unsqueeze(1) * 10, torch.full((20, 1), -4.0))
    sep = exact_latent(far, 2000, g)
    assert abs(sep.mi - math.log(20)) < 1e-6  # fully separated posteriors: log N


def test_fold_truth_bookkeeping() -> None:
    """The enumerated-preimage truth of GELU/SiLU layers (benchmarks/heldout.py): with a bias that
    keeps every pre-activation positive nothing folds and it equals the latent's exact values;
    with folds it is below them (data processing), by a margin its Monte Carlo error can't
    explain."""
    mu, lv = gaussian_case(d=4, n=200, kl=4.0, sigma=0.5, seed=1)
    w = torch.eye(4) + 0.2 * torch.randn(4, 4, generator=torch.Generator().manual_seed(2))
    latent = gaussian_linear_truth(mu, lv, torch.eye(4))
    for act in ("gelu", "silu"):
        unfolded = fold_truth(mu, lv, w, torch.full((4,), 40.0), act, samples=4000, pair=1000)
        for got, want in zip(unfolded, latent, strict=True):
            assert abs(got - want) < 0.1
        folded = fold_truth(mu, lv, w, torch.zeros(4), act, samples=4000, pair=1000)
        assert folded[0] < latent[0] - 0.3 and folded[2] < latent[2] - 0.3


def test_linear_truth_with_noise_is_the_noisy_layers() -> None:
    """h + noise * e, e ~ N(0, a a^T), on one unit: its KL is that of N(m, s + b^2) against
    N(0, 1 + b^2) (written out by hand), its MI agrees with a Monte Carlo over those inflated
    components drawn here, and noise never raises KL or MI (data processing)."""
    n, b2 = 30, 0.3**2
    mu, lv = gaussian_case(d=1, n=n, kl=2.0, sigma=0.4, seed=3)
    m, s = mu.double().squeeze(1), lv.double().exp().squeeze(1)
    want = 0.5 * (((1 + b2) / (s + b2)).log() + (s + b2 + m * m) / (1 + b2) - 1)
    kl, agg, mi = gaussian_linear_truth(mu, lv, torch.eye(1), samples=40000, noise=0.3)
    assert abs(kl - float(want.mean())) < 1e-9
    g = torch.Generator().manual_seed(5)
    idx = torch.randint(n, (40000,), generator=g)
    h = m[idx] + (s[idx] + b2).sqrt() * torch.randn(40000, generator=g, dtype=torch.float64)
    lp = torch.distributions.Normal(m, (s + b2).sqrt()).log_prob(h.unsqueeze(1))  # [samples, n]
    own = lp.gather(1, idx.unsqueeze(1)).squeeze(1)
    assert abs(mi - float((own - lp.logsumexp(1)).mean() + math.log(n))) < 0.02
    plain = gaussian_linear_truth(mu, lv, torch.eye(1), samples=40000)
    assert kl < plain[0] - 0.05 and mi < plain[2] - 0.05, (kl, mi, plain)
    assert abs(kl - agg - mi) < 1e-12
