"""The regression phase: every member's inverse R(h) -> z, fitted alone before the critics train
(its precision bounds every estimate after a nonlinear layer: r = z + e blurs the exact term)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from ..sampling import Posterior
from .batches import Features, Key, Progress, Sampler
from .groups import Members, adam
from .members import MemberStopping
from .refinement import Carry, Held, price, try_refinements
from .whitening import WHITEN_MAX_WIDTH

REGRESSION_PHASE = "fitting inverses R(h)"


def start_regressions(
    feats_of: Features,
    groups: list[Members],
    post: Posterior,
    generator: torch.Generator,
    n: int = 4096,
) -> None:
    """Start each layer's regression R(h) -> z at its least-squares affine fit on n prior samples
    (layers up to WHITEN_MAX_WIDTH wide; wider ones start as initialised). Measured (d=16,
    KL 8, Linear layer): learning R from a random start left the KL 0.3 nats low after 1000
    steps."""
    z = torch.randn((n, *post.latent_shape), generator=generator, device=post.mu.device)
    feats = feats_of(z)
    target = z.flatten(1).double()
    fits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for g in groups:
        names = {name for name, _ in g.keys}
        for name in names - fits.keys():
            h = feats[name].double()
            if h.shape[1] > WHITEN_MAX_WIDTH:
                continue
            x = torch.cat([h, h.new_ones(h.shape[0], 1)], dim=1)
            # ridge of 1e-6 per unit-variance feature: rank-deficient layers stay solvable
            gram = x.T @ x + 1e-6 * n * torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
            sol = torch.linalg.solve(gram, x.T @ target)
            fits[name] = (sol[:-1].float(), sol[-1].float())
        if all(name in fits for name in names):
            g.separable_critic.start_regression(
                torch.stack([fits[name][0] for name, _ in g.keys]),
                torch.stack([fits[name][1] for name, _ in g.keys]),
            )


def _tries(step: int, every: int) -> bool:
    """Whether the check at `step` tries the refinement: checks 0, 1, 2, 4, 8, ... (0 & -1 is
    0, so check 0 passes the power-of-two test too)."""
    check = step // every
    return check & (check - 1) == 0


def _errors(
    groups: list[Members], feats: Mapping[str, torch.Tensor], z: torch.Tensor, seeds: int, b: int
) -> list[torch.Tensor]:
    """Each group's R error per member still fitting and latent unit [G, d]."""
    out = []
    for g in groups:
        if not g.keys:
            out.append(z.new_zeros(0, z.shape[2]))
            continue
        r = g.separable_critic.r_net(g.stack(feats, seeds, b))  # every level of b data points
        out.append((r - z[g.seed_of]).pow(2).mean(dim=1))
    return out


# settle(groups, each member's latest price per group [members]) -> the members whose R is no
# longer needed (their layer is read another way): they stop fitting
Settle = Callable[[list[Members], list[torch.Tensor]], set[Key]]


def fit_regressions(
    run: Sampler,
    groups: list[Members],
    on_step: Progress | None = None,
    settle: Settle | None = None,
    carry: Carry | None = None,
) -> tuple[int, list[torch.Tensor]]:
    """Fit every R alone: up to `regression_steps` steps of `regression_batch` data points per
    seed, each at every bridge level, at `regression_lr` with cosine decay. Every `check_every`
    steps each R is priced (`refinement.price`) on fixed held-out batches; at checks 1, 2, 4,
    8, ... members whose R(h) refined through the decoder is within `regression_tol` of exact
    take that price (and the refinement). Each R stops once its price has not fallen by
    `regression_tol` for `regression_patience` checks, or at once within `regression_tol` of 0,
    and ends with its best parameters; after each try, `settle` may stop members whose R is no
    longer needed; with `carry` the tries go layer by layer from the last
    (`refinement.try_refinements`). Returns the steps run and each
    R's last price, nats, per group [members]."""
    post, settings, seeds = run.post, run.settings, run.seeds
    b = settings.regression_batch

    def draw() -> tuple[Mapping[str, torch.Tensor], torch.Tensor]:
        _, feats, z = run.batch(b)
        return feats, z

    held: Held = [draw() for _ in range(settings.check_batches)]

    @torch.no_grad()
    def prices(tried: bool) -> list[torch.Tensor]:
        """Every R's price on the held-out batches; where `tried`, refined ones' after trying."""
        per_batch = [_errors(groups, feats, z, seeds, b) for feats, z in held]
        out = [price(torch.stack(e).mean(0), post) for e in zip(*per_batch, strict=True)]
        if tried:
            try_refinements(groups, out, held, run, b, carry)
        return out

    nets = [g.separable_critic.r_net for g in groups]
    opt = adam(
        [p for net in nets for p in net.parameters()], settings.regression_lr, post.mu.device
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=settings.regression_steps)
    # twice the critics' patience: an R's price can stall for a few checks and then fall again
    # (deep LeakyReLU chain, layer 2: after 4 stale checks its blur was 1.15 nats; after 8, 0.28)
    stopper = MemberStopping(
        groups,
        nets,
        settings.regression_patience or settings.regression_steps + 1,
        settings.regression_tol,
        keep_best=True,
        floor=0.0,  # a price is never below 0
    )

    def checked(step: int) -> bool:
        """Price every R, retire the stale and the settled; whether any R is still fitting."""
        tried = _tries(step, settings.check_every)
        training = stopper.check(prices(tried), opt)
        if settle is not None and tried and training:
            training = stopper.retire(settle(groups, stopper.last), opt)
        return training

    step = 0
    for step in range(settings.regression_steps):
        if step % settings.check_every == 0 and not checked(step):
            break
        loss = torch.stack([e.sum() for e in _errors(groups, *draw(), seeds, b)]).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if on_step is not None:
            on_step(REGRESSION_PHASE, step + 1, settings.regression_steps)
    else:
        step = settings.regression_steps
        if stopper.training:  # the last price of every R still fitting
            stopper.check(prices(_tries(step, settings.check_every)), opt)
    if on_step is not None and step < settings.regression_steps:
        on_step(REGRESSION_PHASE, step, step)
    stopper.finish()
    return step, [x.float() for x in stopper.last]
