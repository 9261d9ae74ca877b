"""`sweep`: a digits VAE saved every epoch, inspected on the local pool and on Ray; the cache,
dead workers, reports as inputs, and bad input."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import decoderscope as ds
from decoderscope.checkpoints import load_checkpoint
from decoderscope.cli import app
from decoderscope.digits import DigitsVAE, digits, train
from decoderscope.sweep import CSV_COLUMNS, expand, labels

runner = CliRunner()
KW = {"latent_dim": 8, "hidden": 32}
FACTORY = "decoderscope.digits:DigitsVAE"
SMALL = ds.Settings(steps=100, eval_samples=1024, exact_samples=4096, pair_samples=256)
CHEAP = {"random_inits": 0, "seeds": 1, "device": "cpu", "settings": SMALL}
CRASHY = '''
import os
from pathlib import Path

from decoderscope.digits import DigitsVAE


def once(latent_dim=8, hidden=32, marker=""):
    """Dies (as if killed) the first time, while the marker file exists."""
    if Path(marker).exists():
        Path(marker).unlink()
        os._exit(9)
    return DigitsVAE(latent_dim, hidden)


def always(latent_dim=8, hidden=32):
    os._exit(9)
'''


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three epochs of one training run, one bundle per epoch, each with the same 200 digits."""
    folder = tmp_path_factory.mktemp("run")
    data = digits(200)

    def save(epoch: int, model: DigitsVAE) -> None:
        ds.save_checkpoint(model, folder / f"epoch={epoch}.pt", FACTORY, KW, data=data)

    train(DigitsVAE(**KW), digits(), epochs=3, on_epoch=save, batch=32)
    return folder


@pytest.fixture(scope="module")
def swept(run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ds.Sweep]:
    out = tmp_path_factory.mktemp("out")
    return out, ds.sweep(run, out, workers=2, **CHEAP)


