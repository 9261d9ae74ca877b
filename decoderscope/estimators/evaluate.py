"""Reading trained (or warm-started) critics: KL, aggregate KL and MI from fresh samples that no
critic was trained on."""

from __future__ import annotations

import math
from collections.abc import Callable, Container
from dataclasses import dataclass, field

import torch

from .batches import Key, Progress, Sampler
from .exact import ExactLatent, log_ratio_to_prior, mi_terms
from .groups import Members
from .plan import Plan
from .runs import INVERSE, LayerRun
from .settings import Settings
from .stats import logsumexp_over_data, mean_se, with_control

ACCURACY_ROWS = 128  # data points per level the heads' held-out accuracy is read on
EVAL_PHASE = "evaluating"
REFINED_PHASE = "evaluating, refining R(h)"


@dataclass
class _Collected:
    """Per-sample terms gathered batch by batch, each a list of per-batch tensors."""

    own: dict[Key, list[torch.Tensor]]  # log q(h|x)/p(h) at posterior samples [B]
    correct: dict[Key, list[torch.Tensor]]  # each head's held-out accuracy [M]
    kept_h: dict[Key, list[torch.Tensor]]  # the posterior level's h of the first pair_samples
    kept_r: dict[Key, list[torch.Tensor]]  # their refined inverse (members that refine)
    agg_own: dict[Key, list[torch.Tensor]]  # plain: the aggregate critic's logit [B]
    kept_idx: list[torch.Tensor] = field(default_factory=list)  # their data indices [seeds, B]
    cv_kl: list[torch.Tensor] = field(default_factory=list)  # exact log q(z|x)/p(z) [seeds, B]
    kept_z: list[torch.Tensor] = field(default_factory=list)  # their z [seeds, B, d]


