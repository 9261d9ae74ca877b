"""One run of the estimator on a set of tapped layers: plan how each layer is read, train the
critics that need it, and read every layer.

Each step draws one batch of data indices, samples every bridge level for them (prior, bridges,
posterior), runs the decoder ONCE on all of it with every chosen layer tapped, and updates every
layer's critic together. Evaluation uses fresh samples that no critic was trained on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch

from ..sampling import Posterior
from ..taps import grad_mode
from .affine import AffineLayer, affine_values
from .batches import Features, Key, Lazy, Progress, Sampler
from .beside import Beside, polling
from .evaluate import evaluate
from .exact import ExactLatent
from .groups import Members, Refiner
from .inverse import RESTARTS, Starts, refine
from .loop import train_critics
from .plan import (
    FoldSearch,
    Plan,
    Structural,
    find_affine,
    imply,
    latent_valued,
    make_plan,
    patience,
)
from .precision import resolved
from .preimages import PREIMAGE_PHASE, Bank
from .preimages import values as preimage_values
from .refinement import Carry, choose_refinement
from .regression import fit_regressions, start_regressions
from .runs import INJECTIVE, LATENT, PREIMAGES, UNRESOLVED, LayerRun, RunResult
from .settings import Settings
from .whitening import whitened


def _conditioning(post: Posterior, plain: bool) -> torch.Tensor:
    """The critics' conditioning c [N, C]: (mu, logvar) as the paper has it (plain); for the
    telescoping critics a fixed affine map of it (same information), centred but never scaled
    up, followed by the raw (mu, logvar) for the exact latent terms. Scaling collapsed units'
    jitter (std 0.01) up to unit size let the critic fit spurious functions of it, and the
    log-mean-exp over the data read MI 1.34 against an exact 1.93."""
    c = post.conditioning()
    if plain:
        return c
    c = (c - c.mean(0)) / c.std(0, unbiased=False).clamp_min(1.0)
    return torch.cat([c, post.mu.flatten(1), post.logvar.flatten(1)], dim=1)


def _build_groups(
    widths: dict[str, int],
    names: Sequence[str],
    post: Posterior,
    lv: torch.Tensor,
    settings: Settings,
    seeds: int,
) -> tuple[list[Members], list[Members]]:
    """One critic group per layer width over every (layer, seed), and for the plain method one
    aggregate-critic group per width."""
    plain = settings.plain
    c = _conditioning(post, plain)
    heads = lv.shape[0] - 1
    latent_dim = int(math.prod(post.latent_shape))
    by_width: dict[int, list[Key]] = {}
    for n in names:
        for s in range(seeds):
            by_width.setdefault(widths[n], []).append((n, s))
    groups: list[Members] = []
    agg_groups: list[Members] = []
    for width, keys in by_width.items():
        if plain:
            agg_groups.append(Members(keys, width, 1, settings, c[:, :0], separable=False))
        groups.append(
            Members(
                keys, width, heads, settings, c, separable=not plain, latent=latent_dim, levels=lv
            )
        )
    return groups, agg_groups


def _plan(
    run: Sampler,
    groups: list[Members],
    affine: dict[str, AffineLayer],
    on_step: Progress | None,
    determines: Mapping[str, frozenset[str]],
    order: Sequence[str],
) -> tuple[Plan, int]:
    """Fit the inverses R(h) (alone: their precision bounds every estimate after a
    nonlinearity), decide where they are refined through the decoder, look for folding layers'
    preimages, and choose every member's reader, carrying the latent's values upstream where
    a layer read at them reads z only through another (`plan.imply`). Returns the plan and the
    regression steps."""
    settings = run.settings
    if settings.plain or settings.regression_steps == 0:
        return make_plan(groups, affine, {}, None, settings), 0
    carry = None
    if determines and settings.patience > 0:  # else refined layers are not read `inverse`
        d = int(math.prod(run.post.latent_shape))
        carry = Carry(determines, latent_valued(affine, d), tuple(order))
    folds = (
        FoldSearch(run, carry, on_step)
        if settings.preimages and settings.newton_steps > 0
        else None
    )

    def settle(groups: list[Members], prices: list[torch.Tensor]) -> set[Key]:
        """Members whose R is no longer needed: of folding layers, and of layers a later one
        refined in every seed settles (`carry`)."""
        keys = set() if folds is None else folds.settle(groups, prices)
        done = set() if carry is None else carry.layers(groups)
        return keys | {key for g in groups for key in g.all_keys if key[0] in done}

    r_steps, blur = fit_regressions(run, groups, on_step, settle, carry)
    blur = choose_refinement(run, groups, blur, carry)
    if folds is not None:
        folds.finish(groups, blur)
    found, costly = ({}, {}) if folds is None else (folds.found, folds.costly)
    plan = make_plan(groups, affine, found, blur, settings, costly)
    return imply(plan, groups, determines, run.post), r_steps


def run_critics(
    features: Features,
    names: Sequence[str],
    post: Posterior,
    levels: Sequence[float],
    settings: Settings,
    generator: torch.Generator,
    on_step: Progress | None = None,
    seeds: int = 1,
    exact: ExactLatent | None = None,
    structural: Structural | None = None,
    determines: Mapping[str, frozenset[str]] | None = None,
) -> RunResult:
    """Read `latent` + `names`, `seeds` independent runs at once.

    features(z [n, *latent_shape]) -> {name: h [n, ...]} runs the tapped decoder once. Every
    seed's critics see only their own rows, so the runs are independent apart from the fixed
    whitening maps fitted once per decoder. post lives on the compute device. Memory is bounded
    by levels x seeds x batch_size x layer widths, never by the number of samples drawn.

    exact: the latent's exact values; with it (telescoping only) the evaluation subtracts the
    exact latent log-ratio of each sample's own z as a control variate (`evaluate.evaluate`).
    structural: the layers affine by construction, with a float64 way to compute them.
    determines: {layer: the later layers that are functions of it alone}
    (`dependence.determined`): a layer one of which is read at the latent's values holds them
    too (`plan.imply`).
    """
    device = post.mu.device
    plain = settings.plain
    lv = torch.tensor(list(levels), dtype=torch.float32, device=device)
    # the layers feats_of returns: all of them until the affine ones are found, then only those
    # read by another method (an affine layer's features would be mapped every step for nothing)
    served = list(names)

    def raw_feats(z: torch.Tensor) -> Mapping[str, torch.Tensor]:
        out = features(z)

        def compute(name: str) -> torch.Tensor:
            with grad_mode(z):  # inference mode, except for the Jacobians of `inverse.refine`
                return (z if name == LATENT else out[name]).flatten(1).float()

        return Lazy([*served, LATENT], compute)

    feats_of: Features = raw_feats if plain else whitened(raw_feats, post, generator)
    affine = {}
    if settings.reads_affine and names:
        affine = find_affine(
            feats_of, names, post, settings.affine_tol, generator, structural, raw_feats
        )
    served = [n for n in names if n not in affine]
    # a layer that reshapes another served one holds its values: read once, its row copied
    copies = {} if structural is None else structural.copies
    copies = {n: src for n, src in copies.items() if n in served and src in served}
    served = [n for n in served if n not in copies]
    if not resolved(post):
        results = [_unread([LATENT, *served]) for _ in range(seeds)]
        plan = Plan({}, affine, {}, None)
        _affine_rows(plan, post, settings, generator, exact, results)
        return RunResult(_copied(results, copies), 0, 0, _bases(affine))
    z0 = torch.randn(2, *post.latent_shape, generator=generator, device=device)
    widths = {n: int(h.shape[1]) for n, h in feats_of(z0).items()}
    groups, agg_groups = _build_groups(widths, [LATENT, *served], post, lv, settings, seeds)
    if not plain:
        start_regressions(feats_of, groups, post, generator)
        if settings.newton_steps > 0:
            for g in groups:
                g.refiner = _refiner(feats_of, post, settings.newton_steps)
    for g in groups + agg_groups:
        g.critic.to(device)
    run = Sampler(feats_of, post, lv, settings, generator, seeds)
    plan, r_steps = _plan(run, groups, affine, on_step, determines or {}, [LATENT, *served])
    groups = _read_by_critics(groups, plan)
    steps, results = _train_and_read(run, groups, agg_groups, plan, exact, on_step)
    _affine_rows(plan, post, settings, generator, exact, results)
    return RunResult(_copied(results, copies), steps, r_steps, _bases(plan.affine))


def _train_and_read(
    run: Sampler,
    groups: list[Members],
    agg_groups: list[Members],
    plan: Plan,
    exact: ExactLatent | None,
    on_step: Progress | None,
) -> tuple[int, list[dict[str, LayerRun]]]:
    """Train the critics and evaluate them; the folding layers' readings need only the plan, so
    they run beside the training, on a random stream of their own wherever they run
    (`beside.py`). Returns the steps run and every seed's rows but the affine layers'."""
    settings, plain, seeds = run.settings, run.settings.plain, run.seeds
    per_member = patience(plan, groups, settings) if not plain and settings.patience > 0 else None
    device = run.post.mu.device
    stream = torch.Generator(device=device).manual_seed(run.generator.initial_seed() + 1)

    def fold_rows(report: Progress | None) -> list[dict[str, LayerRun]]:
        return _preimage_rows(run.feats_of, plan, run.post, settings, stream, exact, seeds, report)

    with Beside(fold_rows, device, on_step, fork=bool(plan.folds)) as side:
        steps = train_critics(run, groups, agg_groups, per_member, polling([side], on_step))
        with torch.no_grad():
            results = evaluate(run, groups, agg_groups, None if plain else exact, plan, on_step)
        folded = side.collect()
    for res, rows in zip(results, folded, strict=True):
        # rows whose preimage search was too costly say what it would take
        res.update({n: replace(res[n], preimage_flops=c) for n, c in plan.costly.items()})
        res.update(rows)
    return steps, results


def _read_by_critics(groups: list[Members], plan: Plan) -> list[Members]:
    """The groups holding only the members their critics read: those read without it
    (`preimages`, `injective`: `_preimage_rows`, `_affine_rows`) leave, and so does a group
    left empty."""
    critics = {key for key, method in plan.methods.items() if method not in (PREIMAGES, INJECTIVE)}
    for g in groups:
        g.keep(critics)
    return [g for g in groups if g.all_keys]


def _refiner(feats_of: Features, post: Posterior, steps: int) -> Refiner:
    """R(h) refined through the decoder (`inverse.refine`), its last restarts from the banks."""
    nearest = _bank_starts(feats_of, post)

    def refiner(names: Sequence[str], r: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return refine(feats_of, post.latent_shape, names, r, h, steps, nearest)

    return refiner


def _bank_starts(feats_of: Features, post: Posterior) -> Starts:
    """`inverse.refine`'s last restarts: the RESTARTS draws of a fixed bank (`search.Bank`, its
    own generator, so no other draw moves) nearest in h, a bank per layer, built for a layer
    only once a sample of it is left unsolved (each holds 8192 x its width values)."""
    banks: dict[str, Bank] = {}
    generator = torch.Generator(device=post.mu.device).manual_seed(0)

    def nearest(layers: Sequence[str], h: torch.Tensor) -> torch.Tensor:
        out = h.new_empty(h.shape[0], RESTARTS, int(math.prod(post.latent_shape)))
        for name in sorted(set(layers)):
            if name not in banks:
                banks[name] = Bank(feats_of, name, post, generator)
            rows = torch.tensor([n == name for n in layers], device=h.device)
            out[rows] = banks[name].nearest(h[rows], RESTARTS)
        return out

    return nearest


def _copied(
    results: list[dict[str, LayerRun]], copies: dict[str, str]
) -> list[dict[str, LayerRun]]:
    """Each seed's rows with every copy's row its source's."""
    for res in results:
        res.update({name: res[src] for name, src in copies.items()})
    return results


