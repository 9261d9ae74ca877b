"""Input defects found by using the command line as a new user would; each pinned here."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import decoderscope as ds
from decoderscope.cli import app
from decoderscope.demo import DemoVAE
from decoderscope.report import Estimate, Exact, LayerResult, ModelInfo, Report, VariantResult
from decoderscope.testing import gaussian_case, index_data, vae_for

from .conftest import FACTORY, KWARGS

runner = CliRunner()
FAST = ["--steps", "30", "--seeds", "1", "--random-inits", "0", "--device", "cpu"]


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--json", "missing/r.json", "folder 'missing' does not exist; create it first"),
        ("--markdown", ".", "--markdown '.' is a folder; give a file path, e.g. report.md"),
        ("--plot", "nowhere/p.png", "folder 'nowhere' does not exist"),
    ],
)
def test_output_paths_are_checked_before_any_work(
    bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, option: str, value: str,
    message: str,
) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("decoderscope.pipeline.inspect", _no_work)
    result = runner.invoke(app, ["inspect", str(bundle), *FAST, option, value])
    assert result.exit_code == 2, result.output
    assert message in result.output


def _no_work(*_args: object, **_kwargs: object) -> None:
    raise AssertionError("the run started before its output paths were checked")


def test_a_failed_write_keeps_the_finished_results(
    bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    md = tmp_path / "r.md"

    def fail(*_a: object, **_k: object) -> str:
        raise OSError("disk full")

    monkeypatch.setattr(ds.Report, "to_markdown", fail)
    result = runner.invoke(app, ["inspect", str(bundle), *FAST, "--markdown", str(md)])
    assert result.exit_code == 1
    assert "could not write" in result.output and "disk full" in result.output
    kept = ds.Report.from_json((tmp_path / "decoderscope-report.json").read_text())
    assert kept.variant("trained").layers[0].name == "latent"


def test_plot_without_suffix_reports_the_file_it_wrote(bundle: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["inspect", str(bundle), *FAST, "--plot", str(tmp_path / "fig")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "fig.png").read_bytes()[:4] == b"\x89PNG"
    assert f"wrote {tmp_path / 'fig.png'}" in result.output.replace("\n", "")


def test_steps_zero_is_refused_and_help_keeps_its_default(bundle: Path) -> None:
    result = runner.invoke(app, ["inspect", str(bundle), "--steps", "0"])
    assert result.exit_code == 2 and "steps" in result.output and "got 0" in result.output
    help_text = runner.invoke(app, ["inspect", "--help"]).output
    assert "[default: 12000; plain: 1000]" in " ".join(help_text.split())


def test_layers_takes_data_for_a_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "sd.pt"
    torch.save(DemoVAE().state_dict(), path)
    data = tmp_path / "x.npy"
    np.save(data, np.random.default_rng(0).normal(size=(10, 2)))  # float64, numpy's default
    result = runner.invoke(
        app, ["layers", str(path), "--model", FACTORY, "--data", str(data), "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["latent_shape"] == [16]


def test_float64_numpy_data_is_cast_to_the_encoder_dtype() -> None:
    torch.manual_seed(0)
    model = DemoVAE(**KWARGS)
    data = np.random.default_rng(0).normal(size=(40, 2))  # float64
    report = ds.inspect(
        model, data, random_inits=0, seeds=1, device="cpu", settings=ds.Settings(steps=20)
    )
    assert report.model.n_data == 40


def test_factory_not_importable_says_how_to_fix_it(tmp_path: Path) -> None:
    path = tmp_path / "sd.pt"
    torch.save(DemoVAE().state_dict(), path)
    result = runner.invoke(app, ["inspect", str(path), "--model", "my_vae:build"])
    assert result.exit_code == 1
    text = " ".join(result.output.split())
    assert "PYTHONPATH" in text and "--model path/to/my_vae.py:build" in text


def test_a_text_file_named_pt_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "notes.pt"
    path.write_text("hello world\n")
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == 1
    assert "notes.pt is not a torch checkpoint: it starts with 'hello world'" in result.output


def test_version_and_python_dash_m() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"decoderscope {ds.__version__}"
    proc = subprocess.run(
        [sys.executable, "-m", "decoderscope", "--version"], capture_output=True, text=True
    )
    assert proc.returncode == 0 and proc.stdout.strip() == f"decoderscope {ds.__version__}"


class _DictDecoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.fc(z)
        return {"logits": self.out(torch.tanh(h)), "hidden": h}


def test_a_dict_output_names_its_entry_and_the_user_can_choose_it() -> None:
    mu, lv = gaussian_case(d=4, n=200, kl=3.0)
    cheap = ds.Settings(steps=50)
    kw = {"layers": ["fc", "output"], "random_inits": 0, "seeds": 1, "device": "cpu"}
    first = ds.inspect(vae_for(mu, lv, _DictDecoder()), index_data(200), settings=cheap, **kw)
    assert first.variant("trained").layer("output").type == "output['logits']"
    chosen = ds.inspect(
        vae_for(mu, lv, _DictDecoder()), index_data(200), settings=cheap, output_key="hidden", **kw
    )
    row = chosen.variant("trained").layer("output")
    assert row.type == "output['hidden']" and row.method == "affine"
    assert chosen.settings["output_key"] == "hidden"
    with pytest.raises(ds.DecoderscopeError, match=r"output key 'nope' is not a tensor entry"):
        ds.inspect(vae_for(mu, lv, _DictDecoder()), index_data(200), output_key="nope", **kw)


def _report(rows: tuple[LayerResult, ...], n: int = 1000) -> Report:
    return Report(
        "0", ModelInfo((4,), n, "t"), {"log_n": math.log(n)}, (VariantResult("trained", 1, rows),)
    )


def test_one_ceiling_warning_per_variant_and_no_share_of_a_zero_mi() -> None:
    from decoderscope.diagnostics import diagnose

    est = Estimate(6.9, 0.01, 1)
    latent = LayerResult("latent", "latent", (4,), est, Estimate(0.0, 0.0, 1), est,
                         exact=Exact(6.9, 0.0, 6.9))  # fmt: skip
    rows = (latent, *(LayerResult(str(i), "Linear", (4,), est, est, est) for i in range(3)))
    ceiling = [
        d for d in diagnose([VariantResult("trained", 1, rows)], 1000) if "ceiling" in d.message
    ]
    assert len(ceiling) == 1 and "at latent, 0, 1, 2" in ceiling[0].message
    zero = LayerResult("latent", "latent", (4,), est, est, Estimate(0.0, 0.0, 1),
                       exact=Exact(1.0, 1.0, -0.0), mi_share=None)  # fmt: skip
    assert "100%" not in _report((zero,)).to_markdown()


def test_strict_exits_3_on_an_unreliable_value(
    bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = Estimate(-3.0, 0.01, 1)
    latent = LayerResult("latent", "latent", (3,), bad, bad, bad, exact=Exact(1.0, 0.1, 0.9))
    from decoderscope.guard import guard

    report = _report(guard((latent,), 64), 64)
    monkeypatch.setattr("decoderscope.pipeline.inspect", lambda *a, **k: report)
    loose = runner.invoke(app, ["inspect", str(bundle), *FAST])
    assert loose.exit_code == 0, loose.output
    strict = runner.invoke(app, ["inspect", str(bundle), *FAST, "--strict"])
    assert strict.exit_code == 3 and "unreliable: trained/latent (--strict)" in strict.output


def test_plot_axes_never_zoom_into_noise_and_name_each_layer() -> None:
    import matplotlib.pyplot as plt

    from decoderscope.render import MIN_SPAN, figure

    est = Estimate(2.0, 0.0005, 1)
    latent = LayerResult("latent", "latent", (4,), est, est, est, exact=Exact(2.0, 2.0, 2.0))
    rows = (latent, LayerResult("net.0", "Linear", (4,), Estimate(2.0004, 0.0005, 1), est, est))
    fig = figure(_report(rows))
    for ax in fig.axes:
        low, high = ax.get_ylim()
        assert high - low >= MIN_SPAN - 1e-9
        assert ax.yaxis.get_offset_text().get_text() == ""
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["latent", "net.0\nLinear"]
    assert "information through the decoder" in fig._suptitle.get_text()
    plt.close(fig)
