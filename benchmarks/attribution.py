"""Held-out decoders whose layers only a preimage search or a trained critic reads: the Shapley
attribution of their rows (one estimator run per coalition of latent units) against exact
Shapley values, each coalition's truth by Monte Carlo with exact densities.

    .venv/bin/python benchmarks/attribution.py

Prints a Markdown table for docs/accuracy.md. Default settings, 1 seed, no random copies.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

import decoderscope as ds
from decoderscope.testing import (
    Fold,
    fold_truth,
    folded_truth,
    index_data,
    shapley_truth,
    tolerance,
    vae_for,
)

Truth = Callable[[torch.Tensor, torch.Tensor], tuple[float, float, float]]


@dataclass(frozen=True)
class Case:
    name: str
    d: int
    n: int
    seed: int
    decoder: Callable[[], nn.Module]
    truth: Callable[[nn.Module], Truth]  # the layer's truth, given the decoder built


def posteriors(d: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Units independent over the data, of unequal information (KL ~0.2 to ~2 nats each)."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(n, d, generator=g) * torch.linspace(0.4, 1.8, d)
    logvar = math.log(0.25) + 0.3 * torch.randn(n, d, generator=g)
    return mu, logvar


def gelu_linear(d: int, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(d, d)
    with torch.no_grad():
        lin.weight.copy_(torch.linalg.qr(torch.randn(d, d, generator=g))[0] * 1.5)
        lin.bias.copy_(0.3 * torch.randn(d, generator=g))
    return nn.Sequential(lin, nn.GELU())


def gelu_truth(decoder: nn.Module) -> Truth:
    lin = decoder[0]
    return partial(fold_truth, w=lin.weight.detach(), b=lin.bias.detach())


def projected_gelu(d: int, seed: int) -> nn.Module:
    """A GELU of one direction of z: u = w z + b, h = GELU(u) (folds u below GELU's minimum)."""
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(d, 1)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(1, d, generator=g))
        lin.bias.fill_(-0.5)
    return nn.Sequential(lin, nn.GELU())


def projected_truth(decoder: nn.Module) -> Truth:
    """h = GELU(|w| u' + b) with u' = w z / |w|, whose prior is N(0, 1) and posterior
    N(w mu / |w|, w S w^T / |w|^2): `fold_truth` of that 1-unit latent."""
    w, b = decoder[0].weight.detach().double()[0], decoder[0].bias.detach().double()
    norm = w.norm()

    def truth(mu: torch.Tensor, logvar: torch.Tensor) -> tuple[float, float, float]:
        m = (mu.double() @ w / norm).unsqueeze(1)
        var = (logvar.double().exp() @ (w * w)) / norm**2
        return fold_truth(m, var.log().unsqueeze(1), norm.view(1, 1), b)

    return truth


CASES = [
    Case("abs(z), d = 3", 3, 500, 14, lambda: nn.Sequential(Fold()), lambda _: folded_truth),
    Case("abs(z), d = 4", 4, 500, 11, lambda: nn.Sequential(Fold()), lambda _: folded_truth),
    Case("GELU(W z + b), d = 3", 3, 500, 12, lambda: gelu_linear(3, 12), gelu_truth),
    Case("GELU(w·z + b) to 1 feature, d = 3", 3, 500, 13, lambda: projected_gelu(3, 13),
         projected_truth),
]  # fmt: skip


def row(case: Case) -> str:
    mu, logvar = posteriors(case.d, case.n, case.seed)
    decoder = case.decoder()
    vae = vae_for(mu, logvar, decoder)
    start = time.perf_counter()
    report = ds.inspect(vae, index_data(case.n), random_inits=0, seeds=1, device="cpu",
                        attribution=True, progress=False)  # fmt: skip
    took = time.perf_counter() - start
    truth = case.truth(decoder)
    kl, _, mi = truth(mu, logvar)
    kl_phi, mi_phi = shapley_truth(mu, logvar, truth)
    out = report.variant("trained").layers[-1]
    a = out.attribution
    row_error = max(abs(out.kl.mean - kl) / tolerance(kl), abs(out.mi.mean - mi) / tolerance(mi))
    if a is None:
        return f"| {case.name} | {out.method} | {row_error:.2f} | no attribution | | | {took:.0f} |"
    worst = max(
        abs(g - t) / max(0.1, 0.1 * abs(t))
        for got, want in ((a.kl, kl_phi), (a.mi, mi_phi))
        for g, t in zip(got, want, strict=True)
    )

    def listed(got: tuple[float, ...] | list[float]) -> str:
        return ", ".join(f"{x:.2f}" for x in got)

    return (
        f"| {case.name} | {out.method} | {out.kl.mean:.3f} / {kl:.3f}, {out.mi.mean:.3f} / "
        f"{mi:.3f} ({row_error:.2f}) | {listed(a.kl)} ({listed(kl_phi)}) | {listed(a.mi)} "
        f"({listed(mi_phi)}) | {worst:.2f} | {took:.0f} |"
    )


def main() -> None:
    print(
        "| decoder | method | row KL / truth, MI / truth (worst error / max(0.15, 5%)) | "
        "Shapley KL (truth) | Shapley MI (truth) | worst error / max(0.1, 10%) | s |"
    )
    print("|---|---|---|---|---|---:|---:|")
    for case in CASES:
        print(row(case), flush=True)


if __name__ == "__main__":
    main()
