"""Accuracy: truth vs estimate per case and layer, for the default estimator and the paper's
plain method, on decoders whose values are known (DESIGN.md section 2): injective linear chains
and conv decoders (every layer equals the exact latent values), LeakyReLU MLPs (injective, so the
same), and a rank-reducing linear layer (closed form). Writes a Markdown table.

Run: .venv/bin/python benchmarks/accuracy.py [--out docs/accuracy.md] [--quick]
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import decoderscope as ds
from decoderscope.testing import (
    conv_latent_shape,
    conv_upsample,
    gaussian_case,
    gaussian_linear_truth,
    index_data,
    leaky_mlp,
    linear_chain,
    project,
    tolerance,
    vae_for,
)

Truth = dict[str, tuple[float, float, float]]
Case = tuple[str, int, float, Callable[[int], nn.Module], str]


def mlp_linear(d: int) -> nn.Module:
    return linear_chain(d, 3, widen=True)


def mlp_leaky(d: int) -> nn.Module:
    return leaky_mlp(d, 1)


def mlp_leaky_deep(d: int) -> nn.Module:
    """Two nonlinearities deep: R(h) must undo both (its error grows with depth)."""
    return leaky_mlp(d, 2)


def conv(d: int) -> nn.Module:
    return conv_upsample(d, 4, side=2)


def conv_wide(d: int) -> nn.Module:
    """Latent [d/16, 4, 4] -> upsample [d/16, 8, 8] -> 1x1 convs to [16, 8, 8] (1024 features:
    wider than the whitening limit, so these layers are only standardised)."""
    return conv_upsample(d, 16, side=4)


CASES: list[Case] = [
    ("linear MLP", 16, 2.0, mlp_linear, "injective"),
    ("linear MLP", 16, 8.0, mlp_linear, "injective"),
    ("linear MLP", 16, 20.0, mlp_linear, "injective"),
    ("linear MLP", 2, 8.0, mlp_linear, "injective"),
    ("linear MLP", 64, 20.0, mlp_linear, "injective"),
    ("LeakyReLU MLP", 16, 2.0, mlp_leaky, "injective"),
    ("LeakyReLU MLP", 16, 8.0, mlp_leaky, "injective"),
    ("conv, upsample + 1x1", 16, 8.0, conv, "injective"),
    ("rank-reducing linear", 16, 8.0, project, "project"),
    ("linear MLP", 16, 30.0, mlp_linear, "injective"),
    ("linear MLP", 64, 30.0, mlp_linear, "injective"),
    ("conv, wide maps", 64, 8.0, conv_wide, "injective"),
    ("conv, wide maps", 64, 30.0, conv_wide, "injective"),
    ("LeakyReLU MLP, two deep", 16, 8.0, mlp_leaky_deep, "injective"),
]
LATENT_SHAPES: dict[Callable[[int], nn.Module], Callable[[int], tuple[int, ...]]] = {
    conv: lambda d: conv_latent_shape(d, 2),
    conv_wide: lambda d: conv_latent_shape(d, 4),
}


def run_case(case: Case, estimator: str, steps: int | None) -> tuple[ds.Report, Truth, float]:
    name, d, kl, build, kind = case
    n = 1000
    mu, lv = gaussian_case(d=d, n=n, kl=kl, sigma=max(math.exp(-kl / d), 0.05), seed=0)
    if build in LATENT_SHAPES:
        shape = LATENT_SHAPES[build](d)
        mu, lv = mu.view(n, *shape), lv.view(n, *shape)
    torch.manual_seed(1)
    dec = build(d)
    t0 = time.perf_counter()
    report = ds.inspect(
        vae_for(mu, lv, dec),
        index_data(n),
        random_inits=0,
        seeds=1,
        device="cpu",
        settings=ds.Settings(estimator=estimator, steps=steps),
        layers=[n_ for n_, m in dec.named_modules() if n_ and not isinstance(m, nn.LeakyReLU)],
    )
    seconds = time.perf_counter() - t0
    ex = report.variant("trained").layer("latent").exact
    assert ex is not None
    latent = (ex.kl, ex.aggregate_kl, ex.mi)
    truth: Truth = {"latent": latent}
    for row in report.variant("trained").layers[1:]:
        if kind == "project":
            weight = dec[0].weight.detach()
            truth[row.name] = gaussian_linear_truth(mu.flatten(1), lv.flatten(1), weight)
        else:
            truth[row.name] = latent
    return report, truth, seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="first three cases, 300 steps")
    args = parser.parse_args()
    cases = CASES[:3] if args.quick else CASES
    steps = 300 if args.quick else None  # None: each estimator's default
    lines = [
        "| case | d | layer | truth KL / agg / MI | default | plain | default s (steps) "
        "| plain s |",
        "|---|---:|---|---|---|---|---:|---:|",
    ]
    worst: dict[str, float] = {"telescoping": 0.0, "plain": 0.0}
    for case in cases:
        results = {e: run_case(case, e, steps) for e in ("telescoping", "plain")}
        truth = results["telescoping"][1]
        for layer, t in truth.items():
            cells = []
            for est in ("telescoping", "plain"):
                row = results[est][0].variant("trained").layer(layer)
                vals = (row.kl.mean, row.aggregate_kl.mean, row.mi.mean)
                rel = max(abs(v - x) / tolerance(x) for v, x in zip(vals, t, strict=True))
                worst[est] = max(worst[est], rel)
                cells.append(" / ".join(f"{v:.2f}" for v in vals))
            lines.append(
                f"| {case[0]}, KL {case[2]:g} | {case[1]} | `{layer}` | "
                + " / ".join(f"{x:.2f}" for x in t)
                + f" | {cells[0]} | {cells[1]} | {results['telescoping'][2]:.1f} "
                f"({results['telescoping'][0].settings['steps_run']}) | "
                f"{results['plain'][2]:.1f} |"
            )
        print(lines[-1], flush=True)
    lines.append("")
    lines.append(
        "Worst error as a share of the stated tolerance, |est − truth| / max(0.15 nats, 5% of "
        f"|truth|) (1.00 is at it): default {worst['telescoping']:.2f}, "
        f"plain {worst['plain']:.2f}."
    )
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(
            "# Accuracy benchmark\n\nOutput of `python benchmarks/accuracy.py`, N = 1000, "
            + (f"{steps} steps" if steps else "at most 12000 steps (plain: 1000)")
            + " (the default stops early once no critic improves on held-out "
            "batches; the steps it ran are in brackets; plain always runs them all), one seed per "
            "case, CPU; seconds as measured on one thread (OMP_NUM_THREADS=1). Values in nats."
            "\n\n" + text
        )
    print(text)


if __name__ == "__main__":
    main()
