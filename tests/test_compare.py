"""`compare`: two reports (or checkpoints inspected alike) per layer, with thresholds."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import decoderscope as ds
from decoderscope.cli import app
from decoderscope.compare import Delta, compare_reports
from decoderscope.testing import gaussian_case, index_data, vae_for

runner = CliRunner()
CHEAP = ["--steps", "60", "--seeds", "2", "--random-inits", "0", "--device", "cpu"]


def _inspect(bundle: Path, out: Path, seed: int) -> Path:
    result = runner.invoke(
        app, ["inspect", str(bundle), *CHEAP, "--seed", str(seed), "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    return out


def test_two_seeds_of_one_checkpoint_differ_only_within_noise(bundle: Path, tmp_path: Path) -> None:
    a = _inspect(bundle, tmp_path / "a.json", 0)
    b = _inspect(bundle, tmp_path / "b.json", 1)
    md = tmp_path / "c.md"
    result = runner.invoke(
        app, ["compare", str(a), str(b), "--max-mi-drop", "0.2", "--markdown", str(md)]
    )
    assert result.exit_code == 0, result.output
    assert "no layer changed beyond noise" in result.output
    text = md.read_text()
    assert text.startswith("**decoderscope compare**: ✅ no layer changed beyond noise")
    assert "<details><summary>" in text and "</details>" in text
    assert "| variant | layer | ΔKL | Δagg. KL | ΔMI | MI kept | notes |" in text


@pytest.fixture(scope="module")
def damaged(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Reports of a decoder (a.json) and of a copy whose second Linear is zeroed (b.json)."""
    tmp_path = tmp_path_factory.mktemp("damaged")
    mu, lv = gaussian_case(d=4, n=300, kl=4.0, seed=2)
    torch.manual_seed(0)
    dec = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
    damaged = copy.deepcopy(dec)
    with torch.no_grad():
        damaged[2].weight.zero_()  # nothing passes the second Linear
    paths = []
    for name, d in (("a", dec), ("b", damaged)):
        report = ds.inspect(
            vae_for(mu, lv, d), index_data(300), random_inits=0, seeds=2, device="cpu",
            settings=ds.Settings(steps=100),
        )  # fmt: skip
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(report.to_json())
    return paths


def test_a_damaged_decoder_breaks_the_threshold_after_the_damage(
    damaged: list[Path], tmp_path: Path
) -> None:
    js = tmp_path / "c.json"
    result = runner.invoke(
        app, ["compare", *map(str, damaged), "--max-mi-drop", "0.5", "--json", str(js)]
    )
    assert result.exit_code == 3, result.output
    data = json.loads(js.read_text())
    broken = {r["layer"] for r in data["rows"] if r["broken"]}
    assert broken == {"2", "4"}, data["rows"]  # the default layers: Linear 0, 2, 4
    assert data["broken"][0].startswith("trained/2: MI fell by")
    assert "thresholds broken" in result.output


def test_layers_are_matched_by_name_and_mismatches_listed(bundle: Path, tmp_path: Path) -> None:
    a = ds.Report.from_json(_inspect(bundle, tmp_path / "a.json", 0).read_text())
    trained = a.variant("trained")
    fewer = ds.VariantResult("trained", trained.runs, trained.layers[:-1])
    b = ds.Report(a.version, a.model, a.settings, (fewer,), a.diagnostics)
    c = compare_reports(a, b)
    assert c.only_a == (f"trained/{trained.layers[-1].name}",) and c.only_b == ()
    assert [r.layer for r in c.rows] == [r.name for r in trained.layers[:-1]]
    assert all(r.kl.mean == 0 and not r.kl.beyond_noise for r in c.rows)
    with pytest.raises(ds.ArgumentError, match=r"max_mi_drop must be a number >= 0, got -1"):
        compare_reports(a, b, max_mi_drop=-1)


def test_a_difference_is_beyond_noise_past_two_se_and_the_tolerance() -> None:
    a = ds.Estimate(5.0, 0.05, 3)
    assert not Delta.of(a, ds.Estimate(4.7, 0.05, 3)).beyond_noise  # 0.3 < 0.14 + 0.25
    assert Delta.of(a, ds.Estimate(4.5, 0.05, 3)).beyond_noise
    assert Delta.of(a, ds.Estimate(4.5, 0.05, 3)).mean == pytest.approx(-0.5)


def test_the_markdown_renders_as_github_shows_it(damaged: list[Path], tmp_path: Path) -> None:
    """GitHub-flavoured Markdown through cmarkgfm (GitHub's own cmark fork, with its table and
    tag-filter extensions): the verdict is the first paragraph, the plot an image beside it, the
    table one row per layer inside <details>."""
    cmarkgfm = pytest.importorskip("cmarkgfm")
    md, png = tmp_path / "comment.md", tmp_path / "plots" / "delta.png"
    png.parent.mkdir()
    args = ["compare", *map(str, damaged), "--max-mi-drop", "0.5", "--markdown", str(md)]
    result = runner.invoke(app, [*args, "--plot", str(png)])
    assert result.exit_code == 3, result.output
    assert png.stat().st_size > 5_000
    html = cmarkgfm.github_flavored_markdown_to_html(
        md.read_text(), options=cmarkgfm.Options.CMARK_OPT_UNSAFE
    )
    assert html.startswith("<p><strong>decoderscope compare</strong>: ❌ thresholds broken")
    assert '<img src="plots/delta.png" alt="ΔMI per layer, B − A" />' in html
    assert html.index("<img") < html.index("<details>") < html.index("<table>")
    body = html[html.index("<tbody>") : html.index("</tbody>")]
    assert body.count("<tr>") == 4  # latent and the Linear layers 0, 2, 4 of the trained decoder
    assert "<td>trained</td>\n<td><code>2</code></td>" in body
    assert html.rstrip().endswith("</details>")
