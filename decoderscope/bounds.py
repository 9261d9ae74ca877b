"""Bounds that need a likelihood ("Fixing a Broken ELBO", IWAE): rate R = E_x KL(q(z|x) || p(z))
(closed form), distortion D = -E_x E_q log p(x|z), ELBO = -D - R and the IWAE bounds
log p_k(x) = E log (1/k) sum_i p(x, z_i) / q(z_i|x), all in nats per data point, over the data
given. Standard errors are the Monte Carlo error given these data (not the spread over x)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .estimate import Estimate
from .estimators.exact import unit_kl
from .likelihood import Likelihood
from .sampling import Posterior

CHUNK = 8192  # decoder rows per pass: memory does not grow with k or N
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
Decode = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Bounds:
    """rate, distortion, elbo ({mean, se}, nats per data point) and iwae: (k, estimate) for each
    k, k = 1 being the ELBO. I(x; z) <= rate; with the data's entropy H, H - D <= I(x; z)."""

    likelihood: str
    rate: Estimate
    distortion: Estimate
    elbo: Estimate
    iwae: tuple[tuple[int, Estimate], ...]

    def to_dict(self) -> dict[str, Any]:
        def est(e: Estimate) -> dict[str, Any]:
            d = e.to_dict()
            return {"mean": d["mean"], "se": d["se"]}

        return {
            "likelihood": self.likelihood,
            "rate": est(self.rate),
            "distortion": est(self.distortion),
            "elbo": est(self.elbo),
            "iwae": [{"k": k, **est(e)} for k, e in self.iwae],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Bounds:
        def est(x: dict[str, Any]) -> Estimate:
            return Estimate.from_dict({**x, "n": 1})

        iwae = tuple((int(x["k"]), est(x)) for x in d["iwae"])
        return cls(d["likelihood"], est(d["rate"]), est(d["distortion"]), est(d["elbo"]), iwae)


def _log_weights(
    decode: Decode, like: Likelihood, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
    count: int, generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """For each of the B rows of x, `count` samples z ~ q(z|x): log p(x|z) [B, count] and
    log p(z) - log q(z|x) [B, count] (float64)."""
    b = x.shape[0]
    eps = torch.randn((b, count, *mu.shape[1:]), generator=generator, device=mu.device)
    z = mu.unsqueeze(1) + (0.5 * logvar).exp().unsqueeze(1) * eps
    out = decode(z.flatten(0, 1))
    xs = x.unsqueeze(1).expand(b, count, *x.shape[1:]).flatten(0, 1)
    ll = like.log_prob(xs.to(out.dtype), out).double().view(b, count)
    z64, e64 = z.double().flatten(2), eps.double().flatten(2)
    prior_over_q = (-0.5 * z64.pow(2) + 0.5 * e64.pow(2)).sum(2) + 0.5 * logvar.double().flatten(
        1
    ).sum(1, keepdim=True)
    return ll, prior_over_q


def _iwae(
    decode: Decode, like: Likelihood, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
    k: int, generator: torch.Generator,
) -> torch.Tensor:  # fmt: skip
    """log (1/k) sum_i w_i per row of x [B] (float64), accumulated CHUNK rows at a time."""
    per = max(1, CHUNK // x.shape[0])
    total = torch.full((x.shape[0],), -math.inf, dtype=torch.float64, device=mu.device)
    for start in range(0, k, per):
        ll, ratio = _log_weights(decode, like, x, mu, logvar, min(per, k - start), generator)
        total = torch.logaddexp(total, torch.logsumexp(ll + ratio, 1))
    return total - math.log(k)


def compute_bounds(
    decode: Decode, like: Likelihood, data: torch.Tensor, post: Posterior, samples: int,
    ks: tuple[int, ...], generator: torch.Generator,
) -> Bounds:  # fmt: skip
    """R, D, ELBO and IWAE_k over the data. decode: z [B, *latent] -> output [B, ...] (no grad);
    data [N, ...] (moved to the posterior's device a chunk at a time); `samples` z per x for D;
    each IWAE_k is the mean of two independent estimates per x, whose difference gives its
    standard error."""
    mu, logvar = post.mu, post.logvar
    rate_x = unit_kl(post).sum(1)
    d_sum, d_var = 0.0, 0.0
    iw_sum = {k: 0.0 for k in ks}
    iw_var = {k: 0.0 for k in ks}
    rows = max(1, CHUNK // samples)
    with torch.no_grad():
        for start in range(0, data.shape[0], rows):
            sl = slice(start, start + rows)
            x, m, lv = data[sl].to(mu.device), mu[sl], logvar[sl]
            ll, _ = _log_weights(decode, like, x, m, lv, samples, generator)
            d_sum += float(-ll.mean(1).sum())
            d_var += float(ll.var(1).sum()) / samples if samples > 1 else 0.0
            for k in ks:
                a = _iwae(decode, like, x, m, lv, k, generator)
                b = _iwae(decode, like, x, m, lv, k, generator)
                iw_sum[k] += float((0.5 * (a + b)).sum())
                iw_var[k] += float((a - b).pow(2).sum()) / 4
    n = data.shape[0]
    distortion = Estimate(d_sum / n, math.sqrt(d_var) / n, 1)
    rate = Estimate(float(rate_x.mean()), 0.0, 1)
    elbo = Estimate(-distortion.mean - rate.mean, distortion.se, 1)
    iwae = tuple((k, Estimate(iw_sum[k] / n, math.sqrt(iw_var[k]) / n, 1)) for k in ks)
    return Bounds(like.name, rate, distortion, elbo, iwae)
