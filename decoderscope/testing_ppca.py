"""A linear-Gaussian VAE whose bounds, per-unit statistics and MMD^2 are known in closed form
(probabilistic PCA with a deliberately imperfect encoder), for the tests and benchmarks;
`decoderscope.testing` re-exports it."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributions import MultivariateNormal, Normal, kl_divergence


def gaussian_kernel_mean(
    a: torch.Tensor, a_cov: torch.Tensor, b: torch.Tensor, b_cov: torch.Tensor, ell: float
) -> float:
    """E exp(-|X - Y|^2 / (2 ell^2)) for X ~ N(a_i, A), Y ~ N(b_j, B), averaged over all pairs
    (i, j): det(I + (A + B) / ell^2)^(-1/2) exp(-(a - b)^T (ell^2 I + A + B)^(-1) (a - b) / 2).
    a [I, d], b [J, d], covariances [d, d] (float64)."""
    d = a.shape[1]
    s = ell**2 * torch.eye(d, dtype=torch.float64) + a_cov + b_cov
    det = torch.linalg.det(torch.eye(d, dtype=torch.float64) + (a_cov + b_cov) / ell**2)
    diff = a.unsqueeze(1) - b.unsqueeze(0)  # [I, J, d]
    quad = (diff @ torch.linalg.inv(s) * diff).sum(-1)
    return float((-0.5 * quad).exp().mean() / det.sqrt())


class LinearGaussianVAE:
    """Probabilistic PCA, x = W z + b + sigma * noise with z ~ N(0, I_latent), of which the
    decoder uses the first `used` units; N data points drawn from it; and a deliberately
    imperfect encoder: 0.8 x the exact posterior mean map and 1.5 x its variances on the used
    units, the prior (mean 0, variance 1) on the unused ones. `truth` gives the rate, distortion,
    ELBO and log p(x) in closed form (torch.distributions), `iwae_reference` IWAE_k by Monte
    Carlo, independently of the tool's code."""

    def __init__(self, n: int, d: int, latent: int, used: int, sigma: float, seed: int = 0) -> None:
        self.sigma = sigma
        g = torch.Generator().manual_seed(seed)
        f64 = torch.float64
        self.w = torch.zeros(d, latent, dtype=f64)
        self.w[:, :used] = torch.randn(d, used, generator=g, dtype=f64)
        self.b = torch.randn(d, generator=g, dtype=f64)
        z = torch.randn(n, latent, generator=g, dtype=f64)
        self.x = z @ self.w.T + self.b + sigma * torch.randn(n, d, generator=g, dtype=f64)
        wu = self.w[:, :used]
        m_inv = torch.linalg.inv(wu.T @ wu + sigma**2 * torch.eye(used, dtype=f64))
        self.a = torch.zeros(latent, d, dtype=f64)
        self.a[:used] = 0.8 * m_inv @ wu.T
        self.var = torch.ones(latent, dtype=f64)
        self.var[:used] = 1.5 * sigma**2 * torch.diagonal(m_inv)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu = (x.double() - self.b) @ self.a.T
        return mu.float(), self.var.log().float().expand_as(mu)

    def decoder(self) -> nn.Module:
        layer = nn.Linear(self.w.shape[1], self.w.shape[0])
        with torch.no_grad():
            layer.weight.copy_(self.w)
            layer.bias.copy_(self.b)
        return nn.Sequential(layer)

    def truth(self, x: torch.Tensor) -> dict[str, float]:
        mu, _ = self.encode(x)
        mu, std = mu.double(), self.var.sqrt()
        rate = kl_divergence(Normal(mu, std), Normal(0.0, 1.0)).sum(1)
        # E_q ||x - W z - b||^2 = ||x - W mu - b||^2 + tr(W diag(var) W^T)
        err = (x - mu @ self.w.T - self.b).pow(2).sum(1) + (self.w.pow(2) @ self.var).sum()
        d = self.w.shape[0]
        dist = 0.5 * err / self.sigma**2 + d * (math.log(self.sigma) + 0.5 * math.log(2 * math.pi))
        cov = self.w @ self.w.T + self.sigma**2 * torch.eye(self.w.shape[0], dtype=torch.float64)
        logp = MultivariateNormal(self.b, cov).log_prob(x)
        return {
            "rate": float(rate.mean()),
            "distortion": float(dist.mean()),
            "elbo": float((-dist - rate).mean()),
            "log_p": float(logp.mean()),
        }

    def mmd2_truth(self, through: torch.Tensor | None, bandwidth: float) -> float:
        """MMD^2 between the aggregate posterior of the model's data and the prior, at the latent
        (through None) or pushed through the linear map `through` [k, latent]: Gaussian-kernel
        integrals of the Gaussian mixture (`gaussian_kernel_mean`)."""
        a = self.encode(self.x)[0].double()
        a_cov = torch.diag(self.var)
        b, b_cov = torch.zeros(1, a.shape[1], dtype=torch.float64), torch.eye(a.shape[1]).double()
        if through is not None:
            w = through.double()
            a, a_cov, b, b_cov = a @ w.T, w @ a_cov @ w.T, b @ w.T, w @ w.T
        return (
            gaussian_kernel_mean(a, a_cov, a, a_cov, bandwidth)
            + gaussian_kernel_mean(b, b_cov, b, b_cov, bandwidth)
            - 2 * gaussian_kernel_mean(a, a_cov, b, b_cov, bandwidth)
        )

    def iwae_reference(self, x: torch.Tensor, k: int, reps: int, seed: int) -> tuple[float, float]:
        """Monte Carlo IWAE_k with torch.distributions: the mean over `reps` draws per x, and
        its standard error given these data."""
        g = torch.Generator().manual_seed(seed)
        mu, _ = self.encode(x)
        q = Normal(mu.double(), self.var.sqrt())
        values = []
        for _ in range(reps):
            z = q.mean + q.stddev * torch.randn(k, *mu.shape, generator=g, dtype=torch.float64)
            logw = (
                Normal(z @ self.w.T + self.b, self.sigma).log_prob(x).sum(-1)
                + Normal(0.0, 1.0).log_prob(z).sum(-1)
                - q.log_prob(z).sum(-1)
            )
            values.append(torch.logsumexp(logw, 0) - math.log(k))
        per_x = torch.stack(values)  # [reps, N]
        se = math.sqrt(float(per_x.var(0).sum()) / reps) / x.shape[0]
        return float(per_x.mean()), se
