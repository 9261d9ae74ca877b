"""Renderers: rich table, Markdown and a matplotlib figure. They format; they never compute."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from .render_bounds import bound_lines

if TYPE_CHECKING:  # the report imports its renderers; they only read it
    from .mmd import Mmd
    from .report import Estimate, LayerResult, Report, VariantResult

COLUMNS = (("kl", "KL"), ("aggregate_kl", "agg. KL"), ("mi", "MI"))


def progress_display(console: Console) -> Progress:
    """The progress display every long job shows on `console`: description, bar, steps done
    of the total and an estimate of the time left."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    return Progress(*columns, console=console, transient=False)


MARK = "✗"  # a value the guard found beyond a hard bound: never shown as a plain number


def fmt(est: Estimate) -> str:
    return f"{est.mean:.2f} ± {est.se:.2f}"


def _cell(row: LayerResult, key: str, compact: bool) -> str:
    est: Estimate = getattr(row, key)
    if not math.isfinite(est.mean):
        return f"{MARK} not read" if not compact else f"{MARK}not\nread"
    text = f"{est.mean:.2f}\n±{est.se:.2f}" if compact else fmt(est)
    if key in row.unreliable:
        return f"{MARK} {text} {MARK}" if not compact else f"{MARK}{text}"
    return text


def share(row: LayerResult) -> str:
    """A row's share of the latent MI kept, marked where its MI is unreliable; '' without one."""
    if row.mi_share is None:
        return ""
    text = f"{100 * row.mi_share:.0f}%"
    return f"{MARK}{text}" if "mi" in row.unreliable else text


def _values(cell: LayerResult | None, compact: bool) -> list[str]:
    if cell is None:
        return ["–"] * 4
    return [_cell(cell, k, compact) for k, _ in COLUMNS] + [share(cell)]


def _exact_share(latent: LayerResult) -> str:
    return "100%" if latent.mi_share is not None else ""


def methods(cells: list[LayerResult | None], variants: list[str], compact: bool = False) -> str:
    """How a layer's values were read; per variant where the variants differ (in the compact
    form, "x / y" in the order of the variants' columns)."""
    found = {v: c.method for v, c in zip(variants, cells, strict=True) if c and c.method}
    if len(set(found.values())) <= 1:
        return next(iter(found.values()), "")
    if compact:
        return " / ".join(found.values())
    return ", ".join(f"{v}: {m}" for v, m in found.items())


def status(cells: list[LayerResult | None]) -> str:
    return "unreliable" if any(c is not None and c.status for c in cells) else ""


def _rows(report: Report) -> list[tuple[str, str, str, list[LayerResult | None]]]:
    """(name, type, shape, [row per variant]) in the trained variant's layer order."""
    first = report.variants[0]
    out = []
    for row in first.layers:
        cells: list[LayerResult | None] = []
        for v in report.variants:
            cells.append(next((r for r in v.layers if r.name == row.name), None))
        out.append((row.name, row.type, "×".join(map(str, row.shape)), cells))
    return out


def table(report: Report) -> Table:
    """Side-by-side rich table: one row per layer (type and shape under its name), a column group
    per variant; compact enough for an 80-column terminal with two variants."""
    t = Table(
        title="information through the decoder (nats, mean±s.e.)",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        padding=(0, 0),
    )
    t.add_column("layer", style="bold", overflow="fold")
    for v in report.variants:
        for _key, label in COLUMNS:
            t.add_column(f"{v.name}\n{label}", justify="right", overflow="fold", min_width=7)
        t.add_column(f"{v.name}\nMI kept", justify="right", overflow="fold", min_width=7)
    variants = [v.name for v in report.variants]
    for name, typ, shape, cells in _rows(report):
        values: list[str] = []
        for cell in cells:
            values += _values(cell, compact=True)
        label = name
        if typ != "latent":
            label += f"\n[dim]{typ} {shape}\n{methods(cells, variants, compact=True)}[/dim]"
        if status(cells):
            label += f"\n[red]{MARK} unreliable[/red]"
        t.add_row(label, *values)
        latent = cells[0]
        if latent is not None and latent.exact is not None:
            ex = latent.exact
            exact_cells = [f"{ex.kl:.2f}", f"{ex.aggregate_kl:.2f}", f"{ex.mi:.2f}"]
            exact_cells.append(_exact_share(latent))
            t.add_row(" exact", *(exact_cells * len(report.variants)), style="dim")
    return t


