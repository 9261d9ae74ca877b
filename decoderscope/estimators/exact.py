"""Exact values at the latent: closed-form conditional KL, exact-density Monte Carlo for MI."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..sampling import Posterior


@dataclass(frozen=True)
class ExactLatent:
    """Latent-row truth, nats. `mi_se` is the Monte Carlo standard error of MI (and of the
    aggregate KL, which is KL - MI with KL in closed form)."""

    kl: float
    aggregate_kl: float
    mi: float
    mi_se: float
    samples: int


def conditional_kl(post: Posterior) -> torch.Tensor:
    """KL(q(z|x_n) || N(0, I)) per data point, closed form: [N], nats."""
    mu, logvar = post.mu.double().flatten(1), post.logvar.double().flatten(1)
    return 0.5 * (logvar.exp() + mu * mu - 1.0 - logvar).sum(dim=1)


def log_mixture_terms(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log q(z_i | x_n) for every pair: z [E, D], mu/logvar [N, D] -> [E, N] (float64)."""
    inv_var = (-logvar).exp()
    quad = (z * z) @ inv_var.T - 2.0 * z @ (mu * inv_var).T + (mu * mu * inv_var).sum(1)
    const = logvar.sum(1) + mu.shape[1] * math.log(2 * math.pi)
    return -0.5 * (quad + const)


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
        z = mu[i] + (0.5 * logvar[i]).exp() * eps[start : start + step]
        terms = log_mixture_terms(z, mu, logvar)
        own = terms.gather(1, i.unsqueeze(1)).squeeze(1)
        per_sample.append(own - (torch.logsumexp(terms, dim=1) - math.log(n)))
    values = torch.cat(per_sample)
    mi = float(values.mean())
    mi_se = float(values.std() / math.sqrt(samples)) if samples > 1 else 0.0
    return ExactLatent(kl=kl, aggregate_kl=kl - mi, mi=mi, mi_se=mi_se, samples=samples)
