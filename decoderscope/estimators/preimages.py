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

They are found by `search.py`: Gauss-Newton through the decoder from the sample's own z
(known: we drew it), the mean and draws of its posterior q(z|x), and the latent draws of a
fixed bank whose h is nearest; then hops from the most probable preimages found, across the
folds next to them. 16 GELUs on a 16-d latent with broad posteriors (~2^8 preimages, a few
probable): 0.94 of p(h)'s and 0.95 of q(h|x)'s weight found, log-ratio off by +0.02 nats
against an enumerated truth (without the own z and hops: 0.81, -0.78; docs/method.md).

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
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..sampling import Posterior
from .batches import Features, draw_posterior
from .exact import ExactLatent, log_mixture_terms, log_ratio_to_prior, mi_terms
from .runs import PREIMAGES, LayerRun
from .search import (
    HOP_DIRS,
    HOP_FROM,
    HOPS,
    MORE_DIRS,
    NEAREST,
    OWN,
    SAME,
    Bank,
    Found,
    gram_eigenvalues,
    hop,
    rank_deficient,
    ratios,
    search,
    starts,
    weigh,
)
from .stats import finite_mean_se, logsumexp_over_data, with_control

PREIMAGE_PHASE = "reading preimages"
MIN_COVERAGE = 0.25  # below this share found unaided the check fails at once
STABLE = 0.05  # nats the mean log-ratio may move (plus twice its s.e.) when the starts double
BORDERLINE = 4  # times the check's samples where its error bar straddles STABLE
RANK_DEFICIENT = 0.01  # share of own z with a rank-deficient Jacobian tolerated


