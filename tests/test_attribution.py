"""Shapley attribution of each layer's KL and MI to the latent units against truth computed
apart from the tool: latent units independent over the data (diagonal posteriors, means drawn
independently per unit), decoders that keep or drop whole units (axis-aligned), so that every
coalition's value is closed form (`testing.gaussian_linear_truth`, torch.distributions) and the
Shapley values are enumerated here over every subset."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import decoderscope as ds
from decoderscope import joint
from decoderscope.attribution import coalition, unit_groups
from decoderscope.cli import app
from decoderscope.render import figure
from decoderscope.sampling import Posterior
from decoderscope.testing import (
    Fold,
    conv_latent_shape,
    conv_upsample,
    folded_truth,
    gaussian_linear_truth,
    index_data,
    shapley_truth,
    vae_for,
)

N = 400
FAST = ds.Settings(steps=200, eval_samples=1024, exact_samples=8192, pair_samples=256)


def independent_units(d: int, n: int = N, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Posteriors whose units are independent over the data, KL per unit from ~0.1 to ~2 nats."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(n, d, generator=g) * torch.linspace(0.3, 1.6, d)
    return mu, torch.full((n, d), math.log(0.3))


def axis_aligned(d: int, dropped: int) -> nn.Sequential:
    """Linear keeping the first d - dropped units (axis-aligned, rank-reducing), then a widening
    Linear and a LeakyReLU (injective on that image)."""
    keep = nn.Linear(d, d)
    wide = nn.Linear(d, 2 * d)
    with torch.no_grad():
        keep.weight.copy_(torch.diag(torch.cat([torch.ones(d - dropped), torch.zeros(dropped)])))
        keep.bias.zero_()
        wide.weight.copy_(torch.cat([torch.eye(d), 0.5 * torch.eye(d)]))
        wide.bias.zero_()
    return nn.Sequential(keep, wide, nn.LeakyReLU(0.2))


def close(got: float, truth: float) -> bool:
    return abs(got - truth) <= max(0.1, 0.1 * abs(truth))


@pytest.fixture(scope="module")
def exact_case() -> tuple[torch.Tensor, torch.Tensor, ds.Report]:
    mu, logvar = independent_units(5)
    vae = vae_for(mu, logvar, axis_aligned(5, dropped=2))
    report = ds.inspect(vae, index_data(N), random_inits=1, seeds=1, device="cpu",
                        settings=FAST, attribution=True)  # fmt: skip
    return mu, logvar, report


def test_every_coalition_enumerated_matches_the_truth(exact_case) -> None:
    mu, logvar, report = exact_case
    linear = partial(gaussian_linear_truth, samples=4000)
    latent_truth = shapley_truth(mu, logvar, partial(linear, a=torch.eye(5)))
    layer_truth = shapley_truth(mu, logvar, partial(linear, a=torch.eye(5)[:3]))
    trained = report.variant("trained")
    for row in trained.layers:
        a = row.attribution
        assert a is not None and a.permutations is None, row.name
        kl_truth, mi_truth = latent_truth if row.name == "latent" else layer_truth
        assert len(a.kl) == len(a.mi) == 5
        for got, want in zip(a.kl, kl_truth, strict=True):
            assert abs(got - want) < 0.01, (row.name, a.kl, kl_truth)
        for got, want in zip(a.mi, mi_truth, strict=True):
            assert close(got, want), (row.name, a.mi, mi_truth)
        assert abs(math.fsum(a.kl) - row.kl.mean) < 1e-9
        assert abs(math.fsum(a.mi) - row.mi.mean) < 1e-9
    # the dropped units carry nothing at the layers: they get only their share of the row's own
    # Monte Carlo error (the shift that makes the values sum to the row's value)
    for r in trained.layers[1:]:
        error = abs(r.mi.mean - math.fsum(layer_truth[1])) / 5
        assert all(abs(v) <= error + 0.01 for v in r.attribution.mi[3:]), (r.name, error)


def test_random_copies_rows_sum_to_their_own_values(exact_case) -> None:
    _, _, report = exact_case
    import matplotlib.pyplot as plt

    fig = figure(report)  # the heat maps share one colour scale
    maps = [ax for ax in fig.axes if ax.get_title().endswith("(Shapley, nats)")]
    assert [ax.get_title().split(":")[0] for ax in maps] == ["trained", "random"]
    assert maps[0].images[0].get_clim() == maps[1].images[0].get_clim()
    assert any(ax.get_title().startswith("MMD²") for ax in fig.axes)
    plt.close(fig)
    for row in report.variant("random").layers:
        if row.attribution is None:
            continue
        assert abs(math.fsum(row.attribution.mi) - row.mi.mean) < 1e-9
        assert abs(math.fsum(row.attribution.kl) - row.kl.mean) < 1e-9


def test_sampled_permutations_beyond_ten_units() -> None:
    """Eleven units: permutations are sampled. The MI is far below log N, so with independent
    units it is additive (checked) and each unit's truth is its own MI."""
    d, n = 11, 2000
    mu, logvar = independent_units(d, n)
    mu = mu * 0.5
    vae = vae_for(mu, logvar, axis_aligned(d, dropped=0))
    report = ds.inspect(vae, index_data(n), random_inits=0, seeds=1, device="cpu",
                        settings=FAST, attribution=True)  # fmt: skip
    eye = torch.eye(d)
    per_unit = [gaussian_linear_truth(mu, logvar, eye[j : j + 1])[2] for j in range(d)]
    joint = gaussian_linear_truth(mu, logvar, eye)[2]
    assert abs(math.fsum(per_unit) - joint) < 0.05  # the premise: additive here
    kl_truth = (0.5 * (logvar.exp() - 1 - logvar + mu**2)).mean(0).tolist()
    for row in report.variant("trained").layers:
        a = row.attribution
        assert a is not None and a.permutations == FAST.attribution_permutations
        assert all(abs(g - w) < 0.01 for g, w in zip(a.kl, kl_truth, strict=True)), a.kl
        assert all(close(g, w) for g, w in zip(a.mi, per_unit, strict=True)), (a.mi, per_unit)
        assert abs(math.fsum(a.mi) - row.mi.mean) < 1e-9


