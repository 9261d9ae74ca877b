"""The guard: values beyond a hard bound (beyond their error bars and the stated tolerance) are
marked unreliable with a reason, never changed; renderers and JSON say so."""

from __future__ import annotations

import json
import math

from rich.console import Console

from decoderscope.diagnostics import diagnose
from decoderscope.guard import guard
from decoderscope.render import MARK, table
from decoderscope.report import (
    UNRELIABLE,
    Estimate,
    Exact,
    LayerResult,
    ModelInfo,
    Report,
    VariantResult,
)

GOOD = Estimate(2.0, 0.01, 3)
LATENT = LayerResult(
    "latent", "latent", (4,), GOOD, Estimate(0.5, 0.01, 3), Estimate(1.5, 0.01, 3),
    exact=Exact(2.0, 0.5, 1.5), mi_share=1.0, method="exact",
)  # fmt: skip


def _row(name: str, kl: Estimate = GOOD, agg: Estimate | None = None, mi: Estimate | None = None):
    agg = agg or Estimate(0.5, 0.01, 3)
    mi = mi or Estimate(1.5, 0.01, 3)
    return LayerResult(name, "Linear", (4,), kl, agg, mi, method="critic")


def _guarded(*rows: LayerResult, n: int = 1000) -> tuple[LayerResult, ...]:
    return guard((LATENT, *rows), n)


def test_a_negative_aggregate_kl_counts_only_beyond_two_se_and_the_tolerance() -> None:
    rows = _guarded(
        _row("0", agg=Estimate(-0.2, 0.01, 3)),  # -0.2 + 0.02 + 0.15 < 0
        _row("1", agg=Estimate(-0.2, 0.05, 3)),  # -0.2 + 0.10 + 0.15 > 0
        _row("2", agg=Estimate(-0.14, 0.0, 3)),  # within the tolerance
    )
    assert [r.status for r in rows] == [None, UNRELIABLE, None, None]
    assert rows[1].unreliable == ("aggregate_kl",)
    assert rows[1].reason == "aggregate KL -0.20 ± 0.01 is below 0, which no distribution allows"
    assert rows[1].aggregate_kl == Estimate(-0.2, 0.01, 3)  # kept as estimated, never clamped


def test_negative_kl_mi_above_log_n_and_above_the_latent_are_each_named() -> None:
    n = 100  # log N = 4.61
    rows = _guarded(
        _row("neg", kl=Estimate(-4.9, 0.1, 3), mi=Estimate(-5.3, 0.1, 3)),
        _row("ceil", mi=Estimate(6.9, 0.05, 3)),
        _row("dpi", kl=Estimate(2.6, 0.05, 3)),
        _row("near", kl=Estimate(2.2, 0.05, 3)),  # 2.2 - 0.1 - 0.15 < 2.0: allowed
        n=n,
    )
    neg, ceil, dpi, near = rows[1:]
    assert neg.unreliable == ("kl", "mi")
    assert "KL -4.90 ± 0.10 is below 0" in (neg.reason or "")
    assert ceil.unreliable == ("mi",)
    assert "above log N = 4.61 for N = 100" in (ceil.reason or "")
    assert dpi.unreliable == ("kl",)
    assert "exceeds the latent's exact 2.00; data processing forbids it" in (dpi.reason or "")
    assert near.status is None


def test_the_latent_row_is_held_against_its_own_exact_values() -> None:
    off = LayerResult(
        "latent", "latent", (4,), Estimate(163.5, 2.0, 3), Estimate(0.5, 0.01, 3),
        Estimate(1.5, 0.01, 3), exact=Exact(24.77, 0.5, 1.5),
    )  # fmt: skip
    (row,) = guard((off,), 300)
    assert row.unreliable == ("kl",)
    assert "misses the exact value 24.77" in (row.reason or "")
    variant = VariantResult("trained", 3, (row,))
    (calibration,) = [d for d in diagnose([variant], 300) if "calibration" in d.message]
    assert calibration.level == "warning"
    assert "misses the exact KL beyond its error bars" in calibration.message


def test_a_value_that_is_not_finite_is_unreliable_and_written_as_null() -> None:
    rows = _guarded(_row("0", kl=Estimate(math.nan, math.nan, 3)))
    assert rows[1].unreliable == ("kl",)
    assert rows[1].reason == "KL not a finite number"
    report = Report("0", ModelInfo((4,), 1000, "t"), {}, (VariantResult("trained", 3, rows),))
    text = report.to_json()
    data = json.loads(text)
    layer = data["variants"][0]["layers"][1]
    assert layer["kl"]["mean"] is None
    assert layer["status"] == "unreliable" and layer["unreliable"] == ["kl"]
    back = Report.from_json(text).variant("trained").layer("0")
    assert math.isnan(back.kl.mean) and back.status == UNRELIABLE
    assert back.reason == rows[1].reason


def test_renderers_never_show_an_unreliable_value_as_a_plain_number() -> None:
    rows = _guarded(_row("bad", kl=Estimate(-4.9, 0.1, 3)), _row("fine"))
    variants = (VariantResult("trained", 3, rows),)
    report = Report(
        "0", ModelInfo((4,), 1000, "t"), {"log_n": 6.9}, variants, diagnose(variants, 1000)
    )
    md = report.to_markdown()
    bad_line = next(line for line in md.splitlines() if line.startswith("| `bad`"))
    assert f"`bad` {MARK} unreliable" in bad_line and f"{MARK} -4.90 ± 0.10 {MARK}" in bad_line
    fine_line = next(line for line in md.splitlines() if line.startswith("| `fine`"))
    assert MARK not in fine_line and "| critic |" in fine_line
    assert "| layer | type | shape | method |" in md
    assert "unreliable: KL -4.90 ± 0.10 is below 0" in md
    console = Console(width=100, record=True)
    console.print(table(report))
    text = console.export_text()
    assert f"{MARK}-4.90" in text and "unreliable" in text and "critic" in text
