"""Text for the report's likelihood bounds and latent statistics, shared by the console and the
Markdown renderers. It formats; it never computes."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .report import Report

SHOWN_UNITS = 16  # per-unit lists longer than this are cut, with a count of the rest


def _units(values: tuple[float, ...]) -> str:
    head = ", ".join(f"{v:.2f}" for v in values[:SHOWN_UNITS])
    more = f", … ({len(values) - SHOWN_UNITS} more)" if len(values) > SHOWN_UNITS else ""
    return f"[{head}{more}]"


def bound_lines(report: Report) -> list[str]:
    """Lines for the bounds (with a likelihood), MMD^2 per layer and the aggregate posterior at
    the latent."""
    lines = []
    b = report.bounds
    if b is not None:
        lines.append(
            f"likelihood {b.likelihood} (nats per data point): rate R = {b.rate.mean:.2f}, "
            f"distortion D = {b.distortion.mean:.2f} ± {b.distortion.se:.2f}, "
            f"ELBO = -D - R = {b.elbo.mean:.2f} ± {b.elbo.se:.2f}; I(x; z) ≤ R"
        )
        iwae = " · ".join(f"k={k}: {e.mean:.2f} ± {e.se:.2f}" for k, e in b.iwae)
        lines.append(f"IWAE bound log p_k(x), rising to log p(x) with k: {iwae}")
        rows = [
            f"{r.name} {r.elbo.mean:.2f}"
            for v in report.variants
            if v.name == "trained"
            for r in v.layers
            if r.elbo is not None
        ]
        if rows:
            lines.append("ELBO per layer (trained, -D - KL of the layer): " + ", ".join(rows))
    for v in report.variants:
        mmd = [f"{r.name} {r.mmd2.mean:.4f} ± {r.mmd2.se:.4f}" for r in v.layers if r.mmd2]
        if mmd:
            lines.append(f"MMD² aggregate posterior vs prior ({v.name}): " + ", ".join(mmd))
    s = report.latent_stats
    if s is not None:
        lines.append(
            f"latent: {s.active_units} of {len(s.kl_per_dim)} units active "
            f"(Var_x E_q[z_j] > 0.01); KL per unit {_units(s.kl_per_dim)}"
        )
        lines.append(
            f"aggregate posterior: mean {_units(s.aggregate_mean)}, variance "
            f"{_units(s.aggregate_var)}; KL of its moment-matched Gaussian to the prior "
            f"{s.moment_matched_kl:.2f}"
        )
    return lines
