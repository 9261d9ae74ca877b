"""A PyTorch Lightning callback that inspects the module every N epochs and logs per-layer MI to
the trainer's loggers (TensorBoard-compatible scalars). Needs the extra: pip install
'decoderscope[lightning]' (PyTorch Lightning, imported as `pytorch_lightning` or `lightning`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import ArgumentError
from ..estimators.settings import Settings
from ..report import Report
from ..tracker import TRACK_SETTINGS, Tracker, scalars

try:  # the package users most often train with; `lightning` is the same framework renamed
    from pytorch_lightning import Callback, LightningModule, Trainer
except ImportError:  # pragma: no cover - depends on what is installed
    try:
        from lightning.pytorch import Callback, LightningModule, Trainer  # type: ignore[no-redef]
    except ImportError as exc:
        raise ArgumentError(
            "the Lightning callback needs PyTorch Lightning: pip install 'decoderscope[lightning]'"
        ) from exc


class DecoderscopeCallback(Callback):
    """Inspect the LightningModule after every `every_n_epochs`-th training epoch.

    data: encoder inputs [N, ...] (a fixed subset of a few hundred points keeps it cheap).
    Logged to every logger of the trainer at the epoch's global step: `decoderscope/VARIANT/
    LAYER/mi` (nats) and `.../mi_kept` (share of the latent's MI). Reports are saved as
    `out/epoch=NNNN.json` (epochs counted from 1), which `decoderscope sweep out` plots. The module
    must be readable by `ds.VAE.from_model` (an `encode` method and a `decoder` module or `decode`
    method), else pass `vae=` (module -> ds.VAE). Other arguments are `inspect`'s; defaults: the
    trained decoder only, one critic training of at most 2000 steps, on the module's device.
    """

    def __init__(
        self,
        data: Any,
        every_n_epochs: int = 1,
        out: str | Path | None = None,
        *,
        vae: Any = None,
        layers: Sequence[str] | None = None,
        random_inits: int = 0,
        seeds: int = 1,
        seed: int = 0,
        settings: Settings = TRACK_SETTINGS,
    ) -> None:
        super().__init__()
        self.tracker = Tracker(
            data, every=every_n_epochs, out=out, vae=vae, layers=layers,
            random_inits=random_inits, seeds=seeds, seed=seed, settings=settings,
        )  # fmt: skip

    @property
    def history(self) -> list[tuple[int, Report]]:
        """(epoch, report) for every inspection so far."""
        return self.tracker.history

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if not trainer.is_global_zero or not self.tracker.due(epoch):
            return
        self.tracker.inspect_args["device"] = pl_module.device
        report = self.tracker.step(pl_module, epoch)
        if report is None:
            return
        metrics = scalars(report)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
