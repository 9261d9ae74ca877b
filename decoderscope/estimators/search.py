"""The search for every preimage of a layer's value: Gauss-Newton through the decoder from
several starts (the sample's own posterior, a fixed bank of latent draws nearest in value),
then hops across the folds next to the preimages found."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..sampling import Posterior, reparameterise
from .batches import Features
from .exact import log_ratio_to_prior
from .inverse import TRAPPED, solve
from .jacobian import jacobian_copies, jacobians

BANK = 4096  # prior draws, and as many aggregate-posterior draws: the search's bank of starts
NEAREST = 8  # starts per sample from the bank draws nearest in h
OWN = 4  # starts per sample from its own posterior: the mean and OWN - 1 draws
POOL = 8  # the OWN - 1 are the draws nearest in h among POOL times as many
STEPS = 30  # Gauss-Newton steps per start
HOPS = 2  # rounds of hops from the preimages found
HOP_FROM = 4  # most probable preimages per sample hopped from, under p(z) and under q(z|x)
HOP_DIRS = 4  # directions per preimage (each taken both ways): J's weakest right singular vectors
MORE_DIRS = 8  # the hop directions a layer that fails the check with HOP_DIRS is checked again with
HOP_SCALE = 1.5  # hop length, latent units
HOP_WINDOW = 6.0  # nats below a sample's most probable preimage still hopped from
SAME = 1e-2  # solutions closer than this (RMS per latent unit) are one preimage
# J^T J eigenvalue ratio below which J is rank-deficient: float32 Jacobians of an exactly
# singular map leave ~1e-14; GELU units deep in their flat tail (slope ~1e-4) legitimately reach
# 1e-10 (1-3% of a random GELU layer's samples, which failed the check at the earlier 1e-10)
RANK_CUT = 1e-13


def reading_flops(d: int, width: int, row_flops: int, samples: int) -> float:
    """An upper bound on the FLOPs of searching `samples` samples' preimages in a layer `width`
    wide on a latent of d units whose decoder row costs `row_flops`, with the check's first hop
    setting: every start (OWN + NEAREST, the own z, and HOPS rounds of hops from 2 HOP_FROM
    preimages along HOP_DIRS directions both ways) taking all STEPS Gauss-Newton steps, each a
    Jacobian pass of `jacobian_copies` rows. A layer the check retries with MORE_DIRS
    directions or one more round of hops searches with up to about twice these hop starts."""
    hops = HOPS * 2 * HOP_FROM * 2 * min(HOP_DIRS, d)
    starts = OWN + NEAREST + 1 + hops
    return float(samples) * starts * STEPS * jacobian_copies(width, d) * row_flops


@dataclass(frozen=True)
class Found:
    """Preimages of A samples from S starts: z [A, S, d] (float64) and log weights [A, S]
    (log p(z_j) - log vol J(z_j), up to a constant shared by all; -inf where the start found
    no preimage or one found by an earlier start)."""

    z: torch.Tensor
    log_weight: torch.Tensor

    def distinct(self) -> Found:
        """The same starts, each preimage counted once: a start that lands within SAME of a
        preimage an earlier start found gets weight -inf."""
        a, s, d = self.z.shape
        gap = torch.cdist(self.z, self.z).pow(2) / d  # [A, S, S] mean squared gap per unit
        same = (gap < SAME**2) & self.log_weight.isfinite().unsqueeze(1)
        earlier = torch.ones(s, s, dtype=torch.bool, device=self.z.device).tril(-1)  # j < i
        dup = (same & earlier).any(dim=2)
        return Found(self.z, torch.where(dup, -math.inf, self.log_weight))

    def columns(self, cols: list[int]) -> Found:
        """The starts `cols` alone."""
        return Found(self.z[:, cols], self.log_weight[:, cols])

    @property
    def count(self) -> torch.Tensor:
        """Distinct preimages found per sample [A]."""
        return self.log_weight.isfinite().sum(dim=1)


class Bank:
    """Fixed latent draws (BANK prior, BANK aggregate-posterior) and their layer values, from
    which each sample's NEAREST nearest in h serve as Gauss-Newton starts."""

    def __init__(
        self, feats_of: Features, name: str, post: Posterior, generator: torch.Generator
    ) -> None:
        device = post.mu.device
        shape = post.latent_shape
        idx = torch.randint(post.n, (BANK,), generator=generator, device=device)
        noise = torch.randn((2 * BANK, *shape), generator=generator, device=device)
        z = torch.cat([noise[:BANK], reparameterise(post.mu[idx], post.logvar[idx], noise[BANK:])])
        with torch.no_grad():
            self.h = torch.cat([feats_of(c)[name] for c in z.split(4096)])
        self.z = z.flatten(1)

    def nearest(self, h: torch.Tensor, k: int) -> torch.Tensor:
        """The latent draws [A, k, d] whose values are nearest to h [A, D]."""
        picks = []
        for chunk in h.split(1024):
            picks.append(torch.cdist(chunk, self.h).topk(k, dim=1, largest=False).indices)
        return self.z[torch.cat(picks)]


