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

from .estimators.runs import UNRESOLVED, WHY, unread
from .estimators.stats import tolerance
from .report import LABELS, QUANTITIES, Estimate, LayerResult


def _below(est: Estimate, bound: float) -> bool:
    """`est` is below `bound` beyond two standard errors and the tolerance."""
    return est.mean + 2 * est.se + tolerance(bound) < bound


def _above(est: Estimate, bound: float) -> bool:
    return est.mean - 2 * est.se - tolerance(bound) > bound


def _finite(est: Estimate) -> bool:
    return math.isfinite(est.mean) and math.isfinite(est.se)


def breaches(row: LayerResult, latent: LayerResult, n_data: int) -> list[tuple[str, ...]]:
    """(why, quantity, ...) for every bound `row` breaks; `latent` is the variant's latent row
    (its `exact` values bound every layer)."""
    out: list[tuple[str, ...]] = []
    log_n = math.log(n_data) if n_data > 0 else math.inf
    exact = latent.exact
    missing = [q for q in QUANTITIES if not _finite(getattr(row, q))]
    if missing:
        labels = ", ".join(LABELS[q] for q in missing)
        why = f"not read: {WHY[UNRESOLVED]}" if unread(row.method) else "not a finite number"
        out.append((f"{labels} {why}", *missing))
    for q in (q for q in QUANTITIES if q not in missing):
        est: Estimate = getattr(row, q)
        label = f"{LABELS[q]} {est.mean:.2f} ± {est.se:.2f}"
        if _below(est, 0.0):
            out.append((f"{label} is below 0, which no distribution allows", q))
        if q == "mi" and n_data > 1 and _above(est, log_n):
            out.append((f"{label} is above log N = {log_n:.2f} for N = {n_data} data points", q))
        if exact is None:
            continue
        truth = float(getattr(exact, q))
        if row is latent and abs(est.mean - truth) > tolerance(truth) + 2 * est.se:
            out.append((f"{label} misses the exact value {truth:.2f}", q))
        elif row is not latent and _above(est, truth):
            why = f"{label} exceeds the latent's exact {truth:.2f}; data processing forbids it"
            out.append((why, q))
    return out


def guard(rows: Sequence[LayerResult], n_data: int) -> tuple[LayerResult, ...]:
    """One variant's rows (the latent first) with every breach marked; values unchanged."""
    latent = rows[0]
    out = []
    for row in rows:
        found = breaches(row, latent, n_data)
        if found:
            bad = tuple(q for q in QUANTITIES if any(q in b[1:] for b in found))
            reason = "; ".join(b[0] for b in found)
            row = replace(row, unreliable=bad, reason=reason)
        out.append(row)
    return tuple(out)
