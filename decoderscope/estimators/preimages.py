"""Values of a folding layer from the preimages of each sample: no critic.

A layer h = g(z) that folds the latent (GELU or SiLU units: a negative output has two preimages;
|z|) but whose Jacobian has full column rank d has finitely many preimages z_1..z_J of each h,
and then exactly

    q(h|x) = sum_j q(z_j|x) / vol J(z_j),   p(h) = sum_j p(z_j) / vol J(z_j),

vol J = sqrt(det J^T J). So log q(h|x)/p(h) = logsumexp_j(w_j + log q(z_j|x)/p(z_j)) -
logsumexp_j w_j with w_j = log p(z_j) - log vol J(z_j): the latent's exact log-ratio averaged
over the preimages, weighted by how probable each is under the prior. A critic has to learn this
function of h (and read a random GELU layer 0.47 nats low after 6000 steps); here it is
computed, given the preimages.

They are found by Gauss-Newton through the decoder (`inverse._solve`) from several starts:
the sample's own z (known: we drew it), the mean and draws of its posterior q(z|x), and the
latent draws of a fixed bank (prior and aggregate-posterior draws) whose h is nearest (those
that dominate p(h) and q(h|x') for other data points); then `hop`s from the most probable
preimages found, across the folds next to them. Session 10, 16 GELUs on a 16-d latent with
broad posteriors (sigma 0.88; ~8 units per sample on the folded branch, so ~2^8 preimages, a
few probable): the earlier 32 starts without the own z found the own z for 63% of samples and
0.81 of p(h)'s weight (log-ratio off by -0.78 nats on average); with the own z and two rounds
of hops, 0.94 of p(h)'s and 0.95 of q(h|x)'s weight, log-ratio off by +0.02 (enumerated
truth, /tmp/exp10/hop2.py), and the layer read 1.93 / 0.01 / 1.92 against 1.93 / 0.01 / 1.91.

The sums are right only if every preimage with weight is found. `check` measures that on
held-out samples: the share whose own z the search finds without being given it (a layer
below MIN_COVERAGE fails at once), how much the values move when the starts are doubled, and
whether J is rank-deficient at the own z (the fibres are then not sets of points). A layer
with many equally probable preimages (|z| in 8 dimensions: 256) keeps finding new ones, each
doubling lowering the values by up to log 2. A layer whose values move is checked again with
MORE_DIRS hop directions. A layer that passes uses these values; others keep their critic.
Solutions where J is singular are dropped (no isolated preimage; 1/vol J infinite).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from ..sampling import Posterior
from .exact import ExactLatent, log_mixture_terms, log_ratio_to_prior, mi_terms
from .inverse import TRAPPED, _jacobians, _solve
from .runs import LayerRun, mean_se

Features = Callable[[torch.Tensor], Mapping[str, torch.Tensor]]
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
MIN_COVERAGE = 0.25  # below this share found unaided the check fails at once
STABLE = 0.05  # nats the mean log-ratio may move (plus twice its s.e.) when the starts double
BORDERLINE = 4  # times the check's samples where its error bar straddles STABLE
RANK_DEFICIENT = 0.01  # share of own z with a rank-deficient Jacobian tolerated


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
        std = (0.5 * post.logvar[idx]).exp()
        z = torch.cat([noise[:BANK], post.mu[idx] + std * noise[BANK:]])
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
        spread = mu.unsqueeze(1) + (0.5 * logvar).exp().unsqueeze(1) * draws  # [A, P, d]
        values = torch.cat(
            [feats_of(c.view(-1, *shape))[name] for c in spread.flatten(0, 1).split(4096)]
        ).view(a, pool, -1)
        gap = (values - h.unsqueeze(1)).pow(2).sum(2)  # [A, P]
        pick = gap.topk(own - 1, dim=1, largest=False).indices
        mine.append(spread.gather(1, pick.unsqueeze(2).expand(-1, -1, d)))
    return torch.cat([*mine, bank.nearest(h, nearest)], dim=1)


@torch.no_grad()
def search(
    feats_of: Features,
    latent_shape: tuple[int, ...],
    name: str,
    h: torch.Tensor,
    start: torch.Tensor,
    seed: int = 0,
) -> Found:
    """Gauss-Newton from every start [A, S, d] towards h [A, D] (the layer's whitened values;
    the whitening is the same map for every preimage, so it shifts all log weights alike).
    Every start's solution, duplicates included (`Found.distinct` removes them)."""
    a, s, d = start.shape
    z, log_weight = _points(
        feats_of, latent_shape, name, h.repeat_interleave(s, dim=0), start.reshape(a * s, d), seed
    )
    return Found(z.view(a, s, d), log_weight.view(a, s))


