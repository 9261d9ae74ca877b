"""Critic groups: every (layer, seed) member of one layer width, trained together in batched
kernels."""

from __future__ import annotations

from collections.abc import Callable, Container, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .batches import Key, by_seed
from .critic import Concat, CriticGroup, SeparableGroup, soft_logistic
from .members import keep_members
from .settings import Settings

# refiner(layer names [G], r [G, n, d], h [G, n, D]) -> refined r [G, n, d] (`inverse.refine`)
Refiner = Callable[[Sequence[str], torch.Tensor, torch.Tensor], torch.Tensor]


class Members:
    """Critics for every (layer, seed) whose layer has one width: separable critics
    (telescoping) or a concatenating MLP on (h, c) (plain; with C = 0 the plain aggregate critic
    on h alone). Each member is an independent critic with its own initialisation; seed s sees
    only the rows drawn for seed s."""

    def __init__(
        self,
        keys: list[Key],
        width: int,
        heads: int,
        settings: Settings,
        c: torch.Tensor,
        separable: bool,
        latent: int = 0,
        levels: torch.Tensor | None = None,
    ) -> None:
        self.all_keys = self.keys = keys
        self.width = width
        self.heads = heads
        self.all_seeds = self.seed_of = torch.tensor([s for _, s in keys], device=c.device)
        self.c = c
        self.separable = separable
        self.critic: nn.Module
        if separable:
            assert levels is not None
            self.critic = SeparableGroup(
                len(keys),
                width,
                c.shape[1] - 2 * latent,
                settings.hidden,
                levels,
                settings.rank,
                latent,
                settings.regression_depth,
            )
        else:
            self.std = Concat(c)
            self.critic = CriticGroup(len(keys), self.std.width(width), settings.hidden, heads)
        # members whose R(h) is refined through the decoder (`refinement.py`), those whose
        # refinement measured no better than R(h), and R(h)'s price (nats) when a member's
        # refinement was last priced and settled neither way
        self.refined: set[Key] = set()
        self.unrefinable: set[Key] = set()
        self.tried: dict[Key, float] = {}
        self.refiner: Refiner | None = None

    @property
    def separable_critic(self) -> SeparableGroup:
        assert isinstance(self.critic, SeparableGroup)
        return self.critic

    def inverse(
        self, h: torch.Tensor, refine: Container[Key] | None = None, rows: int | None = None
    ) -> torch.Tensor | None:
        """The critics' r for h [G, rows, D]: R(h), refined through the decoder for the members
        in `refined` (and in `refine`, where given: the others get R(h) alone, for rows whose
        values are not read) on the first `rows` rows (default all; R(h) alone after them);
        None (R(h) itself, computed by the critic) when no member refines and `refine` is not
        given."""
        chosen = [
            k
            for k, key in enumerate(self.keys)
            if key in self.refined and (refine is None or key in refine)
        ]
        if not chosen or self.refiner is None:
            if refine is None or not self.separable:
                return None
            with torch.no_grad():
                return self.separable_critic.r_net(h)
        with torch.no_grad():
            r = self.separable_critic.r_net(h)
            at = torch.tensor(chosen, device=h.device)
            m = h.shape[1] if rows is None else rows
            if m > 0:
                names = [self.keys[k][0] for k in chosen]
                r[at, :m] = self.refiner(names, r[at, :m], h[at, :m])
        return r

    def keep(self, keys: Container[Key]) -> None:
        """From now on hold only the members in `keys` (the others' parameters dropped): after
        the plan, members read without their critic (`preimages`, `injective`) cost every
        evaluation batch a pass of their critic for nothing."""
        rows = torch.tensor([key in keys for key in self.all_keys], device=self.c.device)
        rows = rows.nonzero().squeeze(1)
        keep_members(self.critic, rows)
        self.all_keys = self.keys = [self.all_keys[int(i)] for i in rows]
        self.all_seeds = self.seed_of = self.all_seeds[rows]
        self.refined &= set(self.all_keys)

    def select(self, members: torch.Tensor) -> None:
        """Serve only `members` (indices into all keys): their rows, their data points."""
        self.keys = [self.all_keys[int(i)] for i in members]
        self.seed_of = self.all_seeds[members]

    def stack(self, feats: Mapping[str, torch.Tensor], seeds: int, rows: int) -> torch.Tensor:
        """[G, L*rows, D]: each member's own rows of its layer (see `by_seed`)."""
        per_layer = {name: by_seed(feats[name], seeds, rows) for name, _ in self.keys}
        return torch.stack([per_layer[name][s] for name, s in self.keys])

    def losses(
        self, h: torch.Tensor, idx: torch.Tensor, z: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each member's logistic loss [G] (each head at its own two levels, level m+1 against
        level m, mean over the batch, summed over heads) and R's regression loss against the
        latent rows z [G, L*B, d]; h and idx as in `logits`. Separable critics learn from soft
        labels (`soft_logistic`), the plain method from the 0/1 labels, as in the paper."""
        sp = nn.functional.softplus
        if isinstance(self.critic, SeparableGroup):
            pos, neg, pos_z, neg_z, regression = self.critic.head_pairs(
                h, self.c[idx[self.seed_of]], z, self.inverse(h)
            )
            loss = soft_logistic(pos, pos_z) + soft_logistic(neg, neg_z)  # [G, M, B]
            return loss.mean(2).sum(1), regression
        logit = self.logits(h, idx).view(len(self.keys), -1, idx.shape[1], self.heads)
        head = torch.arange(self.heads, device=h.device)
        pos, neg = logit[:, head + 1, :, head], logit[:, head, :, head]  # [M, G, B]
        return (sp(-pos) + sp(neg)).mean(2).sum(0), torch.zeros((), device=h.device)

    def logits(
        self, h: torch.Tensor, idx: torch.Tensor, inverse: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[G, L*B, heads] for h [G, L*B, D]: L blocks of B rows, each block's rows paired with
        the data points idx [seeds, B] of the member's seed; `inverse`: `inverse(h)` where the
        caller has it."""
        member_idx = idx[self.seed_of]  # [G, B]
        if self.separable:
            r = self.inverse(h) if inverse is None else inverse
            return self.critic(h, self.c[member_idx], r)
        levels = h.shape[1] // member_idx.shape[1]
        return self.critic(self.std(h, member_idx.repeat(1, levels)))


def adam(params: Any, lr: float, device: torch.device) -> torch.optim.Adam:
    """Adam with the fused kernel where the device has one (one pass over every parameter:
    1.35 -> 0.40 ms a step for 20 demo critics on 2 cores), else the multi-tensor one."""
    if device.type in ("cpu", "cuda"):
        return torch.optim.Adam(params, lr=lr, fused=True)
    return torch.optim.Adam(params, lr=lr, foreach=True)
