"""An estimate: a mean (nats), its standard error and the number of runs behind it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


def finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def float_or_nan(x: float | None) -> float:
    return math.nan if x is None else float(x)


@dataclass(frozen=True)
class Estimate:
    """Mean over runs, its standard error, and the number of runs (seeds x re-initialisations).

    With n >= 2 the standard error is the spread of the run means / sqrt(n); with n = 1 it is the
    run's Monte Carlo evaluation error (which leaves out critic-training error).
    """

    mean: float
    se: float
    n: int

    @classmethod
    def pool(cls, means: list[float], mc_ses: list[float]) -> Estimate:
        n = len(means)
        mean = math.fsum(means) / n
        if n == 1:
            return cls(mean, mc_ses[0], 1)
        var = math.fsum((m - mean) ** 2 for m in means) / (n - 1)
        return cls(mean, math.sqrt(var / n), n)

    def to_dict(self) -> dict[str, Any]:
        # JSON has no nan or inf: a value that is not a finite number is written as null (its
        # row is marked unreliable by the guard)
        return {"mean": finite_or_none(self.mean), "se": finite_or_none(self.se), "n": self.n}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Estimate:
        return cls(float_or_nan(d["mean"]), float_or_nan(d["se"]), int(d["n"]))