def _points(
    feats_of: Features,
    latent_shape: tuple[int, ...],
    name: str,
    target: torch.Tensor,
    start: torch.Tensor,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gauss-Newton from start [P, d] towards target [P, D]: the solutions z [P, d] (float64)
    and their log weights [P] (log p(z) - log vol J(z); -inf where no preimage was found)."""
    member = torch.zeros(start.shape[0], dtype=torch.long, device=start.device)
    jitter = torch.Generator(device=start.device).manual_seed(seed)
    z, done, rms = _solve(
        feats_of,
        latent_shape,
        [name],
        member,
        start.float(),
        target.float(),
        STEPS,
        jitter,
    )
    eig = _gram_eigenvalues(feats_of, latent_shape, name, z, target.shape[1])
    # a solution where J is singular is no isolated preimage: units saturated in float32 (a
    # GELU at u < -5 outputs 0 to within the solve's tolerance) with vol J ~ 0, whose weight
    # would swamp every other (seen: log weight +187 against 0 for the rest, 5 latent units
    # from the sample's own z, moving its log-ratio by up to 200 nats)
    ok = done & (rms <= TRAPPED) & ~_rank_deficient(eig)
    z64 = z.double()
    log_weight = -0.5 * z64.pow(2).sum(1) - 0.5 * eig.clamp_min(1e-300).log().sum(1)
    return z64, torch.where(ok, log_weight, -math.inf)


def _gram(
    feats_of: Features, latent_shape: tuple[int, ...], name: str, z: torch.Tensor, width: int
) -> torch.Tensor:
    """J^T J at z [P, d]: [P, d, d] (float64)."""
    member = torch.zeros(z.shape[0], dtype=torch.long, device=z.device)
    _, jt = _jacobians(feats_of, [name], member, z.float(), latent_shape, width)
    jt = jt.double()
    return jt @ jt.transpose(1, 2)


def _gram_eigenvalues(
    feats_of: Features, latent_shape: tuple[int, ...], name: str, z: torch.Tensor, width: int
) -> torch.Tensor:
    """Eigenvalues of J^T J at z [P, d] (float64, ascending): [P, d]."""
    return torch.linalg.eigvalsh(_gram(feats_of, latent_shape, name, z, width))


def _rank_deficient(eig: torch.Tensor) -> torch.Tensor:
    """Whether J^T J with eigenvalues eig [P, d] is numerically singular: [P]."""
    return eig[:, 0] <= RANK_CUT * eig[:, -1].clamp_min(1e-300)


def merge(a: Found, b: Found) -> Found:
    """a's solutions followed by b's, duplicates of earlier ones dropped (`Found.distinct`)."""
    return Found(torch.cat([a.z, b.z], 1), torch.cat([a.log_weight, b.log_weight], 1)).distinct()


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
) -> Found:
    """HOPS rounds: from each sample's HOP_FROM most probable preimages under p(z) and under
    q(z|x) not yet hopped from (those within HOP_WINDOW nats of the most probable), HOP_SCALE
    along each of J's `dirs` weakest right singular vectors, both ways, and Gauss-Newton from
    there. A fold's other branch lies across the unit whose slope is near 0, which is where J
    is weakest."""
    a, _, d = found.z.shape
    dirs_n = min(dirs, d)
    hopped = torch.zeros(found.log_weight.shape, dtype=torch.bool, device=h.device)
    for r in range(HOPS):
        k = min(HOP_FROM, found.z.shape[1])
        lw = found.log_weight
        pick = torch.zeros(lw.shape, dtype=torch.bool, device=h.device)
        own = torch.where(lw.isfinite(), lw + _ratios(found, mu, logvar), -math.inf)
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
        z, lw_new = _points(
            feats_of,
            latent_shape,
            name,
            h[rows].repeat_interleave(2 * dirs_n, dim=0),
            new.flatten(0, 1),
            seed + 1 + r,
        )
        # back to [A, most per sample], padded with no preimage
        owner = rows.repeat_interleave(2 * dirs_n)
        slot = torch.arange(owner.numel(), device=h.device) - torch.searchsorted(owner, owner)
        width = int(slot.max()) + 1
        zs = torch.zeros(a, width, d, dtype=torch.float64, device=h.device)
        ws = torch.full((a, width), -math.inf, dtype=torch.float64, device=h.device)
        zs[owner, slot], ws[owner, slot] = z, lw_new
        found = merge(found, Found(zs, ws))
        hopped = torch.cat([hopped, torch.zeros_like(ws, dtype=torch.bool)], dim=1)
    return found


def _ratios(found: Found, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log q(z_j|x)/p(z_j) at every solution [A, S], each sample's data point mu, logvar [A, d]."""
    a, s, d = found.z.shape
    return log_ratio_to_prior(
        found.z.reshape(a * s, d),
        mu.double().repeat_interleave(s, dim=0),
        logvar.double().repeat_interleave(s, dim=0),
    ).view(a, s)


def own_terms(found: Found, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log q(h|x)/p(h) for each sample [A] given its data point's mu, logvar [A, d], nats."""
    w = found.log_weight
    return torch.logsumexp(w + _ratios(found, mu, logvar), dim=1) - torch.logsumexp(w, dim=1)


def aggregate_terms(
    found: Found, mu: torch.Tensor, logvar: torch.Tensor, chunk_elems: int = 1 << 22
) -> torch.Tensor:
    """log q(h)/p(h) for each sample [A], q(h) = mean_n q(h|x_n) over all N data points mu,
    logvar [N, d], nats."""
    a, s, d = found.z.shape
    z = found.z.reshape(a * s, d)
    log_prior = -0.5 * (z.pow(2).sum(1) + d * math.log(2 * math.pi))
    base = found.log_weight.reshape(a * s) - log_prior  # w_j - log p(z_j)
    mu64, lv64 = mu.double().flatten(1), logvar.double().flatten(1)
    lse = torch.full((a * s,), -math.inf, dtype=torch.float64, device=z.device)
    chunk = max(1, chunk_elems // max(1, a * s))
    for start in range(0, mu64.shape[0], chunk):
        terms = log_mixture_terms(z, mu64[start : start + chunk], lv64[start : start + chunk])
        lse = torch.logaddexp(lse, torch.logsumexp(terms, dim=1))
    total = torch.where(found.log_weight.reshape(a * s).isfinite(), base + lse, -math.inf)
    n = mu64.shape[0]
    return (
        torch.logsumexp(total.view(a, s), dim=1)
        - math.log(n)
        - torch.logsumexp(found.log_weight, dim=1)
    )


@dataclass(frozen=True)
class Check:
    """What `check` measured on held-out samples: share whose own z the usual starts found
    unaided, mean change of log q(h|x)/p(h) (and its s.e.) when the starts are doubled, each
    set with the own z and hops (nats), share of own z with a rank-deficient Jacobian, mean
    distinct preimages per sample with the own z and hops, and the hop directions per preimage
    these were measured with (what `values` should use)."""

    coverage: float
    change: float
    change_se: float
    deficient: float
    preimages: float
    hop_dirs: int = HOP_DIRS

    @property
    def passed(self) -> bool:
        return (
            self.coverage >= MIN_COVERAGE
            and abs(self.change) + 2.0 * self.change_se <= STABLE
            and self.deficient <= RANK_DEFICIENT
        )


def check(
    feats_of: Features,
    name: str,
    bank: Bank,
    post: Posterior,
    generator: torch.Generator,
    samples: int = 512,
) -> Check:
    """Measure the search on `samples` held-out posterior samples (see the module docstring).
    Coverage on a first quarter of them, from the usual starts without the own z and no hops:
    below MIN_COVERAGE (|z| in 16 dimensions: 0.10) the layer fails at once. Then on all of
    them the values with the usual starts and with twice as many, each with the own z and
    hops, as `values` computes them; their mean difference is the `change`. The demo's
    random GELU layers: coverage 0.47-0.61, change -0.001 to -0.011 (s.e. 0.003-0.005)."""
    idx, z, h = _draw(feats_of, name, post, samples, generator)
    first = max(1, samples // 4)
    st = starts(feats_of, name, bank, h[:first], idx[:first], post, generator)
    found = search(feats_of, post.latent_shape, name, h[:first], st).distinct()
    coverage = _coverage(found, z[:first])
    if coverage < MIN_COVERAGE:
        return Check(coverage, math.inf, math.inf, math.nan, float(found.count.float().mean()))
    deficient = float(
        _rank_deficient(_gram_eigenvalues(feats_of, post.latent_shape, name, z, h.shape[1]))
        .float()
        .mean()
    )
    d = int(math.prod(post.latent_shape))
    # a layer whose values move when the starts double is checked again with more hop
    # directions (values then use them): a conv GELU layer (16 units on d = 16) read -0.046 +-
    # 0.004 with HOP_DIRS (values +0.20 nats from the enumerated truth) and -0.020 +- 0.003
    # with MORE_DIRS (+0.12), at twice the search's cost
    for dirs in sorted({min(HOP_DIRS, d), min(MORE_DIRS, d)}):
        plain, found, diffs = _doubling(feats_of, name, bank, post, generator, idx, z, h, dirs)
        change, change_se = _mean_se(diffs)
        # a verdict decided by the noise alone (the mean change within STABLE, its error bar
        # across it) is measured again on BORDERLINE times as many samples
        if abs(change) <= STABLE < abs(change) + 2.0 * change_se:
            idx2, z2, h2 = _draw(feats_of, name, post, (BORDERLINE - 1) * samples, generator)
            more = _doubling(feats_of, name, bank, post, generator, idx2, z2, h2, dirs)[2]
            change, change_se = _mean_se(torch.cat([diffs, more]))
        result = Check(
            coverage=_coverage(plain, z),
            change=change if math.isfinite(change) else math.inf,
            change_se=change_se if math.isfinite(change_se) else math.inf,
            deficient=deficient,
            preimages=float(found.count.float().mean()),
            hop_dirs=dirs,
        )
        if result.passed or deficient > RANK_DEFICIENT:
            break
    return result


def _doubling(
    feats_of: Features,
    name: str,
    bank: Bank,
    post: Posterior,
    generator: torch.Generator,
    idx: torch.Tensor,
    z: torch.Tensor,
    h: torch.Tensor,
    dirs: int,
) -> tuple[Found, Found, torch.Tensor]:
    """For samples idx [A] with latent z [A, d] and values h [A, D]: the usual starts' preimages
    alone, with the own z and hops (`dirs` directions) as `values` finds them, and the change
    of log q(h|x)/p(h) per sample [A] when the starts are doubled (each set with the own z and
    hops)."""
    mu, logvar = post.mu.flatten(1)[idx], post.logvar.flatten(1)[idx]
    # twice the starts, the usual ones among them, each set with the sample's own z and hops
    st = starts(feats_of, name, bank, h, idx, post, generator, 2 * NEAREST, 2 * OWN)
    st = torch.cat([st, z.unsqueeze(1)], dim=1)
    raw = search(feats_of, post.latent_shape, name, h, st)
    usual = list(range(OWN)) + list(range(2 * OWN, 2 * OWN + NEAREST))
    plain = raw.columns(usual).distinct()
    found = raw.columns([*usual, st.shape[1] - 1]).distinct()
    found = hop(feats_of, post.latent_shape, name, h, found, mu, logvar, dirs=dirs)
    more = hop(
        feats_of, post.latent_shape, name, h, raw.distinct(), mu, logvar, seed=HOPS, dirs=dirs
    )
    return plain, found, own_terms(more, mu, logvar) - own_terms(found, mu, logvar)


def values(
    feats_of: Features,
    name: str,
    bank: Bank,
    post: Posterior,
    samples: int,
    pair_samples: int,
    generator: torch.Generator,
    exact: ExactLatent | None,
    hop_dirs: int = HOP_DIRS,
    chunk_elems: int = 1 << 24,
) -> LayerRun:
    """KL from `samples` posterior samples, MI from the first `pair_samples` of them, aggregate
    KL = KL - MI. With `exact`, each sample's value is taken relative to the exact latent value
    of its own z (a control variate with known mean, as in the critics' evaluation). Hops take
    `hop_dirs` directions per preimage (`Check.hop_dirs`).

    Every sample's own z is among its starts, so each has a value. `preimage_coverage` is the
    share of the samples whose own z the other starts also found (before hops): how well the
    search does unaided; `preimages` is the mean number of distinct preimages per sample,
    hops included."""
    d = int(math.prod(post.latent_shape))
    mu_all, lv_all = post.mu.flatten(1), post.logvar.flatten(1)
    idx, z, h = _draw(feats_of, name, post, samples, generator)
    # hops add up to HOPS * 2 * HOP_FROM * 2 * hop_dirs starts per sample; the chunk counts
    # the first round's share
    per = max(
        1, chunk_elems // ((OWN + NEAREST + 4 * HOP_FROM * hop_dirs) * d * max(h.shape[1], 1))
    )
    own, agg, hits, counts = [], [], [], []
    for start in range(0, samples, per):
        sl = slice(start, start + per)
        # the own z last: the columns before it say whether the search finds it unaided
        st = starts(feats_of, name, bank, h[sl], idx[sl], post, generator)
        st = torch.cat([st, z[sl].unsqueeze(1)], dim=1)
        found = search(feats_of, post.latent_shape, name, h[sl], st, seed=start).distinct()
        hits.append(_hits(found.columns(list(range(st.shape[1] - 1))), z[sl]))
        found = hop(
            feats_of,
            post.latent_shape,
            name,
            h[sl],
            found,
            mu_all[idx[sl]],
            lv_all[idx[sl]],
            seed=start,
            dirs=hop_dirs,
        )
        own.append(own_terms(found, mu_all[idx[sl]], lv_all[idx[sl]]))
        take = min(per, pair_samples - start)  # MI from the first pair_samples only
        if take > 0:
            first = Found(found.z[:take], found.log_weight[:take])
            agg.append(aggregate_terms(first, mu_all, lv_all))
        counts.append(found.count)
    own_v = torch.cat(own)
    agg_v = torch.cat(agg)[:pair_samples]
    pair = slice(0, agg_v.shape[0])
    kl_terms, mi_terms_ = own_v, own_v[pair] - agg_v
    if exact is not None:
        z64 = z.double()
        mu64, lv64 = mu_all.double(), lv_all.double()
        kl_terms = kl_terms - log_ratio_to_prior(z64, mu64[idx], lv64[idx])
        mi_terms_ = mi_terms_ - mi_terms(z64[pair], idx[pair], mu64, lv64)
    kl, kl_se = _mean_se(kl_terms)
    mi, mi_se = _mean_se(mi_terms_)
    if exact is not None:
        kl += exact.kl
        mi, mi_se = mi + exact.mi, math.hypot(mi_se, exact.mi_se)
    return LayerRun(
        kl,
        kl_se,
        kl - mi,
        math.hypot(kl_se, mi_se),
        mi,
        mi_se,
        None,  # no critic
        preimages=float(torch.cat(counts).float().mean()),
        preimage_coverage=float(torch.cat(hits).float().mean()),
    )


@torch.no_grad()
def _draw(
    feats_of: Features, name: str, post: Posterior, samples: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`samples` posterior draws: data indices [A], latent z [A, d] and the layer's values
    [A, D]."""
    idx = torch.randint(post.n, (samples,), generator=generator, device=post.mu.device)
    mu, logvar = post.mu.flatten(1)[idx], post.logvar.flatten(1)[idx]
    eps = torch.randn(mu.shape, generator=generator, device=mu.device)
    z = mu + (0.5 * logvar).exp() * eps
    h = torch.cat([feats_of(c.view(-1, *post.latent_shape))[name] for c in z.split(4096)])
    return idx, z, h


def _hits(found: Found, z: torch.Tensor) -> torch.Tensor:
    """Whether each sample's own latent z [A, d] is among its distinct preimages: [A]."""
    near = (found.z - z.double().unsqueeze(1)).pow(2).mean(2) < SAME**2
    return (near & found.log_weight.isfinite()).any(dim=1)


def _coverage(found: Found, z: torch.Tensor) -> float:
    """Share of the samples whose own z is among the preimages found."""
    return float(_hits(found, z).float().mean())


def _mean_se(terms: torch.Tensor) -> tuple[float, float]:
    """`mean_se` of the finite terms (a sample with no preimage has none); nan where none is
    finite."""
    finite = terms[terms.isfinite()]
    return mean_se(finite) if finite.numel() > 0 else (math.nan, math.nan)
