"""The critics' training loop: every member of every group in one optimiser, fresh samples
every step, each member stopped on its own held-out loss."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .batches import Batch, Progress, Sampler
from .critic import SeparableGroup
from .groups import Members, adam
from .members import MemberStopping
from .settings import Settings

CRITIC_PHASE = "training critics"


def _optimizer(
    groups: list[Members], agg_groups: list[Members], settings: Settings, device: torch.device
) -> tuple[torch.optim.Adam, torch.optim.lr_scheduler.CosineAnnealingLR]:
    """Adam with cosine decay over `steps`. R and the gates go on at their own, larger rate: R
    is a plain least-squares fit (d=16, KL 8, after LeakyReLU, without the regression phase: KL
    error -1.0 nats at the critics' rate, -0.4 at 10x)."""
    seps = [g.critic for g in groups if isinstance(g.critic, SeparableGroup)]
    fast = [p for c in seps for p in [*c.r_net.parameters(), c.gate]]
    fast_ids = {id(p) for p in fast}
    params = [
        p for g in groups + agg_groups for p in g.critic.parameters() if id(p) not in fast_ids
    ]
    param_groups: list[dict[str, Any]] = [
        {"params": params},
        {"params": fast, "lr": settings.regression_lr},
    ]
    assert settings.lr is not None and settings.steps is not None  # see Settings.__post_init__
    opt = adam(param_groups, settings.lr, device)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=settings.steps)


def _member_losses(
    groups: list[Members], batch: Batch, seeds: int, b: int
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each group's logistic loss per member still training [G] (summed over heads) and the
    regression losses of their R."""
    idx, feats, z_by_seed = batch
    device = idx.device
    out, extras = [], torch.zeros((), device=device)
    for g in groups:
        if not g.keys:  # every member stopped
            out.append(torch.zeros(0, device=device))
            continue
        loss, extra = g.losses(g.stack(feats, seeds, b), idx, z_by_seed[g.seed_of])
        extras = extras + extra
        out.append(loss)
    return out, extras


def _aggregate_loss(
    agg_groups: list[Members], idx: torch.Tensor, feats: Mapping[str, torch.Tensor], seeds: int
) -> torch.Tensor:
    """The plain method's aggregate critics: posterior (level 1) against prior (level 0)."""
    b = idx.shape[1]
    loss = torch.zeros((), device=idx.device)
    for g in agg_groups:
        logit = g.logits(g.stack(feats, seeds, b), idx).view(len(g.keys), 2, b)
        sp = nn.functional.softplus
        loss = loss + (sp(-logit[:, 1]) + sp(logit[:, 0])).mean(dim=1).sum()
    return loss


def train_critics(
    run: Sampler,
    groups: list[Members],
    agg_groups: list[Members],
    patience: list[torch.Tensor] | None,
    on_step: Progress | None = None,
) -> int:
    """Train every critic for up to `steps` steps of `batch_size` data points per seed at every
    bridge level. With `patience` (per group, per member; telescoping only) each member keeps the
    parameters of its best logistic loss on `check_batches` fixed held-out batches and stops once
    that has not improved by `stop_tol` for its patience in checks (one every `check_every`
    steps); the run ends when every member has stopped. The plain method runs every step, as in
    the paper. Returns the steps run."""
    settings, seeds = run.settings, run.seeds
    assert settings.steps is not None
    opt, sched = _optimizer(groups, agg_groups, settings, run.post.mu.device)
    b = settings.batch_size

    def draw() -> Batch:
        return run.batch(b)

    held = [draw() for _ in range(settings.check_batches)] if patience is not None else []
    stopper = None
    if patience is not None:
        stopper = MemberStopping(
            groups, [g.critic for g in groups], patience, settings.stop_tol, True
        )
        stopper.retire_impatient(opt)

    @torch.no_grad()
    def held_losses() -> list[torch.Tensor]:
        per_batch = [_member_losses(groups, batch, seeds, b)[0] for batch in held]
        return [torch.stack(parts).mean(0) for parts in zip(*per_batch, strict=True)]

    steps_run = 0
    for step in range(settings.steps):
        if stopper is not None and step % settings.check_every == 0:
            if not stopper.check(held_losses(), opt):
                _report(on_step, steps_run, steps_run)
                break
        steps_run += 1
        batch = draw()
        per_member, loss = _member_losses(groups, batch, seeds, b)
        loss = loss + sum(x.sum() for x in per_member)
        loss = loss + _aggregate_loss(agg_groups, batch[0], batch[1], seeds)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        _report(on_step, steps_run, settings.steps)
    if stopper is not None:  # a last check, then every member takes its best parameters
        if stopper.training:
            stopper.check(held_losses(), opt)
        stopper.finish()
    return steps_run


def _report(on_step: Progress | None, done: int, total: int) -> None:
    if on_step is not None:
        on_step(CRITIC_PHASE, done, total)
