"""`sweep`: many checkpoints inspected with the same settings and seed, on a local process pool or
a Ray cluster. Each finished checkpoint's report is cached under OUT/cache/ by the checkpoint's
content and the settings, so an interrupted sweep resumes where it stopped; reports (.json) may
be swept too (e.g. those a `Tracker` saved during training)."""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import ArgumentError, DecoderscopeError
from .estimators.settings import Settings
from .report import QUANTITIES, Report
from .version import __version__
from .workers import Job, Outcome, run_local, run_ray, usable_cores, write_atomic

SCHEMA = "decoderscope.sweep/1"
SUFFIXES = (".pt", ".pth", ".ckpt", ".json")  # what a folder contributes
DONE, CACHED, REPORT, FAILED = "done", "cached", "report", "failed"
CSV_COLUMNS = (
    "checkpoint", "variant", "layer", "type", "method",
    "kl", "kl_se", "aggregate_kl", "aggregate_kl_se", "mi", "mi_se", "mi_share", "unreliable",
)  # fmt: skip


@dataclass(frozen=True)
class SweepEntry:
    """One checkpoint (or report) of a sweep. status: `done` (inspected now), `cached` (a report
    for the same content and settings was found), `report` (the input was a report) or `failed`
    (error says why). attempts: how many times a worker ran it now."""

    checkpoint: str
    label: str
    status: str
    report: Report | None = None
    error: str | None = None
    key: str | None = None
    attempts: int = 0
    seconds: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "checkpoint": self.checkpoint,
            "label": self.label,
            "status": self.status,
            "report": f"reports/{self.label}.json" if self.report is not None else None,
            "error": self.error,
            "key": self.key,
            "attempts": self.attempts,
            "seconds": self.seconds,
            "bounds": self.report.bounds.to_dict() if self.report and self.report.bounds else None,
        }


@dataclass(frozen=True)
class Sweep:
    """The result of `sweep`: one entry per checkpoint, in the order given."""

    entries: tuple[SweepEntry, ...]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> list[SweepEntry]:
        return [e for e in self.entries if e.status == FAILED]

    def rows(self) -> list[dict[str, Any]]:
        """One row per checkpoint x variant x layer (CSV_COLUMNS); values in nats, None where a
        value was not read."""
        out = []
        for e in self.entries:
            if e.report is None:
                continue
            for v in e.report.variants:
                for r in v.layers:
                    row: dict[str, Any] = {"checkpoint": e.label, "variant": v.name}
                    row.update(layer=r.name, type=r.type, method=r.method)
                    for q in QUANTITIES:
                        d = getattr(r, q).to_dict()
                        row[q], row[f"{q}_se"] = d["mean"], d["se"]
                    row["mi_share"] = r.mi_share
                    row["unreliable"] = " ".join(r.unreliable)
                    out.append(row)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "version": __version__,
            "settings": self.settings,
            "checkpoints": [e.to_dict() for e in self.entries],
            "rows": self.rows(),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def to_csv(self) -> str:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows())
        return buf.getvalue()


