"""Posterior parameters of the data, and samples from the prior, the posterior and the bridges.

Bridge level a in [0, 1] is r_a(z|x) = N(a*mu(x), a^2 sigma^2(x) + (1 - a^2) I): r_0 is the prior,
r_1 the posterior. Pushed through the decoder, neighbouring levels give small density ratios whose
sum telescopes to log q_k(h|x) / p_k(h) at any layer k.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import DataError, EncodeError
from .model import VAE, posterior_parameters
from .taps import modes_restored


def stream_seed(seed: int, purpose: str) -> int:
    """The seed of decoderscope's random stream `purpose` for the user's `seed`: a hash, so that
    it never equals a small integer. With torch.manual_seed(seed) itself, a user's data drawn
    from the same seed (seed 0 is everyone's default) shared the estimator's random numbers:
    with posteriors made from torch.Generator().manual_seed(0) (d = 64, KL 20), the exact latent
    MI read 6.66 +- 0.01 against 6.91 from any other seed."""
    digest = hashlib.blake2b(f"decoderscope/{purpose}/{seed}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # torch seeds are < 2^64; keep it positive


@dataclass(frozen=True)
class Posterior:
    """Posterior parameters of N data points: mu and logvar, each [N, *latent_shape]."""

    mu: torch.Tensor
    logvar: torch.Tensor

    @property
    def n(self) -> int:
        return int(self.mu.shape[0])

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.mu.shape[1:])

    def to(self, device: torch.device) -> Posterior:
        return Posterior(self.mu.to(device), self.logvar.to(device))

    def conditioning(self) -> torch.Tensor:
        """c = (mu, logvar) flattened: [N, 2 * latent_dim]. q(z|x) depends on x only via c."""
        return torch.cat([self.mu.flatten(1), self.logvar.flatten(1)], dim=1)


def as_data_tensor(data: Any) -> torch.Tensor:
    """Check and convert user data to a float tensor [N, ...] (N >= 1, every value finite)."""
    if isinstance(data, np.ndarray):
        data = torch.from_numpy(data)
    if not isinstance(data, torch.Tensor):
        raise DataError(
            f"data must be a torch.Tensor or numpy array of shape [N, ...], got "
            f"{type(data).__name__}; stack your data set into one tensor"
        )
    if data.dim() == 0 or data.shape[0] == 0:
        raise DataError(
            f"data is empty (shape {list(data.shape)}); pass at least one data point, "
            "ideally hundreds"
        )
    if data.is_floating_point() or data.is_complex():
        bad = ~torch.isfinite(data)
        if bool(bad.any()):
            rows = torch.nonzero(bad.flatten(1).any(dim=1)).flatten()[:5].tolist()
            raise DataError(
                f"data holds {int(bad.sum())} NaN or infinite value(s), first in row(s) {rows}; "
                "remove or impute them before inspecting"
            )
    return data


def encode_all(vae: VAE, data: torch.Tensor, batch_size: int = 512) -> Posterior:
    """Encode all data in chunks (inference mode, encoder in eval mode); validate the result."""
    encoder = vae.encoder
    device = module_device(encoder) if encoder is not None else module_device(vae.decoder)
    dtype = next((p.dtype for p in encoder.parameters()), None) if encoder is not None else None
    mus, logvars = [], []
    with modes_restored(encoder):
        if encoder is not None:
            encoder.eval()
        with torch.inference_mode():
            for start in range(0, data.shape[0], batch_size):
                chunk = data[start : start + batch_size].to(device)
                if chunk.is_floating_point() and dtype is not None:
                    chunk = chunk.to(dtype)  # numpy's float64 for a float32 encoder
                try:
                    out = vae.encode(chunk)
                except Exception as exc:
                    raise EncodeError(
                        f"encode(x) raised {type(exc).__name__}: {exc} on a batch of shape "
                        f"{list(chunk.shape)}; check that the data matches the encoder's input"
                    ) from exc
                mu, logvar = _check_encoded(posterior_parameters(out), chunk.shape[0])
                mus.append(mu.float().cpu())
                logvars.append(logvar.float().cpu())
    return Posterior(torch.cat(mus), torch.cat(logvars))


def _check_encoded(out: Any, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not (
        isinstance(out, tuple | list)
        and len(out) == 2
        and all(isinstance(t, torch.Tensor) for t in out)
    ):
        got = type(out).__name__
        if isinstance(out, tuple | list):
            got += f" of {len(out)} item(s): " + ", ".join(type(t).__name__ for t in out)
        raise EncodeError(
            f"encode(x) must return two tensors (mu, logvar), got {got}; wrap your encoder "
            "so it returns the posterior mean and log-variance"
        )
    mu, logvar = out
    if mu.shape != logvar.shape:
        raise EncodeError(
            f"encode(x) returned mu of shape {list(mu.shape)} and logvar of shape "
            f"{list(logvar.shape)}; they must be equal (a diagonal Gaussian per latent unit)"
        )
    if mu.dim() < 2 or mu.shape[0] != batch:
        raise EncodeError(
            f"encode(x) on a batch of {batch} returned mu of shape {list(mu.shape)}; the first "
            "dimension must be the batch size, followed by the latent shape"
        )
    if not (bool(torch.isfinite(mu).all()) and bool(torch.isfinite(logvar).all())):
        raise EncodeError(
            "encode(x) returned NaN or infinite mu/logvar; check the encoder and its inputs"
        )
    return mu, logvar


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter (or buffer); CPU for a module with neither."""
    for param in module.parameters():
        return param.device
    for buf in module.buffers():
        return buf.device
    return torch.device("cpu")


def reparameterise(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """z = mu + sigma * eps: a draw from N(mu, diag exp(logvar)) given standard normal eps."""
    return mu + (0.5 * logvar).exp() * eps


def bridge_variance(a: torch.Tensor | float, logvar: torch.Tensor) -> torch.Tensor:
    """Per-unit variance a^2 sigma^2 + 1 - a^2 of bridge level a."""
    return a * a * logvar.exp() + (1.0 - a * a)


def expected_log_bridge(a: float, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """phi(a) = E_{z ~ q(z|x)} log r_a(z|x) per data point, closed form up to a constant: [N].

    Head m of the telescoping critic estimates phi(a_m) - phi(a_{m-1}) at posterior samples, and
    phi(1) - phi(0) is the conditional KL.
    """
    var = logvar.exp()
    v = bridge_variance(a, logvar)
    terms = (var + (1.0 - a) ** 2 * mu * mu) / v + v.log()
    return -0.5 * terms.flatten(1).sum(dim=1)


def bridge_grid(post: Posterior, nats_per_bridge: float, max_bridges: int) -> list[float]:
    """Levels 0 = a_0 < ... < a_M = 1 such that every head contributes the same share of the
    latent KL where it is evaluated: phi(a_m) - phi(a_{m-1}) = KL / M (mean over the data), with
    M = ceil(KL / nats_per_bridge) capped at `max_bridges`.

    Measured (d=16, KL 8): spacing by KL between neighbours instead gave heads of 5.2, 2.8 and
    0.1 nats at the posterior samples, and the large first heads carried most of the error.
    """
    mu, logvar = post.mu.double(), post.logvar.double()
    if post.n > 2048:  # the grid is a tuning choice: a fixed subsample is plenty
        idx = torch.linspace(0, post.n - 1, 2048).long()
        mu, logvar = mu[idx], logvar[idx]

    def phi(a: float) -> float:
        return float(expected_log_bridge(a, mu, logvar).mean())

    start, end = phi(0.0), phi(1.0)
    total = end - start
    steps = min(max_bridges, max(1, math.ceil(total / nats_per_bridge)))
    grid = [0.0]
    for m in range(1, steps):
        target = start + total * m / steps
        lo, hi = grid[-1], 1.0
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if phi(mid) < target else (lo, mid)
        grid.append(0.5 * (lo + hi))
    grid.append(1.0)
    return grid


def sample_levels(
    mu: torch.Tensor, logvar: torch.Tensor, levels: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Reparameterised samples from every bridge level for a batch: [L, B, *latent_shape].

    mu, logvar: [B, *latent_shape]; levels: [L] values of a (0 = prior, 1 = posterior).
    """
    shape = (levels.shape[0], *mu.shape)
    eps = torch.randn(shape, generator=generator, device=mu.device, dtype=mu.dtype)
    a = levels.view(-1, *([1] * mu.dim())).to(mu)
    std = bridge_variance(a, logvar.unsqueeze(0)).sqrt()
    return a * mu.unsqueeze(0) + std * eps
