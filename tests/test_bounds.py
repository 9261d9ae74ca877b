"""Likelihood bounds and latent statistics against closed-form truth: a linear-Gaussian VAE
(probabilistic PCA, x = W z + b + sigma * noise) with a deliberately imperfect encoder and two
latent units the decoder does not use. Truths use torch.distributions, not the tool's code."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import decoderscope as ds
from decoderscope.cli import app
from decoderscope.latent_stats import latent_stats
from decoderscope.likelihood import parse_likelihood
from decoderscope.testing import LinearGaussianVAE

runner = CliRunner()
D, LATENT, USED, SIGMA = 6, 4, 2, 0.3


Case = tuple[LinearGaussianVAE, ds.Report]


def PPCA(n: int, seed: int = 0) -> LinearGaussianVAE:  # noqa: N802 - the model's name
    return LinearGaussianVAE(n, D, LATENT, USED, SIGMA, seed)


SMALL = ds.Settings(steps=100, eval_samples=1024, exact_samples=4096, pair_samples=256)


@pytest.fixture(scope="module")
def case() -> Case:
    model = PPCA(400)
    vae = ds.VAE(encode=model.encode, decoder=model.decoder())
    report = ds.inspect(vae, model.x.float(), random_inits=0, seeds=1, device="cpu",
                        settings=SMALL, likelihood=f"gaussian:{SIGMA}")  # fmt: skip
    return model, report


def test_rate_distortion_and_elbo_against_closed_form(
    case: Case,
) -> None:
    model, report = case
    truth = model.truth(model.x)
    b = report.bounds
    assert b is not None and b.likelihood == f"gaussian:{SIGMA:g}"
    assert abs(b.rate.mean - truth["rate"]) < 0.02
    assert abs(b.distortion.mean - truth["distortion"]) < max(0.05, 0.01 * abs(truth["distortion"]))
    assert abs(b.elbo.mean - truth["elbo"]) < max(0.05, 0.01 * abs(truth["elbo"]))
    # the Broken-ELBO bound I(x; z) <= R, with the exact latent MI
    exact = report.variant("trained").layer("latent").exact
    assert exact is not None and exact.mi <= b.rate.mean


def test_iwae_rises_from_the_elbo_to_log_p(case: Case) -> None:
    model, report = case
    truth = model.truth(model.x)
    assert report.bounds is not None
    iwae = report.bounds.iwae
    assert [k for k, _ in iwae] == [1, 10, 100, 1000]
    for k, e in iwae:
        assert truth["elbo"] - 3 * e.se - 0.01 <= e.mean <= truth["log_p"] + 3 * e.se, k
    for (_, a), (_, b) in zip(iwae, iwae[1:], strict=False):
        assert b.mean >= a.mean - 3 * math.hypot(a.se, b.se)
    assert iwae[-1][1].mean > iwae[0][1].mean + 0.1  # the bound does tighten here
    for k, e in iwae[:3]:
        ref, ref_se = model.iwae_reference(model.x, k, reps=8, seed=k)
        assert abs(e.mean - ref) < 3 * math.hypot(e.se, ref_se), (k, e, ref, ref_se)


def test_per_layer_elbo_is_minus_distortion_minus_kl(
    case: Case,
) -> None:
    _, report = case
    assert report.bounds is not None
    d = report.bounds.distortion.mean
    rows = report.variant("trained").layers
    assert [r.name for r in rows] == ["latent", "0"]
    for r in rows:
        assert r.elbo is not None and r.elbo.mean == pytest.approx(-d - r.kl.mean, abs=1e-12)
    # the Linear layer drops the two unused units, which carry no KL (their posterior is the
    # prior): it keeps the latent's exact KL, so its ELBO is the model's
    exact = rows[0].exact
    assert exact is not None and abs(rows[1].kl.mean - exact.kl) < 0.02
    again = ds.Report.from_json(report.to_json())
    assert again.bounds == report.bounds and again.latent_stats == report.latent_stats
    assert again.variants == report.variants


def test_latent_stats_against_the_population() -> None:
    model = PPCA(20000, seed=1)
    mu, logvar = model.encode(model.x)
    stats = latent_stats(mu, logvar)
    cov_x = model.w @ model.w.T + SIGMA**2 * torch.eye(D, dtype=torch.float64)
    cov_mu = model.a @ cov_x @ model.a.T  # E[mu] = 0 since the encoder centres x at b
    agg_var = model.var + torch.diagonal(cov_mu)
    kl = 0.5 * (model.var + torch.diagonal(cov_mu) - 1 - model.var.log())
    assert stats.active_units == USED
    assert all(abs(a) < 0.03 for a in stats.aggregate_mean)
    assert all(
        abs(a - t) < 0.03 for a, t in zip(stats.aggregate_var, agg_var.tolist(), strict=True)
    )
    assert all(abs(a - t) < 0.03 for a, t in zip(stats.kl_per_dim, kl.tolist(), strict=True))
    s = torch.diag(model.var) + cov_mu
    matched = 0.5 * float(torch.trace(s) - LATENT - torch.logdet(s))
    assert abs(stats.moment_matched_kl - matched) < 0.03
    assert stats.kl_per_dim[USED:] == pytest.approx([0.0, 0.0], abs=1e-6)


def test_likelihood_specs_and_the_cli(tmp_path: Path) -> None:
    with pytest.raises(ds.ArgumentError, match="give the Gaussian's standard deviation"):
        parse_likelihood("gaussian:-1")
    with pytest.raises(ds.ArgumentError, match="likelihood must be 'gaussian:SIGMA'"):
        parse_likelihood("poisson")
    x, logits = torch.rand(5, 3).round(), torch.randn(5, 3)
    by_logits = parse_likelihood("bernoulli:logits").log_prob(x, logits)  # type: ignore[union-attr]
    by_probs = parse_likelihood("bernoulli").log_prob(x, torch.sigmoid(logits))  # type: ignore[union-attr]
    assert torch.allclose(by_logits, by_probs, atol=1e-5)
    with pytest.raises(ds.ArgumentError, match="reads the decoder's output as probabilities"):
        parse_likelihood("bernoulli").log_prob(x, logits)  # type: ignore[union-attr]
    from decoderscope.demo import DemoVAE

    bundle = tmp_path / "vae.pt"
    ds.save_checkpoint(DemoVAE(latent_dim=3, hidden=8), bundle, "decoderscope.demo:DemoVAE",
                       {"latent_dim": 3, "hidden": 8}, torch.randn(64, 2),
                       likelihood="gaussian:0.5")  # fmt: skip
    js = tmp_path / "r.json"
    args = ["inspect", str(bundle), "--random-inits", "0", "--seeds", "1", "--steps", "30"]
    result = runner.invoke(app, [*args, "--device", "cpu", "--json", str(js)])
    assert result.exit_code == 0, result.output
    assert ds.Report.from_json(js.read_text()).bounds is not None  # the bundle's likelihood
    result = runner.invoke(app, [*args, "--likelihood", "gaussian:0", "--json", str(js)])
    assert result.exit_code == 2 and "give the Gaussian's standard deviation" in result.output


def test_mmd_against_gaussian_kernel_integrals(case: Case) -> None:
    """The aggregate posterior is a mixture of Gaussians and the prior a Gaussian, at the latent
    and through the Linear layer: MMD^2 at the reported bandwidth in closed form."""
    model, report = case
    for row, w in ((report.variant("trained").layer("latent"), None),
                   (report.variant("trained").layer("0"), model.w)):  # fmt: skip
        m = row.mmd2
        assert m is not None and m.bandwidth > 0
        truth = model.mmd2_truth(w, m.bandwidth)
        assert truth > 0.002  # the imperfect encoder's aggregate posterior is not the prior
        assert abs(m.mean - truth) < 3 * m.se and m.se < truth / 3, (row.name, m, truth)


def test_sweep_draws_the_rate_distortion_plane(case: Case, tmp_path: Path) -> None:
    from decoderscope.render_sweep import figure

    _, report = case
    for name in ("beta=1", "beta=4"):
        (tmp_path / f"{name}.json").write_text(report.to_json())
    swept = ds.sweep(tmp_path, tmp_path / "out")
    saved = (tmp_path / "out" / "sweep.json").read_text()
    assert '"distortion"' in saved and [e.status for e in swept.entries] == ["report"] * 2
    fig = figure(swept)
    assert [ax.get_title() for ax in fig.axes][-1] == "rate–distortion plane"
