"""A convolutional VAE on scikit-learn's bundled digits, upsampled to 16x16, trained for a few
epochs and inspected: trained decoder against re-initialised copies, every default layer.

Run: .venv/bin/python examples/conv_vae_digits.py [--epochs 30] [--plot conv.png]
     [--json conv.json] [--quick]
(needs scikit-learn: pip install 'decoderscope[dev]'). The decoder's Linear layer is read in
closed form, its first transposed convolution (full column rank) as an injective function of it,
and the last one (1024 -> 256 features: not injective on its input space) through the inverse R(h)
refined by Gauss-Newton through the decoder: 2.5-3.5 minutes on 2 cores for the default
inspection (3 random copies, 3 seeds), a third of it the likelihood's IWAE bounds (k up to 1000
per data point).
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F  # noqa: N812 - torch's own convention
from rich.console import Console
from torch import nn

import decoderscope as ds
from decoderscope.demo import GaussianVAE
from decoderscope.digits import digits, train
from decoderscope.render import plot, print_report

SIDE = 16


def images(n: int | None = None) -> torch.Tensor:
    """The digits upsampled (bilinear) from 8x8 to 16x16, flattened: [n, 256] in [0, 1]."""
    x = digits(n).view(-1, 1, 8, 8)
    return F.interpolate(x, size=(SIDE, SIDE), mode="bilinear", align_corners=False).flatten(1)


class ConvVAE(GaussianVAE):
    """Encoder: two strided convolutions to 32x4x4, then Linear to (mu, logvar). Decoder
    (DCGAN-style): Linear to 32x4x4, two transposed convolutions to 16x16, LeakyReLU between.
    Data and reconstructions are flattened [B, 256]; Gaussian likelihood with a learned scale."""

    def __init__(self, latent_dim: int = 16) -> None:
        super().__init__()
        act = nn.LeakyReLU(0.2)
        self.encoder = nn.Sequential(
            nn.Unflatten(1, (1, SIDE, SIDE)),
            nn.Conv2d(1, 16, 4, stride=2, padding=1),
            act,
            nn.Conv2d(16, 32, 4, stride=2, padding=1),
            act,
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 2 * latent_dim),
        )
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, 32 * 4 * 4),
            act,
            nn.Unflatten(1, (32, 4, 4)),
            nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1),
            act,
            nn.ConvTranspose2d(16, 1, 4, stride=2, padding=1),
            nn.Flatten(),
        )
        self.log_scale = nn.Parameter(torch.tensor(math.log(0.2)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--plot", default=None, help="write the figure here (PNG)")
    parser.add_argument("--json", default=None, help="write the report here")
    parser.add_argument("--quick", action="store_true", help="1 random copy, 1 seed")
    args = parser.parse_args()
    torch.manual_seed(0)
    x = images()
    start = time.perf_counter()
    model = train(ConvVAE(), x, args.epochs)
    trained_s = time.perf_counter() - start
    scale = float(model.log_scale.detach().exp())
    start = time.perf_counter()
    report = ds.inspect(
        model,
        x,
        random_inits=1 if args.quick else 3,
        seeds=1 if args.quick else 3,
        device="cpu",
        likelihood=f"gaussian:{scale:.6g}",
        progress=True,
    )
    inspect_s = time.perf_counter() - start
    console = Console()
    print_report(report, console)
    console.print(
        f"trained {args.epochs} epochs in {trained_s:.0f} s; inspected in {inspect_s:.0f} s "
        f"({torch.get_num_threads()} threads)"
    )
    if args.plot:
        plot(report, args.plot)
    if args.json:
        with open(args.json, "w") as f:
            f.write(report.to_json())


if __name__ == "__main__":
    main()
