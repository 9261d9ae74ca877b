"""One run's estimates at one layer: what every estimator path returns."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LayerRun:
    """One run's estimates at one layer, nats, each with its Monte Carlo standard error."""

    kl: float
    kl_se: float
    aggregate_kl: float
    aggregate_kl_se: float
    mi: float
    mi_se: float
    # highest held-out accuracy of any bridge critic (1.0 = saturated); None: no critic
    accuracy: float | None
    head_means: tuple[float, ...] = ()  # each bridge head's mean log-ratio at posterior samples
    steps: int = 0  # training steps run (fewer than Settings.steps when stopped early)
    regression_steps: int = 0  # steps of the regression phase run before them
    # what R(h)'s error costs, nats: sum over latent units of min(1/2 log(1 + e^2 / sigma^2), KL)
    inverse_blur: float | None = None
    # the layer is affine in z with this rank: values exact (`affine.affine_values`), no critic
    affine_rank: int | None = None
    # values from each sample's preimages (`preimages.values`), no critic: distinct preimages
    # found per sample (mean) and the share of samples whose own z was among them
    preimages: float | None = None
    preimage_coverage: float | None = None


def mean_se(values: torch.Tensor) -> tuple[float, float]:
    """Mean of per-sample terms [n] and its standard error, in float64."""
    values = values.double()
    se = float(values.std() / math.sqrt(values.numel())) if values.numel() > 1 else 0.0
    return float(values.mean()), se
