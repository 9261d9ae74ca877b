"""The CI recipe's decoderscope commands (examples/ci/decoderscope.yml), run as written."""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from decoderscope.cli import app

RECIPE = Path(__file__).resolve().parents[1] / "examples" / "ci" / "decoderscope.yml"
runner = CliRunner()


def _commands() -> list[list[str]]:
    lines = re.findall(r"^\s*run: decoderscope (.+)$", RECIPE.read_text(), flags=re.MULTILINE)
    return [shlex.split(line) for line in lines]


def test_the_recipe_inspects_and_compares_as_written(
    bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inspect_args, compare_args = _commands()
    assert inspect_args[0] == "inspect" and compare_args[0] == "compare"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "reports").mkdir()
    shutil.copy(bundle, tmp_path / "checkpoints" / "vae.pt")
    cheap = ["--steps", "60"]  # the recipe's defaults, fewer critic steps
    base = [*inspect_args[:-1], "reports/base.json"]
    assert runner.invoke(app, [*base, *cheap]).exit_code == 0  # step 1 of docs/ci.md
    first = runner.invoke(app, [*inspect_args, *cheap])
    assert first.exit_code == 0, first.output
    result = runner.invoke(app, compare_args)
    assert result.exit_code == 0, result.output  # same checkpoint, settings and seed
    comment = (tmp_path / "comment.md").read_text()
    assert comment.startswith("**decoderscope compare**: ✅ no layer changed beyond noise")