def own_terms(found: Found, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log q(h|x)/p(h) for each sample [A] given its data point's mu, logvar [A, d], nats."""
    w = found.log_weight
    return torch.logsumexp(w + ratios(found, mu, logvar), dim=1) - torch.logsumexp(w, dim=1)


def aggregate_terms(
    found: Found, mu: torch.Tensor, logvar: torch.Tensor, chunk_elems: int = 1 << 22
) -> torch.Tensor:
    """log q(h)/p(h) for each sample [A], q(h) = mean_n q(h|x_n) over all N data points mu,
    logvar [N, d], nats."""
    a, s, d = found.z.shape
    weight = found.log_weight.reshape(a * s)
    # the preimages alone: most of the starts' slots are duplicates (weight -inf)
    at = weight.isfinite().nonzero().squeeze(1)
    z = found.z.reshape(a * s, d)[at]
    log_prior = -0.5 * (z.pow(2).sum(1) + d * math.log(2 * math.pi))
    base = weight[at] - log_prior  # w_j - log p(z_j)
    mu64, lv64 = mu.double().flatten(1), logvar.double().flatten(1)
    lse = logsumexp_over_data(
        lambda i, j: log_mixture_terms(z, mu64[i:j], lv64[i:j]),
        mu64.shape[0],
        max(1, chunk_elems // max(1, at.numel())),
        base,
    )
    total = torch.full_like(weight, -math.inf)
    total[at] = base + lse
    n = mu64.shape[0]
    return (
        torch.logsumexp(total.view(a, s), dim=1)
        - math.log(n)
        - torch.logsumexp(found.log_weight, dim=1)
    )


class _Layer(NamedTuple):
    """One folding layer's search: the tapped decoder, the layer's name, its bank of starts, the
    posterior, and the generator the starts are drawn with."""

    feats_of: Features
    name: str
    bank: Bank
    post: Posterior
    generator: torch.Generator


@dataclass(frozen=True)
class Check:
    """What `check` measured on held-out samples: share whose own z the usual starts found
    unaided, mean change of log q(h|x)/p(h) (and its s.e.) when the starts are doubled, each
    set with the own z and hops (nats), share of own z with a rank-deficient Jacobian, mean
    distinct preimages per sample with the own z and hops, and the hop directions per preimage
    these were measured with, and the rounds of hops (what `values` should use)."""

    coverage: float
    change: float
    change_se: float
    deficient: float
    preimages: float
    hop_dirs: int = HOP_DIRS
    hop_rounds: int = HOPS

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
    idx, z, h = draw_posterior(feats_of, name, post, samples, generator)
    first = max(1, samples // 4)
    st = starts(feats_of, name, bank, h[:first], idx[:first], post, generator)
    found = weigh(
        feats_of,
        post.latent_shape,
        name,
        h.shape[1],
        search(feats_of, post.latent_shape, name, h[:first], st),
    )
    coverage = _coverage(found, z[:first])
    if coverage < MIN_COVERAGE:
        return Check(coverage, math.inf, math.inf, math.nan, float(found.count.float().mean()))
    deficient = float(
        rank_deficient(gram_eigenvalues(feats_of, post.latent_shape, name, z, h.shape[1]))
        .float()
        .mean()
    )
    d = int(math.prod(post.latent_shape))
    layer = _Layer(feats_of, name, bank, post, generator)
    # a layer whose values move when the starts double is checked again with more hop
    # directions (values then use them): a conv GELU layer (16 units on d = 16) read -0.046 +-
    # 0.004 with HOP_DIRS (values +0.20 nats from the enumerated truth) and -0.020 +- 0.003
    # with MORE_DIRS (+0.12), at twice the search's cost. Where J has no more directions
    # (d <= HOP_DIRS), with one more round of hops: |z| at d = 4 (16 preimages) moved -0.054 +-
    # 0.005 with HOPS rounds (its critic then read KL 2.89 against 2.65), -0.042 +- 0.003 with
    # one more (values 2.72); more rounds found no more (15.0 distinct preimages per sample)
    first = min(HOP_DIRS, d)
    retry = (min(MORE_DIRS, d), HOPS) if d > HOP_DIRS else (first, HOPS + 1)
    for dirs, rounds in ((first, HOPS), retry):
        plain, found, diffs = _doubling(layer, idx, z, h, dirs, rounds)
        change, change_se = finite_mean_se(diffs)
        # a verdict decided by the noise alone (the mean change within STABLE, its error bar
        # across it) is measured again on BORDERLINE times as many samples
        if abs(change) <= STABLE < abs(change) + 2.0 * change_se:
            idx2, z2, h2 = draw_posterior(
                feats_of, name, post, (BORDERLINE - 1) * samples, generator
            )
            more = _doubling(layer, idx2, z2, h2, dirs, rounds)[2]
            change, change_se = finite_mean_se(torch.cat([diffs, more]))
        result = Check(
            coverage=_coverage(plain, z),
            change=change if math.isfinite(change) else math.inf,
            change_se=change_se if math.isfinite(change_se) else math.inf,
            deficient=deficient,
            preimages=float(found.count.float().mean()),
            hop_dirs=dirs,
            hop_rounds=rounds,
        )
        if result.passed or deficient > RANK_DEFICIENT:
            break
    return result


def _doubling(
    layer: _Layer, idx: torch.Tensor, z: torch.Tensor, h: torch.Tensor, dirs: int, rounds: int
) -> tuple[Found, Found, torch.Tensor]:
    """For samples idx [A] with latent z [A, d] and values h [A, D]: the usual starts' preimages
    alone, with the own z and hops (`dirs` directions, `rounds` rounds) as `values` finds them,
    and the change of log q(h|x)/p(h) per sample [A] when the starts are doubled (each set with
    the own z and hops)."""
    feats_of, name, bank, post, generator = layer
    mu, logvar = post.mu.flatten(1)[idx], post.logvar.flatten(1)[idx]
    # twice the starts, the usual ones among them, each set with the sample's own z and hops
    st = starts(feats_of, name, bank, h, idx, post, generator, 2 * NEAREST, 2 * OWN)
    st = torch.cat([st, z.unsqueeze(1)], dim=1)
    shape, width = post.latent_shape, h.shape[1]
    raw = search(feats_of, shape, name, h, st)
    usual = list(range(OWN)) + list(range(2 * OWN, 2 * OWN + NEAREST))
    plain = weigh(feats_of, shape, name, width, raw.columns(usual))
    found = weigh(feats_of, shape, name, width, raw.columns([*usual, st.shape[1] - 1]))
    found = hop(feats_of, shape, name, h, found, mu, logvar, dirs=dirs, rounds=rounds)
    more = weigh(feats_of, shape, name, width, raw)
    more = hop(feats_of, shape, name, h, more, mu, logvar, seed=rounds, dirs=dirs, rounds=rounds)
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
    hop_rounds: int = HOPS,
) -> LayerRun:
    """KL from `samples` posterior samples, MI from the first `pair_samples` of them, aggregate
    KL = KL - MI. With `exact`, each sample's value is taken relative to the exact latent value
    of its own z (a control variate with known mean, as in the critics' evaluation). Hops take
    `hop_dirs` directions per preimage, `hop_rounds` rounds (`Check.hop_dirs`, `hop_rounds`).

    Every sample's own z is among its starts, so each has a value. `preimage_coverage` is the
    share of the samples whose own z the other starts also found (before hops): how well the
    search does unaided; `preimages` is the mean number of distinct preimages per sample,
    hops included."""
    mu_all, lv_all = post.mu.flatten(1), post.logvar.flatten(1)
    idx, z, h = draw_posterior(feats_of, name, post, samples, generator)
    layer = _Layer(feats_of, name, bank, post, generator)
    own_v, agg_v, hits, counts = _search_all(layer, idx, z, h, pair_samples, hop_dirs, hop_rounds)
    pair = slice(0, agg_v.shape[0])
    kl_cv = mi_cv = None
    if exact is not None:
        z64, mu64, lv64 = z.double(), mu_all.double(), lv_all.double()
        kl_cv = log_ratio_to_prior(z64, mu64[idx], lv64[idx])
        mi_cv = mi_terms(z64[pair], idx[pair], mu64, lv64)
    exact_kl, exact_mi, exact_se = (
        (exact.kl, exact.mi, exact.mi_se) if exact is not None else (0.0,) * 3
    )
    kl, kl_se = with_control(own_v, kl_cv, exact_kl, 0.0, finite_mean_se)
    mi, mi_se = with_control(own_v[pair] - agg_v, mi_cv, exact_mi, exact_se, finite_mean_se)
    return LayerRun(
        kl,
        kl_se,
        kl - mi,
        math.hypot(kl_se, mi_se),
        mi,
        mi_se,
        PREIMAGES,
        preimages=float(counts.float().mean()),
        preimage_coverage=float(hits.float().mean()),
    )


def _search_all(
    layer: _Layer,
    idx: torch.Tensor,
    z: torch.Tensor,
    h: torch.Tensor,
    pair_samples: int,
    hop_dirs: int,
    hop_rounds: int,
    chunk_elems: int = 1 << 24,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every sample's preimages, searched in chunks: log q(h|x)/p(h) per sample [A], log
    q(h)/p(h) for the first `pair_samples` [E], whether the search found the own z unaided [A],
    and the distinct preimages per sample [A]."""
    feats_of, name, bank, post, generator = layer
    d = int(math.prod(post.latent_shape))
    mu_all, lv_all = post.mu.flatten(1), post.logvar.flatten(1)
    # hops add up to HOPS * 2 * HOP_FROM * 2 * hop_dirs starts per sample; the chunk counts
    # the first round's share
    per = max(
        1, chunk_elems // ((OWN + NEAREST + 4 * HOP_FROM * hop_dirs) * d * max(h.shape[1], 1))
    )
    own, agg, hits, counts = [], [], [], []
    for start in range(0, h.shape[0], per):
        sl = slice(start, start + per)
        mu, logvar = mu_all[idx[sl]], lv_all[idx[sl]]
        # the own z last: the columns before it say whether the search finds it unaided
        st = starts(feats_of, name, bank, h[sl], idx[sl], post, generator)
        st = torch.cat([st, z[sl].unsqueeze(1)], dim=1)
        sol = search(feats_of, post.latent_shape, name, h[sl], st, seed=start)
        found = weigh(feats_of, post.latent_shape, name, h.shape[1], sol)
        hits.append(_hits(found.columns(list(range(st.shape[1] - 1))), z[sl]))
        found = hop(
            feats_of, post.latent_shape, name, h[sl], found, mu, logvar, seed=start,
            dirs=hop_dirs, rounds=hop_rounds,
        )  # fmt: skip
        own.append(own_terms(found, mu, logvar))
        take = min(per, pair_samples - start)  # MI from the first pair_samples only
        if take > 0:
            first = Found(found.z[:take], found.log_weight[:take])
            agg.append(aggregate_terms(first, mu_all, lv_all))
        counts.append(found.count)
    return torch.cat(own), torch.cat(agg)[:pair_samples], torch.cat(hits), torch.cat(counts)


def _hits(found: Found, z: torch.Tensor) -> torch.Tensor:
    """Whether each sample's own latent z [A, d] is among its distinct preimages: [A]."""
    near = (found.z - z.double().unsqueeze(1)).pow(2).mean(2) < SAME**2
    return (near & found.log_weight.isfinite()).any(dim=1)


def _coverage(found: Found, z: torch.Tensor) -> float:
    """Share of the samples whose own z is among the preimages found."""
    return float(_hits(found, z).float().mean())
