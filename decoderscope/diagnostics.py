"""Self-checks on finished estimates: calibration at the latent, data processing, a negative
aggregate KL, log N, the inverse's blur, saturation.

Only reads results; it never changes a number.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .estimators.runs import UNRESOLVED, WHY, unread
from .report import LABELS, QUANTITIES, Diagnostic, Estimate, LayerResult, VariantResult

# R(h)'s blur above which a layer is flagged. Measured error / blur on injective layers: 0.18
# (one LeakyReLU, blur 1.10, KL -0.20), 0.38 (blur 0.64, -0.24), 0.55 (two LeakyReLUs, blur
# 2.76, KL -1.51); blur 0.25 thus flags layers that may read more than ~0.15 nats low.
BLUR_WARNING = 0.25
# share of samples whose own z the preimage search finds unaided below which a layer is
# flagged: `estimators.preimages.MIN_COVERAGE`, what its check needs to read a layer that way
# (the demo's random GELU layers: 0.47-0.61, read within 0.06 of an enumerated truth)
PREIMAGE_COVERAGE_WARNING = 0.25


def diagnose(variants: Sequence[VariantResult], n_data: int) -> tuple[Diagnostic, ...]:
    """Every diagnostic of a report's variants, in order: the latent's calibration (trained
    variant), the layers read without a critic, then each row's checks."""
    out: list[Diagnostic] = []
    for variant in variants:
        exact = variant.layers[0].exact
        if exact is None:
            continue
        truths = {"kl": exact.kl, "aggregate_kl": exact.aggregate_kl, "mi": exact.mi}
        notes: list[tuple[str, str, str | None]] = []  # (level, message, layer)
        if variant.name == "trained" or len(variants) == 1:
            notes.append(_calibration(variant.layers[0], truths))
        notes += _readers(variant)
        for row in variant.layers[1:]:
            notes += _unreliable(row) + _coverage(row)
        for row in variant.layers:
            notes += _row_checks(row)
        notes += _ceiling(variant, n_data)
        out += [Diagnostic(level, msg, layer, variant.name) for level, msg, layer in notes]
    return tuple(out)


Note = tuple[str, str, str | None]


def _calibration(latent: LayerResult, truths: dict[str, float]) -> Note:
    """The latent's estimates beside its exact values; a warning where the guard found them
    apart beyond the error bars."""
    if unread(latent.method):
        return ("warning", f"the latent's estimates were not read: {WHY[UNRESOLVED]}", "latent")
    parts = []
    for q in QUANTITIES:
        est: Estimate = getattr(latent, q)
        err = est.mean - truths[q]
        parts.append(f"{LABELS[q]} {est.mean:.2f} vs exact {truths[q]:.2f} ({err:+.2f})")
    msg = "calibration at the latent: " + "; ".join(parts)
    if latent.unreliable:
        bad = ", ".join(LABELS[q] for q in latent.unreliable)
        msg += (
            f". The estimator misses the exact {bad} beyond its error bars: "
            "expect errors of this size at the layers too (more steps, or more data)"
        )
    return ("warning" if latent.unreliable else "info", msg, "latent")


def _readers(variant: VariantResult) -> list[Note]:
    """Info lines naming the layers whose values are exact (affine) or preimage sums."""
    out: list[Note] = []
    units = math.prod(variant.layers[0].shape)
    exact = [r for r in variant.layers if r.affine_rank is not None]
    injective = [f"{r.name} (rank {r.affine_rank})" for r in exact if r.method == "injective"]
    exact = [r for r in exact if r.method != "injective"]
    affine = [f"{r.name} (rank {r.affine_rank})" for r in exact if r.affine_rank]
    affine += [f"{r.name} (constant)" for r in exact if r.affine_rank == 0]
    if injective:
        out.append(
            (
                "info",
                "injective functions of an affine map of the latent (through strictly monotone "
                "activations and full-column-rank linear maps or convolutions), or layers a "
                "later layer read at the latent's values depends on z only through, so they "
                "hold that map's (the latent's) values, exact as for an affine layer: "
                + ", ".join(injective),
                None,
            )
        )
    if affine:
        out.append(
            (
                "info",
                f"affine in the {units} latent units, so their values are exact (closed-form "
                "KL, exact-density Monte Carlo MI), not a critic's: " + ", ".join(affine),
                None,
            )
        )
    folds = [
        f"{r.name} ({r.preimages:.1f} per sample, own z found unaided for "
        f"{100 * (r.preimage_coverage or 0.0):.1f}%)"
        for r in variant.layers
        if r.preimages is not None
    ]
    if folds:
        out.append(
            (
                "info",
                "folding layers (each value has several preimages in the latent), so their "
                "values are computed from the preimages found by Gauss-Newton through the "
                "decoder, not a critic's: " + ", ".join(folds),
                None,
            )
        )
    costly = [f"{r.name} ({r.preimage_flops:.1e})" for r in variant.layers if r.preimage_flops]
    if costly:
        out.append(
            (
                "info",
                "R(h) does not invert these layers, and searching their preimages would take "
                "more than preimage_flops (projected FLOPs in brackets), so critics read them "
                "(raise Settings.preimage_flops to search): " + ", ".join(costly),
                None,
            )
        )
    return out


def _coverage(row: LayerResult) -> list[Note]:
    if row.preimage_coverage is None or row.preimage_coverage >= PREIMAGE_COVERAGE_WARNING:
        return []
    return [
        (
            "warning",
            f"the preimage search found the samples' own latent z unaided for only "
            f"{100 * row.preimage_coverage:.1f}% of them: preimages it misses are left out of "
            "the sums, so the values here may be off",
            row.name,
        )
    ]


def _unreliable(row: LayerResult) -> list[Note]:
    if row.status is None or row.name == "latent":
        return []
    return [("warning", f"{row.status}: {row.reason}", row.name)]


def _ceiling(variant: VariantResult, n_data: int) -> list[Note]:
    """One warning naming every row whose MI is within 5% of log N."""
    log_n = math.log(n_data) if n_data > 1 else math.inf
    at = [
        row.name
        for row in variant.layers
        if max(row.mi.mean, row.exact.mi if row.exact is not None else -math.inf)
        >= log_n - 0.05 * log_n
    ]
    if not at:
        return []
    return [
        (
            "warning",
            f"MI is at the ceiling log N = {log_n:.2f} nats for N = {n_data} data points at "
            f"{', '.join(at)}: the data points are told apart perfectly there, so more data is "
            "needed to measure a higher MI",
            None,
        )
    ]


def _row_checks(row: LayerResult) -> list[Note]:
    out: list[Note] = []
    if row.name != "latent" and (row.inverse_blur or 0.0) > BLUR_WARNING:
        out.append(
            (
                "warning",
                f"the learned inverse R(h) recovers the latent here only up to a blur worth "
                f"{row.inverse_blur:.2f} nats: if this layer keeps the latent's information, its "
                "KL and MI may read low by up to about that much, so a drop here is not by "
                "itself evidence of lost information",
                row.name,
            )
        )
    if row.critic_accuracy is not None and row.critic_accuracy >= 0.995:
        out.append(
            (
                "warning",
                f"a critic separates its samples with held-out accuracy "
                f"{row.critic_accuracy:.3f}: saturated, so its KL may be underestimated (lower "
                "nats_per_bridge for more bridges)",
                row.name,
            )
        )
    return out
