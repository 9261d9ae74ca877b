"""Runs -> report rows: each layer's values pooled over its runs (seeds x re-initialisations)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from .estimators.exact import ExactLatent
from .estimators.runs import LATENT, LayerRun
from .report import Estimate, Exact, LayerResult


def _share(runs: Sequence[LayerRun], exact: ExactLatent) -> float | None:
    """The row's MI / the exact latent MI: only where that MI is clearly above 0 and the row's
    MI was read."""
    if not exact.mi > max(2 * exact.mi_se, 0.01):
        return None
    share = statistics.fmean(r.mi for r in runs) / exact.mi
    return share if math.isfinite(share) else None


def pool_row(
    name: str,
    type_: str,
    shape: tuple[int, ...],
    runs: Sequence[LayerRun],
    exact: ExactLatent,
) -> LayerResult:
    """One row from its runs: mean and standard error of each value (`Estimate.pool`), the
    reader's measurements pooled where every run has them (ranks by max, coverage by min), the
    share of the exact latent MI kept, and the exact values on the latent row."""
    exact_row = Exact(exact.kl, exact.aggregate_kl, exact.mi, exact.mi_se)
    affine = [r.affine_rank for r in runs]
    found = [r.preimages for r in runs]
    coverage = [r.preimage_coverage for r in runs]
    blur = [r.inverse_blur for r in runs if r.inverse_blur is not None]
    costly = [r.preimage_flops for r in runs if r.preimage_flops is not None]
    accuracy = [r.accuracy for r in runs if r.accuracy is not None]
    return LayerResult(
        name=name,
        type=type_,
        shape=shape,
        kl=Estimate.pool([r.kl for r in runs], [r.kl_se for r in runs]),
        aggregate_kl=Estimate.pool(
            [r.aggregate_kl for r in runs], [r.aggregate_kl_se for r in runs]
        ),
        mi=Estimate.pool([r.mi for r in runs], [r.mi_se for r in runs]),
        exact=exact_row if name == LATENT else None,
        critic_accuracy=max(accuracy, default=None),
        affine_rank=max(a for a in affine if a is not None) if None not in affine else None,
        preimages=statistics.fmean(f for f in found if f is not None)
        if None not in found
        else None,
        preimage_coverage=min(c for c in coverage if c is not None)
        if None not in coverage
        else None,
        inverse_blur=max(blur, default=None),
        preimage_flops=max(costly, default=None),
        mi_share=_share(runs, exact),
        method="+".join(sorted({r.method for r in runs})),
    )
