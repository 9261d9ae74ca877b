"""Small statistics shared by every reader: mean and standard error, control variates, and the
log-mean-exp over the data points taken in chunks."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

# The accuracy the estimator claims, in nats: an estimate within max(0.15 nats, 5%) of the truth
# agrees with it. Tests, benchmarks and the diagnostics all measure against this one slack.
TOLERANCE_NATS = 0.15
TOLERANCE_SHARE = 0.05


def tolerance(truth: float) -> float:
    """Slack (nats) within which an estimate agrees with `truth`: max(0.15 nats, 5% of it)."""
    return max(TOLERANCE_NATS, TOLERANCE_SHARE * abs(truth))


def mean_se(values: torch.Tensor) -> tuple[float, float]:
    """Mean of per-sample terms [n] and its standard error, in float64."""
    values = values.double()
    se = float(values.std() / math.sqrt(values.numel())) if values.numel() > 1 else 0.0
    return float(values.mean()), se


def finite_mean_se(values: torch.Tensor) -> tuple[float, float]:
    """`mean_se` of the finite terms; nan where none is finite."""
    finite = values[values.isfinite()]
    return mean_se(finite) if finite.numel() > 0 else (math.nan, math.nan)


def with_control(
    values: torch.Tensor,
    control: torch.Tensor | None,
    offset: float,
    offset_se: float,
    stat: Callable[[torch.Tensor], tuple[float, float]] = mean_se,
) -> tuple[float, float]:
    """Mean and s.e. (`stat`) of per-sample terms [n] estimated relative to a control variate
    [n] whose mean is known (`offset`, with its own Monte Carlo s.e. `offset_se`); without a
    control, the plain `stat`. Where the terms track the control, their noise cancels."""
    if control is None:
        return stat(values)
    mean, se = stat(values.double() - control)
    return mean + offset, math.hypot(se, offset_se)


def logsumexp_over_data(
    terms: Callable[[int, int], torch.Tensor], n: int, chunk: int, like: torch.Tensor
) -> torch.Tensor:
    """log sum_k exp t_k over n data points, where terms(start, stop) gives the t_k of data
    points start..stop-1 along the last dimension: taken `chunk` at a time, so memory does not
    grow with n. `like` [...] gives the result's shape, dtype and device."""
    lse = torch.full_like(like, -math.inf)
    for start in range(0, n, chunk):
        lse = torch.logaddexp(lse, torch.logsumexp(terms(start, start + chunk), dim=-1))
    return lse
