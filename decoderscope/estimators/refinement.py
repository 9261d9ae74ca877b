"""Whether, and for which members, R(h) refined through the decoder replaces R(h): priced on
held-out batches, in nats of the latent it leaves blurred."""

from __future__ import annotations

import math
import warnings
from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass

import torch

from ..dependence import carried
from ..errors import DecoderError
from ..sampling import Posterior
from .batches import Sampler
from .exact import unit_kl
from .groups import Members
from .settings import Settings

Held = Sequence[tuple[Mapping[str, torch.Tensor], torch.Tensor]]  # (features, z) batches
# rows of each held-out batch (spread over its bridge levels) that a refinement is priced on:
# each costs newton_steps Gauss-Newton solves through the decoder, d Jacobian columns apiece.
# Pricing every row (4 batches x 128 points x every level) took 83% of a conv VAE's inspection
# (py-spy: _refined_price -> refine -> jacobians); the decision it feeds (within
# regression_tol of exact, or no better than R(h)) is as clear on a few hundred rows.
PRICE_ROWS = 128
CLEARLY = 4  # prices above regression_tol x this, or below it / this, are priced no further
# widest layer (after reduction) solved through the decoder, standardised layers included: its
# Jacobian passes hold CHUNK x width floats (32 MB at 2048) and a bank of restarts 8192 x width
# (64 MB). At 512 (whitened layers only) the diffusers AutoencoderKL's 1024-wide GroupNorm
# `up_blocks.1.resnets.0.norm1` went to critics: KL 19.44 (trained) and 15.65 (random) against
# the latent's 19.27, the critics ~55% of the inspection; solved, both read 19.27 (blur 1e-9)
SOLVE_MAX_WIDTH = 2048


def price(mse: torch.Tensor, post: Posterior) -> torch.Tensor:
    """What an inverse's squared error per latent unit, mse [G, d], costs: [G] nats. Blurring z
    by e^2 loses about 1/2 log(1 + e^2 / sigma^2) per unit (sigma^2 the posterior variance), and
    never more than the unit's own KL: a collapsed unit carries nothing, so missing it costs
    nothing."""
    inv_var = (-post.logvar.flatten(1)).exp().mean(0)  # [d], mean 1/sigma^2 over the data
    kl_per_unit = unit_kl(post).mean(0).to(inv_var)  # [d], nats
    return torch.minimum(0.5 * torch.log1p(mse * inv_var), kl_per_unit).sum(dim=1)


def solvable(width: int, post: Posterior) -> bool:
    """Whether g(z) = h is solved through the decoder for a layer of this width (after
    reduction): at least as wide as the latent (a narrower one has no isolated preimages) and
    at most SOLVE_MAX_WIDTH."""
    return math.prod(post.latent_shape) <= width <= SOLVE_MAX_WIDTH


@dataclass(frozen=True)
class Carry:
    """What settles a layer without its own R(h): `determines` (`dependence.determined`), the
    layers read at the latent's values from the start (affine of full rank) and the layers in
    execution order. `plan.imply` reads a layer that a later one holding the latent's values
    reads z through alone at those values (`dependence.carried`), so once a later layer is
    refined in every seed, the earlier one's R(h) and its refinement are not needed."""

    determines: Mapping[str, frozenset[str]]
    valued: frozenset[str]
    order: tuple[str, ...]

    def layers(self, groups: Sequence[Members]) -> set[str]:
        """The layers settled so as things stand."""
        keys = [key for g in groups for key in g.all_keys]
        seeds = {s for _, s in keys}
        refined = set().union(*(g.refined for g in groups))
        every = {name for name, _ in keys if all((name, s) in refined for s in seeds)}
        return set(carried(self.determines, self.valued | every))


def refinable(g: Members, prices: torch.Tensor, post: Posterior, settings: Settings) -> list[int]:
    """Members (indices into g.keys) worth refining: not yet settled, their R costs more than
    `regression_tol`, their layer `solvable`, and, if tried before, their R's price fallen by
    more than `regression_tol` since (the refinement starts from R(h): from the same R it
    settles nothing new. The diffusers AutoencoderKL's conv_out priced 0.07-0.41 nats refined
    against 2.47 for R at five tries in a row, ~27 s each, with R's price unchanged)."""
    if g.refiner is None or not solvable(g.width, post):
        return []
    settled = g.refined | g.unrefinable
    tol = settings.regression_tol
    return [
        k
        for k, key in enumerate(g.keys)
        if key not in settled
        and float(prices[k]) > tol
        and float(prices[k]) < g.tried.get(key, math.inf) - tol
    ]


