"""Inspect your own VAE from Python: wrap encode and decoder, then read the report.

Run: .venv/bin/python examples/custom_vae.py
"""

from __future__ import annotations

import torch
from torch import nn

import decoderscope as ds


class MyVAE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(2, 32), nn.GELU(), nn.Linear(32, 8))
        self.decoder = nn.Sequential(nn.Linear(4, 32), nn.GELU(), nn.Linear(32, 2))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.enc(x).chunk(2, dim=-1)
        return mu, logvar


def main() -> None:
    torch.manual_seed(0)
    model = MyVAE()  # untrained here: load your weights instead
    data = torch.randn(500, 2)
    report = ds.inspect(
        ds.VAE.from_model(model),
        data,
        random_inits=1,
        seeds=1,
        device="cpu",
        settings=ds.Settings(steps=300),
    )
    for row in report.variant("trained").layers:
        print(f"{row.name:8s} KL {row.kl.mean:6.3f}  MI {row.mi.mean:6.3f} ± {row.mi.se:.3f} nats")
    print(report.to_markdown())


if __name__ == "__main__":
    main()
