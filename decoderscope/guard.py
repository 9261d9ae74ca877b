"""The guard: every pooled value held against the bounds no distribution can break, in one place
before the report is built.

Bounds (nats): KL >= 0, aggregate KL >= 0, 0 <= MI <= log N, and, by data processing, no layer
above the latent's exact KL, aggregate KL and MI; at the latent, its estimates against its own
exact values. A value breaks a bound only beyond two standard errors plus the estimator's stated
tolerance (`estimators.stats.tolerance`). Such a value is kept as estimated, never clamped: its
row is marked `status="unreliable"` with the reason, and renderers show it as such.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

from .estimators.stats import tolerance
from .report import Estimate, LayerResult

UNRELIABLE = "unreliable"
QUANTITIES = ("kl", "aggregate_kl", "mi")
LABELS = {"kl": "KL", "aggregate_kl": "aggregate KL", "mi": "MI"}


def _below(est: Estimate, bound: float) -> bool:
    """`est` is below `bound` beyond two standard errors and the tolerance."""
    return est.mean + 2 * est.se + tolerance(bound) < bound


def _above(est: Estimate, bound: float) -> bool:
    return est.mean - 2 * est.se - tolerance(bound) > bound


def breaches(row: LayerResult, latent: LayerResult, n_data: int) -> list[tuple[str, str]]:
    """(quantity, why) for every bound `row` breaks; `latent` is the variant's latent row (its
    `exact` values bound every layer)."""
    out: list[tuple[str, str]] = []
    log_n = math.log(n_data) if n_data > 0 else math.inf
    exact = latent.exact
    for q in QUANTITIES:
        est: Estimate = getattr(row, q)
        label = f"{LABELS[q]} {est.mean:.2f} ± {est.se:.2f}"
        if not (math.isfinite(est.mean) and math.isfinite(est.se)):
            out.append((q, f"{LABELS[q]} is not a finite number ({est.mean})"))
            continue
        if _below(est, 0.0):
            out.append((q, f"{label} is below 0, which no distribution allows"))
        if q == "mi" and n_data > 1 and _above(est, log_n):
            out.append((q, f"{label} is above log N = {log_n:.2f} for N = {n_data} data points"))
        if exact is None:
            continue
        truth = float(getattr(exact, q))
        if row is latent and abs(est.mean - truth) > tolerance(truth) + 2 * est.se:
            out.append((q, f"{label} misses the exact value {truth:.2f}"))
        elif row is not latent and _above(est, truth):
            out.append(
                (q, f"{label} exceeds the latent's exact {truth:.2f}; data processing forbids it")
            )
    return out


def guard(rows: Sequence[LayerResult], n_data: int) -> tuple[LayerResult, ...]:
    """One variant's rows (the latent first) with every breach marked; values unchanged."""
    latent = rows[0]
    out = []
    for row in rows:
        found = breaches(row, latent, n_data)
        if found:
            bad = tuple(q for q in QUANTITIES if any(b == q for b, _ in found))
            reason = "; ".join(why for _, why in found)
            row = replace(row, status=UNRELIABLE, reason=reason, unreliable=bad)
        out.append(row)
    return tuple(out)
