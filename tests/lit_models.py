"""Models in the layouts of real libraries, for tests/test_adapters.py: a Lightning VAE (rebuilt
from its .ckpt's hyper-parameters) and the PyTorch examples' VAE (layers on the model, a
`decode` method, `forward` returning (recon, mu, logvar))."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F

from decoderscope.digits import DigitsVAE


class LitVAE(pl.LightningModule):  # type: ignore[misc]
    """The digits VAE as a LightningModule: `encode` and a `decoder` module."""

    def __init__(self, latent_dim: int = 8, hidden: int = 32, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        vae = DigitsVAE(latent_dim, hidden)
        self.encoder, self.decoder, self.log_scale = vae.encoder, vae.decoder, vae.log_scale
        self.vae = vae

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.vae.encode(x)

    def training_step(self, batch: Any, _index: int) -> torch.Tensor:
        return self.vae.loss(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class ExamplesVAE(nn.Module):
    """The PyTorch examples' VAE (examples/vae/main.py), sized for 8x8 digits."""

    def __init__(self, latent_dim: int = 10, hidden: int = 256, pixels: int = 64) -> None:
        super().__init__()
        self.fc1 = nn.Linear(pixels, hidden)
        self.fc21 = nn.Linear(hidden, latent_dim)
        self.fc22 = nn.Linear(hidden, latent_dim)
        self.fc3 = nn.Linear(latent_dim, hidden)
        self.fc4 = nn.Linear(hidden, pixels)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h1 = F.relu(self.fc1(x))
        return self.fc21(h1), self.fc22(h1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc4(F.relu(self.fc3(z))))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        return self.decode(z), mu, logvar
