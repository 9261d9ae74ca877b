"""The `VAE` wrapper: how decoderscope gets a model's posterior parameters and its decoder."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributions import Independent, Normal

from .errors import DecoderscopeError, EncodeError
from .taps import first_tensor, modes_restored

EncodeFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


# where encoders keep the posterior's parameters (pythae, diffusers, Keras-style names)
MEAN_NAMES = ("mu", "mean", "loc", "embedding", "z_mean")
LOGVAR_NAMES = ("logvar", "log_var", "log_variance", "log_covariance", "z_log_var")
STD_NAMES = ("std", "scale", "sigma", "stddev")
DIST_NAMES = ("latent_dist", "posterior", "dist")  # diffusers' AutoencoderKLOutput.latent_dist


class DecodePath(nn.Module):
    """A model's `decode` method as a module (its submodules are named `model.*`). `inner`: the
    model's decoder module, which `resolve_decoder` inspects instead where decode(z) is exactly
    inner(z), so that layer names stay the decoder's own."""

    def __init__(self, model: nn.Module, inner: str | None = None) -> None:
        super().__init__()
        self.model = model
        self.inner = inner

    def forward(self, z: torch.Tensor) -> Any:
        return self.model.decode(z)  # type: ignore[operator]


def _field(obj: Any, names: tuple[str, ...]) -> Any:
    """The first of `names` that `obj` holds as an entry or a data attribute (not a method)."""
    for name in names:
        value = obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)
        if value is not None and not callable(value):
            return value
    return None


def posterior_parameters(out: Any) -> Any:
    """(mu, logvar) from what an encoder returns: a pair of tensors; a `Normal` or
    `Independent(Normal)`; an object or dict holding one under `latent_dist` (diffusers'
    AutoencoderKL); or an object or dict with the mean under a name in MEAN_NAMES and the
    log-variance under LOGVAR_NAMES (or the standard deviation under STD_NAMES), as pythae and
    others return. Anything else comes back unchanged, for `encode_all` to refuse by name."""
    if isinstance(out, tuple | list | torch.Tensor):
        return out
    if isinstance(out, Independent):
        out = out.base_dist
    if isinstance(out, Normal):
        return out.loc, 2 * out.scale.log()
    dist = _field(out, DIST_NAMES)
    if dist is not None:
        return posterior_parameters(dist)
    mu = _field(out, MEAN_NAMES)
    if isinstance(mu, torch.Tensor):
        logvar = _field(out, LOGVAR_NAMES)
        if isinstance(logvar, torch.Tensor):
            return mu, logvar
        std = _field(out, STD_NAMES)
        if isinstance(std, torch.Tensor):
            return mu, 2 * std.log()
    return out


def resolve_decoder(decoder: nn.Module, z: torch.Tensor) -> tuple[nn.Module, str | None]:
    """The module to inspect, and a note for the report. A model's decode path is what it
    decodes with; where decode(z) equals its decoder module's output on `z` exactly, that module
    is inspected (its own layer names), else the decode path, with a note saying so."""
    if not isinstance(decoder, DecodePath) or decoder.inner is None:
        return decoder, None
    inner = getattr(decoder.model, decoder.inner)
    with modes_restored(decoder), torch.no_grad():
        decoder.eval()
        (a, _), (b, _) = first_tensor(decoder(z)), first_tensor(inner(z))
    if a is not None and b is not None and a.shape == b.shape and torch.equal(a, b):
        return inner, None
    return decoder, (
        f"model.decode(z) is not model.{decoder.inner}(z) alone (e.g. a post-quantisation "
        "convolution first): the decode path is inspected, its layers named model.*"
    )


@dataclass(frozen=True)
class VAE:
    """A VAE as decoderscope sees it.

    encode: maps a batch x of shape [B, ...] to `(mu, logvar)`, each [B, *latent_shape], for the
        diagonal-Gaussian posterior q(z|x) = N(mu, diag exp(logvar)). The prior is N(0, I).
    decoder: the `nn.Module` that maps z of shape [B, *latent_shape] to the output.
    encoder: optional module behind `encode`; if given, it is put in eval mode while encoding
        and restored afterwards.
    """

    encode: EncodeFn
    decoder: nn.Module
    encoder: nn.Module | None = None

    def __post_init__(self) -> None:
        if not callable(self.encode):
            raise EncodeError(
                f"VAE(encode=...) must be callable, got {type(self.encode).__name__}; "
                "pass a function x -> (mu, logvar), e.g. model.encode"
            )
        if not isinstance(self.decoder, nn.Module):
            raise DecoderscopeError(
                f"VAE(decoder=...) must be a torch.nn.Module, got {type(self.decoder).__name__}; "
                "wrap a function in an nn.Module so its layers can be hooked"
            )

    @classmethod
    def from_model(cls, model: nn.Module) -> VAE:
        """Find encode and decoder on common layouts, with no adapter code.

        encode: `model.encode(x)` returning anything `posterior_parameters` reads (a pair, a
        Normal, diffusers' AutoencoderKLOutput, a dict or object with mean and log-variance).
        decoder: the model's `decode` method where it has one (the path the model decodes with:
        diffusers' post-quant convolution, the PyTorch examples layout), inspected as its
        `decoder`/`dec` module where decode(z) is exactly that module's output
        (`resolve_decoder`); else the `decoder` (or `dec`) module. Otherwise build
        `VAE(encode=..., decoder=...)` yourself.
        """
        encode = getattr(model, "encode", None)
        if not callable(encode):
            raise DecoderscopeError(
                f"{type(model).__name__} has no `encode` method returning (mu, logvar); "
                "build ds.VAE(encode=..., decoder=...) yourself"
            )
        modules = [a for a in ("decoder", "dec") if isinstance(getattr(model, a, None), nn.Module)]
        sub = modules[0] if modules else None
        if callable(getattr(model, "decode", None)):
            return cls(encode=encode, decoder=DecodePath(model, sub), encoder=model)
        if sub is not None:
            encoder = getattr(model, "encoder", None)
            return cls(
                encode=encode,
                decoder=getattr(model, sub),
                encoder=encoder if isinstance(encoder, nn.Module) else model,
            )
        raise DecoderscopeError(
            f"{type(model).__name__} has neither a `decoder` module nor a `decode` method; "
            "build ds.VAE(encode=..., decoder=...) yourself"
        )
