"""Speed: the per-layer method (each layer its own decoder passes and its own critic pair, the
paper's plain estimator at 2000 steps x 256) against decoderscope (one call, every layer from
shared passes), in one process, on decoders whose truth is known (injective linear chains: every
layer equals the exact latent values). Prints wall-time ratios and errors against the truth.

Run: .venv/bin/python benchmarks/speed.py [--quick]
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

import decoderscope as ds


def case(depth: int, d: int = 16, n: int = 1000, kl: float = 7.7) -> tuple[ds.VAE, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(n, d, generator=g)
    logvar = torch.full((n, d), 2 * math.log(0.5))
    lo, hi = 0.0, 10.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        mu = base * mid
        value = float((0.5 * (logvar.exp() + mu * mu - 1 - logvar).sum(1)).mean())
        lo, hi = (lo, mid) if value > kl else (mid, hi)
    mu = base * lo
    torch.manual_seed(1)
    dec = nn.Sequential(*[nn.Linear(d, d) for _ in range(depth)])

    def encode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        i = x[:, 0].long()
        return mu[i], logvar[i]

    return ds.VAE(encode=encode, decoder=dec), torch.arange(n).float().unsqueeze(1)


def errors(report: ds.Report, layers: list[str]) -> float:
    trained = report.variant("trained")
    ex = trained.layer("latent").exact
    assert ex is not None
    worst = 0.0
    for name in layers:
        row = trained.layer(name)
        for est, truth in ((row.kl, ex.kl), (row.aggregate_kl, ex.aggregate_kl), (row.mi, ex.mi)):
            worst = max(worst, abs(est.mean - truth))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer steps, for a smoke run")
    args = parser.parse_args()
    plain_steps = 200 if args.quick else 2000
    print("| decoder | per-layer plain: s | max err | decoderscope: s | max err | speed-up |")
    print("|---|---:|---:|---:|---:|---:|")
    for depth in (3, 8):
        vae, data = case(depth)
        layers = [str(i) for i in range(depth)]
        t0 = time.perf_counter()
        worst_plain = 0.0
        for name in layers:
            r = ds.inspect(
                vae,
                data,
                layers=[name],
                random_inits=0,
                seeds=1,
                device="cpu",
                settings=ds.Settings(estimator="plain", steps=plain_steps),
            )
            worst_plain = max(worst_plain, errors(r, [name]))
        t_plain = time.perf_counter() - t0
        t0 = time.perf_counter()
        steps = ds.Settings().steps // (10 if args.quick else 1)
        r = ds.inspect(
            vae, data, random_inits=0, seeds=1, device="cpu", settings=ds.Settings(steps=steps)
        )
        t_ds = time.perf_counter() - t0
        print(
            f"| {depth}-layer linear MLP | {t_plain:.1f} | {worst_plain:.2f} | {t_ds:.1f} | "
            f"{errors(r, layers):.2f} | {t_plain / t_ds:.1f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
