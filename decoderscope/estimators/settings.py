"""The estimator's settings (`ds.Settings`), grouped as docs/usage.md documents them."""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..errors import ArgumentError
from ..sampling import Posterior, bridge_grid

ESTIMATORS = ("telescoping", "plain")

# validation, by kind of value: each field's name is in exactly one group
_POSITIVE_INTS = (
    "steps",
    "batch_size",
    "hidden",
    "rank",
    "max_bridges",
    "check_every",
    "check_batches",
    "regression_batch",
    "regression_depth",
    "distortion_samples",
    "attribution_permutations",
)
_SAMPLE_COUNTS = (
    "eval_samples",
    "pair_samples",
    "exact_samples",
    "preimage_samples",
    "refined_samples",
    "attribution_samples",
)
_POSITIVE_NUMBERS = ("lr", "regression_lr", "nats_per_bridge", "preimage_flops")
_COUNTS = (
    "patience",
    "regression_patience",
    "regression_steps",
    "newton_steps",
    "attribution_runs",
)
_TOLERANCES = ("stop_tol", "regression_tol", "affine_tol")


@dataclass(frozen=True)
class Settings:
    """Estimator settings: sample counts per run, KLs in nats. Every field, what it does and what
    was measured to choose its default: docs/usage.md. `steps` and `lr` default to None, the
    estimator's own (telescoping: 12000 steps at 1e-2; plain: 1000 at 2e-3); the frozen
    instance holds the value used."""

    # budget
    estimator: str = "telescoping"
    steps: int | None = None
    batch_size: int = 256
    eval_samples: int = 4096
    pair_samples: int = 512
    exact_samples: int = 16384
    # bridges
    nats_per_bridge: float = 2.0
    max_bridges: int = 16
    # critics
    lr: float | None = None
    hidden: int = 64
    rank: int = 32
    # the regression R(h) -> z
    regression_steps: int = 4000
    regression_batch: int = 128
    regression_lr: float = 2e-2
    regression_tol: float = 0.01
    regression_patience: int = 8
    regression_depth: int = 3
    # R(h) refined through the decoder (Gauss-Newton)
    newton_steps: int = 80
    refined_samples: int = 128
    # folding layers read from their preimages
    preimages: bool = True
    preimage_samples: int = 1024
    preimage_flops: float = 1e13
    # layers affine in z
    affine_tol: float = 1e-6
    # bounds that need a likelihood: z per data point for the distortion, the IWAE sample sizes
    distortion_samples: int = 128
    # MMD^2 per layer: samples of the aggregate posterior and of the prior (8 blocks)
    mmd_samples: int = 2048
    iwae_k: tuple[int, ...] = (1, 10, 100, 1000)
    # attribution (`inspect(attribution=True)`): MI samples per coalition, permutations sampled
    # where the latent has more than 10 units (channels), and the most estimator runs (one per
    # coalition) spent on rows that a critic or a preimage search reads
    attribution_samples: int = 2048
    attribution_permutations: int = 32
    attribution_runs: int = 30
    # early stopping
    check_every: int = 50
    check_batches: int = 4
    patience: int = 4
    stop_tol: float = 1e-3

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ArgumentError(
                f"estimator must be one of {list(ESTIMATORS)}, got {self.estimator!r}"
            )
        # None: the estimator's own default (frozen: the report's settings show the value used)
        plain = self.plain
        if self.lr is None:
            object.__setattr__(self, "lr", 2e-3 if plain else 1e-2)
        if self.steps is None:
            object.__setattr__(self, "steps", 1000 if plain else 12000)
        for name in _POSITIVE_INTS:
            _check(name, getattr(self, name), int, 1, "a positive integer")
        for name in _SAMPLE_COUNTS:
            _check(name, getattr(self, name), int, 2, "an integer >= 2")
        for name in _POSITIVE_NUMBERS:
            value = getattr(self, name)
            if isinstance(value, bool) or not (isinstance(value, int | float) and value > 0):
                raise ArgumentError(f"{name} must be a positive number, got {value!r}")
        for name in _COUNTS:
            _check(name, getattr(self, name), int, 0, "an integer >= 0")
        for name in _TOLERANCES:
            _check(name, getattr(self, name), (int, float), 0, "a number >= 0")
        _check("mmd_samples", self.mmd_samples, int, 16, "an integer >= 16 (2 per block)")
        ks = self.iwae_k
        if not (
            isinstance(ks, tuple | list)
            and all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in ks)
        ):
            raise ArgumentError(f"iwae_k must be a tuple of integers >= 1, got {ks!r}")
        object.__setattr__(self, "iwae_k", tuple(sorted(set(ks))))
        if not isinstance(self.preimages, bool):
            raise ArgumentError(f"preimages must be True or False, got {self.preimages!r}")

    @property
    def plain(self) -> bool:
        """Whether this is the paper's plain method (critics on (mu, logvar), an aggregate
        critic per layer; none of the telescoping method's readings)."""
        return self.estimator == "plain"

    @property
    def reads_affine(self) -> bool:
        """Whether layers are tested for being affine in z: not the plain method, affine_tol > 0."""
        return not self.plain and self.affine_tol > 0

    def as_dict(self) -> dict[str, object]:
        """Every field and its value (as the report's `settings` show them; tuples as lists,
        as JSON reads them back)."""
        return {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
            for f in fields(self)
        }


def _check(name: str, value: object, kind: type | tuple[type, ...], low: float, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, kind) or value < low:  # type: ignore[operator]
        raise ArgumentError(f"{name} must be {what}, got {value!r}")


def levels_for(post: Posterior, settings: Settings) -> list[float]:
    """Bridge levels a_0 = 0 (prior) ... a_M = 1 (posterior)."""
    if settings.plain:
        return [0.0, 1.0]
    return bridge_grid(post, settings.nats_per_bridge, settings.max_bridges)
