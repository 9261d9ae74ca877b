"""A sweep's renderers: its progress bar, a rich summary per checkpoint and a figure of MI per
layer across checkpoints. They format; they never compute."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from .render import MIN_SPAN, progress_display, pyplot, save, share

if TYPE_CHECKING:
    from .report import LayerResult, Report
    from .sweep import Sweep, SweepEntry

RUN = ("done", "failed")  # entries that a worker ran now: the progress bar counts only these


def _line(entry: SweepEntry) -> str:
    if entry.status == "failed":
        return f"[red]failed[/red] {entry.label}: {entry.error}"
    took = f" in {entry.seconds:.1f} s" if entry.seconds is not None else ""
    tries = f" ({entry.attempts} tries)" if entry.attempts > 1 else ""
    return f"{entry.status} {entry.label}{took}{tries}"


@contextmanager
def progress_bar(
    enabled: bool | None, total: int, backend: str
) -> Iterator[Callable[[SweepEntry], None]]:
    """A bar over the checkpoints that must be inspected (cached ones and reports are listed, not
    counted, so the time left is that of the work left); yields `advance(entry)`."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield lambda _entry: None
        return
    with progress_display(Console(stderr=True)) as bar:
        task = bar.add_task(f"sweep on {backend}", total=total)

        def advance(entry: SweepEntry) -> None:
            bar.console.print(_line(entry), highlight=False)
            if entry.status in RUN:
                bar.advance(task)

        yield advance


def _last(report: Report, variant: str) -> LayerResult | None:
    found = [v for v in report.variants if v.name == variant]
    return found[0].layers[-1] if found and len(found[0].layers) > 1 else None


def _kept(row: LayerResult | None) -> str:
    return (share(row) if row is not None else "") or "–"


def summary(sweep: Sweep) -> Table:
    """One row per checkpoint: status, the latent's MI, and the share of it kept at the last layer
    (trained and random)."""
    table = Table(title="decoderscope sweep", title_justify="left")
    for name in ("checkpoint", "status", "latent MI", "kept: trained", "kept: random", "seconds"):
        table.add_column(name, justify="left" if name in ("checkpoint", "status") else "right")
    for e in sweep.entries:
        if e.report is None:
            table.add_row(e.label, "[red]failed[/red]", "–", "–", "–", _seconds(e))
            continue
        latent = e.report.variants[0].layers[0]
        mi = f"{latent.exact.mi:.2f}" if latent.exact is not None else f"{latent.mi.mean:.2f}"
        trained, random = _last(e.report, "trained"), _last(e.report, "random")
        table.add_row(e.label, e.status, mi, _kept(trained), _kept(random), _seconds(e))
    return table


def _seconds(e: SweepEntry) -> str:
    return f"{e.seconds:.1f}" if e.seconds is not None else ""


def print_summary(sweep: Sweep, console: Console) -> None:
    console.print(summary(sweep))
    for e in sweep.failed:
        console.print(f"[red]failed:[/red] {e.checkpoint}: {e.error}", highlight=False)


def plot_sweep(sweep: Sweep, path: str | Path) -> None:
    """Write `figure(sweep)` to `path`."""
    save(figure(sweep), path)


def figure(sweep: Sweep) -> Any:
    """Left: MI (nats) per layer of the trained decoder across checkpoints, with error bars.
    Right: the share of the latent's MI each layer keeps, trained (solid) and random (dashed).
    Values marked unreliable are left out, not drawn as plain points."""
    plt = pyplot()
    shown = [e for e in sweep.entries if e.report is not None]
    names = list(dict.fromkeys(r.name for e in shown for r in e.report.variants[0].layers))  # type: ignore[union-attr]
    planes = [e for e in shown if e.report.bounds is not None]  # type: ignore[union-attr]
    fig, axes = plt.subplots(1, 3 if planes else 2, figsize=(19 if planes else 13, 4.6))
    ax_mi, ax_kept = axes[0], axes[1]
    if planes:
        _rate_distortion(axes[2], planes)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, name in enumerate(names):
        colour = colours[i % len(colours)]
        for variant, style in (("trained", "-"), ("random", "--")):
            xs, ys, es, shares = [], [], [], []
            for x, e in enumerate(shown):
                row = _row(e.report, variant, name)  # type: ignore[arg-type]
                if row is None or "mi" in row.unreliable or not math.isfinite(row.mi.mean):
                    continue
                xs.append(x)
                ys.append(row.mi.mean)
                es.append(row.mi.se)
                shares.append(row.mi_share)
            if not xs:
                continue
            label = name if variant == "trained" else None
            if variant == "trained":
                ax_mi.errorbar(xs, ys, yerr=es, marker="o", capsize=3, color=colour, label=label)
            kept = [(x, 100 * s) for x, s in zip(xs, shares, strict=True) if s is not None]
            if kept and name != "latent":  # the latent keeps 100% by definition
                ax_kept.plot(*zip(*kept, strict=True), style, marker="o", color=colour)
    ticks = [e.label for e in shown]
    for ax, title in ((ax_mi, "MI, trained decoder (nats)"), (ax_kept, "latent MI kept (%)")):
        ax.set_title(title)
        ax.set_xticks(range(len(ticks)), ticks, rotation=45, ha="right", fontsize=8)
        ax.ticklabel_format(axis="y", useOffset=False, style="plain")
        ax.grid(alpha=0.3)
    low, high = ax_mi.get_ylim()
    if high - low < MIN_SPAN:  # noise never fills an axis
        mid = 0.5 * (low + high)
        ax_mi.set_ylim(mid - MIN_SPAN / 2, mid + MIN_SPAN / 2)
    low, high = ax_kept.get_ylim()
    ax_kept.set_ylim(min(0.0, low), max(105.0, high))
    ax_kept.plot([], [], "k-", label="trained")
    ax_kept.plot([], [], "k--", label="random")
    ax_kept.legend(fontsize=8)
    ax_mi.legend(fontsize=8, title="layer")
    fig.suptitle(f"information across {len(shown)} checkpoint(s)")
    fig.tight_layout()
    return fig


def _rate_distortion(ax: Any, entries: list[SweepEntry]) -> None:
    """The rate-distortion plane ("Fixing a Broken ELBO"): one point per checkpoint with a
    likelihood, distortion (± s.e.) against rate, labelled."""
    for e in entries:
        b = e.report.bounds if e.report is not None else None
        if b is None:
            continue
        ax.errorbar(b.distortion.mean, b.rate.mean, xerr=b.distortion.se, fmt="o", capsize=3)
        ax.annotate(e.label, (b.distortion.mean, b.rate.mean), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")  # fmt: skip
    ax.set_xlabel("distortion D (nats)")
    ax.set_ylabel("rate R (nats)")
    ax.set_title("rate–distortion plane")
    ax.grid(alpha=0.3)


def _row(report: Report, variant: str, name: str) -> LayerResult | None:
    for v in report.variants:
        if v.name == variant:
            return next((r for r in v.layers if r.name == name), None)
    return None
