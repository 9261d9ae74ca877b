"""Truth at the edges: the bottleneck family and confident posteriors, row by row.

bottleneck NARROW WIDE ACT SEED: Linear(8, NARROW), ACT, Linear(NARROW, WIDE), Softplus; d = 8,
N = 512, latent KL 9.2, one seed; truth is the bottleneck's closed form at every layer.
confident LOGVAR: latent 2, Linear-Tanh-Linear, N = 300, every logvar equal, 300 steps, 2 seeds;
truth is the latent's exact row at every layer (the decoder is injective).

Run: .venv/bin/python benchmarks/edges.py bottleneck 3 32 leaky 0
     .venv/bin/python benchmarks/edges.py confident -20
"""

from __future__ import annotations

import math
import sys
import time

import torch
from torch import nn

import decoderscope as ds
from decoderscope.testing import (
    bottleneck,
    gaussian_case,
    gaussian_linear_truth,
    index_data,
    vae_for,
)


def _print(report: ds.Report, truth: tuple[float, float, float] | None, seconds: float) -> None:
    print(f"{seconds:.1f} s, {report.settings['steps_run']} critic steps")
    trained = report.variant("trained")
    exact = trained.layer("latent").exact
    assert exact is not None
    for row in trained.layers:
        t = truth if truth is not None and row.name != "latent" else None
        t = t or (exact.kl, exact.aggregate_kl, exact.mi)
        values = " / ".join(
            f"{e.mean:.3f} ± {e.se:.3f}" for e in (row.kl, row.aggregate_kl, row.mi)
        )
        print(f"  {row.name:7} {row.method:11} {values}  truth " + " / ".join(f"{x:.3f}" for x in t)
              + (f"  [{row.status}: {row.reason}]" if row.status else ""))  # fmt: skip


def main(argv: list[str]) -> None:
    kind, *rest = argv
    t0 = time.perf_counter()
    if kind == "bottleneck":
        narrow, wide, act, seed = int(rest[0]), int(rest[1]), rest[2], int(rest[3])
        mu, lv = gaussian_case(d=8, n=512, kl=9.2, sigma=math.exp(-9.2 / 8), seed=seed)
        torch.manual_seed(seed)
        dec = bottleneck(8, narrow, wide, act)
        report = ds.inspect(
            vae_for(mu, lv, dec), index_data(512), layers=["0", "1", "2", "3"],
            random_inits=0, seeds=1, device="cpu", progress=False,
        )  # fmt: skip
        _print(
            report, gaussian_linear_truth(mu, lv, dec[0].weight.detach()), time.perf_counter() - t0
        )
    elif kind == "confident":
        g = torch.Generator().manual_seed(0)
        mu, lv = torch.randn(300, 2, generator=g), torch.full((300, 2), float(rest[0]))
        torch.manual_seed(0)
        dec = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 4))
        report = ds.inspect(
            vae_for(mu, lv, dec), index_data(300), random_inits=0, seeds=2, device="cpu",
            progress=False, settings=ds.Settings(steps=300),
        )  # fmt: skip
        _print(report, None, time.perf_counter() - t0)
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