def try_refinements(
    groups: list[Members],
    prices: list[torch.Tensor],
    held: Held,
    run: Sampler,
    b: int,
    carry: Carry | None,
) -> None:
    """`try_refinement` for every group's members; with `carry`, in waves from the last layer:
    each wave prices the layers that determine no layer still to be priced, and a layer that a
    refined later one settles (`carry`) is not priced. The diffusers AutoencoderKL's
    normalisations and the convolutions between them (21 of its 33 layers) were each priced,
    ~2/3 of the pricing, and then read at the latent's values through the block's last
    convolution; its other 12 layers (the blocks' last convolutions, which determine no later
    layer: the skip connections add to them) are one wave, solved together (in 5 solves, one
    per width, instead of 24, each with its own tail of Gauss-Newton passes of few samples)."""
    if carry is None:
        for g, p in zip(groups, prices, strict=True):
            try_refinement(g, p, held, run.post, run.settings, run.seeds, b)
        return
    left = list(carry.order)
    while left:
        settled = carry.layers(groups)
        left = [name for name in left if name not in settled]
        pending = set(left)
        wave = {a for a in left if not carry.determines.get(a, frozenset()) & pending}
        for g, p in zip(groups, prices, strict=True):
            try_refinement(g, p, held, run.post, run.settings, run.seeds, b, wave)
        left = [name for name in left if name not in wave]


def try_refinement(
    g: Members,
    prices: torch.Tensor,
    held: Held,
    post: Posterior,
    settings: Settings,
    seeds: int,
    b: int,
    layers: Container[str] | None = None,
) -> None:
    """Price the refined inverse of g's `refinable` members (of `layers` alone, where given) on
    `held`. A member within `regression_tol` of exact uses it from now on and takes its price in
    `prices` [members] (in place); one no better than its R(h) is marked `unrefinable` and not
    tried again."""
    chosen = refinable(g, prices, post, settings)
    if layers is not None:
        chosen = [k for k in chosen if g.keys[k][0] in layers]
    if not chosen:
        return
    try:
        after = _refined_price(g, chosen, held, post, seeds, b, settings.regression_tol)
    except DecoderError as exc:  # an op without forward-mode AD (a custom autograd.Function)
        g.unrefinable.update(g.keys[k] for k in chosen)
        warnings.warn(
            f"R(h) is not refined through this decoder, which cannot run in forward-mode AD "
            f"({exc.__cause__!r}); its nonlinear layers are read with the learned inverse alone "
            "(set newton_steps=0 to skip the attempt)",
            RuntimeWarning,
            stacklevel=2,
        )
        return
    for j, k in enumerate(chosen):
        if float(after[j]) <= settings.regression_tol:
            g.refined.add(g.keys[k])
            prices[k] = after[j]
        elif float(after[j]) >= float(prices[k]) - settings.regression_tol:
            # a lossy layer: Gauss-Newton lands on some preimage of h, not near z
            g.unrefinable.add(g.keys[k])
        else:  # better than R(h), not within tol: tried again once R has improved
            g.tried[g.keys[k]] = float(prices[k])


def _refined_price(
    g: Members, chosen: list[int], held: Held, post: Posterior, seeds: int, b: int, tol: float
) -> torch.Tensor:
    """Price [len(chosen)] of the members' R(h) refined through the decoder, nats, on the
    held-out batches `held` ((features, z) of b data points per seed at every level). A member
    is priced no further once its price on the batches so far is clear: above CLEARLY x `tol`
    (it will not be used, and the rows it leaves unsolved each take every Gauss-Newton step),
    or below `tol` / CLEARLY (it will; a rare sample it fails on still shows in the
    evaluation's estimate and s.e.)."""
    assert g.refiner is not None
    sums = torch.zeros(len(chosen), post.mu.flatten(1).shape[1], device=post.mu.device)
    counts = torch.zeros(len(chosen), 1, device=post.mu.device)
    active = list(range(len(chosen)))
    with torch.no_grad():
        for feats, z in held:
            rows = torch.tensor([chosen[j] for j in active], device=post.mu.device)
            h = g.stack(feats, seeds, b)
            every = max(1, h.shape[1] // PRICE_ROWS)  # rows in level order: all levels kept
            h = h[:, ::every]  # every member: R is one grouped net
            r = g.separable_critic.r_net(h)[rows]
            refined = g.refiner([g.keys[chosen[j]][0] for j in active], r, h[rows])
            at = torch.tensor(active, device=post.mu.device)
            sums[at] += (refined - z[g.seed_of][rows, ::every]).pow(2).mean(dim=1)
            counts[at] += 1
            so_far = price(sums / counts, post)
            active = [j for j in active if tol / CLEARLY < float(so_far[j]) <= CLEARLY * tol]
            if not active:
                break
    return price(sums / counts, post)


def choose_refinement(
    run: Sampler, groups: list[Members], blur: list[torch.Tensor], carry: Carry | None = None
) -> list[torch.Tensor]:
    """After the regression phase, a last try for members it did not settle (`refinable`,
    stopped between two tries of the phase): R(h) refined through the decoder is used where its
    price, on `check_batches` fresh held-out batches of `regression_batch` data points per seed
    at every level, is within `regression_tol` of exact. Returns every member's price of the
    inverse it will use (nats, per group [members]). No candidates (linear decoders, or none
    left): nothing drawn."""
    post, settings = run.post, run.settings
    settled = set() if carry is None else carry.layers(groups)
    candidates = [
        [k for k in refinable(g, p, post, settings) if g.keys[k][0] not in settled]
        for g, p in zip(groups, blur, strict=True)
    ]
    if not any(candidates):
        return blur
    b = settings.regression_batch
    held = [run.batch(b)[1:] for _ in range(settings.check_batches)]
    out = [p.clone() for p in blur]
    try_refinements(groups, out, held, run, b, carry)
    return out
