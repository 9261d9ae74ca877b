"""The `VAE` wrapper: how decoderscope gets a model's posterior parameters and its decoder."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .errors import DecoderscopeError, EncodeError

EncodeFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class _DecodeModule(nn.Module):
    """Wraps a model whose decoder is a `decode` method; its submodules keep the model's names."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.model.decode(z)  # type: ignore[operator]


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
        """Find encode and decoder on common layouts.

        Accepted: `model.encode(x) -> (mu, logvar)` together with a `decoder` (or `dec`) module,
        or a `decode` method (the decoder is then the model's `decode`, and layer names start
        with `model.`). Otherwise build `VAE(encode=..., decoder=...)` yourself.
        """
        encode = getattr(model, "encode", None)
        if not callable(encode):
            raise DecoderscopeError(
                f"{type(model).__name__} has no `encode` method returning (mu, logvar); "
                "build ds.VAE(encode=..., decoder=...) yourself"
            )
        for attr in ("decoder", "dec"):
            sub = getattr(model, attr, None)
            if isinstance(sub, nn.Module):
                encoder = getattr(model, "encoder", None)
                return cls(
                    encode=encode,
                    decoder=sub,
                    encoder=encoder if isinstance(encoder, nn.Module) else model,
                )
        if callable(getattr(model, "decode", None)):
            return cls(encode=encode, decoder=_DecodeModule(model), encoder=model)
        raise DecoderscopeError(
            f"{type(model).__name__} has neither a `decoder` module nor a `decode` method; "
            "build ds.VAE(encode=..., decoder=...) yourself"
        )
