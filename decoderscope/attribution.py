"""Which latent units each layer's information comes from: Shapley values (captum) of a layer's
KL and MI over the latent units, where a unit left out of a coalition carries no information
(its posterior is the prior's, N(0, 1)). Spatial latents [C, H, W] are grouped by channel.

A coalition's value is read by the layer's own reader where that needs no training: the
latent's exact values (closed-form KL, exact-density MI), an affine or injective layer's closed
form (`affine.affine_values` on that layer's map), and for a layer read as `inverse` (R(h)
recovers z) the latent's. Every coalition is read with the same random numbers, so the
differences the Shapley values are made of carry little Monte Carlo noise. Layers read by a
trained critic or by a preimage search are read by one more estimator run per coalition
(`coalitions.py`), within a budget of runs.

The full coalition's value is the row's own estimate: the Shapley values of the game read
without training are shifted by (row value - game's full value) / groups each, which is what
the Shapley values of the game with that one value replaced are, so they sum to the row's value
(the row's value and the game's differ by Monte Carlo error: the row's MI is read with more
samples, and a pooled row averages its runs).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .estimators.affine import affine_values
from .estimators.exact import ExactLatent, exact_latent
from .estimators.runs import AFFINE, INJECTIVE, INVERSE, LATENT, LayerRun
from .sampling import Posterior

# up to this many groups every coalition is read (2^G) and the Shapley sum taken over subsets;
# beyond, captum's permutation sampling. captum's exact ShapleyValues walks every permutation
# (8 groups: 43 s of its own work on 2 cores), and 32 sampled permutations missed the truth by
# 0.25 nats where MI is near log N (marginal contributions swing from ~2 nats first to ~0 last)
EXACT_GROUPS = 10

Mask = tuple[bool, ...]
Values = tuple[float, float]  # (KL, MI) in nats
Reader = Callable[[Mask], Values]  # a coalition's values


@dataclass(frozen=True)
class Attribution:
    """Shapley values of a row's KL and MI, nats, one per latent unit (per channel for spatial
    latents); each list sums to the row's own value. `permutations`: how many were sampled, None
    where every one was enumerated (exact)."""

    kl: tuple[float, ...]
    mi: tuple[float, ...]
    permutations: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"kl": list(self.kl), "mi": list(self.mi), "permutations": self.permutations}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Attribution:
        return cls(tuple(d["kl"]), tuple(d["mi"]), d.get("permutations"))


def unit_groups(latent_shape: Sequence[int]) -> torch.Tensor:
    """Each latent unit's group [d] in the flattened latent's order: the unit itself for a flat
    latent, its channel (the first axis) for a spatial latent [C, H, W]."""
    d = math.prod(latent_shape)
    if len(latent_shape) < 2:
        return torch.arange(d)
    return torch.arange(latent_shape[0]).repeat_interleave(d // latent_shape[0])


def coalition(post: Posterior, groups: torch.Tensor, mask: Mask) -> Posterior:
    """The posterior in which the units of groups outside `mask` are the prior's (mu 0, logvar
    0): they carry no information about x."""
    keep = torch.tensor(mask, device=post.mu.device)[groups.to(post.mu.device)]
    keep = keep.view(post.latent_shape).to(post.mu.dtype)
    return Posterior(post.mu * keep, post.logvar * keep)


class Game:
    """The values (KL, MI) of every coalition of latent groups, read by the given readers with
    the same random numbers for every coalition, each coalition read once per reader."""

    def __init__(self, post: Posterior, samples: int, seed: int) -> None:
        self.post, self.samples, self.seed = post, samples, seed
        self.groups = unit_groups(post.latent_shape)
        self.size = int(self.groups.max()) + 1 if self.groups.numel() else 0
        self._latent: dict[Mask, ExactLatent] = {}
        self._values: dict[tuple[str, Mask], Values] = {}

    def generator(self) -> torch.Generator:
        return torch.Generator(device=self.post.mu.device).manual_seed(self.seed)

    def posterior(self, mask: Mask) -> Posterior:
        return coalition(self.post, self.groups, mask)

    def latent(self, mask: Mask) -> ExactLatent:
        if mask not in self._latent:
            self._latent[mask] = exact_latent(self.posterior(mask), self.samples, self.generator())
        return self._latent[mask]

    def value(self, reader_id: str, reader: Reader, mask: Mask) -> Values:
        key = (reader_id, mask)
        if key not in self._values:
            self._values[key] = reader(mask)
        return self._values[key]


def latent_reader(game: Game) -> Reader:
    """The latent's exact values under a coalition's posterior."""

    def read(mask: Mask) -> Values:
        exact = game.latent(mask)
        return exact.kl, exact.mi

    return read


def affine_reader(basis: torch.Tensor, game: Game) -> Reader:
    """The values of y = basis @ z (`affine.affine_values`) under a coalition's posterior."""

    def read(mask: Mask) -> Values:
        gen = torch.Generator(device=game.post.mu.device).manual_seed(game.seed)
        row = affine_values(game.posterior(mask), basis, game.samples, gen, game.latent(mask))
        return row.kl, row.mi

    return read