def _steps(s: dict[str, Any]) -> str:
    """'1000 steps', or '250 of 1000 steps' when the critics stopped early."""
    run, most = s.get("steps_run"), s.get("steps")
    return f"{run} of {most} steps" if run is not None and run != most else f"{most} steps"


def print_report(report: Report, console: Console) -> None:
    console.print(table(report))
    s = report.settings
    console.print(
        f"N = {report.model.n_data} data points (MI ≤ log N = {s.get('log_n', 0):.2f}); "
        f"estimator {s.get('estimator')}, {s.get('bridges')} bridge(s), "
        f"{_steps(s)} × {s.get('batch_size')}; runs: "
        + ", ".join(f"{v.name} {v.runs}" for v in report.variants)
    )
    for line in bound_lines(report):
        console.print(line, highlight=False, markup=False)
    if report.diagnostics:
        console.print("[bold]Diagnostics[/bold]")
        for d in report.diagnostics:
            where = " / ".join(x for x in (d.variant, d.layer) if x)
            style = "yellow" if d.level == "warning" else "dim"
            console.print(f"[{style}]{d.level}[/{style}] {where}: {d.message}", highlight=False)


def markdown(report: Report) -> str:
    """A report fit for a pull-request comment: settings, side-by-side table, diagnostics."""
    s = report.settings
    lines = [
        "## decoderscope report",
        "",
        f"- model: `{report.model.source}`, latent shape {list(report.model.latent_shape)}, "
        f"N = {report.model.n_data} data points (MI ≤ log N = {s.get('log_n', 0):.2f} nats)",
        f"- estimator: {s.get('estimator')}, {s.get('bridges')} bridge(s), {_steps(s)} "
        f"× {s.get('batch_size')} samples; seeds {s.get('seeds')}, random inits "
        f"{s.get('random_inits')}, device {s.get('device')}, seed {s.get('seed')}",
        f"- decoderscope {report.version}; values in nats, mean ± standard error over runs",
    ]
    bad = report.unreliable_rows()
    if bad:
        lines.append(
            f"- {MARK} marks {len(bad)} row(s) with a value beyond a hard bound (KL ≥ 0, "
            "0 ≤ MI ≤ log N, data processing) beyond its error bars: not to be trusted; "
            "the reasons are under Diagnostics"
        )
    lines.append("")
    header = ["layer", "type", "shape", "method"]
    for v in report.variants:
        header += [f"{v.name} {label}" for _k, label in COLUMNS] + [f"{v.name} MI kept"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * 4 + "---:|" * (len(header) - 4))
    for name, typ, shape, cells in _rows(report):
        flag = f" {MARK} unreliable" if status(cells) else ""
        values = [f"`{name}`{flag}", typ, shape, methods(cells, [v.name for v in report.variants])]
        for cell in cells:
            values += _values(cell, compact=False)
        lines.append("| " + " | ".join(values) + " |")
        latent = cells[0]
        if latent is not None and latent.exact is not None:
            ex = latent.exact
            exact = [f"*{ex.kl:.2f}*", f"*{ex.aggregate_kl:.2f}*", f"*{ex.mi:.2f}*"]
            exact.append(f"*{_exact_share(latent)}*" if latent.mi_share is not None else "")
            lines.append("| *exact* | | | | " + " | ".join(exact * len(report.variants)) + " |")
    extra = bound_lines(report)
    if extra:
        lines += ["", "### Bounds and the latent", ""] + [f"- {line}" for line in extra]
    if report.diagnostics:
        lines += ["", "### Diagnostics", ""]
        for d in report.diagnostics:
            where = " / ".join(x for x in (d.variant, d.layer) if x)
            lines.append(f"- **{d.level}** {where}: {d.message}")
    return "\n".join(lines) + "\n"


MIN_SPAN = 0.5  # nats: the smallest y range drawn, so that noise never fills an axis


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg back end: figures go to files, never to a screen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, path: str | Path, dpi: int = 120) -> None:
    """Write `fig` to `path` (PNG unless its suffix names another format) and free it."""
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def plot(report: Report, path: str | Path) -> None:
    """Write `figure(report)` to `path` (PNG unless its suffix names another format)."""
    save(figure(report), path)


