"""Where a report goes: every output path checked before any work, and a finished run's results
never lost to a path that fails when written."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .errors import ArgumentError


class Written(Protocol):
    """A result that writes itself: a `Report` or a `compare.Comparison`."""

    def to_json(self) -> str: ...

    def to_markdown(self) -> str: ...


def _plotter(result: Written) -> Callable[[Path], None]:
    """The figure of a `Report` or of a `Comparison`."""
    from .compare import Comparison
    from .render import plot
    from .render_compare import plot as plot_comparison

    if isinstance(result, Comparison):
        return lambda p: plot_comparison(result, p)
    return lambda p: plot(result, p)  # type: ignore[arg-type]


def _markdown(result: Written, plot: Path | None, markdown: Path) -> str:
    """A comparison's Markdown shows its plot where one was written (path relative to it)."""
    from .compare import Comparison

    if isinstance(result, Comparison) and plot is not None:
        return result.to_markdown(os.path.relpath(plot, markdown.parent))
    return result.to_markdown()


FALLBACK = "decoderscope-report.json"  # in the working folder, where an output could not be written


@dataclass(frozen=True)
class Outputs:
    """Checked output paths: JSON (`stdout` for '-'), Markdown and a figure (suffix added)."""

    json: Path | None = None
    stdout: bool = False
    markdown: Path | None = None
    plot: Path | None = None


def _file(option: str, value: str | Path, example: str) -> Path:
    path = Path(value)
    if path.is_dir():
        raise ArgumentError(
            f"{option} {str(value)!r} is a folder; give a file path, e.g. {path / example}"
        )
    parent = path.parent
    if not parent.is_dir():
        raise ArgumentError(
            f"{option} {str(value)!r}: folder {str(parent)!r} does not exist; create it first "
            f"(mkdir -p {parent})"
        )
    return path


def check_outputs(json: str | None, markdown: Path | None, plot: Path | None) -> Outputs:
    """Outputs with every path checked (existing folder, not itself a folder); a figure path
    without a suffix gets '.png', as matplotlib would write it."""
    png = None
    if plot is not None:
        png = _file("--plot", plot, "layers.png")
        if not png.suffix:
            png = png.with_suffix(".png")
    return Outputs(
        json=_file("--json", json, "report.json") if json not in (None, "-") else None,
        stdout=json == "-",
        markdown=_file("--markdown", markdown, "report.md") if markdown is not None else None,
        plot=png,
    )


def write_outputs(result: Written, outputs: Outputs) -> tuple[list[str], list[str]]:
    """Write every output; returns (what was written, what failed and why). Where any failed and
    the JSON was not written, the JSON goes to FALLBACK (or the next free name) so the run's
    results survive."""
    done: list[str] = []
    failed: list[str] = []
    jobs: list[tuple[Path | None, Callable[[Path], object]]] = [
        (outputs.json, lambda p: p.write_text(result.to_json() + "\n")),
        (outputs.plot, _plotter(result)),
        (outputs.markdown, lambda p: p.write_text(_markdown(result, outputs.plot, p))),
    ]
    for path, write in jobs:
        if path is None:
            continue
        try:
            write(path)
            done.append(str(path))
        except (OSError, ValueError) as exc:
            failed.append(f"{path}: {exc}")
    if failed and str(outputs.json) not in done and not outputs.stdout:
        rescue = Path(FALLBACK)
        k = 1
        while rescue.exists():
            rescue = Path(f"decoderscope-report-{k}.json")
            k += 1
        rescue.write_text(result.to_json() + "\n")
        done.append(f"{rescue} (the run's results, kept since an output failed)")
    return done, failed
