"""Image-scale accuracy: decoders of the size people train on images, built so that every
layer's truth is known, read with default settings (every default layer, 3 seeds, the trained
decoder alone), N = 1000, latent KL 22 nats, d = 16:

- an MLP to a 784-wide sigmoid output (Linear 256, 512, LeakyReLU): injective, every layer holds
  the latent's values;
- a DCGAN-style decoder, Linear to 64x2x2 then three stride-2 transposed convolutions to 8x16x16
  feature maps (2048 features), LeakyReLU between, Tanh last: injective, the latent's values;
- the same after a Linear(16, 6): every layer holds that map's values, whose truth is closed
  form.

Prints truth vs estimate per layer, the worst error as a share of the stated tolerance
(`decoderscope.testing.tolerance`: max(0.15 nats, 5%); 1.00 is at it) and each case's time.

Run: .venv/bin/python benchmarks/imagescale.py [case ...]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import nn

import decoderscope as ds
from decoderscope.testing import (
    gaussian_case,
    gaussian_linear_truth,
    index_data,
    truth_cells,
    vae_for,
)

D, N, KL, SIGMA = 16, 1000, 22.0, 0.3


def mlp_784() -> nn.Module:
    return nn.Sequential(
        nn.Linear(D, 256), nn.LeakyReLU(0.2), nn.Linear(256, 512), nn.LeakyReLU(0.2),
        nn.Linear(512, 784), nn.Sigmoid(),
    )  # fmt: skip


def dcgan(rank: int | None = None) -> nn.Sequential:
    """Linear(16, 256) -> [64, 2, 2] -> ConvT to [32, 4, 4], [16, 8, 8], [8, 16, 16]; with
    `rank`, Linear(16, rank) first, then Linear(rank, 256) (a product of float32 matrices is not
    of low rank in float32: its rounding fills the other directions at 1e-7)."""
    first: list[nn.Module] = [nn.Linear(D, 64 * 2 * 2)]
    if rank is not None:
        first = [nn.Linear(D, rank), nn.Linear(rank, 64 * 2 * 2)]
    act = nn.LeakyReLU
    return nn.Sequential(
        *first, act(0.2), nn.Unflatten(1, (64, 2, 2)),
        nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1), act(0.2),
        nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1), act(0.2),
        nn.ConvTranspose2d(16, 8, 4, stride=2, padding=1), nn.Tanh(),
    )  # fmt: skip


CASES: dict[str, Callable[[], nn.Module]] = {
    "MLP to 784, sigmoid": mlp_784,
    "DCGAN to 8x16x16": dcgan,
    "DCGAN after Linear(16, 6)": lambda: dcgan(rank=6),
}


def run(name: str) -> tuple[list[str], float]:
    """The case's table lines and its worst error as a share of the tolerance."""
    mu, lv = gaussian_case(d=D, n=N, kl=KL, sigma=SIGMA, seed=5)
    torch.manual_seed(11)
    dec = CASES[name]()
    t0 = time.perf_counter()
    report = ds.inspect(vae_for(mu, lv, dec), index_data(N), random_inits=0, device="cpu")
    seconds = time.perf_counter() - t0
    trained = report.variant("trained")
    exact = trained.layer("latent").exact
    assert exact is not None
    latent = (exact.kl, exact.aggregate_kl, exact.mi)
    layer_truth = latent
    first = dec[0] if isinstance(dec, nn.Sequential) else None
    if isinstance(first, nn.Linear) and first.out_features < D:  # every layer: its values
        layer_truth = gaussian_linear_truth(mu, lv, first.weight.detach())
    lines, worst = [], 0.0
    for row in trained.layers:
        cells, share = truth_cells(row, latent if row.name == "latent" else layer_truth)
        worst = max(worst, share)
        row_cells = f"| {name} | `{row.name}` | {row.method} | {cells}"
        lines.append(f"{row_cells} | {share:.2f} | {seconds:.1f} |")
    return lines, worst


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("cases", nargs="*", help=f"a subset of: {list(CASES)}")
    args = parser.parse_args()
    print(f"torch threads: {torch.get_num_threads()}\n", flush=True)
    print("| case | layer | read by | truth KL / agg / MI | estimate ± se | /tolerance | s |")
    print("|---|---|---|---|---|---:|---:|")
    worst = 0.0
    for name in args.cases or list(CASES):
        lines, share = run(name)
        worst = max(worst, share)
        print("\n".join(lines), flush=True)
    print(f"\nWorst error as a share of the tolerance: {worst:.2f}")


if __name__ == "__main__":
    main()