def _natural(path: Path) -> list[Any]:
    """Sort key: epoch=2 before epoch=10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def expand(paths: Sequence[str | Path], out: Path | None = None) -> list[Path]:
    """Files, folders (their .pt/.pth/.ckpt/.json files, not those under `out`) and glob patterns,
    each group in natural order, duplicates dropped."""
    found: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_file():
            group = [p]
        elif p.is_dir():
            group = [f for f in p.iterdir() if f.is_file() and f.suffix in SUFFIXES]
            if out is not None:
                group = [f for f in group if out.resolve() not in f.resolve().parents]
            if not group:
                raise ArgumentError(f"folder {str(raw)!r} holds no {'/'.join(SUFFIXES)} files")
        else:
            group = [Path(f) for f in glob.glob(str(raw), recursive=True) if Path(f).is_file()]
            if not group:
                raise ArgumentError(f"{str(raw)!r} is not a file or folder and matches no files")
        found += sorted(group, key=_natural)
    first: dict[Path, Path] = {}
    for f in found:
        first.setdefault(f.resolve(), f)
    unique = list(first.values())
    if not unique:
        raise ArgumentError("sweep needs at least one checkpoint or report")
    return unique


def labels(files: Sequence[Path]) -> list[str]:
    """A distinct, file-name-safe label per file: its path below the files' common folder, without
    the suffix where that stays distinct."""
    common = Path(os.path.commonpath([str(f.resolve().parent) for f in files]))
    rel = [f.resolve().relative_to(common) for f in files]
    short = [str(r.with_suffix("")).replace("/", "__") for r in rel]
    return [
        s if short.count(s) == 1 else str(r).replace("/", "__")
        for s, r in zip(short, rel, strict=True)
    ]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sha256_tensor(t: torch.Tensor) -> str:
    flat = t.detach().cpu().contiguous().reshape(-1)
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_key(path: Path, settings: dict[str, Any]) -> str:
    """The cache's key for a checkpoint: its content and every setting that changes its report."""
    text = json.dumps({"file": _sha256_file(path), **settings}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def sweep(
    paths: str | Path | Sequence[str | Path],
    out: str | Path,
    *,
    workers: int | None = None,
    ray: str | None = None,
    data: torch.Tensor | None = None,
    model: str | None = None,
    trust: bool = False,
    layers: Sequence[str] | None = None,
    random_inits: int = 3,
    seeds: int = 3,
    device: str = "auto",
    seed: int = 0,
    settings: Settings | None = None,
    output_key: str | int | None = None,
    likelihood: str | None = None,
    threads: int | None = None,
    retries: int = 1,
    progress: bool | None = None,
) -> Sweep:
    """Inspect every checkpoint in `paths` (files, folders, globs; reports are read, not
    inspected) with the same settings and seed; write OUT/sweep.json, OUT/sweep.csv, OUT/sweep.png
    and OUT/reports/LABEL.json. Runs on `workers` local processes (default: one per core, at most
    one per checkpoint) with `threads` torch threads each (default: cores // workers), or on Ray
    (`ray`: 'auto', 'local' or a cluster address). A worker that dies is retried `retries` times;
    a checkpoint that still fails is reported as failed, with why, and the others are kept."""
    from .pipeline import check_count, resolve_device
    from .render_sweep import progress_bar

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ArgumentError(f"--out {str(out)!r} is a file; give a folder for the sweep's outputs")
    if ray is not None and workers is not None:
        raise ArgumentError("--workers sizes the local pool; with --ray, Ray schedules the tasks")
    files = expand([paths] if isinstance(paths, str | Path) else list(paths), out)
    retries = check_count("retries", retries, 0)
    if ray is None:
        workers = check_count("workers", workers or min(len(files), usable_cores()), 1)
    # the pool shares this machine's cores; a Ray task takes one CPU unless told otherwise
    default_threads = 1 if ray is not None else max(1, usable_cores() // (workers or 1))
    threads = check_count("threads", threads or default_threads, 1)
    settings = settings or Settings()
    inspect_args: dict[str, Any] = {
        "layers": list(layers) if layers is not None else None,
        "random_inits": check_count("random_inits", random_inits, 0),
        "seeds": check_count("seeds", seeds, 1),
        "device": str(resolve_device(device)),
        "seed": check_count("seed", seed, 0),
        "output_key": output_key,
        "likelihood": likelihood,
        "settings": settings,
    }
    keyed = {
        **inspect_args,
        "settings": settings.as_dict(),
        "version": __version__,
        "model": model,
        "data": _sha256_tensor(torch.as_tensor(data)) if data is not None else None,
    }
    order = labels(files)
    entries, jobs = _plan(files, order, keyed, out, (model, trust, data, inspect_args, threads))
    backend = f"ray ({ray})" if ray is not None else f"local ({workers} worker(s))"
    with progress_bar(progress, len(jobs), backend) as advance:
        for entry in entries.values():
            _keep(entry, out, advance)

        def on_done(job: Job, outcome: Outcome) -> None:
            entries[job.label] = _finished(job, outcome)
            _keep(entries[job.label], out, advance)

        if ray is not None:
            run_ray(jobs, ray, retries, on_done)
        else:
            run_local(jobs, workers or 1, retries, on_done)
    info = {**keyed, "backend": backend, "threads": threads, "retries": retries}
    return _write(Sweep(tuple(entries[label] for label in order), info), out)


def _write(swept: Sweep, out: Path) -> Sweep:
    """OUT/sweep.json, OUT/sweep.csv and, with any report, OUT/sweep.png."""
    from .render_sweep import plot_sweep

    write_atomic(out / "sweep.json", swept.to_json() + "\n")
    write_atomic(out / "sweep.csv", swept.to_csv())
    if any(e.report is not None for e in swept.entries):
        plot_sweep(swept, out / "sweep.png")
    return swept


def _plan(
    files: list[Path], order: list[str], keyed: dict[str, Any], out: Path, job_args: tuple[Any, ...]
) -> tuple[dict[str, SweepEntry], list[Job]]:
    """Entries ready now (reports, cached checkpoints) and the jobs for the rest."""
    for sub in ("reports", "cache"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    entries: dict[str, SweepEntry] = {}
    jobs: list[Job] = []
    for path, label in zip(files, order, strict=True):
        ready = _ready(path, label, keyed, out)
        if isinstance(ready, SweepEntry):
            entries[label] = ready
        else:
            result, error = (str(out / "cache" / f"{ready}.{x}") for x in ("json", "error"))
            jobs.append(Job(str(path), label, ready, result, error, *job_args))
    return entries, jobs


def _ready(path: Path, label: str, keyed: dict[str, Any], out: Path) -> SweepEntry | str:
    """The entry for a report given as input or a checkpoint found in the cache; else the
    checkpoint's cache key (it must be inspected)."""
    if path.suffix == ".json":
        try:
            return SweepEntry(str(path), label, REPORT, Report.from_json(path.read_text()))
        except DecoderscopeError as exc:  # not JSON, or another schema: says which
            return SweepEntry(str(path), label, FAILED, error=str(exc))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            why = f"not a decoderscope report: {type(exc).__name__}: {exc}"
            return SweepEntry(str(path), label, FAILED, error=why)
    key = cache_key(path, keyed)
    cached = out / "cache" / f"{key}.json"
    if cached.is_file():
        try:
            report = Report.from_json(cached.read_text())
            return SweepEntry(str(path), label, CACHED, report, key=key)
        except (DecoderscopeError, ValueError, KeyError, TypeError):
            cached.unlink()  # unreadable: inspect again
    return key


def _finished(job: Job, outcome: Outcome) -> SweepEntry:
    report: Report | None = None
    error: str | None = outcome.text
    if outcome.status == "ok":
        if not Path(job.result).is_file():  # the pool's workers write it; Ray's tasks return it
            write_atomic(job.result, outcome.text)
        report, error = Report.from_json(outcome.text), None
    status = DONE if report is not None else FAILED
    return SweepEntry(
        job.checkpoint, job.label, status, report, error, job.key, outcome.attempts, outcome.seconds
    )


def _keep(entry: SweepEntry, out: Path, advance: Callable[[SweepEntry], None]) -> None:
    if entry.report is not None:
        write_atomic(out / "reports" / f"{entry.label}.json", entry.report.to_json() + "\n")
    advance(entry)