@torch.no_grad()
def starts(
    feats_of: Features,
    name: str,
    bank: Bank,
    h: torch.Tensor,
    idx: torch.Tensor,
    post: Posterior,
    generator: torch.Generator,
    nearest: int | None = None,
    own: int | None = None,
) -> torch.Tensor:
    """Starts [A, own + nearest, d] for h [A, D] drawn from data points idx [A]: the posterior
    mean of x, the own - 1 of POOL * own draws of q(z|x) whose values are nearest to h, then
    the nearest bank draws, nearest first (defaults: OWN, NEAREST). Draws near h in value lie
    near its most probable preimages under q(z|x): with own - 1 plain draws instead (and no
    own z), the search missed the preimage that dominates q(h|x) for one sample in 512-1024
    on SiLU layers (that sample then reads tens of nats low)."""
    own = OWN if own is None else own
    nearest = NEAREST if nearest is None else nearest
    shape = post.latent_shape
    mu, logvar = post.mu.flatten(1)[idx], post.logvar.flatten(1)[idx]
    a, d = mu.shape
    pool = POOL * max(own - 1, 0)
    mine = [mu.unsqueeze(1)]
    if pool > 0:
        draws = torch.randn((a, pool, d), generator=generator, device=mu.device)
        spread = reparameterise(mu.unsqueeze(1), logvar.unsqueeze(1), draws)  # [A, P, d]
        values = torch.cat(
            [feats_of(c.view(-1, *shape))[name] for c in spread.flatten(0, 1).split(4096)]
        ).view(a, pool, -1)
        gap = (values - h.unsqueeze(1)).pow(2).sum(2)  # [A, P]
        pick = gap.topk(own - 1, dim=1, largest=False).indices
        mine.append(spread.gather(1, pick.unsqueeze(2).expand(-1, -1, d)))
    return torch.cat([*mine, bank.nearest(h, nearest)], dim=1)


@dataclass(frozen=True)
class Solutions:
    """Where Gauss-Newton ended from S starts for each of A samples: z [A, S, d] (float64) and
    whether it solved there [A, S] (converged at a residual RMS per feature <= TRAPPED).
    `weigh` makes the distinct ones preimages."""

    z: torch.Tensor
    ok: torch.Tensor

    def columns(self, cols: list[int]) -> Solutions:
        """The starts `cols` alone."""
        return Solutions(self.z[:, cols], self.ok[:, cols])


@torch.no_grad()
def search(
    feats_of: Features,
    latent_shape: tuple[int, ...],
    name: str,
    h: torch.Tensor,
    start: torch.Tensor,
    seed: int = 0,
) -> Solutions:
    """Gauss-Newton from every start [A, S, d] towards h [A, D] (the layer's whitened values;
    the whitening is the same map for every preimage, so it shifts all log weights alike).
    Every start's solution, duplicates included (`weigh` keeps the distinct ones)."""
    a, s, d = start.shape
    z, ok = points(
        feats_of, latent_shape, name, h.repeat_interleave(s, dim=0), start.reshape(a * s, d), seed
    )
    return Solutions(z.view(a, s, d), ok.view(a, s))


