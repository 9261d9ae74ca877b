"""decoderscope: how much of the latent code's information survives each layer of a VAE decoder."""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    ArgumentError,
    CheckpointError,
    DataError,
    DecoderError,
    DecoderscopeError,
    EncodeError,
    LayerError,
)
from .estimators.train import Settings  # noqa: E402
from .inspect import inspect  # noqa: E402
from .model import VAE  # noqa: E402
from .report import Diagnostic, Estimate, Exact, LayerResult, Report, VariantResult  # noqa: E402

__all__ = [
    "VAE",
    "ArgumentError",
    "CheckpointError",
    "DataError",
    "DecoderError",
    "DecoderscopeError",
    "Diagnostic",
    "EncodeError",
    "Estimate",
    "Exact",
    "LayerError",
    "LayerResult",
    "Report",
    "Settings",
    "VariantResult",
    "__version__",
    "inspect",
]
