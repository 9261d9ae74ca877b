"""The likelihood p(x|z) that the rate-distortion bounds, the IWAE bound and the per-layer ELBOs
need (the decoder alone does not say what its output parametrises): a spec string or a
callable `(x, decoder_output) -> log p(x|z)` per row, in nats."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .errors import ArgumentError

LogLikelihood = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SPECS = "'gaussian:SIGMA', 'bernoulli' (outputs are probabilities) or 'bernoulli:logits'"


@dataclass(frozen=True)
class Likelihood:
    """`log_prob(x [B, ...], out [B, ...]) -> [B]` (nats, summed over features); `name` as the
    report shows it."""

    name: str
    log_prob: LogLikelihood


def _gaussian(sigma: float) -> LogLikelihood:
    def log_prob(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        err = ((x - out) / sigma).flatten(1)
        const = math.log(sigma) + 0.5 * math.log(2 * math.pi)
        return -0.5 * err.pow(2).sum(1) - const * err.shape[1]

    return log_prob


def _bernoulli(logits: bool) -> LogLikelihood:
    def log_prob(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if not logits and (bool((out < 0).any()) or bool((out > 1).any())):
            raise ArgumentError(
                "likelihood 'bernoulli' reads the decoder's output as probabilities, but it has "
                f"values in [{float(out.min()):.3g}, {float(out.max()):.3g}]; for logits use "
                "'bernoulli:logits'"
            )
        z = out if logits else torch.logit(out.clamp(1e-7, 1 - 1e-7))
        return -torch.nn.functional.binary_cross_entropy_with_logits(
            z.flatten(1), x.flatten(1).to(z.dtype), reduction="none"
        ).sum(1)

    return log_prob


def parse_likelihood(spec: str | LogLikelihood | Likelihood | None) -> Likelihood | None:
    """A `Likelihood` from a spec string or a callable (None stays None)."""
    if spec is None or isinstance(spec, Likelihood):
        return spec
    if callable(spec):
        return Likelihood(getattr(spec, "__name__", "callable"), spec)
    if not isinstance(spec, str):
        raise ArgumentError(f"likelihood must be {SPECS} or a callable, got {spec!r}")
    kind, _, arg = spec.partition(":")
    if kind == "gaussian":
        try:
            sigma = float(arg)
        except ValueError:
            sigma = math.nan
        if not (math.isfinite(sigma) and sigma > 0):
            raise ArgumentError(
                f"likelihood {spec!r}: give the Gaussian's standard deviation, e.g. "
                "'gaussian:0.1' (a number > 0)"
            )
        return Likelihood(f"gaussian:{sigma:g}", _gaussian(sigma))
    if kind == "bernoulli" and arg in ("", "logits"):
        return Likelihood(spec, _bernoulli(arg == "logits"))
    raise ArgumentError(f"likelihood must be {SPECS} or a callable, got {spec!r}")