def figure(report: Report) -> Any:
    """Per layer KL, aggregate KL and MI with error bars, one line per variant (the paper's
    Figure 1 style), the exact latent values as dotted lines; MMD^2 per layer where the rows
    carry it; below, where rows carry an attribution, a heat map per variant of the MI's Shapley
    values (layers x latent units, nats; blank: not attributed). Nats axes span at least
    MIN_SPAN and show plain values (no offset); ticks name each layer and its type."""
    plt = pyplot()
    first = report.variants[0].layers
    columns = list(COLUMNS)
    if any(r.mmd2 is not None for v in report.variants for r in v.layers):
        columns.append(("mmd2", "MMD²"))
    attributed = [v for v in report.variants if any(r.attribution for r in v.layers)]
    fig = plt.figure(figsize=(4.3 * len(columns) + 0.4, 4.6 * (1 + (len(attributed) > 0))))
    grid = fig.add_gridspec(1 + (len(attributed) > 0), len(columns))
    axes = [fig.add_subplot(grid[0, k]) for k in range(len(columns))]
    names = [r.name for r in first]
    ticks = [r.name if r.type == "latent" else f"{r.name}\n{r.type}" for r in first]
    exact = first[0].exact
    for ax, (key, label) in zip(axes, columns, strict=True):
        for v in report.variants:
            _plot_variant(ax, v, key, names)
        if key == "mmd2":
            ax.set_title("MMD² (Gaussian kernel, median bandwidth)")
        else:
            _nats_axis(ax, label, None if exact is None else getattr(exact, key))
        ax.set_xticks(range(len(names)), ticks, rotation=45, ha="right", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend()
    span = len(columns) // max(1, len(attributed))  # the variants share the lower row
    values = [x for v in attributed for r in v.layers if r.attribution for x in r.attribution.mi]
    scale = (min(0.0, *values), max(0.0, *values)) if values else (0.0, 1.0)  # one colour scale
    for k, v in enumerate(attributed):
        ax = fig.add_subplot(grid[1, k * span : (k + 1) * span])
        _heat_map(fig, ax, v, report, scale)
    fig.suptitle(
        f"information through the decoder: {report.model.source}, N = {report.model.n_data}"
    )
    fig.tight_layout()
    return fig


def _nats_axis(ax: Any, label: str, exact: float | None) -> None:
    if exact is not None:
        ax.axhline(exact, color="grey", ls=":", lw=1, label="exact (latent)")
    ax.set_title(f"{label} (nats)")
    ax.ticklabel_format(axis="y", useOffset=False, style="plain")
    low, high = ax.get_ylim()
    if high - low < MIN_SPAN:
        mid = 0.5 * (low + high)
        ax.set_ylim(mid - MIN_SPAN / 2, mid + MIN_SPAN / 2)


def _heat_map(
    fig: Any, ax: Any, v: VariantResult, report: Report, scale: tuple[float, float]
) -> None:
    """The variant's MI attribution, layers (rows) x latent units or channels (columns)."""
    import numpy as np

    width = max(len(r.attribution.mi) for r in v.layers if r.attribution)
    grid = np.full((len(v.layers), width), np.nan)
    for i, r in enumerate(v.layers):
        if r.attribution:
            grid[i] = r.attribution.mi
    image = ax.imshow(
        grid, aspect="auto", cmap="viridis", interpolation="nearest", vmin=scale[0], vmax=scale[1]
    )
    unit = "channel" if len(report.model.latent_shape) > 1 else "latent unit"
    ax.set_xlabel(unit)
    ax.set_yticks(range(len(v.layers)), [r.name for r in v.layers], fontsize=8)
    ax.set_title(f"{v.name}: MI by {unit} (Shapley, nats)")
    fig.colorbar(image, ax=ax)


def _plot_variant(ax: object, v: VariantResult, key: str, names: list[str]) -> None:
    xs, ys, es = [], [], []
    for i, name in enumerate(names):
        row = next((r for r in v.layers if r.name == name), None)
        if row is not None:
            est: Estimate | Mmd | None = getattr(row, key)
            if est is None:
                continue
            xs.append(i)
            ys.append(est.mean)
            es.append(est.se)
    ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=v.name)  # type: ignore[attr-defined]
