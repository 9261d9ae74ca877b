"""The refined inverse's cost at evaluation: default settings (`refined_samples` = 128: a layer
read through R(h) refined by Gauss-Newton takes its KL and MI terms from the first 128 posterior
samples) against `refined_samples` = `eval_samples` (every one of the 4096 refined, as the
evaluation did before), in the same process, on decoders whose every layer holds the latent's
values (the truth is the exact latent row). Prints the times, their ratio and each run's worst
error as a share of the stated tolerance (`decoderscope.testing.tolerance`).

Both runs skip the accuracy diagnostic's refinement on `inverse` rows (not a setting), so the
ratio is that of the sample cut alone.

Run: .venv/bin/python benchmarks/refined.py [--seeds 1]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import nn

import decoderscope as ds
from decoderscope.testing import OpaqueLeaky, gaussian_case, index_data, truth_cells, vae_for

N = 1000
# name: (latent dim, KL, decoder); refined inverse at every nonlinear layer
CASES: dict[str, tuple[int, float, Callable[[], nn.Module]]] = {
    "Linear(16, 64), ReLU, Linear(64, 64), ReLU": (
        16,
        8.0,
        lambda: nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU()),
    ),
    "(Linear(16, 32), LeakyReLU hidden from the graph) x 2": (
        16,
        8.0,
        lambda: nn.Sequential(nn.Linear(16, 32), OpaqueLeaky(), nn.Linear(32, 32), OpaqueLeaky()),
    ),
}


def _run(d: int, kl: float, build: Callable[[], nn.Module], seeds: int, refined: int) -> tuple[
    float, float]:  # fmt: skip
    """Seconds and worst error / tolerance over every layer's KL, aggregate KL and MI."""
    mu, lv = gaussian_case(d=d, n=N, kl=kl, sigma=0.5, seed=0)
    torch.manual_seed(1)
    vae = vae_for(mu, lv, build())
    settings = ds.Settings(refined_samples=refined)
    t0 = time.perf_counter()
    report = ds.inspect(
        vae, index_data(N), random_inits=0, seeds=seeds, device="cpu", settings=settings,
        progress=False,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    trained = report.variant("trained")
    exact = trained.layer("latent").exact
    assert exact is not None
    truth = (exact.kl, exact.aggregate_kl, exact.mi)
    return seconds, max(truth_cells(row, truth)[1] for row in trained.layers[1:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=1)
    args = parser.parse_args()
    every = ds.Settings().eval_samples
    print(f"torch threads: {torch.get_num_threads()}, N = {N}, seeds = {args.seeds}\n")
    fewer = ds.Settings().refined_samples
    print(
        f"| case | refined {fewer}: s | /tolerance | refined {every}: s | /tolerance | speed-up |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, (d, kl, build) in CASES.items():
        fast, fast_err = _run(d, kl, build, args.seeds, fewer)
        slow, slow_err = _run(d, kl, build, args.seeds, every)
        print(
            f"| {name} | {fast:.1f} | {fast_err:.2f} | {slow:.1f} | {slow_err:.2f} | "
            f"{slow / fast:.1f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