def test_spatial_latents_are_grouped_by_channel() -> None:
    shape = conv_latent_shape(8)  # [2, 2, 2]
    assert unit_groups(shape).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert unit_groups((3,)).tolist() == [0, 1, 2]
    mu, logvar = independent_units(8)
    post = Posterior(mu.view(N, *shape), logvar.view(N, *shape))
    off = coalition(post, unit_groups(shape), (False, True))
    assert torch.equal(off.mu[:, 0], torch.zeros(N, 2, 2))
    assert torch.equal(off.mu[:, 1], post.mu[:, 1])
    assert torch.equal(off.logvar[:, 0], torch.zeros(N, 2, 2))
    vae = vae_for(post.mu, post.logvar, conv_upsample(8))
    report = ds.inspect(vae, index_data(N), random_inits=0, seeds=1, device="cpu",
                        settings=FAST, attribution=True)  # fmt: skip
    for row in report.variant("trained").layers:
        assert row.attribution is not None and len(row.attribution.mi) == 2
        # channel 0 holds units 0-3, whose KL the test's posteriors make the smaller
        kl = (0.5 * (logvar.exp() - 1 - logvar + mu**2)).mean(0)
        assert abs(row.attribution.kl[0] - float(kl[:4].sum())) < 0.01


def test_rows_a_search_reads_are_read_per_coalition_and_match_the_truth() -> None:
    """h = |z| folds every sign: read from its preimages, so each coalition is one more run. Its
    units are independent given x and under the prior, so KL is additive over them (each unit's
    Shapley value is its own folded KL); MI's Shapley values from every coalition's exact
    MI (`folded_truth`)."""
    mu, logvar = independent_units(3)
    vae = vae_for(mu, logvar, nn.Sequential(Fold()))
    report = ds.inspect(vae, index_data(N), random_inits=0, seeds=1, device="cpu",
                        settings=FAST, attribution=True)  # fmt: skip
    row = report.variant("trained").layer("output")
    assert row.method == "preimages" and row.attribution is not None
    kl_truth = [folded_truth(mu[:, [j]], logvar[:, [j]])[0] for j in range(3)]
    _, mi_truth = shapley_truth(mu, logvar, partial(folded_truth, samples=8000))
    for got, want in zip(row.attribution.kl, kl_truth, strict=True):
        assert close(got, want), (row.attribution.kl, kl_truth)
    for got, want in zip(row.attribution.mi, mi_truth, strict=True):
        assert close(got, want), (row.attribution.mi, mi_truth)
    assert abs(math.fsum(row.attribution.kl) - row.kl.mean) < 1e-9
    assert abs(math.fsum(row.attribution.mi) - row.mi.mean) < 1e-9
    assert not [d for d in report.diagnostics if "no attribution" in d.message]