def _bases(affine: dict[str, AffineLayer]) -> dict[str, torch.Tensor]:
    return {name: layer.basis for name, layer in affine.items()}


def _unread(names: Sequence[str]) -> dict[str, LayerRun]:
    nan = math.nan
    return {n: LayerRun(nan, nan, nan, nan, nan, nan, UNRESOLVED) for n in names}


def _preimage_rows(
    feats_of: Features,
    plan: Plan,
    post: Posterior,
    settings: Settings,
    generator: torch.Generator,
    exact: ExactLatent | None,
    seeds: int,
    on_step: Progress | None = None,
) -> list[dict[str, LayerRun]]:
    """Every seed's rows of the folding layers, read from their preimages: one {name: LayerRun}
    per seed. Progress counts the readings (one per folding layer and seed, each about as
    costly: the demo's ~3 s)."""
    samples = min(settings.eval_samples, settings.preimage_samples)
    rows: list[dict[str, LayerRun]] = [{} for _ in range(seeds)]
    total = len(plan.folds) * seeds
    for i, (name, (bank, verdict)) in enumerate(plan.folds.items()):
        for j, res in enumerate(rows):
            res[name] = preimage_values(
                feats_of,
                name,
                bank,
                post,
                samples,
                settings.pair_samples,
                generator,
                exact,
                verdict.hop_dirs,
                verdict.hop_rounds,
            )
            if on_step is not None:
                on_step(PREIMAGE_PHASE, i * seeds + j + 1, total)
    return rows


def _affine_rows(
    plan: Plan,
    post: Posterior,
    settings: Settings,
    generator: torch.Generator,
    exact: ExactLatent | None,
    results: list[dict[str, LayerRun]],
) -> None:
    """Every seed's rows of the affine layers, in closed form, into `results` (one
    {name: LayerRun} per seed)."""
    for name, layer in plan.affine.items():
        for res in results:
            row = affine_values(post, layer.basis, settings.eval_samples, generator, exact)
            res[name] = row if layer.via is None else replace(row, method=INJECTIVE)
