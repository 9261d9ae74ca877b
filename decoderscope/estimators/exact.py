"""Exact values at the latent: closed-form conditional KL, exact-density Monte Carlo for MI."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..sampling import Posterior, reparameterise
from .stats import logsumexp_over_data, mean_se


@dataclass(frozen=True)
class ExactLatent:
    """Latent-row truth, nats. `mi_se` is the Monte Carlo standard error of MI (and of the
    aggregate KL, which is KL - MI with KL in closed form)."""

    kl: float
    aggregate_kl: float
    mi: float
    mi_se: float


EPS64 = float(torch.finfo(torch.float64).eps)


def unit_kl(post: Posterior) -> torch.Tensor:
    """KL(q(z_j|x_n) || N(0, 1)) per data point and latent unit, closed form: [N, d] (float64),
    nats."""
    mu, logvar = post.mu.double().flatten(1), post.logvar.double().flatten(1)
    # expm1(lv) - lv >= 0 in floating point too: exp(lv) - 1 - lv rounds below 0 for lv near 0
    return 0.5 * (torch.expm1(logvar) - logvar + mu * mu)


def conditional_kl(post: Posterior) -> torch.Tensor:
    """KL(q(z|x_n) || N(0, I)) per data point, closed form: [N], nats."""
    return unit_kl(post).sum(dim=1)


# nats of float64 rounding in the expanded quadratic form above which the pairs are taken one
# difference at a time. The terms that matter are those of z near some mu_n, where the expanded
# z^2/s^2 and mu^2/s^2 cancel to (z - mu)^2/s^2 with rounding eps64 sum_j (2 mu_j^2 + 1) / s_j^2
# (logvar -40: 50 nats, and MI read 9.5 > log N); far pairs are negligible in any log-sum-exp
EXPANDED_ROUNDING = 1e-6
DIRECT_ELEMS = 1 << 22


def log_mixture_terms(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log q(z_i | x_n) for every pair: z [E, D], mu/logvar [N, D] -> [E, N] (float64). Expanded
    into matmuls where float64 rounding allows it, else from the differences (memory E N D)."""
    inv_var = (-logvar).exp()
    const = logvar.sum(1) + mu.shape[1] * math.log(2 * math.pi)
    per_point = ((2.0 * mu * mu + 1.0) * inv_var).sum(1)
    rounding = EPS64 * float(per_point.max()) if per_point.numel() else 0.0
    if rounding <= EXPANDED_ROUNDING:
        quad = (z * z) @ inv_var.T - 2.0 * z @ (mu * inv_var).T + (mu * mu * inv_var).sum(1)
    else:  # rows a few at a time, so memory stays near E N
        rows = max(1, DIRECT_ELEMS // max(1, mu.shape[0] * mu.shape[1]))
        quad = (
            torch.cat([((r.unsqueeze(1) - mu) ** 2 * inv_var).sum(2) for r in z.split(rows)])
            if z.shape[0]
            else z.new_zeros(0, mu.shape[0])
        )
    return -0.5 * (quad + const)


def log_ratio_to_prior(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log q(z|x) / p(z) for z, mu, logvar [B, d] (float64): [B] nats."""
    inv_var = (-logvar).exp()
    return 0.5 * (z * z - (z - mu) ** 2 * inv_var - logvar).sum(dim=1)


def mi_terms(
    z: torch.Tensor,
    idx: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    chunk_elems: int = 1 << 22,
) -> torch.Tensor:
    """Per-sample MI terms log q(z_e|x_i) - log mean_n q(z_e|x_n) for z [E, d] drawn from the
    data points idx [E], against all N data points mu, logvar [N, d] (float64): [E] nats. Done
    in chunks of the data of about `chunk_elems` pair terms."""
    m, lv = mu[idx], logvar[idx]
    own = -0.5 * ((z - m) ** 2 * (-lv).exp() + lv + math.log(2 * math.pi)).sum(dim=1)
    lse = logsumexp_over_data(
        lambda i, j: log_mixture_terms(z, mu[i:j], logvar[i:j]),
        mu.shape[0],
        max(1, chunk_elems // max(1, z.shape[0])),
        own,
    )
    return own - (lse - math.log(mu.shape[0]))


def exact_latent(
    post: Posterior, samples: int, generator: torch.Generator, chunk_elems: int = 1 << 21
) -> ExactLatent:
    """MI = E[log q(z|x_i) - log q(z)] with log q(z) = logsumexp_n log q(z|x_n) - log N, by Monte
    Carlo over `samples` draws (i uniform, z ~ q(z|x_i)); aggregate KL = KL - MI. Cost: samples x N
    x latent_dim multiply-adds, done in chunks of about `chunk_elems` pair terms."""
    mu = post.mu.double().flatten(1)
    logvar = post.logvar.double().flatten(1)
    n = mu.shape[0]
    kl = float(conditional_kl(post).mean())
    idx = torch.randint(n, (samples,), generator=generator, device=mu.device)
    eps = torch.randn(samples, mu.shape[1], generator=generator, device=mu.device).double()
    per_sample = []
    step = max(1, chunk_elems // max(n, 1))
    for start in range(0, samples, step):
        i = idx[start : start + step]
        z = reparameterise(mu[i], logvar[i], eps[start : start + step])
        per_sample.append(mi_terms(z, i, mu, logvar, chunk_elems))
    mi, mi_se = mean_se(torch.cat(per_sample))
    return ExactLatent(kl=kl, aggregate_kl=kl - mi, mi=mi, mi_se=mi_se)
