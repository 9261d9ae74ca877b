"""Renderers of a `Comparison`: a rich table and Markdown for a pull-request comment (verdict
first, details folded). They format; they never compute."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich import box
from rich.table import Table

from .render import pyplot, save

if TYPE_CHECKING:
    from .compare import Comparison, Delta, LayerDelta

LABELS = (("kl", "ΔKL"), ("aggregate_kl", "Δagg. KL"), ("mi", "ΔMI"))


def verdict(c: Comparison) -> str:
    """One line: thresholds broken, changes beyond noise, or none."""
    if c.broken:
        return f"❌ thresholds broken at {len(c.broken)} place(s): " + "; ".join(c.broken)
    changed = c.changed
    if changed:
        names = ", ".join(f"{r.variant}/{r.layer}" for r in changed[:6])
        more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
        return f"⚠️ changed beyond noise (no threshold broken): {names}{more}"
    return "✅ no layer changed beyond noise"


def _delta(d: Delta) -> str:
    mark = " ‼" if d.beyond_noise else ""
    return f"{d.mean:+.2f} ± {d.se:.2f}{mark}"


def _kept(r: LayerDelta) -> str:
    a, b = r.a.mi_share, r.b.mi_share
    if a is None or b is None:
        return ""
    return f"{100 * a:.0f}% → {100 * b:.0f}%"


def _flags(r: LayerDelta) -> str:
    out = []
    if r.a.status or r.b.status:
        out.append(
            "unreliable in " + " and ".join(x for x, row in (("A", r.a), ("B", r.b)) if row.status)
        )
    out += list(r.broken)
    return "; ".join(out)


def table(c: Comparison) -> Table:
    t = Table(title=f"B − A (nats): A = {c.a}, B = {c.b}", box=box.SIMPLE_HEAD)
    for name in ("variant", "layer", *(label for _, label in LABELS), "MI kept", "notes"):
        t.add_column(name, justify="right" if name.startswith("Δ") else "left")
    for r in c.rows:
        t.add_row(
            r.variant, r.layer, *(_delta(getattr(r, q)) for q, _ in LABELS), _kept(r), _flags(r)
        )
    return t


def markdown(c: Comparison, image: str | None = None) -> str:
    """Verdict line first, then the plot (`image`: its path or URL, if one was written), then
    the per-layer table and mismatches in a collapsible block."""
    lines = [f"**decoderscope compare**: {verdict(c)}", ""]
    lines.append(f"A (reference): `{c.a}` · B (new): `{c.b}`")
    thresholds = ", ".join(f"{k} {v:g}" for k, v in c.thresholds.items() if v is not None)
    lines.append(
        f"thresholds: {thresholds or 'none'}; ‼ marks a change beyond noise "
        "(|Δ| > 2 s.e. + max(0.15 nats, 5%))"
    )
    if image is not None:
        lines += ["", f"![ΔMI per layer, B − A]({image})"]
    lines += ["", "<details><summary>per-layer differences (B − A, nats)</summary>", ""]
    lines.append("| variant | layer | ΔKL | Δagg. KL | ΔMI | MI kept | notes |")
    lines.append("|---|---|---:|---:|---:|---:|---|")
    for r in c.rows:
        cells = [r.variant, f"`{r.layer}`", *(_delta(getattr(r, q)) for q, _ in LABELS)]
        lines.append("| " + " | ".join([*cells, _kept(r), _flags(r)]) + " |")
    if c.only_a or c.only_b:
        lines.append("")
        if c.only_a:
            lines.append("- only in A: " + ", ".join(f"`{x}`" for x in c.only_a))
        if c.only_b:
            lines.append("- only in B: " + ", ".join(f"`{x}`" for x in c.only_b))
    lines += ["", "</details>", ""]
    return "\n".join(lines)


def plot(c: Comparison, path: str | Path) -> None:
    """Write `figure(c)` to `path` (PNG unless its suffix names another format)."""
    save(figure(c), path, dpi=110)


def figure(c: Comparison) -> Any:
    """A small figure: ΔMI (B − A, nats) per layer with ±2 s.e. bars, one series per variant;
    changes beyond noise drawn filled and red, thresholds broken named in the title."""
    plt = pyplot()
    layers = list(dict.fromkeys(r.layer for r in c.rows))
    variants = list(dict.fromkeys(r.variant for r in c.rows))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * len(layers) + 2), 3.2))
    width = 0.8 / max(1, len(variants))
    for k, variant in enumerate(variants):
        rows = [r for r in c.rows if r.variant == variant]
        xs = [layers.index(r.layer) + (k - (len(variants) - 1) / 2) * width for r in rows]
        ys = [r.mi.mean for r in rows]
        es = [2 * r.mi.se for r in rows]
        ax.errorbar(xs, ys, yerr=es, fmt="o", mfc="white", capsize=3, label=variant)
        beyond = [(x, y) for x, y, r in zip(xs, ys, rows, strict=True) if r.mi.beyond_noise]
        if beyond:
            ax.plot(*zip(*beyond, strict=True), "o", color="tab:red", zorder=3)
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xticks(range(len(layers)), layers, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("ΔMI, B − A (nats)")
    broken = f" · {len(c.broken)} threshold(s) broken" if c.broken else ""
    ax.set_title(f"red: changed beyond noise{broken}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
