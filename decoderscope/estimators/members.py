"""Per-member early stopping for batched critics.

Every parameter of a batched critic group has the member (one layer of one seed) as its leading
dimension. Members converge at very different speeds: in the demo the trained decoder's critics
stop improving within 150-450 steps while those of the random decoders' lossy layers improve for
all 1000. A member that has stopped improving is retired: its parameters are set aside and the
live tensors shrink to the members still training (with their Adam moments), so a retired
member costs nothing from then on.
"""

from __future__ import annotations

import math
from collections.abc import Container, Mapping, Sequence
from typing import Protocol

import torch
from torch import nn


class Subset(Protocol):
    """A group whose per-step work follows the members still training, `keys` (one per live
    member)."""

    @property
    def keys(self) -> Sequence[object]: ...

    def select(self, members: torch.Tensor) -> None:
        """Train only `members` (indices into the full member list) from now on."""


class MemberStopping:
    """Retire each member of `modules[k]` (serving `groups[k]`) once its score on fixed held-out
    data has not improved on its best by more than `tol` for `patience` checks in a row
    (`patience`: one number, or per group a tensor [members] of each member's own).

    keep_best: a member ends with the parameters of its best score, counting only gains beyond
    `tol` (else: those it had when it stopped, or at `finish` if still training). `last` holds
    each member's latest score.

    floor: a lower bound on every score, if there is one. A member whose best is within `tol` of
    it can never again gain more than `tol`, so it retires at once; with keep_best, with the
    parameters it would have ended with after `patience` more checks (the demo's exactly
    inverted layers: their R's price is 0 from its least-squares start, and they no longer spend
    400 steps proving it).
    """

    def __init__(
        self,
        groups: Sequence[Subset],
        modules: Sequence[nn.Module],
        patience: int | Sequence[torch.Tensor],
        tol: float,
        keep_best: bool,
        floor: float | None = None,
    ) -> None:
        self.groups, self.tol, self.keep_best = groups, tol, keep_best
        self.floor = -math.inf if floor is None else floor
        self.modules = list(modules)
        self.params = [list(m.parameters()) for m in modules]
        self.saved = [[p.detach().clone() for p in ps] for ps in self.params]
        sizes = [ps[0].shape[0] for ps in self.params]
        device = self.params[0][0].device
        self.patience = (
            [torch.full((n,), patience, dtype=torch.long, device=device) for n in sizes]
            if isinstance(patience, int)
            else [torch.as_tensor(p, dtype=torch.long, device=device) for p in patience]
        )
        self.full = [torch.arange(n, device=device) for n in sizes]
        self.active = [idx.clone() for idx in self.full]
        self.best = [torch.full((n,), math.inf, dtype=torch.float64, device=device) for n in sizes]
        self.last = [torch.full((n,), math.nan, dtype=torch.float64, device=device) for n in sizes]
        self.stale = [torch.zeros(n, dtype=torch.long, device=device) for n in sizes]

    def retire_impatient(self, opt: torch.optim.Optimizer) -> None:
        """Retire, before any step, every member whose patience is 0: a first check would retire
        it with the parameters it starts with whatever its score, and scoring it can cost much
        (an inverse refined through the decoder on every held-out row)."""
        for k in range(len(self.params)):
            done = self.patience[k][self.active[k]] == 0
            if bool(done.any()):
                self._save(k, done)
                self._shrink(k, ~done, opt)

    @property
    def training(self) -> bool:
        """Whether any member is still training."""
        return any(idx.numel() > 0 for idx in self.active)

    @torch.no_grad()
    def check(self, scores: Sequence[torch.Tensor], opt: torch.optim.Optimizer) -> bool:
        """scores: per group, one per member still training ([A_k], lower is better). Updates
        the bests, retires members that are stale for `patience` checks and returns
        `training`."""
        for k, score in enumerate(scores):
            idx = self.active[k]
            if idx.numel() == 0:
                continue
            now = score.detach().double()
            best = self.best[k][idx]
            # only a gain beyond tol counts, also for what is kept: the held-out score is noisy,
            # and keeping every lower value let a warm-started linear layer's critic drift to
            # a checkpoint 0.03 nats off (its start read 0.002 off)
            better = now < best - self.tol
            if self.keep_best and bool(better.any()):
                self._save(k, better)
            self.best[k][idx] = torch.where(better, now, best)
            self.last[k][idx] = now
            stale = torch.where(better, 0, self.stale[k][idx] + 1)
            self.stale[k][idx] = stale
            done = (stale >= self.patience[k][idx]) | (self.best[k][idx] <= self.floor + self.tol)
            self._stop(k, done, opt)
        return self.training

    @torch.no_grad()
    def retire(self, keys: Container[object], opt: torch.optim.Optimizer) -> bool:
        """Retire now every live member whose key (`groups[k].keys`) is in `keys`, with the
        parameters it would end with (keep_best: its best so far); returns `training`."""
        for k, group in enumerate(self.groups):
            done = torch.tensor(
                [key in keys for key in group.keys], dtype=torch.bool, device=self.full[k].device
            )
            self._stop(k, done, opt)
        return self.training

    def _stop(self, k: int, done: torch.Tensor, opt: torch.optim.Optimizer) -> None:
        """Retire the live members marked in `done` [A_k], with the parameters they end with:
        their best (keep_best) or those they have now."""
        if bool(done.any()):
            if not self.keep_best:
                self._save(k, done)
            self._shrink(k, ~done, opt)

    def _save(self, k: int, members: torch.Tensor) -> None:
        """Set aside the current parameters of the live members marked in `members` [A_k]."""
        where = self.active[k][members]
        for p, keep in zip(self.params[k], self.saved[k], strict=True):
            keep[where] = p.detach()[members]

    def _shrink(self, k: int, live: torch.Tensor, opt: torch.optim.Optimizer) -> None:
        rows = live.nonzero().squeeze(1)
        self._replace(k, [p.detach()[rows] for p in self.params[k]], opt, rows)
        self.active[k] = self.active[k][rows]
        self.groups[k].select(self.active[k])

    def _replace(
        self,
        k: int,
        values: list[torch.Tensor],
        opt: torch.optim.Optimizer | None,
        rows: torch.Tensor | None = None,
    ) -> None:
        """New parameters holding `values` (in the order of `self.params[k]`) in place of module
        k's (`swap_parameters`), also in `opt` with their Adam moments cut to `rows`."""
        new_of = {
            id(p): nn.Parameter(v.clone(), p.requires_grad)
            for p, v in zip(self.params[k], values, strict=True)
        }
        swap_parameters(self.modules[k], new_of)
        if opt is not None:
            for group in opt.param_groups:
                group["params"] = [new_of.get(id(p), p) for p in group["params"]]
            for p in self.params[k]:
                state = opt.state.pop(p, None)
                if state is not None:
                    if rows is not None:
                        for name in ("exp_avg", "exp_avg_sq"):
                            if name in state:
                                state[name] = state[name][rows]
                    opt.state[new_of[id(p)]] = state
        self.params[k] = [new_of[id(p)] for p in self.params[k]]

    @torch.no_grad()
    def finish(self) -> None:
        """Every member back in place with its kept parameters; the groups serve all members."""
        for k in range(len(self.params)):
            if not self.keep_best and self.active[k].numel() > 0:
                self._save(k, torch.ones_like(self.active[k], dtype=torch.bool))
            self._replace(k, self.saved[k], None)
            self.active[k] = self.full[k].clone()
            self.groups[k].select(self.full[k])


def swap_parameters(module: nn.Module, new_of: Mapping[int, nn.Parameter]) -> None:
    """Put new_of[id(p)] in place of every parameter p of `module` and its submodules. New
    Parameter objects, not new `.data`: autograd keeps each leaf's shape in its cached gradient
    accumulator, so a leaf cannot change shape."""
    for owner in module.modules():
        for name, p in list(owner._parameters.items()):
            if p is not None:
                owner._parameters[name] = new_of[id(p)]


def keep_members(module: nn.Module, rows: torch.Tensor) -> None:
    """Cut every parameter of a batched critic group (member first) to the members `rows`."""
    swap_parameters(
        module,
        {
            id(p): nn.Parameter(p.detach()[rows].clone(), p.requires_grad)
            for p in module.parameters()
        },
    )