def _collect(
    run: Sampler,
    groups: list[Members],
    agg_groups: list[Members],
    exact: ExactLatent | None,
    warm: Container[Key],
    on_step: Progress | None = None,
) -> _Collected:
    """Draw `eval_samples` posterior samples per seed (batch_size at a time; every bridge level
    in the first batch, for the accuracy) and collect each member's terms; the first
    `pair_samples` keep their h (and refined inverse) for MI. The estimates read the critics at
    the posterior level alone; the heads' accuracy (a diagnostic) is read at every level on
    the first ACCURACY_ROWS data points: a refined inverse costs a Gauss-Newton solve per row,
    and reading every level of every batch multiplied the evaluation's cost by the number of
    levels (17 on a conv VAE of digits).
    Members whose inverse is refined read their KL and MI terms on the first
    `refined_samples` where the exact control variate is there (the rest of their rows get
    R(h) alone, read by no estimate), and on every sample without it. Members in `warm` (read
    as `inverse`: heads kept at their warm start, the exact latent log-ratio at R(h)) that
    refine get no accuracy: their heads are the latent's at about z, and refining every
    level's rows cost four times their evaluation."""
    post, settings, seeds = run.post, run.settings, run.seeds
    mu_all, logvar_all = post.mu.flatten(1).double(), post.logvar.flatten(1).double()
    n_levels, b = run.lv.shape[0], settings.batch_size
    keys = [k for g in groups for k in g.keys]
    out = _Collected(
        {k: [] for k in keys},
        {k: [] for k in keys},
        {k: [] for k in keys},
        {k: [] for k in keys},
        {k: [] for g in agg_groups for k in g.keys},
    )
    report = _reporter(run, groups, exact, on_step)
    drawn = 0
    while drawn < settings.eval_samples:
        # every level for the heads' accuracy (first batch), then the posterior's alone: the
        # estimates read no other level
        levels = n_levels if drawn == 0 else 1
        idx, feats, z_by_seed = run.batch(b, posterior_only=drawn > 0)
        keep = drawn < settings.pair_samples
        if exact is not None:
            # the posterior level's latent samples, seed by seed, as idx.flatten() orders them
            zp = z_by_seed[:, -b:].reshape(seeds * b, -1).double()
            flat = idx.flatten()
            out.cv_kl.append(log_ratio_to_prior(zp, mu_all[flat], logvar_all[flat]).view(seeds, b))
            if keep:
                out.kept_z.append(zp.view(seeds, b, -1))
        # a refined inverse costs a Gauss-Newton solve per sample: its members' terms are read
        # on the first `refined_samples`; with the control variate they are near 0 wherever
        # R(h) finds z, so fewer samples keep the s.e. small
        m = _refined_rows(drawn, b, settings, exact)
        for g in groups:
            # a group whose members all refine reads no KL term past their refined rows: after
            # those and the pair samples, its batches cost nothing (the diffusers
            # AutoencoderKL's `inverse` members: 14 of 16 batches)
            reads = _reads(g, m)
            if not (reads or keep or drawn == 0):
                continue
            h = g.stack(feats, seeds, b).view(len(g.keys), levels, b, -1)
            _read_group(out, g, h[:, -1], idx, m, keep, reads)
            if drawn == 0:  # the heads' held-out accuracy at every level
                for key, acc in _head_accuracy(g, h, idx, warm).items():
                    out.correct[key].append(acc)
        for g in agg_groups:
            logit = g.logits(g.stack(feats, seeds, b), idx).view(len(g.keys), levels, b)
            for k, key in enumerate(g.keys):
                out.agg_own[key].append(logit[k, -1])
        if keep:
            out.kept_idx.append(idx)
        report(drawn // b)
        drawn += b
    return out


def _reads(g: Members, m: int) -> bool:
    """Whether g reads KL terms from a batch whose first m rows its refining members read:
    always where one of its members does not refine."""
    return m > 0 or any(key not in g.refined for key in g.keys)


def _read_group(
    out: _Collected,
    g: Members,
    last: torch.Tensor,
    idx: torch.Tensor,
    m: int,
    keep: bool,
    reads: bool,
) -> None:
    """One batch's terms of g's members into `out`, from their posterior level's h [G, B, D]
    drawn for idx [seeds, B]: where g `reads` the batch (`_reads`), log q(h|x)/p(h) per row
    (members that refine: their first m rows alone), and for the pair samples (`keep`) h and
    its inverse."""
    inverse = g.inverse(last, rows=m)
    if reads:
        total = g.logits(last, idx, inverse).sum(dim=2)  # [G, B] log q(h|x)/p(h)
        for k, key in enumerate(g.keys):
            if key not in g.refined:
                out.own[key].append(total[k])
            elif m:
                out.own[key].append(total[k, :m])
    if keep:
        for k, key in enumerate(g.keys):
            out.kept_h[key].append(last[k])
            if inverse is not None:
                out.kept_r[key].append(inverse[k])


def _head_accuracy(
    g: Members, h: torch.Tensor, idx: torch.Tensor, warm: Container[Key]
) -> dict[Key, torch.Tensor]:
    """Each head's held-out accuracy [M] per member of g not both `warm` and refined, on the
    first ACCURACY_ROWS data points of h [G, L, B, D] (every level) drawn for idx [seeds, B]."""
    n_levels, a = h.shape[1], min(ACCURACY_ROWS, h.shape[2])
    heads = n_levels - 1
    head = torch.arange(heads, device=h.device)
    rows = h[:, :, :a].reshape(len(g.keys), n_levels * a, -1)
    read = [key for key in g.keys if not (key in g.refined and key in warm)]
    r = g.inverse(rows, read)
    logit = g.logits(rows, idx[:, :a], r).view(len(g.keys), n_levels, a, heads)
    pos, neg = logit[:, head + 1, :, head], logit[:, head, :, head]
    acc = 0.5 * ((pos > 0).float().mean(dim=2) + (neg < 0).float().mean(dim=2))
    return {key: acc[:, k] for k, key in enumerate(g.keys) if key in read}


def _refined_rows(drawn: int, b: int, settings: Settings, exact: ExactLatent | None) -> int:
    """How many of the b rows of the batch after `drawn` samples members that refine read
    (through their refined inverse): those among the first `refined_samples` with the exact
    control variate; every row without it."""
    return b if exact is None else max(0, min(b, settings.refined_samples - drawn))


def _reporter(
    run: Sampler, groups: list[Members], exact: ExactLatent | None, on_step: Progress | None
) -> Callable[[int], None]:
    """Progress per evaluation batch (by its number from 0). Batches whose rows are refined
    through the decoder (`_collect`: the first `refined_samples` with the exact control
    variate, else all) cost far more than the rest (on diffusers' AutoencoderKL
    most of the inspection), so each kind is a phase of its own and its time left is read
    from batches like it; one phase where no member refines."""
    settings, b = run.settings, run.settings.batch_size
    total = math.ceil(settings.eval_samples / b)
    slow = 0
    if any(g.refined for g in groups):  # the refining batches come first
        slow = sum(_refined_rows(k * b, b, settings, exact) > 0 for k in range(total))

    def report(k: int) -> None:
        if on_step is None:
            return
        if k < slow:
            on_step(REFINED_PHASE, k + 1, slow)
        else:
            on_step(EVAL_PHASE, k + 1 - slow, total - slow)

    return report


def evaluate(
    run: Sampler,
    groups: list[Members],
    agg_groups: list[Members],
    exact: ExactLatent | None,
    plan: Plan,
    on_step: Progress | None = None,
) -> list[dict[str, LayerRun]]:
    """KL from `eval_samples` posterior samples per seed, MI from the first `pair_samples` of them
    (`pair_mi`), aggregate KL = KL - MI; one {name: LayerRun} per seed, each row read by the
    method `plan` chose.

    With `exact`, each sample's estimate is taken relative to the exact latent value of the z it
    came from: KL = mean(T(h) - log q(z|x)/p(z)) + exact KL, and MI likewise with the exact
    per-sample MI term plus the exact-density MI (whose Monte Carlo error enters the se). Both
    control variates have known means, so the estimates stay unbiased; where the layer keeps
    the latent's information, T(h) tracks the exact term and the evaluation noise nearly
    cancels (warm-started critics at the latent, d=16, KL 8: errors +0.04 / +0.10 / -0.06
    without it, -0.02 / -0.02 / -0.00 with it)."""
    warm = {key for key, method in plan.methods.items() if method == INVERSE}
    got = _collect(run, groups, agg_groups, exact, warm, on_step)
    post, settings, seeds = run.post, run.settings, run.seeds
    pair_idx = torch.cat(got.kept_idx, dim=1)[:, : settings.pair_samples]  # [seeds, E]
    kl_cv = mi_cv = None
    ex_kl, ex_mi, ex_se = (exact.kl, exact.mi, exact.mi_se) if exact is not None else (0.0,) * 3
    if exact is not None:
        mu_all, logvar_all = post.mu.flatten(1).double(), post.logvar.flatten(1).double()
        kl_cv = torch.cat(got.cv_kl, dim=1)  # [seeds, eval rows]
        zs = torch.cat(got.kept_z, dim=1)[:, : settings.pair_samples]  # [seeds, E, d]
        mi_cv = torch.stack(
            [mi_terms(zs[s], pair_idx[s], mu_all, logvar_all) for s in range(seeds)]
        )
    results: list[dict[str, LayerRun]] = [{} for _ in range(seeds)]
    for g in groups:
        pair_terms = None
        if not agg_groups:
            hp = torch.stack([torch.cat(got.kept_h[k])[: settings.pair_samples] for k in g.keys])
            rp = None
            if got.kept_r[g.keys[0]]:
                rp = torch.stack(
                    [torch.cat(got.kept_r[k])[: settings.pair_samples] for k in g.keys]
                )
            pair_terms = pair_mi(g, hp, pair_idx, post.n, rp)
        for k, key in enumerate(g.keys):
            name, seed = key
            kl_vals = torch.cat(got.own[key])  # fewer where the inverse is refined
            kl, kl_se = with_control(kl_vals, _first(kl_cv, seed, len(kl_vals)), ex_kl, 0.0)
            if pair_terms is not None:
                # a member that refines takes its MI terms from the rows it refined alone
                terms = pair_terms[k][: len(kl_vals)] if key in g.refined else pair_terms[k]
                mi, mi_se = with_control(terms, _first(mi_cv, seed, len(terms)), ex_mi, ex_se)
                agg, agg_se = kl - mi, math.hypot(kl_se, mi_se)
            else:
                agg_vals = torch.cat(got.agg_own[key])
                agg, agg_se = mean_se(agg_vals)
                mi, mi_se = mean_se(kl_vals - agg_vals)
            results[seed][name] = LayerRun(
                kl,
                kl_se,
                agg,
                agg_se,
                mi,
                mi_se,
                plan.methods[key],
                accuracy=_accuracy(got.correct[key]),
                inverse_blur=None if plan.blur is None else plan.blur[key],
            )
    return results


def _accuracy(correct: list[torch.Tensor]) -> float | None:
    """The highest head's held-out accuracy; None where it was not read."""
    return float(torch.stack(correct).mean(0).max()) if correct else None


def _first(control: torch.Tensor | None, seed: int, rows: int) -> torch.Tensor | None:
    """The first `rows` of seed's control variates [seeds, rows...]; None without them."""
    return None if control is None else control[seed, :rows]


def pair_mi(
    g: Members,
    h: torch.Tensor,
    idx: torch.Tensor,
    n_data: int,
    inverse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample MI terms T(h_i, c_i) - log mean_n exp T(h_i, c_n): [G, E], for h [G, E, D]
    with data indices idx [seeds, E]; `inverse`: `g.inverse(h)` where the caller has it.

    The aggregate ratio q_k(h)/p_k(h) = mean_n q_k(h|x_n)/p_k(h) is exact, so each term is at most
    log N. Cost: one [E, P] x [P, N] product per member (separable critic), in chunks of the data.
    """
    groups, e, _ = h.shape
    critic = g.separable_critic
    inverse = g.inverse(h) if inverse is None else inverse  # once, not per chunk
    own = critic(h, g.c[idx[g.seed_of]], inverse).sum(dim=2)  # [G, E]
    lse = logsumexp_over_data(
        lambda i, j: critic.pair_totals(h, g.c[i:j], inverse),
        n_data,
        max(1, (1 << 22) // max(1, groups * e)),
        own,
    )
    return own - (lse - math.log(n_data))
