"""decoderscope: how much of the latent code's information survives each layer of a VAE decoder."""

from __future__ import annotations

from .checkpoints import save_checkpoint
from .compare import Comparison, compare
from .errors import (
    ArgumentError,
    CheckpointError,
    DataError,
    DecoderError,
    DecoderscopeError,
    EncodeError,
    LayerError,
)
from .estimators.settings import Settings
from .model import VAE
from .pipeline import inspect
from .report import Diagnostic, Estimate, Exact, LayerResult, Report, VariantResult
from .sweep import Sweep, SweepEntry, sweep
from .tracker import Tracker
from .version import __version__

__all__ = [
    "VAE",
    "ArgumentError",
    "CheckpointError",
    "Comparison",
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
    "Sweep",
    "SweepEntry",
    "Tracker",
    "VariantResult",
    "__version__",
    "compare",
    "inspect",
    "save_checkpoint",
    "sweep",
]
