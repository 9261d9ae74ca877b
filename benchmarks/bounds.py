"""Held-out linear-Gaussian VAEs (probabilistic PCA with an imperfect encoder and unused latent
units, not the tests' own): rate, distortion, ELBO, IWAE, the latent statistics, MMD^2 and the
Shapley attribution against their closed forms and an independent Monte Carlo reference.

    .venv/bin/python benchmarks/bounds.py

Prints a Markdown table for docs/accuracy.md.
"""

from __future__ import annotations

import math
import time
from functools import partial

import torch

import decoderscope as ds
from decoderscope.latent_stats import latent_stats
from decoderscope.report import Report
from decoderscope.testing import LinearGaussianVAE, gaussian_linear_truth, shapley_truth

# (data dim, latent, used units, sigma, seed)
CASES = [(8, 5, 3, 0.2, 11), (20, 8, 6, 0.5, 12), (12, 6, 4, 0.1, 13), (30, 10, 5, 0.3, 14)]
N = 500


def population(model: LinearGaussianVAE) -> tuple[list[float], list[float], float]:
    """Per-unit KL and aggregate variance, and the moment-matched KL, over the model's data
    distribution (the encoder centres x at b, so the aggregate mean is 0)."""
    d = model.w.shape[0]
    cov_x = model.w @ model.w.T + model.sigma**2 * torch.eye(d, dtype=torch.float64)
    cov_mu = model.a @ cov_x @ model.a.T
    kl = 0.5 * (model.var + torch.diagonal(cov_mu) - 1 - model.var.log())
    s = torch.diag(model.var) + cov_mu
    matched = 0.5 * float(torch.trace(s) - s.shape[0] - torch.logdet(s))
    return kl.tolist(), (model.var + torch.diagonal(cov_mu)).tolist(), matched


def row(case: tuple[int, int, int, float, int]) -> str:
    d, latent, used, sigma, seed = case
    model = LinearGaussianVAE(N, d, latent, used, sigma, seed)
    vae = ds.VAE(encode=model.encode, decoder=model.decoder())
    start = time.perf_counter()
    report = ds.inspect(vae, model.x.float(), random_inits=0, seeds=1, device="cpu",
                        likelihood=f"gaussian:{sigma}", attribution=True)  # fmt: skip
    seconds = time.perf_counter() - start
    truth = model.truth(model.x)
    b = report.bounds
    assert b is not None
    iwae = b.iwae
    inside = all(truth["elbo"] - 3 * e.se <= e.mean <= truth["log_p"] + 3 * e.se for _, e in iwae)
    rising = all(
        y.mean >= x.mean - 3 * math.hypot(x.se, y.se)
        for (_, x), (_, y) in zip(iwae, iwae[1:], strict=False)
    )  # noqa: E501
    worst_z = 0.0
    for k, e in iwae[:3]:
        ref, ref_se = model.iwae_reference(model.x, k, reps=8, seed=k)
        worst_z = max(worst_z, abs(e.mean - ref) / math.hypot(e.se, ref_se))
    elbo_rows = all(
        r.elbo is not None and abs(r.elbo.mean - (-b.distortion.mean - r.kl.mean)) < 1e-9
        for r in report.variant("trained").layers
    )
    big = LinearGaussianVAE(20000, d, latent, used, sigma, seed + 100)
    stats = latent_stats(*big.encode(big.x))
    kl, var, matched = population(big)
    unit_err = max(
        max(abs(a - t) for a, t in zip(stats.kl_per_dim, kl, strict=True)),
        max(abs(a - t) for a, t in zip(stats.aggregate_var, var, strict=True)),
        max(abs(a) for a in stats.aggregate_mean),
    )
    return (
        f"| {d}/{latent}/{used}, σ {sigma} | {b.rate.mean - truth['rate']:+.4f} | "
        f"{b.distortion.mean - truth['distortion']:+.3f} ± {b.distortion.se:.3f} | "
        f"{b.elbo.mean - truth['elbo']:+.3f} | {truth['elbo']:.2f} … {truth['log_p']:.2f} | "
        + " ".join(f"{e.mean:.2f}" for _, e in iwae)
        + f" | {inside and rising} | {worst_z:.1f} | {elbo_rows} | "
        f"{stats.active_units}/{used} | {unit_err:.3f} | "
        f"{stats.moment_matched_kl - matched:+.3f} | {mmd_z(model, report)} | "
        f"{attribution_errors(model, report)} | {seconds:.1f} |"
    )


def mmd_z(model: LinearGaussianVAE, report: Report) -> str:
    """|MMD^2 - closed form| / s.e. at the latent and at the decoder's Linear layer."""
    out = []
    for name, w in (("latent", None), ("0", model.w)):
        m = report.variant("trained").layer(name).mmd2
        assert m is not None
        out.append(f"{abs(m.mean - model.mmd2_truth(w, m.bandwidth)) / m.se:.1f}")
    return ", ".join(out)


def attribution_errors(model: LinearGaussianVAE, report: Report) -> str:
    """The worst Shapley error of KL and of MI over the latent row and the Linear layer, in
    units of max(0.1 nats, 10% of the truth), and the largest |sum of the values - the row's
    value|. Truth: the unused units' posteriors are the prior at every point (null players,
    Shapley value 0), and both rows hold the used units' values, whose game `shapley_truth`
    enumerates."""
    mu, logvar = model.encode(model.x)
    used = int((model.w.abs().sum(0) > 0).sum())
    eye = torch.eye(used, dtype=torch.float64)
    truth = partial(gaussian_linear_truth, a=eye, samples=4000)
    kl, mi = shapley_truth(mu[:, :used].double(), logvar[:, :used].double(), truth)
    pad = [0.0] * (mu.shape[1] - used)
    worst, worst_sum = 0.0, 0.0
    for name in ("latent", "0"):
        row = report.variant("trained").layer(name)
        assert row.attribution is not None
        for got, want in zip((row.attribution.kl, row.attribution.mi), (kl + pad, mi + pad),
                             strict=True):  # fmt: skip
            errors = [abs(g - t) / max(0.1, 0.1 * abs(t)) for g, t in zip(got, want, strict=True)]
            worst = max(worst, *errors)
        worst_sum = max(worst_sum, abs(sum(row.attribution.mi) - row.mi.mean))
    return f"{worst:.2f} | {worst_sum:.1e}"


def main() -> None:
    print(
        "| x dim / latent / used | rate − truth | distortion − truth | ELBO − truth | "
        "ELBO … log p(x) | IWAE k = 1, 10, 100, 1000 | inside, rising | worst \\|IWAE − MC\\| / "
        "s.e. (k ≤ 100) | layer ELBO = −D − KL | active / used | worst unit error | "
        "moment-matched KL − truth | \\|MMD² − truth\\| / s.e. (latent, layer) | worst Shapley "
        "error / max(0.1, 10%) | \\|Σ Shapley MI − row MI\\| | s |"
    )
    print("|---|---:|---:|---:|---|---|---|---:|---|---|---:|---:|---|---:|---:|---:|")
    for case in CASES:
        print(row(case), flush=True)


if __name__ == "__main__":
    main()
