"""Information over training: `ds.Tracker` in a plain PyTorch loop and the Lightning callback in a
real (short) Lightning training run, both on the digits VAE."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import pytest
import torch

import decoderscope as ds
from decoderscope.digits import DigitsVAE, digits, train
from decoderscope.tracker import scalars

SMALL = ds.Settings(steps=100, eval_samples=1024, exact_samples=4096, pair_samples=256)


class Writer:
    """A TensorBoard-style writer that remembers what it was given."""

    def __init__(self) -> None:
        self.logged: list[tuple[str, float, int]] = []

    def add_scalar(self, tag: str, scalar_value: float, global_step: int) -> None:
        self.logged.append((tag, scalar_value, global_step))


def test_tracker_logs_and_saves_without_changing_the_training(tmp_path: Path) -> None:
    data = digits()
    torch.manual_seed(0)
    plain = train(DigitsVAE(8, 32), data, epochs=2, batch=64)
    writer = Writer()
    tracker = ds.Tracker(data[:200], out=tmp_path, writer=writer, settings=SMALL)
    torch.manual_seed(0)
    tracked = DigitsVAE(8, 32)
    train(tracked, data, epochs=2, batch=64, on_epoch=lambda e, m: tracker.step(m, e))
    # the inspections leave the model, its mode and the RNG stream of the training as they were
    for a, b in zip(plain.parameters(), tracked.parameters(), strict=True):
        assert torch.equal(a, b)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch=0001.json", "epoch=0002.json"]
    assert [e for e, _ in tracker.history] == [1, 2]
    tags = {t for t, _, _ in writer.logged}
    assert {"decoderscope/trained/latent/mi", "decoderscope/trained/4/mi"} <= tags
    assert "decoderscope/trained/4/mi_kept" in tags
    last = tracker.history[-1][1]
    mi = last.variant("trained").layer("4").mi.mean
    assert ("decoderscope/trained/4/mi", mi, 2) in writer.logged and mi > 0


def test_tracker_every_and_bad_arguments(tmp_path: Path) -> None:
    tracker = ds.Tracker(digits(50), every=2, settings=SMALL)
    assert tracker.step(DigitsVAE(8, 32), 1) is None and tracker.history == []
    with pytest.raises(ds.ArgumentError, match="every must be an integer >= 1, got 0"):
        ds.Tracker(digits(50), every=0)
    (tmp_path / "f").write_text("")
    with pytest.raises(ds.ArgumentError, match="is a file; give a folder"):
        ds.Tracker(digits(50), out=tmp_path / "f")


def test_unreliable_and_unread_values_are_not_logged() -> None:
    report = ds.inspect(DigitsVAE(8, 32), digits(100), random_inits=0, seeds=1, device="cpu",
                        settings=SMALL)  # fmt: skip
    rows = list(report.variants[0].layers)
    rows[1] = ds.LayerResult(**{**rows[1].__dict__, "unreliable": ("mi",), "reason": "test"})
    rows[2] = ds.LayerResult(**{**rows[2].__dict__, "mi": ds.Estimate(math.nan, math.nan, 1)})
    variant = ds.VariantResult("trained", 1, tuple(rows))
    marked = ds.Report(report.version, report.model, report.settings, (variant,), ())
    logged = scalars(marked)
    assert f"decoderscope/trained/{rows[1].name}/mi" not in logged
    assert f"decoderscope/trained/{rows[2].name}/mi" not in logged
    assert f"decoderscope/trained/{rows[3].name}/mi" in logged


def test_lightning_callback_logs_mi_during_training(tmp_path: Path) -> None:
    pl = pytest.importorskip("pytorch_lightning")
    from pytorch_lightning.loggers import CSVLogger

    from decoderscope.integrations.lightning import DecoderscopeCallback

    class LitDigits(pl.LightningModule):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            vae = DigitsVAE(8, 32)
            self.encoder, self.decoder, self.vae = vae.encoder, vae.decoder, vae

        def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.vae.encode(x)

        def training_step(self, batch: Any, _index: int) -> torch.Tensor:
            return self.vae.loss(batch[0])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=3e-3)

    data = digits()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=64)
    callback = DecoderscopeCallback(data[:200], every_n_epochs=1, out=tmp_path / "reports",
                                    settings=SMALL)  # fmt: skip
    logger = CSVLogger(tmp_path, name="logs")
    trainer = pl.Trainer(
        max_epochs=2, logger=logger, callbacks=[callback], accelerator="cpu",
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(LitDigits(), loader)
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("decoderscope/trained/4/mi")]
    assert len(rows) == 2
    assert all(float(r["decoderscope/trained/latent/mi"]) > 0 for r in rows)
    assert [e for e, _ in callback.history] == [1, 2]
    # the saved reports are what `sweep` draws its curves from
    swept = ds.sweep(tmp_path / "reports", tmp_path / "sweep")
    assert [e.status for e in swept.entries] == ["report", "report"]
    assert (tmp_path / "sweep" / "sweep.png").is_file()
