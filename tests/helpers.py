"""Ground-truth constructions (DESIGN.md section 2) shared by the tests."""

from __future__ import annotations

import math

import torch
from torch import nn

import decoderscope as ds

# the truth's Monte Carlo stream must not be the data's: gaussian_case(seed=0) draws from
# Generator(0), and truths drawn from it too read MI off (d = 64, KL 20: by -0.25 at the latent)
TRUTH_SALT = 1_000_003


def gaussian_case(
    d: int = 8, n: int = 500, kl: float = 4.0, sigma: float = 0.5, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior parameters with mean conditional KL `kl` nats: mu, logvar [n, d]."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d, generator=g)
    logvar = torch.full((n, d), 2 * math.log(sigma))
    lo, hi = 0.0, 10.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        mu = base * mid
        value = (0.5 * (logvar.exp() + mu * mu - 1 - logvar).sum(1)).mean()
        lo, hi = (lo, mid) if value > kl else (mid, hi)
    return base * lo, logvar


class Lookup:
    """encode(x) for data that are row indices: returns the stored (mu, logvar) of each row."""

    def __init__(self, mu: torch.Tensor, logvar: torch.Tensor) -> None:
        self.mu, self.logvar = mu, logvar

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        i = x[:, 0].long()
        return self.mu[i], self.logvar[i]


def index_data(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.float32).unsqueeze(1)


def vae_for(mu: torch.Tensor, logvar: torch.Tensor, decoder: nn.Module) -> ds.VAE:
    return ds.VAE(encode=Lookup(mu, logvar), decoder=decoder)


def gaussian_linear_truth(
    mu: torch.Tensor, logvar: torch.Tensor, a: torch.Tensor, samples: int = 20000, seed: int = 0
) -> tuple[float, float, float]:
    """Exact (KL, aggregate KL, MI) at h = a @ z for a [k, d] of rank k: q(h|x) = N(a mu, a S a^T),
    p(h) = N(0, a a^T); KL in closed form, MI by Monte Carlo with exact mixture densities."""
    a = a.double()
    mu, var = mu.double(), logvar.double().exp()
    means = mu @ a.T
    covs = a.unsqueeze(0) * var.unsqueeze(1) @ a.T  # [n, k, k]
    prior = torch.distributions.MultivariateNormal(torch.zeros(a.shape[0]).double(), a @ a.T)
    q = torch.distributions.MultivariateNormal(means, covs)
    kl = float(torch.distributions.kl_divergence(q, prior).mean())
    g = torch.Generator().manual_seed(TRUTH_SALT + seed)
    n = mu.shape[0]
    idx = torch.randint(n, (samples,), generator=g)
    z = mu[idx] + var[idx].sqrt() * torch.randn(samples, mu.shape[1], generator=g).double()
    h = z @ a.T
    terms = []
    for chunk in h.split(500):
        terms.append(q.log_prob(chunk.unsqueeze(1)))  # [c, n]
    lp = torch.cat(terms)
    own = lp.gather(1, idx.unsqueeze(1)).squeeze(1)
    mi = float((own - torch.logsumexp(lp, 1) + math.log(n)).mean())
    return kl, kl - mi, mi


class Fold(nn.Module):
    """h = |z|: not injective (the sign of every unit is lost)."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z.abs()


def folded_truth(
    mu: torch.Tensor, logvar: torch.Tensor, samples: int = 20000, seed: int = 0
) -> tuple[float, float, float]:
    """Exact (KL, aggregate KL, MI) at h = |z|, by Monte Carlo with exact densities: each unit
    of h is a folded normal, density N(h; m, s) + N(h; -m, s) on h >= 0, and units are
    independent given x (the prior's are folded N(0, 1))."""
    mu, std = mu.double().flatten(1), (0.5 * logvar.double().flatten(1)).exp()
    g = torch.Generator().manual_seed(TRUTH_SALT + seed)
    n = mu.shape[0]
    idx = torch.randint(n, (samples,), generator=g)
    h = (mu[idx] + std[idx] * torch.randn(samples, mu.shape[1], generator=g).double()).abs()

    def log_folded(h: torch.Tensor, m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        normal = torch.distributions.Normal(m, s)
        return torch.logaddexp(normal.log_prob(h), normal.log_prob(-h)).sum(-1)

    prior = log_folded(h, torch.zeros(()).double(), torch.ones(()).double())
    own = log_folded(h, mu[idx], std[idx])
    kl = float((own - prior).mean())
    lse = torch.cat(
        [
            torch.logsumexp(log_folded(c.unsqueeze(1), mu.unsqueeze(0), std.unsqueeze(0)), 1)
            for c in h.split(500)
        ]
    )
    mi = float((own - lse + math.log(n)).mean())
    return kl, kl - mi, mi
