"""MMD^2 between the aggregate posterior and the prior, at the latent and pushed to each layer
(InfoVAE / MMD-VAE): the unbiased estimate with a Gaussian kernel exp(-|a - b|^2 / (2 l^2)),
the bandwidth l by the median heuristic on the prior's samples. A kernel divergence: it needs
no training, and it is not in nats."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .estimators.runs import LATENT
from .sampling import Posterior

BLOCKS = 8  # independent blocks; their spread gives the standard error
MEDIAN_SAMPLES = 512  # prior samples the median heuristic looks at (its cost is quadratic)


@dataclass(frozen=True)
class Mmd:
    """Unbiased MMD^2 (mean over BLOCKS blocks), its standard error and the kernel bandwidth."""

    mean: float
    se: float
    bandwidth: float

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "se": self.se, "bandwidth": self.bandwidth}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Mmd:
        return cls(float(d["mean"]), float(d["se"]), float(d["bandwidth"]))


def median_bandwidth(y: torch.Tensor) -> float:
    """The median distance between distinct samples among the first MEDIAN_SAMPLES of y [m, D]
    (float64)."""
    y = y[:MEDIAN_SAMPLES]
    dist = torch.cdist(y, y)
    upper = dist[torch.triu(torch.ones_like(dist, dtype=torch.bool), diagonal=1)]
    return float(upper.median())


def _unbiased(x: torch.Tensor, y: torch.Tensor, bandwidth: float) -> float:
    """The U-statistic MMD^2_u of samples x [m, D] and y [m, D]."""
    scale = -0.5 / bandwidth**2
    kxx = (torch.cdist(x, x).pow(2) * scale).exp()
    kyy = (torch.cdist(y, y).pow(2) * scale).exp()
    kxy = (torch.cdist(x, y).pow(2) * scale).exp()
    m = x.shape[0]
    within = (kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return float(within - 2 * kxy.mean())


def mmd2(x: torch.Tensor, y: torch.Tensor, bandwidth: float | None = None) -> Mmd:
    """MMD^2 between the samples x [m, ...] (aggregate posterior) and y [m, ...] (prior), in
    BLOCKS independent blocks (float64); bandwidth: the median heuristic on y if None."""
    x64, y64 = x.flatten(1).double(), y.flatten(1).double()
    if bandwidth is None:
        bandwidth = median_bandwidth(y64)
    if not bandwidth > 0:  # every prior sample lands on one point (a dead layer)
        return Mmd(0.0, 0.0, 0.0)
    per = [
        _unbiased(xb, yb, bandwidth)
        for xb, yb in zip(x64.chunk(BLOCKS), y64.chunk(BLOCKS), strict=True)
    ]
    mean = math.fsum(per) / len(per)
    var = math.fsum((p - mean) ** 2 for p in per) / (len(per) - 1)
    return Mmd(mean, math.sqrt(var / len(per)), bandwidth)


def sample_pair(
    post: Posterior, m: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """m latent samples of the aggregate posterior (a data point, then z ~ q(z|x)) and m of the
    prior, each [m, *latent_shape] on the posterior's device."""
    n = torch.randint(0, post.n, (m,), generator=generator, device=post.mu.device)
    eps = torch.randn((m, *post.latent_shape), generator=generator, device=post.mu.device)
    q = post.mu[n] + (0.5 * post.logvar[n]).exp() * eps
    p = torch.randn((m, *post.latent_shape), generator=generator, device=post.mu.device)
    return q, p


def mmd_by_layer(
    features: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    names: Sequence[str],
    q: torch.Tensor,
    p: torch.Tensor,
) -> dict[str, Mmd]:
    """MMD^2 at the latent ("latent") and at each layer of `names`; features(z) -> {name: h}."""
    with torch.no_grad():
        hq, hp = features(q), features(p)
    out = {LATENT: mmd2(q, p)}
    out.update({name: mmd2(hq[name], hp[name]) for name in names})
    return out
