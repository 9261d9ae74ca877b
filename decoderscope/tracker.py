"""Information over training: `Tracker` inspects a model every N epochs with cheap settings, logs
per-layer MI as scalars (any TensorBoard-style writer) and saves each report, so that `sweep` can
draw the curves from them afterwards. The Lightning callback is built on it."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from .errors import ArgumentError
from .estimators.settings import Settings
from .model import VAE
from .report import Report
from .workers import write_atomic

# cheap by default: the trained decoder only, one critic training of at most 2000 steps
TRACK_SETTINGS = Settings(steps=2000)


class ScalarWriter(Protocol):
    """What `Tracker` logs to: `torch.utils.tensorboard.SummaryWriter` and the like."""

    def add_scalar(self, tag: str, scalar_value: float, global_step: int) -> Any: ...


def scalars(report: Report, prefix: str = "decoderscope") -> dict[str, float]:
    """Per variant and layer: `PREFIX/VARIANT/LAYER/mi` (nats) and `.../mi_kept` (share of the
    latent's MI, 0-1). Values marked unreliable or not read are left out, not logged as numbers."""
    out: dict[str, float] = {}
    for v in report.variants:
        for r in v.layers:
            if "mi" in r.unreliable or not math.isfinite(r.mi.mean):
                continue
            out[f"{prefix}/{v.name}/{r.name}/mi"] = r.mi.mean
            if r.mi_share is not None:
                out[f"{prefix}/{v.name}/{r.name}/mi_kept"] = r.mi_share
    return out


class Tracker:
    """Inspect a VAE during training: call `tracker.step(model, epoch)` after each epoch.

    data: inputs [N, ...] for the encoder (a fixed subset: a few hundred points keep it cheap).
    every: inspect when epoch % every == 0. out: folder for `epoch=NNNN.json` reports (None: keep
    them in memory only, in `history`). writer: gets `add_scalar(tag, value, epoch)` for each of
    `scalars(report)`. vae: how to read the model (default `VAE.from_model`). The remaining
    arguments are `inspect`'s; the defaults inspect the trained decoder only, once, at most 2000
    critic steps per layer (`TRACK_SETTINGS`).
    """

    def __init__(
        self,
        data: Any,
        *,
        every: int = 1,
        out: str | Path | None = None,
        writer: ScalarWriter | None = None,
        vae: Callable[[nn.Module], VAE] | None = None,
        layers: Sequence[str] | None = None,
        random_inits: int = 0,
        seeds: int = 1,
        device: str | torch.device = "cpu",
        seed: int = 0,
        settings: Settings = TRACK_SETTINGS,
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ArgumentError(f"every must be an integer >= 1, got {every!r}")
        self.data = data
        self.every = every
        self.out = Path(out) if out is not None else None
        if self.out is not None:
            if self.out.exists() and not self.out.is_dir():
                raise ArgumentError(f"out {str(out)!r} is a file; give a folder for the reports")
            self.out.mkdir(parents=True, exist_ok=True)
        self.writer = writer
        self.vae = vae or VAE.from_model
        self.inspect_args: dict[str, Any] = {
            "layers": layers,
            "random_inits": random_inits,
            "seeds": seeds,
            "device": device,
            "seed": seed,
            "settings": settings,
        }
        self.history: list[tuple[int, Report]] = []

    def due(self, epoch: int) -> bool:
        return epoch % self.every == 0

    def step(self, model: nn.Module, epoch: int) -> Report | None:
        """Inspect `model` if `epoch` is due; returns the report (else None). The model comes
        back as it was (mode, parameters, hooks, RNG state)."""
        if not self.due(epoch):
            return None
        from .pipeline import inspect

        report = inspect(
            self.vae(model), self.data, progress=False, source=f"epoch {epoch}", **self.inspect_args
        )
        if self.out is not None:
            write_atomic(self.out / f"epoch={epoch:04d}.json", report.to_json() + "\n")
        if self.writer is not None:
            for tag, value in scalars(report).items():
                self.writer.add_scalar(tag, value, epoch)
        self.history.append((epoch, report))
        return report
