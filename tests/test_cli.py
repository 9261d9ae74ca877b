from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import decoderscope as ds
from decoderscope.checkpoints import save_checkpoint
from decoderscope.cli import app
from decoderscope.demo import DemoVAE

from .conftest import FACTORY, KWARGS

runner = CliRunner()
FAST = ["--steps", "30", "--seeds", "1", "--random-inits", "1", "--device", "cpu"]


def test_inspect_bundle_writes_table_json_markdown_plot(bundle: Path, tmp_path: Path) -> None:
    md, png, js = tmp_path / "r.md", tmp_path / "r.png", tmp_path / "r.json"
    result = runner.invoke(
        app,
        [
            "inspect",
            str(bundle),
            *FAST,
            "--markdown",
            str(md),
            "--plot",
            str(png),
            "--json",
            str(js),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "trained" in result.stdout and "random" in result.stdout and "exact" in result.stdout
    report = ds.Report.from_json(js.read_text())
    assert [v.name for v in report.variants] == ["trained", "random"]
    assert report.variant("trained").layers[0].name == "latent"
    text = md.read_text()
    assert "| `latent` |" in text and "trained MI" in text and "random MI" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_json_to_stdout_is_only_json(bundle: Path) -> None:
    result = runner.invoke(app, ["inspect", str(bundle), *FAST, "--json", "-"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["schema"] == "decoderscope.report/1"
    assert data["settings"]["seeds"] == 1 and data["model"]["n_data"] == 64


def test_layers_option_and_unknown_layer(bundle: Path) -> None:
    ok = runner.invoke(app, ["inspect", str(bundle), *FAST, "--layers", "0,output", "--json", "-"])
    assert ok.exit_code == 0, ok.output
    names = [r["name"] for r in json.loads(ok.stdout)["variants"][0]["layers"]]
    assert names == ["latent", "0", "output"]
    bad = runner.invoke(app, ["inspect", str(bundle), *FAST, "--layers", "nope"])
    assert bad.exit_code == 1
    assert "unknown layer 'nope'; valid names are: 0, 1, 2" in bad.output


def test_plain_state_dict_needs_model(tmp_path: Path) -> None:
    model = DemoVAE()
    path = tmp_path / "sd.pt"
    torch.save(model.state_dict(), path)
    data = tmp_path / "x.npy"
    np.save(data, np.random.default_rng(0).normal(size=(40, 2)).astype(np.float32))
    result = runner.invoke(app, ["inspect", str(path), "--data", str(data), *FAST])
    assert result.exit_code == 1
    assert "plain state_dict (weights only); pass --model" in result.output
    ok = runner.invoke(
        app, ["inspect", str(path), "--data", str(data), "--model", FACTORY, *FAST, "--json", "-"]
    )
    assert ok.exit_code == 0, ok.output


def test_lightning_checkpoint_with_model(tmp_path: Path) -> None:
    model = DemoVAE(**KWARGS)
    sd = {f"model.{k}": v for k, v in model.state_dict().items()}
    path = tmp_path / "light.ckpt"
    torch.save({"state_dict": sd, "hyper_parameters": KWARGS, "epoch": 3}, path)
    data = tmp_path / "x.pt"
    torch.save(torch.randn(40, 2), data)
    result = runner.invoke(
        app, ["inspect", str(path), "--data", str(data), "--model", FACTORY, *FAST, "--json", "-"]
    )
    assert result.exit_code == 0, result.output


def test_mismatched_state_dict_lists_keys(tmp_path: Path) -> None:
    path = tmp_path / "sd.pt"
    torch.save(DemoVAE(latent_dim=5).state_dict(), path)
    result = runner.invoke(app, ["inspect", str(path), "--model", FACTORY, "--data", str(path)])
    assert result.exit_code == 1
    assert "does not fit the model" in result.output and "shape mismatch at" in result.output


def test_pickled_module_needs_trust(tmp_path: Path) -> None:
    path = tmp_path / "whole.pt"
    torch.save(DemoVAE(**KWARGS), path)
    refused = runner.invoke(app, ["inspect", str(path), *FAST])
    assert refused.exit_code == 1
    assert "DemoVAE" in refused.output and "--trust" in refused.output
    data = tmp_path / "x.npz"
    np.savez(data, data=np.zeros((30, 2), dtype=np.float32))
    trusted = runner.invoke(app, ["inspect", str(path), "--trust", "--data", str(data), *FAST])
    assert trusted.exit_code == 0, trusted.output
    assert "runs code from the file" in trusted.output


def test_torchscript_refused(tmp_path: Path) -> None:
    path = tmp_path / "ts.pt"
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(path))
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == 1
    assert "TorchScript archive; forward hooks do not run inside it" in result.output


def test_missing_corrupt_and_no_data(tmp_path: Path, bundle: Path) -> None:
    missing = runner.invoke(app, ["inspect", str(tmp_path / "none.pt")])
    assert missing.exit_code == 1 and "does not exist" in missing.output
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(bundle.read_bytes()[:200])
    bad = runner.invoke(app, ["inspect", str(corrupt)])
    assert bad.exit_code == 1 and "corrupt or truncated" in bad.output
    model = DemoVAE(**KWARGS)
    nodata = tmp_path / "nodata.pt"
    save_checkpoint(model, nodata, factory=FACTORY, kwargs=KWARGS)
    result = runner.invoke(app, ["inspect", str(nodata), *FAST])
    assert result.exit_code == 1 and "carries no data; pass --data" in result.output


def test_usage_errors_exit_2(bundle: Path) -> None:
    result = runner.invoke(app, ["inspect", str(bundle), "--seeds", "0"])
    assert result.exit_code == 2 and "seeds must be an integer >= 1, got 0" in result.output
    result = runner.invoke(app, ["inspect", str(bundle), "--estimator", "magic"])
    assert result.exit_code == 2 and "estimator must be one of" in result.output
    result = runner.invoke(app, ["inspect"])
    assert result.exit_code == 2


def test_layers_command(bundle: Path) -> None:
    result = runner.invoke(app, ["layers", str(bundle), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["latent_shape"] == [3]
    rows = {r["name"]: r for r in info["layers"]}
    assert rows["0"]["type"] == "Linear" and rows["0"]["output_shape"] == [8]
    assert rows["0"]["params"] == 3 * 8 + 8 and rows["0"]["default"]
    assert not rows["1"]["default"]  # GELU: no parameters
    table = runner.invoke(app, ["layers", str(bundle)])
    assert table.exit_code == 0 and "Linear" in table.stdout


def test_json_round_trip(bundle: Path) -> None:
    result = runner.invoke(app, ["inspect", str(bundle), *FAST, "--json", "-"])
    report = ds.Report.from_json(result.stdout)
    assert ds.Report.from_json(report.to_json()) == report
    with pytest.raises(ds.DecoderscopeError, match="not a decoderscope report"):
        ds.Report.from_json('{"schema": "other"}')
