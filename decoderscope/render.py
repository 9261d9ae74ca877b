"""Renderers: rich table, Markdown and a matplotlib figure. They format; they never compute."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:  # the report imports its renderers; they only read it
    from .report import Estimate, LayerResult, Report, VariantResult

COLUMNS = (("kl", "KL"), ("aggregate_kl", "agg. KL"), ("mi", "MI"))


def fmt(est: Estimate) -> str:
    return f"{est.mean:.2f} ± {est.se:.2f}"


def _share(row: LayerResult) -> str:
    return "" if row.mi_share is None else f"{100 * row.mi_share:.0f}%"


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


def _compact(est: Estimate) -> str:
    return f"{est.mean:.2f}\n±{est.se:.2f}"


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
    for name, typ, shape, cells in _rows(report):
        values: list[str] = []
        for cell in cells:
            if cell is None:
                values += ["–"] * 4
            else:
                values += [_compact(getattr(cell, k)) for k, _ in COLUMNS] + [_share(cell)]
        label = name if typ == "latent" else f"{name}\n[dim]{typ} {shape}[/dim]"
        t.add_row(label, *values)
        latent = cells[0]
        if latent is not None and latent.exact is not None:
            ex = latent.exact
            exact_cells = [f"{ex.kl:.2f}", f"{ex.aggregate_kl:.2f}", f"{ex.mi:.2f}", "100%"]
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
        "",
    ]
    header = ["layer", "type", "shape"]
    for v in report.variants:
        header += [f"{v.name} {label}" for _k, label in COLUMNS] + [f"{v.name} MI kept"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * 3 + "---:|" * (len(header) - 3))
    for name, typ, shape, cells in _rows(report):
        values = [f"`{name}`", typ, shape]
        for cell in cells:
            if cell is None:
                values += ["–"] * 4
            else:
                values += [fmt(getattr(cell, k)) for k, _ in COLUMNS] + [_share(cell)]
        lines.append("| " + " | ".join(values) + " |")
        latent = cells[0]
        if latent is not None and latent.exact is not None:
            ex = latent.exact
            exact = [f"*{ex.kl:.2f}*", f"*{ex.aggregate_kl:.2f}*", f"*{ex.mi:.2f}*", "*100%*"]
            lines.append("| *exact* | | | " + " | ".join(exact * len(report.variants)) + " |")
    if report.diagnostics:
        lines += ["", "### Diagnostics", ""]
        for d in report.diagnostics:
            where = " / ".join(x for x in (d.variant, d.layer) if x)
            lines.append(f"- **{d.level}** {where}: {d.message}")
    return "\n".join(lines) + "\n"


def plot(report: Report, path: str | Path) -> None:
    """Per layer KL, aggregate KL and MI with error bars, one line per variant (the paper's
    Figure 1 style); the exact latent values as dotted lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4), sharex=True)
    names = [r.name for r in report.variants[0].layers]
    x = list(range(len(names)))
    exact = report.variants[0].layers[0].exact
    for ax, (key, label) in zip(axes, COLUMNS, strict=True):
        for v in report.variants:
            _plot_variant(ax, v, key, names)
        if exact is not None:
            ax.axhline(getattr(exact, key), color="grey", ls=":", lw=1, label="exact (latent)")
        ax.set_title(f"{label} (nats)")
        ax.set_xticks(x, names, rotation=45, ha="right")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_variant(ax: object, v: VariantResult, key: str, names: list[str]) -> None:
    xs, ys, es = [], [], []
    for i, name in enumerate(names):
        row = next((r for r in v.layers if r.name == name), None)
        if row is not None:
            est: Estimate = getattr(row, key)
            xs.append(i)
            ys.append(est.mean)
            es.append(est.se)
    ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=v.name)  # type: ignore[attr-defined]