def test_critic_rows_over_the_run_budget_have_none_and_say_why() -> None:
    mu, logvar = independent_units(2)
    decoder = nn.Sequential(nn.Linear(2, 1), nn.GELU())  # folds: not read in closed form
    vae = vae_for(mu, logvar, decoder)
    settings = replace(FAST, attribution_runs=1)  # two latent units: 2 coalition runs
    report = ds.inspect(vae, index_data(N), random_inits=0, seeds=1, device="cpu",
                        settings=settings, attribution=True)  # fmt: skip
    rows = {r.name: r for r in report.variant("trained").layers}
    assert rows["latent"].attribution is not None
    read_by_critic = [n for n, r in rows.items() if r.method in ("critic", "preimages")]
    assert read_by_critic
    assert all(rows[n].attribution is None for n in read_by_critic)
    notes = [d.message for d in report.diagnostics if "no attribution" in d.message]
    assert len(notes) == 1 and "it takes 2 estimator runs" in notes[0], notes
    assert "over attribution_runs=1" in notes[0]
    assert all(f"trained {n}" in notes[0] for n in read_by_critic)
    text = report.to_json()
    again = ds.Report.from_json(text)
    assert again.variant("trained").layers[0].attribution == rows["latent"].attribution
    assert json.loads(text)["settings"]["attribution"] is True


def test_rows_left_unread_take_no_coalition_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Posteriors too narrow for float32 features leave the latent's critic row and the Tanh
    layer unread (no values to split): they get no attribution and no estimator run is spent on
    their coalitions; the affine layer (closed form) gets its own."""
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(N, 2, generator=g), torch.full((N, 2), -20.0)
    torch.manual_seed(0)
    decoder = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 4))
    calls = []
    run = joint.run_decoders
    monkeypatch.setattr(joint, "run_decoders", lambda *a, **k: calls.append(1) or run(*a, **k))
    vae, settings = vae_for(mu, logvar, decoder), ds.Settings(steps=300)
    report = ds.inspect(vae, index_data(N), random_inits=0, seeds=1, device="cpu",
                        settings=settings, attribution=True)  # fmt: skip
    rows = {r.name: r for r in report.variant("trained").layers}
    assert rows["latent"].method == rows["2"].method == "unresolved"
    assert rows["latent"].attribution is None and rows["2"].attribution is None
    assert rows["0"].method == "affine" and rows["0"].attribution is not None
    assert calls == []
    assert not [d for d in report.diagnostics if "no attribution" in d.message]


def test_attribution_must_be_a_bool() -> None:
    mu, logvar = independent_units(2)
    with pytest.raises(ds.ArgumentError, match="attribution must be True or False, got 'yes'"):
        ds.inspect(vae_for(mu, logvar, nn.Linear(2, 2)), index_data(N), attribution="yes")  # type: ignore[arg-type]


def test_cli_attribution_flag(bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    args = ["inspect", str(bundle), "--random-inits", "0", "--seeds", "1", "--steps", "100"]
    got = CliRunner().invoke(app, [*args, "--attribution", "--json", str(out)])
    assert got.exit_code == 0, got.output
    rows = json.loads(out.read_text())["variants"][0]["layers"]
    latent = rows[0]
    assert len(latent["attribution"]["mi"]) == 3 and latent["attribution"]["permutations"] is None
    critic = [r for r in rows if r["method"] == "critic"]
    assert critic  # the demo's last Linear to 2 features: read per coalition (6 runs)
    for row in critic:
        assert abs(math.fsum(row["attribution"]["kl"]) - row["kl"]["mean"]) < 1e-9
    got = CliRunner().invoke(app, [*args, "--attribution", "--attribution-runs", "-1"])
    assert got.exit_code == 2 and "attribution_runs must be an integer >= 0, got -1" in got.output
