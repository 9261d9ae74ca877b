"""Coalition values of the rows that only a trained critic or a preimage search reads: one more
estimator run per coalition of latent groups, on that coalition's posterior (units outside it
at the prior's mu 0, logvar 0), every such layer of every decoder read in the same run.

Two coalitions need no run. The empty one's values are 0: no unit carries information about x,
so every layer's q_k(h|x) is its prior p_k(h) for every x (KL 0, MI 0). The full one's are the
row's own runs (the mean over its seeds). Each coalition is read with one seed, and with the
same random numbers as every other (the joint run's seed), so the Shapley values carry one
run's estimation error per coalition; `attribution.attribute_row` makes them sum to the row.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

from .attribution import EXACT_GROUPS, Game, Mask, Reader, Values
from .estimators.runs import LayerRun
from .sampling import Posterior

# reads every needed layer (by key) on a coalition's posterior: one estimator run
CoalitionRead = Callable[[Posterior], Mapping[str, LayerRun]]


def runs_needed(groups: int, permutations: int) -> int:
    """The estimator runs an attribution over `groups` latent groups takes at most: every
    coalition but the empty and the full one where every subset is enumerated (groups <=
    EXACT_GROUPS), else (groups - 1) per sampled permutation."""
    if groups <= EXACT_GROUPS:
        return max(0, 2**groups - 2)
    return permutations * (groups - 1)


class CoalitionRuns:
    """The coalition values of the layers `read` reads, one estimator run per coalition asked
    for (cached: every row's game shares them). full: each key's values from the row's own
    runs. on_run(done, total) after each run."""

    def __init__(
        self,
        game: Game,
        read: CoalitionRead,
        full: Mapping[str, Values],
        total: int,
        on_run: Callable[[int, int], None],
    ) -> None:
        self.game, self._read, self.full = game, read, full
        self.total, self._on_run = total, on_run
        self._runs: dict[Mask, Mapping[str, LayerRun]] = {}

    def reader(self, key: str) -> tuple[str, Reader]:
        """The reader of the layer `key` (one decoder's), kept under its own key."""

        def read(mask: Mask) -> Values:
            if not any(mask):
                return 0.0, 0.0
            if all(mask):
                return self.full[key]
            if mask not in self._runs:
                self._runs[mask] = self._read(self.game.posterior(mask))
                self._on_run(len(self._runs), self.total)
            row = self._runs[mask][key]
            return row.kl, row.mi

        return f"run {key}", read


def mean_values(runs: list[LayerRun]) -> Values:
    """The values of a layer's runs (its seeds): their mean KL and MI."""
    return (
        math.fsum(r.kl for r in runs) / len(runs),
        math.fsum(r.mi for r in runs) / len(runs),
    )