def points(
    feats_of: Features,
    latent_shape: tuple[int, ...],
    name: str,
    target: torch.Tensor,
    start: torch.Tensor,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gauss-Newton from start [P, d] towards target [P, D]: the solutions z [P, d] (float64)
    and whether each solved there [P] (converged at a residual RMS per feature <= TRAPPED)."""
    member = torch.zeros(start.shape[0], dtype=torch.long, device=start.device)
    jitter = torch.Generator(device=start.device).manual_seed(seed)
    z, done, rms = solve(
        feats_of,
        latent_shape,
        [name],
        member,
        start.float(),
        target.float(),
        STEPS,
        jitter,
    )
    return z.double(), done & (rms <= TRAPPED)


def weigh(
    feats_of: Features,
    latent_shape: tuple[int, ...],
    name: str,
    width: int,
    sol: Solutions,
    before: Found | None = None,
) -> Found:
    """The distinct preimages among `sol`, after `before`'s when given (its columns first, as
    they are), with their log weights log p(z) - log vol J(z) (layer `width` features). J^T J is
    formed and decomposed only where a solution is kept: most starts land on a preimage an
    earlier one found (~10 distinct of 141 per sample on the demo's random GELU layer), and
    each costs a Jacobian pass and an eigen-decomposition (d = 16: 5.7 and 12 us per solution
    on 2 cores). A solution where J is rank-deficient is no isolated preimage: a GELU unit
    saturated in float32 (u < -5 outputs 0 within the solve's tolerance) has vol J ~ 0, whose
    weight would swamp every other (seen: log weight +187 against 0 for the rest, 5 latent
    units from the sample's own z, moving its log-ratio by up to 200 nats). It is dropped, and
    a later solution that it hid as a duplicate is weighed in its place."""
    a, s, d = sol.z.shape
    old_z = sol.z.new_zeros(a, 0, d) if before is None else before.z
    old_w = sol.z.new_zeros(a, 0) if before is None else before.log_weight
    z = torch.cat([old_z, sol.z], 1)
    ok = sol.ok.clone()
    weight = torch.full((a, s), -math.inf, dtype=torch.float64, device=z.device)
    weighed = torch.zeros_like(ok)
    while True:
        trial = torch.where(ok, 0.0, -math.inf).to(torch.float64)
        kept = Found(z, torch.cat([old_w, trial], 1)).distinct().log_weight.isfinite()
        kept = kept[:, old_w.shape[1] :]
        rows, cols = (kept & ~weighed).nonzero(as_tuple=True)
        if rows.numel() == 0:
            break
        at = sol.z[rows, cols]
        eig = gram_eigenvalues(feats_of, latent_shape, name, at, width)
        weight[rows, cols] = -0.5 * at.pow(2).sum(1) - 0.5 * eig.clamp_min(1e-300).log().sum(1)
        weighed[rows, cols] = True
        bad = rank_deficient(eig)
        if not bool(bad.any()):
            break
        ok[rows[bad], cols[bad]] = False
    return Found(z, torch.cat([old_w, torch.where(kept, weight, -math.inf)], 1))


def _gram(
    feats_of: Features, latent_shape: tuple[int, ...], name: str, z: torch.Tensor, width: int
) -> torch.Tensor:
    """J^T J at z [P, d]: [P, d, d] (float64)."""
    member = torch.zeros(z.shape[0], dtype=torch.long, device=z.device)
    _, jt = jacobians(feats_of, [name], member, z.float(), latent_shape, width)
    jt = jt.double()
    return jt @ jt.transpose(1, 2)


def gram_eigenvalues(
    feats_of: Features, latent_shape: tuple[int, ...], name: str, z: torch.Tensor, width: int
) -> torch.Tensor:
    """Eigenvalues of J^T J at z [P, d] (float64, ascending): [P, d]."""
    return torch.linalg.eigvalsh(_gram(feats_of, latent_shape, name, z, width))


def rank_deficient(eig: torch.Tensor) -> torch.Tensor:
    """Whether J^T J with eigenvalues eig [P, d] is numerically singular: [P]."""
    return eig[:, 0] <= RANK_CUT * eig[:, -1].clamp_min(1e-300)


@torch.no_grad()
def hop(
    feats_of: Features,
    latent_shape: tuple[int, ...],
    name: str,
    h: torch.Tensor,
    found: Found,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    seed: int = 0,
    dirs: int = HOP_DIRS,
    rounds: int = HOPS,
) -> Found:
    """`rounds` rounds of hops: from each sample's HOP_FROM most probable preimages under p(z)
    and under q(z|x) not yet hopped from (those within HOP_WINDOW nats of the most probable),
    HOP_SCALE along each of J's `dirs` weakest right singular vectors, both ways, and
    Gauss-Newton from there. A fold's other branch lies across the unit whose slope is near 0,
    which is where J is weakest."""
    a, _, d = found.z.shape
    dirs_n = min(dirs, d)
    hopped = torch.zeros(found.log_weight.shape, dtype=torch.bool, device=h.device)
    for r in range(rounds):
        k = min(HOP_FROM, found.z.shape[1])
        lw = found.log_weight
        pick = torch.zeros(lw.shape, dtype=torch.bool, device=h.device)
        own = torch.where(lw.isfinite(), lw + ratios(found, mu, logvar), -math.inf)
        for score in (lw, own):
            best = score.max(dim=1, keepdim=True).values
            # a preimage is hopped from once: each round takes the most probable not yet hopped
            top = score.masked_fill(hopped, -math.inf).topk(k, dim=1)
            near = top.values >= best - HOP_WINDOW
            pick |= torch.zeros_like(pick).scatter(1, top.indices, near & top.values.isfinite())
        hopped |= pick
        rows, cols = pick.nonzero(as_tuple=True)
        if rows.numel() == 0:
            break
        base = found.z[rows, cols].float()  # [P, d]
        gram = _gram(feats_of, latent_shape, name, base, h.shape[1])
        vecs = torch.linalg.eigh(gram).eigenvectors[:, :, :dirs_n].transpose(1, 2)  # [P, k, d]
        new = base.unsqueeze(1) + HOP_SCALE * torch.cat([vecs, -vecs], dim=1).float()
        z, ok = points(
            feats_of,
            latent_shape,
            name,
            h[rows].repeat_interleave(2 * dirs_n, dim=0),
            new.flatten(0, 1),
            seed + 1 + r,
        )
        # back to [A, most per sample], padded with no solution
        owner = rows.repeat_interleave(2 * dirs_n)
        slot = torch.arange(owner.numel(), device=h.device) - torch.searchsorted(owner, owner)
        width = int(slot.max()) + 1
        zs = torch.zeros(a, width, d, dtype=torch.float64, device=h.device)
        oks = torch.zeros(a, width, dtype=torch.bool, device=h.device)
        zs[owner, slot], oks[owner, slot] = z, ok
        found = weigh(feats_of, latent_shape, name, h.shape[1], Solutions(zs, oks), found)
        hopped = torch.cat([hopped, torch.zeros_like(oks)], dim=1)
    return found


def ratios(found: Found, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log q(z_j|x)/p(z_j) at every solution [A, S], each sample's data point mu, logvar [A, d]."""
    a, s, d = found.z.shape
    return log_ratio_to_prior(
        found.z.reshape(a * s, d),
        mu.double().repeat_interleave(s, dim=0),
        logvar.double().repeat_interleave(s, dim=0),
    ).view(a, s)