def span_key(basis: torch.Tensor) -> str:
    """A key of the span of basis [k, d] (orthonormal rows): layers that keep the same latent
    directions have the same values, so their coalitions are read once. From the projector
    basis^T basis, which does not depend on the basis chosen, at 1e-8."""
    projector = (basis.T @ basis).double().mul(1e8).round().to(torch.int64)
    return f"span {basis.shape[0]}x{basis.shape[1]} {hash(projector.cpu().numpy().tobytes())}"


def reader_for(
    name: str, runs: Sequence[LayerRun], basis: torch.Tensor | None, game: Game
) -> tuple[str, Reader] | None:
    """The training-free reader of one decoder's layer `name` from its runs' methods, with the
    key its values are kept under (the latent's for a layer that holds the latent's values);
    None where a critic or a preimage search reads it, or it was not read."""
    methods = {r.method for r in runs}
    if methods <= {AFFINE, INJECTIVE} and basis is not None:
        return span_key(basis), affine_reader(basis, game)
    if name == LATENT or methods == {INVERSE}:
        return LATENT, latent_reader(game)
    return None


def shapley(game: Game, reader_id: str, reader: Reader, permutations: int) -> tuple[
    torch.Tensor, torch.Tensor, int | None]:  # fmt: skip
    """Shapley values of KL and MI over the game's groups ([G] each, float64): exact over every
    subset where G <= EXACT_GROUPS, else by captum's `ShapleyValueSampling` with `permutations`
    sampled permutations, the same for KL and MI (torch's global RNG seeded by the game's seed;
    the caller's state is kept). Returns them and the permutations sampled (None: exact)."""
    g = game.size
    if g <= EXACT_GROUPS:
        kl, mi = _subsets(lambda mask: game.value(reader_id, reader, mask), g)
        return kl, mi, None
    from captum.attr import ShapleyValueSampling

    def forward(masks: torch.Tensor) -> torch.Tensor:
        rows = [game.value(reader_id, reader, tuple(bool(v) for v in m.tolist())) for m in masks]
        return torch.tensor(rows, dtype=torch.float64)

    ones = torch.ones(1, g, dtype=torch.float64)
    zeros = torch.zeros(1, g, dtype=torch.float64)
    out = []
    for target in (0, 1):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(game.seed)
            phi = ShapleyValueSampling(forward).attribute(
                ones, zeros, target=target, n_samples=permutations
            )
        out.append(phi[0].double())
    return out[0], out[1], permutations


def _subsets(value: Callable[[Mask], Values], g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """phi_j = sum over coalitions S without j of |S|! (g - |S| - 1)! / g! (v(S + j) - v(S))."""
    values = {m: value(m) for m in itertools.product((False, True), repeat=g)}
    phi = torch.zeros(2, g, dtype=torch.float64)
    for mask, (kl, mi) in values.items():
        size = sum(mask)
        if size == g:
            continue
        weight = math.factorial(size) * math.factorial(g - size - 1) / math.factorial(g)
        for j in range(g):
            if not mask[j]:
                kl_j, mi_j = values[mask[:j] + (True,) + mask[j + 1 :]]
                phi[0, j] += weight * (kl_j - kl)
                phi[1, j] += weight * (mi_j - mi)
    return phi[0], phi[1]


def attribute_row(
    game: Game,
    readers: Sequence[tuple[str, Reader]],
    kl: float,
    mi: float,
    permutations: int,
) -> Attribution:
    """A row's attribution from the readers of its decoders (several for a pooled variant: their
    mean), shifted so that it sums to the row's own kl and mi. The shift is (row value - sum of
    the values) / groups: the sum is the game's full value less its empty one (0), and taking
    it from the values also absorbs captum's float32 rounding."""
    phis = [shapley(game, i, r, permutations) for i, r in readers]
    phi_kl = torch.stack([p[0] for p in phis]).mean(0)
    phi_mi = torch.stack([p[1] for p in phis]).mean(0)
    phi_kl = phi_kl + (kl - math.fsum(phi_kl.tolist())) / game.size
    phi_mi = phi_mi + (mi - math.fsum(phi_mi.tolist())) / game.size
    return Attribution(tuple(phi_kl.tolist()), tuple(phi_mi.tolist()), phis[0][2])