def test_sweep_writes_json_csv_plot_and_reports(swept: tuple[Path, ds.Sweep], run: Path) -> None:
    out, result = swept
    assert [e.label for e in result.entries] == ["epoch=1", "epoch=2", "epoch=3"]
    assert [e.status for e in result.entries] == ["done"] * 3
    with (out / "sweep.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == CSV_COLUMNS
    layers = ["latent", "0", "2", "4"]
    assert len(rows) == 3 * len(layers)  # checkpoints x variants (trained) x layers
    assert [r["layer"] for r in rows[:4]] == layers
    saved = json.loads((out / "sweep.json").read_text())
    assert saved["schema"] == "decoderscope.sweep/1" and len(saved["rows"]) == len(rows)
    assert (out / "sweep.png").stat().st_size > 10_000
    # the same numbers as inspecting the checkpoint here, with the worker's one thread
    loaded = load_checkpoint(run / "epoch=3.pt")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        here = ds.inspect(loaded.model, loaded.data, source=loaded.source, **CHEAP)  # type: ignore[arg-type]
    finally:
        torch.set_num_threads(threads)
    report = ds.Report.from_json((out / "reports" / "epoch=3.json").read_text())
    assert report.to_dict()["variants"] == here.to_dict()["variants"]
    assert report.variant("trained").layers[-1].mi.mean > 0.5  # it learned something


def test_sweep_resumes_from_the_cache(
    swept: tuple[Path, ds.Sweep], run: Path, tmp_path: Path
) -> None:
    out, first = swept
    again = ds.sweep(run, out, workers=2, **CHEAP)
    assert [e.status for e in again.entries] == ["cached"] * 3
    assert again.rows() == first.rows()
    copy = shutil.copytree(out, tmp_path / "copy")
    other = ds.sweep(run / "epoch=1.pt", copy, workers=1, **{**CHEAP, "seed": 1})
    assert other.entries[0].status == "done"  # other settings, another key


def test_dead_worker_is_retried_then_reported(tmp_path: Path) -> None:
    module = tmp_path / "crashy.py"
    module.write_text(CRASHY)
    marker = tmp_path / "die-once"
    marker.touch()
    model = DigitsVAE(**KW)
    data = digits(100)
    ds.save_checkpoint(
        model, tmp_path / "a.pt", f"{module}:once", {**KW, "marker": str(marker)}, data
    )
    ds.save_checkpoint(model, tmp_path / "b.pt", f"{module}:always", KW, data)
    paths = [tmp_path / "a.pt", tmp_path / "b.pt"]
    out = tmp_path / "out"
    # the CLI's settings (--steps 100), so that the CLI below finds this run's cache
    result = ds.sweep(paths, out, workers=2, **{**CHEAP, "settings": ds.Settings(steps=100)})
    assert [(e.status, e.attempts) for e in result.entries] == [("done", 2), ("failed", 2)]
    why = result.entries[1].error
    assert why is not None and "the worker died (exit code 9) on each of 2 tries" in why
    assert json.loads((out / "sweep.json").read_text())["checkpoints"][1]["status"] == "failed"
    # the CLI: a summary, the failure named, exit 1; the finished one comes from the cache
    res = runner.invoke(app, ["sweep", *map(str, paths), "--out", str(out), "--retries", "0",
                              "--random-inits", "0", "--seeds", "1", "--steps", "100",
                              "--device", "cpu"])  # fmt: skip
    assert res.exit_code == 1, res.output
    assert "died" in res.output and "decoderscope sweep" in res.output  # the summary's title
    saved = json.loads((out / "sweep.json").read_text())["checkpoints"]
    assert [(c["status"], c["attempts"]) for c in saved] == [("cached", 0), ("failed", 1)]


def test_sweep_on_ray_gives_the_pool_s_numbers(swept: tuple[Path, ds.Sweep], run: Path,
                                              tmp_path: Path) -> None:  # fmt: skip
    ray = pytest.importorskip("ray")
    _, pool = swept
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        on_ray = ds.sweep(run, tmp_path, ray="auto", **CHEAP)
    finally:
        ray.shutdown()
    assert [e.status for e in on_ray.entries] == ["done"] * 3
    assert on_ray.rows() == pool.rows()


def test_reports_are_swept_as_they_are(swept: tuple[Path, ds.Sweep], tmp_path: Path) -> None:
    out, pool = swept
    result = ds.sweep(out / "reports", tmp_path / "again")
    assert [e.status for e in result.entries] == ["report"] * 3
    assert result.rows() == pool.rows()
    assert (tmp_path / "again" / "sweep.png").is_file()


def test_bad_input_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(ds.ArgumentError, match="matches no files"):
        ds.sweep(tmp_path / "nothing-*.pt", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ds.ArgumentError, match="holds no .pt/.pth/.ckpt/.json files"):
        ds.sweep(tmp_path / "empty", tmp_path / "out")
    (tmp_path / "file").write_text("")
    with pytest.raises(ds.ArgumentError, match="is a file; give a folder"):
        ds.sweep(tmp_path, tmp_path / "file")
    res = runner.invoke(app, ["sweep", str(tmp_path / "none.pt"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "matches no files" in res.output
    # a .json that is not a report fails as an entry, with why; it does not stop the sweep
    (tmp_path / "empty" / "other.json").write_text('{"schema": "something/1"}')
    (tmp_path / "empty" / "broken.json").write_text("{")
    swept = ds.sweep(tmp_path / "empty", tmp_path / "out2")
    errors = [e.error or "" for e in swept.entries]
    assert [e.status for e in swept.entries] == ["failed", "failed"]
    assert errors[0].startswith("report is not valid JSON") and "something/1" in errors[1]


def test_labels_are_distinct_and_ordered_naturally(tmp_path: Path) -> None:
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        for name in ("x.pt", "epoch=10.pt", "epoch=9.pt"):
            (tmp_path / sub / name).touch()
    files = expand([tmp_path / "a", str(tmp_path / "b" / "*.pt"), tmp_path / "a" / "x.pt"])
    assert [f.name for f in files] == ["epoch=9.pt", "epoch=10.pt", "x.pt"] * 2
    assert labels(files)[:3] == ["a__epoch=9", "a__epoch=10", "a__x"]
    assert labels([tmp_path / "a" / "x.pt"]) == ["x"]
