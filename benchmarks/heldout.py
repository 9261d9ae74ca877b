"""Held-out accuracy: injective decoders that were not used to tune the estimator (other
nonlinearities, other seeds, a deeper nonlinear chain, a wide ReLU MLP), default settings
(seeds=3), N = 1000.
Every layer of an injective decoder holds exactly the latent's values, so the truth is the exact
latent row. Lossy decoders have their own truth: a rank-reducing linear layer (closed form), a
dead layer (0), h = |z| (folded normals, exact densities by Monte Carlo) and a GELU layer
(its preimages enumerated), where the refined
inverse must not be used and the critics must learn what is lost. Prints truth vs estimate and
the worst error as a share of the stated tolerance (`decoderscope.testing.tolerance`: max(0.15
nats, 5%)); 1.00 is at the tolerance.

The estimate is the mean over `--seeds` runs (the tool's default, 3) with its standard error
across them; `--seed` picks the run seed.

Run: .venv/bin/python benchmarks/heldout.py [case ...] [--seeds S] [--seed K]
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import torch
from torch import nn

import decoderscope as ds
from decoderscope.testing import (
    Fold,
    fold_truth,
    folded_truth,
    gaussian_case,
    gaussian_linear_truth,
    index_data,
    truth_cells,
    vae_for,
)

# name: (latent dim, KL, latent shape or None, decoder, layers); injective: every layer holds the
# latent's values
Case = tuple[int, float, tuple[int, ...] | None, Callable[[], nn.Module], list[str]]
CASES: dict[str, Case] = {
    "Linear, Tanh, Linear": (
        12,
        10.0,
        None,
        lambda: nn.Sequential(nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 12)),
        ["0", "2"],
    ),
    "Linear(8, 16), ELU, Linear": (
        8,
        6.0,
        None,
        lambda: nn.Sequential(nn.Linear(8, 16), nn.ELU(), nn.Linear(16, 16)),
        ["0", "2"],
    ),
    "upsample, 1x1 conv, LeakyReLU(0.1), 1x1 conv": (
        16,
        8.0,
        (4, 2, 2),
        lambda: nn.Sequential(
            nn.Upsample(scale_factor=2),
            nn.Conv2d(4, 8, 1),
            nn.LeakyReLU(0.1),
            nn.Conv2d(8, 8, 1),
        ),
        ["1", "3"],
    ),
    "(Linear, LeakyReLU(0.2)) x 2, Linear": (
        16,
        7.7,
        None,
        lambda: nn.Sequential(
            nn.Linear(16, 16),
            nn.LeakyReLU(0.2),
            nn.Linear(16, 16),
            nn.LeakyReLU(0.2),
            nn.Linear(16, 16),
        ),
        ["0", "2", "4"],
    ),
    # ReLU is not injective per unit, but 64 units on a 16-d latent are in practice: on the
    # first instance of this shape measured, the Jacobian had rank 16 at every sampled z and
    # Gauss-Newton in float64 never found a second preimage (added with the refinement's restarts)
    "Linear(16, 64), ReLU, Linear(64, 64), ReLU": (
        16,
        8.0,
        None,
        lambda: nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU()),
        ["1", "3"],
    ),
    "Linear(32, 48), Linear(48, 48)": (
        32,
        12.0,
        None,
        lambda: nn.Sequential(nn.Linear(32, 48), nn.Linear(48, 48)),
        ["0", "1"],
    ),
    # added before any run: the largest latent and KL asked for, with a
    # nonlinearity
    "Linear(64, 96), LeakyReLU(0.1), Linear(96, 96), KL 30": (
        64,
        30.0,
        None,
        lambda: nn.Sequential(nn.Linear(64, 96), nn.LeakyReLU(0.1), nn.Linear(96, 96)),
        ["1", "2"],
    ),
}

# not injective, with their own truth (KL, aggregate KL, MI) at the last listed layer, from the
# posterior (mu, logvar) and the decoder
Truth = Callable[[torch.Tensor, torch.Tensor, nn.Module], tuple[float, float, float]]


def first_linear_folds(act: str = "gelu") -> Truth:
    """Truth at the fold after a decoder's first Linear (`fold_truth`, 16000 samples and 8000
    pairs)."""

    def truth(mu: torch.Tensor, lv: torch.Tensor, dec: nn.Module) -> tuple[float, float, float]:
        lin = dec[0]
        assert isinstance(lin, nn.Linear)
        return fold_truth(mu, lv, lin.weight.detach(), lin.bias.detach(), act, 16000, 8000)

    return truth


def dead() -> nn.Module:
    """Linear, ReLU with every unit dead (bias -100: the output is constant), Linear."""
    first = nn.Linear(6, 12)
    with torch.no_grad():
        first.bias.fill_(-100.0)
    return nn.Sequential(first, nn.ReLU(), nn.Linear(12, 4))


LOSSY: dict[str, tuple[Case, Truth]] = {
    "Linear(12, 5), rank-reducing": (
        (12, 6.0, None, lambda: nn.Sequential(nn.Linear(12, 5, bias=False)), ["0"]),
        lambda mu, lv, dec: gaussian_linear_truth(mu, lv, dec[0].weight.detach()),
    ),
    "Linear(64, 16), rank-reducing, KL 20": (
        (64, 20.0, None, lambda: nn.Sequential(nn.Linear(64, 16, bias=False)), ["0"]),
        lambda mu, lv, dec: gaussian_linear_truth(mu, lv, dec[0].weight.detach()),
    ),
    "dead ReLU layer, then Linear": ((6, 4.0, None, dead, ["1", "2"]), lambda *_: (0.0, 0.0, 0.0)),
    "abs(z) (folds every sign)": (
        (4, 4.0, None, Fold, ["output"]),
        lambda mu, lv, _: folded_truth(mu, lv),
    ),
    "abs(z), d = 16": ((16, 8.0, None, Fold, ["output"]), lambda mu, lv, _: folded_truth(mu, lv)),
    # a random decoder's kind of layer: GELU folds (-inf, 0) onto (min GELU, 0), so
    # about half the units are ambiguous at a time; exact truth by enumerating the preimages
    "Linear(8, 8), GELU, Linear(8, 8) (GELU folds)": (
        (
            8,
            6.0,
            None,
            lambda: nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8)),
            ["1", "2"],
        ),
        # 16000 samples and 8000 pairs: at the default 8000 / 2000 the truth
        # read 5.62 / 0.55 / 5.08, at 16000 / 8000 5.59 / 0.46 / 5.14, 5.61 / 0.47 / 5.14 and
        # 5.55 / 0.44 / 5.12 over three truth seeds (an aggregate KL "error" of -0.06 measured
        # against the smaller truth was mostly the truth's)
        first_linear_folds(),
    ),
    # added after lr, steps and the penalty were chosen on the cases above: held out
    "Linear(6, 6), SiLU, Linear(6, 6) (SiLU folds)": (
        (
            6,
            9.0,
            None,
            lambda: nn.Sequential(nn.Linear(6, 6), nn.SiLU(), nn.Linear(6, 6)),
            ["2"],
        ),
        first_linear_folds("silu"),
    ),
    "abs(z), d = 8, KL 12": (
        (8, 12.0, None, Fold, ["output"]),
        lambda mu, lv, _: folded_truth(mu, lv),
    ),
    # the demo's random decoders have such layers (16 GELUs on a 16-d latent whose
    # posteriors are broad); a random copy of the demo's decoder read 0.95 against a truth of
    # 1.18 there. Broad posteriors (sigma 0.88) make many preimages matter
    "Linear(16, 16), GELU, Linear(16, 16), KL 2 (demo-like)": (
        (
            16,
            2.0,
            None,
            lambda: nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 16)),
            ["2"],
        ),
        # more pairs than the default: with broad posteriors the MI terms vary more (truth MI
        # 1.79 / 1.88 / 1.83 over three truth seeds at 2000 pairs; KL 1.90 / 1.91 / 1.90)
        first_linear_folds(),
    ),
    # added before any run: a conv decoder whose feature maps fold.
    # A 1x1 conv acts on each of the 4 positions with the same 4x4 weight W, so on the
    # flattened (channel, position) latent the pre-activation is kron(W, I_4) z + b; the
    # upsampling copies each position, which loses nothing
    "upsample, 1x1 conv, GELU, 1x1 conv (conv GELU folds)": (
        (
            16,
            8.0,
            (4, 2, 2),
            lambda: nn.Sequential(
                nn.Upsample(scale_factor=2),
                nn.Conv2d(4, 4, 1),
                nn.GELU(),
                nn.Conv2d(4, 4, 1),
            ),
            ["2", "3"],
        ),
        lambda mu, lv, dec: fold_truth(
            mu.flatten(1),
            lv.flatten(1),
            torch.kron(dec[1].weight.detach()[:, :, 0, 0], torch.eye(4)),
            dec[1].bias.detach().repeat_interleave(4),
            samples=16000,
            pair=8000,
        ),
    ),
    # added after the search's changes, before any run: folds at a realistic KL
    # (narrow posteriors, sigma 0.14: few preimages matter, but those must be found)
    "Linear(10, 10), GELU, Linear(10, 10), KL 20 (GELU folds)": (
        (
            10,
            20.0,
            None,
            lambda: nn.Sequential(nn.Linear(10, 10), nn.GELU(), nn.Linear(10, 10)),
            ["1", "2"],
        ),
        first_linear_folds(),
    ),
}


def run(name: str, n: int = 1000, seeds: int = 3, seed: int = 0) -> list[str]:
    lossy = LOSSY.get(name)
    d, kl, shape, build, layers = CASES[name] if lossy is None else lossy[0]
    mu, lv = gaussian_case(d=d, n=n, kl=kl, sigma=max(math.exp(-kl / d), 0.05), seed=3)
    if shape is not None:
        mu, lv = mu.view(n, *shape), lv.view(n, *shape)
    torch.manual_seed(7)
    dec = build()
    t0 = time.perf_counter()
    report = ds.inspect(
        vae_for(mu, lv, dec),
        index_data(n),
        layers=layers,
        random_inits=0,
        seeds=seeds,
        seed=seed,
        device="cpu",
    )
    seconds = time.perf_counter() - t0
    trained = report.variant("trained")
    exact = trained.layer("latent").exact
    assert exact is not None
    latent_truth = (exact.kl, exact.aggregate_kl, exact.mi)
    lines = []
    layer_truth = None if lossy is None else lossy[1](mu, lv, dec)
    for row in trained.layers:
        truth = latent_truth if layer_truth is None or row.name == "latent" else layer_truth
        cells, share = truth_cells(row, truth)
        lines.append(f"| {name} | {d} | `{row.name}` | {cells} | {share:.2f} | {seconds:.1f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("cases", nargs="*", help=f"a subset of: {list(CASES) + list(LOSSY)}")
    parser.add_argument("--seeds", type=int, default=3, help="runs averaged (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="run seed (default 0)")
    args = parser.parse_args()
    print("| case | d | layer | truth KL / agg / MI | estimate ± se | /tolerance | s |")
    print("|---|---:|---|---|---|---:|---:|")
    for name in args.cases or [*CASES, *LOSSY]:
        for line in run(name, seeds=args.seeds, seed=args.seed):
            print(line, flush=True)


if __name__ == "__main__":
    main()
