"""What every reader returns: one run's values at one layer, and how they were obtained."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

LATENT = "latent"

# How a layer's values are read (the report's `method`), and why a reader applies: chosen once per
# layer by `plan.py` before any critic trains.
AFFINE = "affine"
INJECTIVE = "injective"
INVERSE = "inverse"
PREIMAGES = "preimages"
CRITIC = "critic"
UNRESOLVED = "unresolved"
WHY = {
    AFFINE: "every feature is an affine function of z: closed-form KL, exact-density MI",
    INJECTIVE: "by the decoder's graph an injective function (strictly monotone activations, "
    "Linear maps of full column rank) of an affine layer: that layer's exact values (the "
    "latent's where it keeps every unit and the float32 features resolve every direction); "
    "or, by data processing, the latent's exact values where a later layer read at them "
    "depends on z only through this one",
    INVERSE: "R(h) recovers z within regression_tol nats: the exact latent log-ratio at R(h)",
    PREIMAGES: "the layer folds z, and a held-out check finds every probable preimage: exact "
    "sums over them",
    CRITIC: "none of the above: a trained density-ratio critic",
    UNRESOLVED: "the posteriors are too narrow for float32 features (`precision.rounding_nats` "
    "above its limit): a critic or preimage reading would be rounding error, so the layer is "
    "not read",
}


def unread(method: str | None) -> bool:
    """Whether a row's method (runs joined by "+") says some runs were not read."""
    return method is not None and UNRESOLVED in method.split("+")


@dataclass(frozen=True)
class LayerRun:
    """One run's values at one layer, nats, each with its Monte Carlo standard error, and how
    they were read (`method`, one of `WHY`'s keys) with that reader's own measurements."""

    kl: float
    kl_se: float
    aggregate_kl: float
    aggregate_kl_se: float
    mi: float
    mi_se: float
    method: str
    # highest held-out accuracy of any bridge critic (1.0 = saturated); None: no critic
    accuracy: float | None = None
    # what R(h)'s error costs, nats: sum over latent units of min(1/2 log(1 + e^2 / sigma^2), KL)
    inverse_blur: float | None = None
    affine_rank: int | None = None  # AFFINE: the rank of the map z -> h
    # PREIMAGES: distinct preimages found per sample (mean), and the share of samples whose own
    # z the search found unaided
    preimages: float | None = None
    preimage_coverage: float | None = None
    # CRITIC where R(h) does not invert the layer: the projected FLOPs of a preimage search,
    # over `Settings.preimage_flops`, for which it was not run
    preimage_flops: float | None = None


@dataclass(frozen=True)
class RunResult:
    """Every seed's layers ({name: LayerRun} per seed) and the training steps the run took."""

    layers: list[dict[str, LayerRun]]
    steps: int  # critic steps (fewer than Settings.steps when every critic stopped early)
    regression_steps: int  # steps of the regression phase run before them
    # the affine (and injective) layers' maps: {name: basis [k, d]}, `affine.AffineLayer.basis`
    bases: dict[str, torch.Tensor] = field(default_factory=dict)
