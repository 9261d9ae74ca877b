"""Two reports side by side: per variant and layer, the change of KL, aggregate KL and MI with its
standard error, whether it is beyond noise, and whether it breaks the reviewer's thresholds.

B is the new report, A the reference: a difference is B - A (nats).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import ArgumentError, DecoderscopeError
from .estimators.stats import tolerance
from .report import QUANTITIES, Estimate, LayerResult, Report

SCHEMA = "decoderscope.compare/1"


@dataclass(frozen=True)
class Delta:
    """B - A for one value (nats), its standard error (A's and B's in quadrature), and whether
    it is beyond noise: |difference| > 2 s.e. + the stated tolerance of A's value."""

    mean: float
    se: float
    beyond_noise: bool

    @classmethod
    def of(cls, a: Estimate, b: Estimate) -> Delta:
        mean, se = b.mean - a.mean, math.hypot(a.se, b.se)
        beyond = not math.isfinite(mean) or abs(mean) > 2 * se + tolerance(a.mean)
        return cls(mean, se, beyond)

    def to_dict(self) -> dict[str, Any]:
        finite = math.isfinite(self.mean)
        return {
            "mean": self.mean if finite else None,
            "se": self.se if math.isfinite(self.se) else None,
            "beyond_noise": self.beyond_noise,
        }


@dataclass(frozen=True)
class LayerDelta:
    """One layer of one variant in both reports: A's and B's rows and the differences."""

    variant: str
    layer: str
    a: LayerResult
    b: LayerResult
    kl: Delta
    aggregate_kl: Delta
    mi: Delta
    broken: tuple[str, ...] = ()  # thresholds this layer breaks, as sentences

    @property
    def kept_drop(self) -> float | None:
        """Drop of the share of latent MI kept, A's share minus B's (None without both)."""
        if self.a.mi_share is None or self.b.mi_share is None:
            return None
        return self.a.mi_share - self.b.mi_share

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"variant": self.variant, "layer": self.layer}
        d.update({q: getattr(self, q).to_dict() for q in QUANTITIES})
        d["mi_share"] = {"a": self.a.mi_share, "b": self.b.mi_share}
        d["unreliable"] = {"a": self.a.status is not None, "b": self.b.status is not None}
        d["broken"] = list(self.broken)
        return d


@dataclass(frozen=True)
class Comparison:
    """The result of `compare`: matched rows, rows found in only one report, thresholds."""

    a: str
    b: str
    rows: tuple[LayerDelta, ...]
    only_a: tuple[str, ...]
    only_b: tuple[str, ...]
    thresholds: dict[str, float | None] = field(default_factory=dict)

    @property
    def broken(self) -> list[str]:
        return [f"{r.variant}/{r.layer}: {why}" for r in self.rows for why in r.broken]

    @property
    def changed(self) -> list[LayerDelta]:
        return [r for r in self.rows if any(getattr(r, q).beyond_noise for q in QUANTITIES)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "a": self.a,
            "b": self.b,
            "thresholds": dict(self.thresholds),
            "broken": self.broken,
            "rows": [r.to_dict() for r in self.rows],
            "only_a": list(self.only_a),
            "only_b": list(self.only_b),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def to_markdown(self, image: str | None = None) -> str:
        """Markdown for a pull-request comment; `image`: where the plot is (path or URL)."""
        from .render_compare import markdown

        return markdown(self, image)


def _check_threshold(name: str, value: float | None) -> float | None:
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise ArgumentError(f"{name} must be a number >= 0, got {value!r}")
    return value


def _broken(row: LayerDelta, max_mi_drop: float | None, max_kept_drop: float | None) -> list[str]:
    """The thresholds a row breaks; a drop counts only where it is beyond noise."""
    out = []
    drop = -row.mi.mean
    if max_mi_drop is not None and row.mi.beyond_noise and drop > max_mi_drop:
        out.append(f"MI fell by {drop:.2f} ± {row.mi.se:.2f} nats (> {max_mi_drop:g})")
    kept = row.kept_drop
    if max_kept_drop is not None and kept is not None and row.mi.beyond_noise:
        if kept > max_kept_drop:
            out.append(f"MI kept fell by {100 * kept:.0f} points (> {100 * max_kept_drop:g})")
    return out


def compare_reports(
    a: Report,
    b: Report,
    max_mi_drop: float | None = None,
    max_kept_drop: float | None = None,
) -> Comparison:
    """Per variant and layer (matched by name), B - A with standard errors; rows in one report
    only are listed. `max_mi_drop` (nats) and `max_kept_drop` (share, 0-1): a layer breaks them
    where MI or the share of latent MI kept falls by more, beyond noise."""
    max_mi_drop = _check_threshold("max_mi_drop", max_mi_drop)
    max_kept_drop = _check_threshold("max_kept_drop", max_kept_drop)
    rows: list[LayerDelta] = []
    names_a, names_b = {v.name for v in a.variants}, {v.name for v in b.variants}
    only_a = [v.name for v in a.variants if v.name not in names_b]
    only_b = [v.name for v in b.variants if v.name not in names_a]
    for va in (v for v in a.variants if v.name in names_b):
        vb = b.variant(va.name)
        by_name = {r.name: r for r in vb.layers}
        in_a = {r.name for r in va.layers}
        only_a += [f"{va.name}/{r.name}" for r in va.layers if r.name not in by_name]
        only_b += [f"{va.name}/{r.name}" for r in vb.layers if r.name not in in_a]
        for ra in (r for r in va.layers if r.name in by_name):
            rb = by_name[ra.name]
            kl, agg, mi = (Delta.of(getattr(ra, q), getattr(rb, q)) for q in QUANTITIES)
            row = LayerDelta(va.name, ra.name, ra, rb, kl, agg, mi)
            rows.append(replace(row, broken=tuple(_broken(row, max_mi_drop, max_kept_drop))))
    thresholds = {"max_mi_drop": max_mi_drop, "max_kept_drop": max_kept_drop}
    source_a, source_b = a.model.source, b.model.source
    return Comparison(source_a, source_b, tuple(rows), tuple(only_a), tuple(only_b), thresholds)


def load_report(path: str | Path) -> Report:
    """A report from a JSON file written by `inspect --json` or `Report.to_json`."""
    p = Path(path)
    if not p.is_file():
        raise DecoderscopeError(f"report {str(path)!r} does not exist or is not a file")
    return Report.from_json(p.read_text())


def compare(
    a: Report | str | Path,
    b: Report | str | Path,
    max_mi_drop: float | None = None,
    max_kept_drop: float | None = None,
    **inspect_args: Any,
) -> Comparison:
    """Compare two reports, or two checkpoints inspected first with the same `inspect_args`
    (settings, seed, ...): a path ending in .json is a report, any other a checkpoint."""
    return compare_reports(
        _report(a, inspect_args), _report(b, inspect_args), max_mi_drop, max_kept_drop
    )


def _report(x: Report | str | Path, inspect_args: dict[str, Any]) -> Report:
    if isinstance(x, Report):
        return x
    if Path(x).suffix == ".json":
        return load_report(x)
    from .checkpoints import load_checkpoint
    from .pipeline import inspect_loaded

    args = dict(inspect_args)
    model, trust = args.pop("model", None), args.pop("trust", False)
    data = args.pop("data", None)
    return inspect_loaded(load_checkpoint(x, model=model, trust=trust), data, **args)
