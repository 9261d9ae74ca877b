"""The aggregate posterior at the latent, in closed form from the posteriors' parameters: its
moments per unit, the KL of its moment-matched Gaussian to the prior, the KL per unit and the
active units (Burda et al.: Var_x E_q[z_j] > 0.01). Nothing here is estimated by a critic."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .estimators.exact import unit_kl
from .sampling import Posterior

ACTIVE = 0.01  # Burda et al.'s threshold on Var_x E_q[z_j]


@dataclass(frozen=True)
class LatentStats:
    """Per latent unit (flattened in the latent's order): `kl_per_dim` = E_x KL(q(z_j|x) ||
    N(0, 1)) (nats; they sum to the latent's KL), `aggregate_mean` and `aggregate_var` (the
    aggregate posterior's mean and variance), `activity` = Var_x E_q[z_j]; `active_units`: how
    many units have activity > 0.01; `moment_matched_kl`: KL(N(m, S) || N(0, I)) in nats for the
    aggregate posterior's mean m and full covariance S (0 iff its first two moments are the
    prior's)."""

    active_units: int
    kl_per_dim: tuple[float, ...]
    aggregate_mean: tuple[float, ...]
    aggregate_var: tuple[float, ...]
    activity: tuple[float, ...]
    moment_matched_kl: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "active_units": self.active_units,
            "kl_per_dim": list(self.kl_per_dim),
            "aggregate_mean": list(self.aggregate_mean),
            "aggregate_var": list(self.aggregate_var),
            "activity": list(self.activity),
            "moment_matched_kl": self.moment_matched_kl,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LatentStats:
        return cls(
            int(d["active_units"]),
            tuple(d["kl_per_dim"]),
            tuple(d["aggregate_mean"]),
            tuple(d["aggregate_var"]),
            tuple(d.get("activity", ())),
            float(d["moment_matched_kl"]),
        )


def latent_stats(mu: torch.Tensor, logvar: torch.Tensor) -> LatentStats:
    """From the posteriors' parameters mu, logvar [N, *latent_shape] (float64 inside): the
    aggregate posterior's moments are exact (law of total variance over the N data points)."""
    m = mu.flatten(1).double()
    lv = logvar.flatten(1).double()
    var = lv.exp()
    kl = unit_kl(Posterior(mu, logvar))
    centred = m - m.mean(0)
    cov = centred.T @ centred / m.shape[0] + torch.diag(var.mean(0))  # [d, d]
    mean = m.mean(0)
    logdet = torch.linalg.slogdet(cov)[1]
    matched = 0.5 * float(torch.trace(cov) + mean @ mean - m.shape[1] - logdet)
    activity = centred.pow(2).mean(0)
    return LatentStats(
        active_units=int((activity > ACTIVE).sum()),
        kl_per_dim=tuple(kl.mean(0).tolist()),
        aggregate_mean=tuple(mean.tolist()),
        aggregate_var=tuple(torch.diagonal(cov).tolist()),
        activity=tuple(activity.tolist()),
        moment_matched_kl=matched if math.isfinite(matched) else math.nan,
    )
