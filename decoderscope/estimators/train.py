"""One run of the critics: train every layer's critic from shared decoder passes, then evaluate.

Each step draws one batch of data indices, samples every bridge level for them (prior, bridges,
posterior), runs the decoder ONCE on all of it with every chosen layer tapped, and updates every
layer's critic together. Evaluation uses fresh samples that no critic was trained on.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ..errors import ArgumentError, DecoderError
from ..sampling import Posterior, bridge_grid, sample_levels
from ..taps import grad_mode
from .affine import AffineLayer, affine_fit, affine_values
from .critic import Concat, CriticGroup, SeparableGroup, soft_logistic
from .exact import ExactLatent, log_ratio_to_prior, mi_terms, unit_kl
from .inverse import refine
from .members import MemberStopping
from .preimages import Bank, check
from .preimages import values as preimage_values
from .runs import LayerRun, mean_se

LATENT = "latent"
ESTIMATORS = ("telescoping", "plain")
Features = Callable[[torch.Tensor], Mapping[str, torch.Tensor]]
# refiner(layer names [G], r [G, n, d], h [G, n, D]) -> refined r [G, n, d] (`inverse.refine`)
Refiner = Callable[[Sequence[str], torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Settings:
    """Estimator settings. Sample counts are per run; all KLs in nats.

    estimator: "telescoping" (bridges, whitening, separable critics warm-started at the exact
        latent ratio of a learned inverse, aggregate by log-mean-exp over the data from the
        conditional critic; docs/method.md) or "plain" (the paper's method: one logistic critic
        on (h, mu, logvar), a separate one on h for the aggregate, raw inputs).
    regression_lr: learning rate of the regression R(h) -> z and of the gates on the exact latent
        terms (the critics use `lr`).
    regression_depth: hidden layers of R's MLP (3; 2 until session 4). A third layer fits
        inverses after nonlinearities more closely (LeakyReLU MLP, d=16, KL 8: KL error -0.15 ->
        -0.10 nats; held-out two-LeakyReLU chain, last layer: -1.49 -> -0.93) at 10-40% more
        time on such decoders; docs/method.md.
    lr: the critics' learning rate; None: 1e-2 for telescoping critics, 2e-3 for plain ones.
        Telescoping critics learn from soft labels (`critic.soft_logistic`), which made 1e-2
        stable: with 0/1 labels a critic on Linear(64, 16) at latent KL 20 (affine_tol=0) read
        KL -1.05 against 4.98 (no checkpoint beat its warm start), with soft labels 4.96. Only
        critics that train see it: exactly inverted layers keep their warm start. Session 8,
        one run each at 1000 steps, KL error at 2e-3 with the penalty -> 1e-2 without
        (docs/method.md item 5): abs(z) d = 4 -1.42 -> -0.18, d = 16 -2.80 -> -1.00, a random
        Linear-GELU-Linear layer (d = 8) -0.77 -> -0.67. At 2e-2 the Linear(64, 16) critic
        diverged again.
    residual_penalty: weight of the mean squared learned residual on the exact latent terms
        (0 since session 8: with 0/1 labels the unpenalised residual over-fitted, latent
        d = 64, KL 20: +2.3 nats; soft labels remove the noise it fitted, and a penalty of 0.1
        read abs(z), d = 16, -1.53 against -1.00 without).
    gauss_rounds: rounds of marginal Gaussianisation after whitening (0: whitening only).
    steps: the most training steps; None: 12000 for telescoping critics (1000 until session 8,
        6000 in sessions 8-9), 1000 for plain ones. Only critics that learn run them (lossy
        layers, whose held-out loss still falls at 2000 steps); exactly inverted and affine
        layers take none. One run each, KL error at 1000 / 2000 / 6000 steps: abs(z), d = 16:
        -1.00 / -0.22 / -0.02; abs(z), d = 8, latent KL 12: - / -3.85 (3 seeds) / -0.33; GELU
        layer -0.67 / -0.59 / -0.49 (with the 4x patience below). The demo takes 149 s instead
        of 62. At 12000 (session 10) abs(z), d = 8, latent KL 12 reads 7.51 / 1.33 / 6.17
        against 7.53 / 1.36 / 6.18 (3 seeds; 7.23 / 1.19 / 6.04 at 6000) in twice the time; the
        demo's critics stop at 3250. Telescoping critics stop earlier once no critic's logistic
        loss on `check_batches` fixed held-out batches has improved by `stop_tol` nats for
        `patience` checks, one every `check_every` steps (patience 0: always run every step).
        Each critic stops on its own and ends with its parameters at its best held-out loss;
        critics whose R(h) blurs the latent by more than 0.25 nats get 4x the patience (2x
        until session 8).
    regression_patience: the same for each R(h) in the regression phase, on its price in nats
        (stops when it has not fallen by `regression_tol` for this many checks).
    newton_steps: the most Gauss-Newton steps per sample when R(h) is refined through the
        decoder (`inverse.refine`; 0: never refined). The refinement is used for a layer only
        where it recovers z to within `regression_tol` nats; such a layer's critic, like a linear
        one's, keeps its exact warm start. Held-out two-LeakyReLU chain, last layer: KL 6.70 ->
        7.70 nats (truth 7.70). 80, not 20: at 20 steps 2-3% of the samples of a d = 8 chain
        had not converged in some runs, its price stayed above regression_tol, and the layer
        read 0.95 nats low after the full critic training (26 s); at 40, 0.2-0.6% and a price
        of up to 0.008; at 60-80, 0-0.1% (3-6 s). The extra steps only run on the few samples
        still moving.
    preimages: a layer whose R(h) neither inverts it nor refines to z (it folds: GELU, SiLU,
        |z|), as wide as the latent or wider, gets values summed over each sample's preimages
        (found by Gauss-Newton through the decoder from the sample's own z and other starts,
        then hops across nearby folds) instead of a critic, where `preimages.check` finds them
        reliably on held-out samples (`preimages.py`; False: never). Held-out, 3 seeds (KL /
        aggregate KL / MI), truth -> critic -> preimages (session 10): Linear(8, 8), GELU
        5.59 / 0.46 / 5.14 -> 5.15 / 0.34 / 4.80 -> 5.60 / 0.47 / 5.13; the demo-like
        Linear(16, 16), GELU at KL 2 1.93 / 0.01 / 1.91 -> 1.67 / 0.01 / 1.65 -> 1.93 / 0.01 /
        1.92. |z| in 8 or more dimensions has too many equally probable preimages, fails the
        check and keeps its critic.
    preimage_samples: posterior samples per run for a folding layer's KL (at most
        `eval_samples`; its MI uses the first `pair_samples`). Each costs a search: 1024 take
        ~9 s per run on a random 16-unit GELU layer of the demo (2 cores), KL s.e. ~0.01.
    affine_tol: a layer whose every feature is an affine function of z up to this share of its
        variance (least squares on prior and posterior samples) gets exact values instead of a
        critic (`affine.py`; 0: never). Float32 rounding leaves ~1e-14, up to 2e-8 in the
        tiny-variance whitened directions of the demo's trained Linear layer (not affine at
        1e-9); tanh(Wz) with pre-activations of std 0.06 leaves 1.2e-5 (not affine), of std 0.03
        7e-7 (affine: curvature below 1e-3 of its std). Linear(64, 16) at latent KL 20 read KL /
        aggregate KL / MI 4.55 / 0.15 / 4.40 with a critic against 4.98 / 0.41 / 4.57.
    """

    estimator: str = "telescoping"
    steps: int | None = None
    batch_size: int = 256
    lr: float | None = None
    regression_lr: float = 2e-2
    residual_penalty: float = 0.0
    hidden: int = 64
    rank: int = 32
    gauss_rounds: int = 0
    knots: int = 33
    nats_per_bridge: float = 2.0
    max_bridges: int = 16
    eval_samples: int = 4096
    pair_samples: int = 512
    preimage_samples: int = 1024
    exact_samples: int = 16384
    regression_steps: int = 4000
    regression_tol: float = 0.01
    regression_patience: int = 8
    regression_depth: int = 3
    regression_batch: int = 128
    newton_steps: int = 80
    preimages: bool = True
    affine_tol: float = 1e-6
    check_every: int = 50
    check_batches: int = 4
    patience: int = 4
    stop_tol: float = 1e-3

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ArgumentError(
                f"estimator must be one of {list(ESTIMATORS)}, got {self.estimator!r}"
            )
        # None: the estimator's own default (frozen: the report's settings show the value used)
        plain = self.estimator == "plain"
        if self.lr is None:
            object.__setattr__(self, "lr", 2e-3 if plain else 1e-2)
        if self.steps is None:
            object.__setattr__(self, "steps", 1000 if plain else 12000)
        for name in (
            "steps",
            "batch_size",
            "hidden",
            "rank",
            "max_bridges",
            "knots",
            "check_every",
            "check_batches",
            "regression_batch",
            "regression_depth",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ArgumentError(f"{name} must be a positive integer, got {value!r}")
        for name in ("eval_samples", "pair_samples", "exact_samples", "preimage_samples"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 2:
                raise ArgumentError(f"{name} must be an integer >= 2, got {value!r}")
        for name in ("lr", "regression_lr", "nats_per_bridge"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and value > 0):
                raise ArgumentError(f"{name} must be a positive number, got {value!r}")
        if not (isinstance(self.residual_penalty, int | float) and self.residual_penalty >= 0):
            raise ArgumentError(
                f"residual_penalty must be a number >= 0, got {self.residual_penalty!r}"
            )
        for name in (
            "gauss_rounds",
            "patience",
            "regression_patience",
            "regression_steps",
            "newton_steps",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ArgumentError(f"{name} must be an integer >= 0, got {value!r}")
        if not isinstance(self.preimages, bool):
            raise ArgumentError(f"preimages must be True or False, got {self.preimages!r}")
        for name in ("stop_tol", "regression_tol", "affine_tol"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (isinstance(value, int | float) and value >= 0):
                raise ArgumentError(f"{name} must be a number >= 0, got {value!r}")


def levels_for(post: Posterior, settings: Settings) -> list[float]:
    """Bridge levels a_0 = 0 (prior) ... a_M = 1 (posterior)."""
    if settings.estimator == "plain":
        return [0.0, 1.0]
    return bridge_grid(post, settings.nats_per_bridge, settings.max_bridges)


Key = tuple[str, int]  # (layer name, seed index)
# progress(phase, steps done, steps planned): after every step, and once more when a phase stops
# early, with planned = done
Progress = Callable[[str, int, int], None]
REGRESSION_PHASE = "fitting inverses R(h)"
CRITIC_PHASE = "training critics"


def _by_seed(h: torch.Tensor, seeds: int, rows: int) -> torch.Tensor:
    """[seeds, L*rows, D] from a layer's [L*seeds*rows, D] (levels, then seeds, then rows): each
    seed's own rows, levels kept in order. Sizes are explicit: a dead layer has width 0."""
    levels = h.shape[0] // (seeds * rows)
    d = h.shape[1]
    return h.view(levels, seeds, rows, d).transpose(0, 1).reshape(seeds, levels * rows, d)


def _draw(
    feats_of: Features,
    post: Posterior,
    lv: torch.Tensor,
    generator: torch.Generator,
    seeds: int,
    b: int,
) -> tuple[torch.Tensor, Mapping[str, torch.Tensor], torch.Tensor]:
    """One batch: b data points per seed (idx [seeds, b]), a sample of each at every bridge
    level, decoded in one pass ({name: h [L*seeds*b, D]}), and the latent samples per seed
    ([seeds, L*b, d]: the regression target, the raw coordinates of the exact terms)."""
    idx = torch.randint(post.n, (seeds, b), generator=generator, device=post.mu.device)
    flat = idx.flatten()
    with torch.inference_mode():
        z = sample_levels(post.mu[flat], post.logvar[flat], lv, generator).flatten(0, 1)
    return idx, feats_of(z), _by_seed(z.flatten(1), seeds, b)


class _Group:
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
        self.residual_penalty = settings.residual_penalty
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

        # members whose R(h) is refined through the decoder (`_choose_refinement`), and how
        self.refined: set[Key] = set()
        self.unrefinable: set[Key] = set()  # refinement measured no better than R(h)
        self.refiner: Refiner | None = None

    def inverse(self, h: torch.Tensor) -> torch.Tensor | None:
        """The critics' r for h [G, rows, D]: R(h), refined through the decoder for the members
        in `refined`; None (R(h) itself, computed by the critic) when no member refines."""
        chosen = [k for k, key in enumerate(self.keys) if key in self.refined]
        if not chosen or self.refiner is None:
            return None
        assert isinstance(self.critic, SeparableGroup)
        with torch.no_grad():
            r = self.critic.r_net(h)
            rows = torch.tensor(chosen, device=h.device)
            r[rows] = self.refiner([self.keys[k][0] for k in chosen], r[rows], h[rows])
        return r

    def select(self, members: torch.Tensor) -> None:
        """Serve only `members` (indices into all keys): their rows, their data points."""
        self.keys = [self.all_keys[int(i)] for i in members]
        self.seed_of = self.all_seeds[members]

    def stack(self, feats: Mapping[str, torch.Tensor], seeds: int, rows: int) -> torch.Tensor:
        """[G, L*rows, D]: each member's own rows of its layer (see `_by_seed`)."""
        per_layer = {name: _by_seed(feats[name], seeds, rows) for name, _ in self.keys}
        return torch.stack([per_layer[name][s] for name, s in self.keys])

    def losses(
        self, h: torch.Tensor, idx: torch.Tensor, z: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each member's logistic loss [G] (each head at its own two levels, level m+1 against
        level m, mean over the batch, summed over heads) and the extra loss terms (the
        residual's penalty and R's regression loss against the latent rows z [G, L*B, d]); h
        and idx as in `logits`. Separable critics learn from soft labels (`soft_logistic`), the
        plain method from the 0/1 labels, as in the paper."""
        sp = nn.functional.softplus
        if isinstance(self.critic, SeparableGroup):
            pos, neg, pos_z, neg_z, penalty, regression = self.critic.head_pairs(
                h, self.c[idx[self.seed_of]], z, self.inverse(h)
            )
            loss = soft_logistic(pos, pos_z) + soft_logistic(neg, neg_z)  # [G, M, B]
            return loss.mean(2).sum(1), self.residual_penalty * penalty + regression
        logit = self.logits(h, idx).view(len(self.keys), -1, idx.shape[1], self.heads)
        head = torch.arange(self.heads, device=h.device)
        pos, neg = logit[:, head + 1, :, head], logit[:, head, :, head]  # [M, G, B]
        return (sp(-pos) + sp(neg)).mean(2).sum(0), torch.zeros((), device=h.device)

    def logits(self, h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """[G, L*B, heads] for h [G, L*B, D]: L blocks of B rows, each block's rows paired with
        the data points idx [seeds, B] of the member's seed."""
        member_idx = idx[self.seed_of]  # [G, B]
        if self.separable:
            return self.critic(h, self.c[member_idx], self.inverse(h))
        levels = h.shape[1] // member_idx.shape[1]
        return self.critic(self.std(h, member_idx.repeat(1, levels)))


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
) -> list[dict[str, LayerRun]]:
    """Train and evaluate critics for `latent` + `names`, `seeds` independent runs at once.

    features(z [n, *latent_shape]) -> {name: h [n, ...]} runs the tapped decoder once. Each step
    draws batch_size data points per seed, samples every bridge level for them, and decodes all of
    it in ONE pass; every seed's critics see only their own rows, so the runs are independent
    apart from the fixed whitening maps fitted once per decoder. post lives on the compute
    device. Memory is bounded by levels x seeds x batch_size x layer widths, never by the number
    of samples drawn. Returns one {name: LayerRun} per seed.

    exact: the latent's exact values; with it (telescoping only) the evaluation subtracts the
    exact latent log-ratio of each sample's own z as a control variate (see `_evaluate`).
    """
    device = post.mu.device
    plain = settings.estimator == "plain"
    lv = torch.tensor(list(levels), dtype=torch.float32, device=device)
    n_levels, heads = lv.shape[0], lv.shape[0] - 1

    # the layers feats_of returns: all of them until the affine ones are found, then only those
    # that get a critic (an affine layer's features would be whitened every step for nothing)
    served = list(names)

    def raw_feats(z: torch.Tensor) -> dict[str, torch.Tensor]:
        with grad_mode(z):  # inference mode, except for the Jacobians of `inverse.refine`
            out = features(z)
        result = {n: out[n].flatten(1).float() for n in served}
        result[LATENT] = z.flatten(1).float()
        return result

    feats_of: Features = raw_feats
    if not plain:
        feats_of = _gaussianized(raw_feats, post, settings, generator)
    # layers affine in z: exact values, no critic
    affine: dict[str, AffineLayer] = {}
    if not plain and settings.affine_tol > 0 and names:
        affine = _find_affine(feats_of, names, post, settings.affine_tol, generator)
    served = [n for n in names if n not in affine]
    # widths from a small prior batch
    z0 = torch.randn(2, *post.latent_shape, generator=generator, device=device)
    widths = {n: int(h.shape[1]) for n, h in feats_of(z0).items()}
    all_names = [LATENT, *served]

    latent_dim = int(math.prod(post.latent_shape))
    c = post.conditioning()
    if not plain:
        # a fixed affine map of c (same information), centred but never scaled up: the prior's
        # unit scale is the natural one. Scaling collapsed units' jitter (std 0.01) up to unit
        # size let the critic fit spurious functions of it, and the log-mean-exp over the data
        # read MI 1.34 against an exact 1.93.
        c = (c - c.mean(0)) / c.std(0, unbiased=False).clamp_min(1.0)
        # the raw (mu, logvar) ride along for the exact latent terms (see SeparableGroup)
        c = torch.cat([c, post.mu.flatten(1), post.logvar.flatten(1)], dim=1)
    groups: list[_Group] = []
    agg_groups: list[_Group] = []
    by_width: dict[int, list[Key]] = {}
    for n in all_names:
        for s in range(seeds):
            by_width.setdefault(widths[n], []).append((n, s))
    for width, keys in by_width.items():
        if plain:
            agg_groups.append(_Group(keys, width, 1, settings, c[:, :0], separable=False))
        groups.append(
            _Group(
                keys, width, heads, settings, c, separable=not plain, latent=latent_dim, levels=lv
            )
        )
    if not plain:
        _start_regressions(feats_of, groups, post, generator)
        if settings.newton_steps > 0:

            def refiner(names: Sequence[str], r: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
                return refine(feats_of, post.latent_shape, names, r, h, settings.newton_steps)

            for g in groups:
                g.refiner = refiner
    for g in groups + agg_groups:
        g.critic.to(device)

    r_steps, blur = 0, None
    if not plain:  # R first, alone (its precision bounds every estimate after a nonlinearity)
        r_steps, blur = _fit_regressions(
            feats_of, groups, post, lv, settings, generator, seeds, on_step
        )
        if blur is not None:
            blur = _choose_refinement(feats_of, groups, blur, post, lv, settings, generator, seeds)
    folds: dict[str, tuple[Bank, int]] = {}
    if blur is not None and settings.preimages and settings.newton_steps > 0:
        folds = _find_folds(feats_of, groups, blur, post, settings, generator)
    # R and the gates go on at their own, larger rate: R is a plain least-squares fit (d=16, KL 8,
    # after LeakyReLU, without the regression phase: KL error -1.0 nats at the critics' rate,
    # -0.4 at 10x; after the phase, the critics' rate read -0.34 against -0.24)
    seps = [g.critic for g in groups if isinstance(g.critic, SeparableGroup)]
    fast = [p for c in seps for p in [*c.r_net.parameters(), c.gate]]
    fast_ids = {id(p) for p in fast}
    params: list[nn.Parameter] = [
        p for g in groups + agg_groups for p in g.critic.parameters() if id(p) not in fast_ids
    ]
    param_groups: list[dict[str, Any]] = [
        {"params": params},
        {"params": fast, "lr": settings.regression_lr},
    ]
    assert settings.lr is not None and settings.steps is not None  # see Settings.__post_init__
    opt = _adam(param_groups, settings.lr, device)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=settings.steps)
    b = settings.batch_size

    def draw() -> tuple[torch.Tensor, Mapping[str, torch.Tensor], torch.Tensor]:
        return _draw(feats_of, post, lv, generator, seeds, b)

    def member_losses(
        idx: torch.Tensor, feats: Mapping[str, torch.Tensor], z_by_seed: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Each group's logistic loss per member still training [G] (summed over heads) and the
        extra terms."""
        out, extras = [], torch.zeros((), device=device)
        for g in groups:
            if not g.keys:  # every member stopped
                out.append(torch.zeros(0, device=device))
                continue
            h = g.stack(feats, seeds, b)
            loss, extra = g.losses(h, idx, z_by_seed[g.seed_of])
            extras = extras + extra
            out.append(loss)
        return out, extras

    # early stopping on a fixed held-out set, per member: each critic keeps the parameters of its
    # best held-out logistic loss and stops training once it has not improved by stop_tol for
    # `patience` checks; the run ends when every member has stopped (telescoping only; the plain
    # method runs its steps, as in the paper)
    stopping = not plain and settings.patience > 0
    steps_run = 0
    held = [draw() for _ in range(settings.check_batches)] if stopping else []
    # a critic whose R(h) blurs the latent by more than BLUR_PATIENCE nats gets BLUR_PATIENCE_X
    # times the patience: its warm start is not the answer, and its loss only starts to fall
    # once the gate (starting saturated at sigmoid(8)) has moved, after ~200 steps at the gate's
    # rate. With patience 4 the last layer of a two-LeakyReLU chain stopped at step 200 and read
    # KL -1.63; with 8, -0.95 (all 1000 steps: -0.99). Since session 8 4x: with 6000 steps and
    # 2x, a GELU layer stopped at step 2450 on a plateau of the still high rate (KL -0.73),
    # a SiLU layer at 1450 (-0.79); with 4x both ran on (-0.49, -0.57)
    stopper = None
    if stopping:
        patience = [
            torch.full((len(g.keys),), settings.patience, dtype=torch.long, device=device)
            for g in groups
        ]
        if blur is not None:
            # an inverse within regression_tol of exact (the latent, linear layers, layers
            # inverted through the decoder) makes the warm start the exact log-ratio: such a
            # critic retires at the first check, keeping it (patience 0)
            patience = [
                torch.where(
                    x > BLUR_PATIENCE,
                    BLUR_PATIENCE_X * p,
                    torch.where(x <= settings.regression_tol, 0, p),
                )
                for p, x in zip(patience, blur, strict=True)
            ]
        # layers read from their preimages: their critics retire at the first check
        for g, p in zip(groups, patience, strict=True):
            for k, (name, _) in enumerate(g.keys):
                if name in folds:
                    p[k] = 0
        stopper = MemberStopping(
            groups, [g.critic for g in groups], patience, settings.stop_tol, True
        )

    @torch.no_grad()
    def held_losses() -> list[torch.Tensor]:
        per_batch = [member_losses(*batch)[0] for batch in held]
        return [torch.stack(parts).mean(0) for parts in zip(*per_batch, strict=True)]

    for step in range(settings.steps):
        if stopper is not None and step % settings.check_every == 0:
            if not stopper.check(held_losses(), opt):
                if on_step is not None:
                    on_step(CRITIC_PHASE, steps_run, steps_run)
                break
        steps_run += 1
        idx, feats, z_by_seed = draw()
        per_member, loss = member_losses(idx, feats, z_by_seed)
        loss = loss + sum(x.sum() for x in per_member)
        for g in agg_groups:  # plain: aggregate critic, posterior (level 1) vs prior (level 0)
            h = g.stack(feats, seeds, b)
            logit = g.logits(h, idx).view(len(g.keys), n_levels, b)
            loss = (
                loss
                + (nn.functional.softplus(-logit[:, 1]) + nn.functional.softplus(logit[:, 0]))
                .mean(dim=1)
                .sum()
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if on_step is not None:
            on_step(CRITIC_PHASE, steps_run, settings.steps)
    if stopper is not None:  # a last check, then every member takes its best parameters
        if stopper.training:
            stopper.check(held_losses(), opt)
        stopper.finish()
    with torch.no_grad():
        control = None if plain else exact
        results = _evaluate(
            feats_of, groups, agg_groups, post, lv, settings, generator, seeds, control
        )
    blur_of: dict[Key, float] = {}
    if blur is not None:
        for g, prices in zip(groups, blur, strict=True):
            blur_of.update(zip(g.keys, prices.tolist(), strict=True))
    for name, (bank, hop_dirs) in folds.items():
        for seed in range(seeds):
            results[seed][name] = preimage_values(
                feats_of,
                name,
                bank,
                post,
                min(settings.eval_samples, settings.preimage_samples),
                settings.pair_samples,
                generator,
                exact,
                hop_dirs,
            )
    for name, layer in affine.items():
        for seed in range(seeds):
            v = affine_values(post, layer.basis, settings.eval_samples, generator, exact)
            results[seed][name] = LayerRun(
                v.kl,
                0.0,
                v.aggregate_kl,
                v.aggregate_kl_se,
                v.mi,
                v.mi_se,
                None,
                affine_rank=layer.rank,
            )
    return [
        {
            name: replace(
                r,
                steps=steps_run,
                regression_steps=r_steps,
                # R(h) does not enter a folding layer's values
                inverse_blur=None if name in folds else blur_of.get((name, seed)),
            )
            for name, r in res.items()
        }
        for seed, res in enumerate(results)
    ]


def _find_affine(
    feats_of: Features,
    names: Sequence[str],
    post: Posterior,
    tol: float,
    generator: torch.Generator,
) -> dict[str, AffineLayer]:
    """The layers among `names` that are affine in z (`affine.affine_fit`), checked on n prior
    and n posterior samples (n = max(2048, 2(d + 1))): the posterior's too, because a layer can
    be linear where the prior lives and bend where a posterior sits far out."""
    d = int(math.prod(post.latent_shape))
    n = max(2048, 2 * (d + 1))
    device = post.mu.device
    idx = torch.randint(post.n, (n,), generator=generator, device=device)
    noise = torch.randn((2 * n, *post.latent_shape), generator=generator, device=device)
    z = torch.cat([noise[:n], post.mu[idx] + (0.5 * post.logvar[idx]).exp() * noise[n:]])
    with torch.inference_mode():
        feats = feats_of(z)
    found = {}
    for name in names:
        fit = affine_fit(feats[name], z.flatten(1), tol)
        if fit is not None:
            found[name] = fit
    return found


def _adam(params: Any, lr: float, device: torch.device) -> torch.optim.Adam:
    """Adam with the fused kernel where the device has one (one pass over every parameter:
    1.35 -> 0.40 ms a step for 20 demo critics on 2 cores), else the multi-tensor one."""
    if device.type in ("cpu", "cuda"):
        return torch.optim.Adam(params, lr=lr, fused=True)
    return torch.optim.Adam(params, lr=lr, foreach=True)


BLUR_PATIENCE = 0.25  # nats of R's price above which a critic gets more patience:
BLUR_PATIENCE_X = 4  # this many times `patience`
WHITEN_MAX_WIDTH = 512  # widest layer whitened (and R fitted by least squares) after reduction
SPECTRUM_MAX_WIDTH = 2048  # widest layer whose prior covariance is decomposed to find its rank


def _fit_regressions(
    feats_of: Features,
    groups: list[_Group],
    post: Posterior,
    lv: torch.Tensor,
    settings: Settings,
    generator: torch.Generator,
    seeds: int,
    on_step: Progress | None = None,
) -> tuple[int, list[torch.Tensor] | None]:
    """Fit every critic's regression R(h) -> z alone before the critics train: up to
    `regression_steps` steps of `regression_batch` data points per seed, each at every bridge
    level, at `regression_lr` with cosine decay. Returns the steps run and each R's last price,
    nats, per group [members] (None without a phase).

    Every `check_every` steps R's error per latent unit, e^2, is measured on fixed held-out rows
    and priced in nats: blurring z by e^2 loses about 1/2 log(1 + e^2 / sigma^2) per unit
    (sigma^2 the posterior variance), and never more than the unit's own KL (a collapsed unit
    costs nothing; the demo's phase fell from 3650 to 2150 steps with the same estimates). Each
    R stops once its price has not fallen by `regression_tol` for `regression_patience`
    checks, or at once when it is within `regression_tol` of 0 (linear layers, exact from their
    least-squares start; lossy layers stop once R has found what the layer keeps), and the phase
    ends when every R has stopped. A stopped R no
    longer costs anything (`MemberStopping`).

    R's precision bounds every estimate after a nonlinear layer (r = z + e blurs the exact term).
    d=16, KL 8, Linear + LeakyReLU(0.2) + Linear, last layer, KL / aggregate KL / MI errors:
    R trained only alongside the critics, MSE 0.039 per unit, -0.46 / -0.34 / -0.12 nats; all
    4000 phase steps, MSE 0.008, -0.12 / -0.07 / -0.05; the session-3 stopping (1150 steps),
    -0.24 / -0.16 / -0.09; now (3-layer R, per-R stopping: all 4000 steps) -0.10 / -0.08 /
    -0.02. Alternatives measured on the same case: one random level per row,
    -0.32 / -0.22 / -0.10; stopping on a plateau of the held-out error (three 5-fold rate
    drops, 2850 steps), -0.52 / -0.30 / -0.22; R at the critics' rate afterwards, -0.34 /
    -0.23 / -0.11."""
    b = settings.regression_batch
    fitted = [g.critic for g in groups if isinstance(g.critic, SeparableGroup)]
    if not fitted or settings.regression_steps == 0:
        return 0, None

    def draw() -> tuple[Mapping[str, torch.Tensor], torch.Tensor]:
        _, feats, z = _draw(feats_of, post, lv, generator, seeds, b)
        return feats, z

    def errors(feats: Mapping[str, torch.Tensor], z: torch.Tensor) -> list[torch.Tensor]:
        """Each group's R error per member still fitting and latent unit [G, d]."""
        out = []
        for g in groups:
            assert isinstance(g.critic, SeparableGroup)
            if not g.keys:
                out.append(z.new_zeros(0, z.shape[2]))
                continue
            r = g.critic.r_net(g.stack(feats, seeds, b))  # rows: every level of b data points
            out.append((r - z[g.seed_of]).pow(2).mean(dim=1))
        return out

    held = [draw() for _ in range(settings.check_batches)]

    # what R's error costs: blurring z by e^2 per unit loses about 1/2 log(1 + e^2 / sigma^2)
    # per unit, never more than the unit's own KL: a collapsed unit (sigma ~ 1) carries nothing,
    # so not recovering it costs nothing
    @torch.no_grad()
    def price(step: int) -> list[torch.Tensor]:
        """Each group's R price per member still fitting [G], nats. At checks 1, 2, 4, 8, ...
        a member whose R(h) refined through the decoder is within `regression_tol` of exact
        takes that price instead (and the refinement): by the floor rule it stops at once."""
        per_batch = [errors(*x) for x in held]
        prices = [_price(torch.stack(e).mean(0), post) for e in zip(*per_batch, strict=True)]
        check = step // settings.check_every
        if check >= 1 and check & (check - 1) == 0:
            for g, p in zip(groups, prices, strict=True):
                _try_refinement(g, p, held, post, settings, seeds, b)
        return prices

    params = [p for c in fitted for p in c.r_net.parameters()]
    opt = _adam(params, settings.regression_lr, post.mu.device)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=settings.regression_steps)
    # each R stops once its price has not fallen by regression_tol for `regression_patience`
    # checks, keeping the parameters it has then (0: every R runs every step). Twice the critics'
    # patience: an R's price can stall for a few checks and then fall again (deep LeakyReLU
    # chain, layer 2: after 4 stale checks its blur was 1.15 nats; after 8, 0.28)
    stopper = MemberStopping(
        groups,
        [c.r_net for c in fitted],
        settings.regression_patience or settings.regression_steps + 1,
        settings.regression_tol,
        keep_best=True,
        floor=0.0,  # a price is never below 0
    )
    step = 0
    for step in range(settings.regression_steps):
        if step % settings.check_every == 0 and not stopper.check(price(step), opt):
            break
        loss = torch.stack([e.sum() for e in errors(*draw())]).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if on_step is not None:
            on_step(REGRESSION_PHASE, step + 1, settings.regression_steps)
    else:
        step = settings.regression_steps
        if stopper.training:  # the last price of every R still fitting
            stopper.check(price(step), opt)
    if on_step is not None and step < settings.regression_steps:
        on_step(REGRESSION_PHASE, step, step)
    stopper.finish()
    return step, [x.float() for x in stopper.last]


def _price(mse: torch.Tensor, post: Posterior) -> torch.Tensor:
    """What an inverse's squared error per latent unit, mse [G, d], costs: [G] nats."""
    inv_var = (-post.logvar.flatten(1)).exp().mean(0)  # [d], mean 1/sigma^2 over the data
    kl_per_unit = unit_kl(post).mean(0).to(inv_var)  # [d], nats
    return torch.minimum(0.5 * torch.log1p(mse * inv_var), kl_per_unit).sum(dim=1)


def _refinable(g: _Group, prices: torch.Tensor, post: Posterior, settings: Settings) -> list[int]:
    """Members (indices into g.keys) worth refining: their R costs more than `regression_tol`
    and their layer is at least as wide as the latent (a narrower one cannot be injective) and
    whitened (at most WHITEN_MAX_WIDTH wide after reduction: the Jacobian of a wider,
    standardised layer costs d times its width per sample)."""
    if g.refiner is None or not _solvable(g.width, post):
        return []
    settled = g.refined | g.unrefinable
    return [
        k
        for k in range(len(g.keys))
        if g.keys[k] not in settled and float(prices[k]) > settings.regression_tol
    ]


def _solvable(width: int, post: Posterior) -> bool:
    """Whether g(z) = h is solved through the decoder for a layer of this width (after
    reduction): at least as wide as the latent (a narrower one has no isolated preimages) and
    whitened (at most WHITEN_MAX_WIDTH: a wider, standardised layer's Jacobian costs d times
    its width per sample)."""
    return math.prod(post.latent_shape) <= width <= WHITEN_MAX_WIDTH


def _try_refinement(
    g: _Group,
    prices: torch.Tensor,
    held: Sequence[tuple[Mapping[str, torch.Tensor], torch.Tensor]],
    post: Posterior,
    settings: Settings,
    seeds: int,
    b: int,
) -> None:
    """Price the refined inverse of g's `_refinable` members on `held`. A member within
    `regression_tol` of exact uses it from now on and takes its price in `prices` [members]
    (in place); one no better than its R(h) is marked `unrefinable` and not tried again."""
    chosen = _refinable(g, prices, post, settings)
    if not chosen:
        return
    try:
        after = _refined_price(g, chosen, held, post, seeds, b)
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


def _refined_price(
    g: _Group,
    chosen: list[int],
    held: Sequence[tuple[Mapping[str, torch.Tensor], torch.Tensor]],
    post: Posterior,
    seeds: int,
    b: int,
) -> torch.Tensor:
    """Price [len(chosen)] of the members' R(h) refined through the decoder, nats, on the
    held-out batches `held` ((features, z) of b data points per seed at every level)."""
    assert isinstance(g.critic, SeparableGroup) and g.refiner is not None
    rows = torch.tensor(chosen, device=post.mu.device)
    names = [g.keys[k][0] for k in chosen]
    errors = []
    with torch.no_grad():
        for feats, z in held:
            h = g.stack(feats, seeds, b)
            r = g.critic.r_net(h)[rows]
            refined = g.refiner(names, r, h[rows])
            errors.append((refined - z[g.seed_of][rows]).pow(2).mean(dim=1))
    return _price(torch.stack(errors).mean(0), post)


def _choose_refinement(
    feats_of: Features,
    groups: list[_Group],
    blur: list[torch.Tensor],
    post: Posterior,
    lv: torch.Tensor,
    settings: Settings,
    generator: torch.Generator,
    seeds: int,
) -> list[torch.Tensor]:
    """After the regression phase, a last try for members it did not settle (`_refinable`,
    stopped between two tries of the phase): R(h) refined through the decoder is used where its
    price, on `check_batches` fresh held-out batches of `regression_batch` data points per seed
    at every level, is within `regression_tol` of exact. Returns every member's price of the
    inverse it will use (nats, per group [members]). No candidates (linear decoders, or none
    left): nothing drawn."""
    candidates = [_refinable(g, p, post, settings) for g, p in zip(groups, blur, strict=True)]
    if not any(candidates):
        return blur
    b = settings.regression_batch
    held = [
        _draw(feats_of, post, lv, generator, seeds, b)[1:] for _ in range(settings.check_batches)
    ]
    out = [p.clone() for p in blur]
    for g, prices in zip(groups, out, strict=True):
        _try_refinement(g, prices, held, post, settings, seeds, b)
    return out


def _find_folds(
    feats_of: Features,
    groups: list[_Group],
    blur: list[torch.Tensor],
    post: Posterior,
    settings: Settings,
    generator: torch.Generator,
) -> dict[str, tuple[Bank, int]]:
    """Layers whose values come from their preimages (`preimages.py`): R(h) not within
    `regression_tol` of exact in any seed and not refined (the refinement lands on some
    preimage, not z), as wide as the latent or wider (else the fibres are not points) and
    whitened, and passing `preimages.check`. Returns each such layer's bank of starts and the
    hop directions per preimage it passed with."""
    lossy: dict[str, bool] = {}
    for g, prices in zip(groups, blur, strict=True):
        for k, (name, _) in enumerate(g.keys):
            ok = (
                name != LATENT
                and _solvable(g.width, post)
                and g.keys[k] not in g.refined
                and float(prices[k]) > settings.regression_tol
            )
            lossy[name] = lossy.get(name, True) and ok
    found = {}
    for name, ok in lossy.items():
        if not ok:
            continue
        bank = Bank(feats_of, name, post, generator)
        try:
            verdict = check(feats_of, name, bank, post, generator)
        except DecoderError:  # no forward-mode AD (warned when the refinement was tried)
            continue
        if verdict.passed:
            found[name] = (bank, verdict.hop_dirs)
    return found


def _start_regressions(
    feats_of: Features,
    groups: list[_Group],
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
        assert isinstance(g.critic, SeparableGroup)
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
            g.critic.start_regression(
                torch.stack([fits[name][0] for name, _ in g.keys]),
                torch.stack([fits[name][1] for name, _ in g.keys]),
            )


class _Marginal:
    """Monotone per-feature map x -> y that sends the prior's marginals to N(0, 1): piecewise
    linear between the prior quantiles at Phi(y_k) and the normal scores y_k (`knots` of them,
    evenly spaced in [-3, 3]), extended linearly beyond the end knots. Knots are made strictly
    increasing (ties from atoms, such as a ReLU's zeros, get a tiny spacing), so the map is
    injective and every KL is unchanged. Few knots keep it smooth: measured with 257 knots from
    8192 samples, quantile noise made linear layers read 0.15 nats lower."""

    def __init__(self, h: torch.Tensor, knots: int) -> None:
        y = torch.linspace(-3.0, 3.0, knots, dtype=torch.float64)
        probs = torch.special.ndtr(y)
        xs = torch.quantile(h.double(), probs.to(h.device), dim=0).T  # [D, K]
        spread = (xs[:, -1] - xs[:, 0]).clamp_min(1e-12)
        step = 1e-6 * spread.unsqueeze(1)
        # strictly increasing: cumulative max plus a tiny ramp
        xs = torch.cummax(xs, dim=1).values + step * torch.arange(knots, device=h.device)
        self.x = xs.to(h.dtype).contiguous()
        self.y = y.to(device=h.device, dtype=h.dtype)
        self.slope = (self.y[1:] - self.y[:-1]) / (self.x[:, 1:] - self.x[:, :-1])  # [D, K-1]

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        cols = h.T.contiguous()  # [D, rows]
        k = torch.searchsorted(self.x, cols).clamp(1, self.x.shape[1] - 1) - 1
        x0 = self.x.gather(1, k)
        out = self.y[k] + (cols - x0) * self.slope.gather(1, k)
        return out.T


class _Whiten:
    """(h - mean) @ U_r diag(lambda_r)^-1/2 under the prior, keeping the r directions whose
    variance is at least 1e-12 of the largest. The others hold nothing but float32 rounding
    (relative std below 1e-6, where h itself is only computed to about 1e-7), so dropping them
    loses nothing measurable; flooring them instead amplified rounding noise 1e5-fold and
    spoiled the estimates of rank-deficient layers (Linear(6, 12)). At 1e-10 a chain of 8 random
    Linear(16, 16) layers lost a real direction at its 6th layer (variance ratio 2.5e-12; KL
    -0.55 nats); at 1e-12 only from the 7th (5.8e-14: std within 4x of float32 rounding)."""

    def __init__(self, h: torch.Tensor) -> None:
        h64 = h.double()
        self.mean = h64.mean(0).to(h)
        evals, evecs = torch.linalg.eigh(torch.cov(h64.T).reshape(h.shape[1], h.shape[1]))
        keep = evals >= 1e-12 * float(evals.max().clamp_min(1e-300))
        self.rank = int(keep.sum())
        self.proj = (evecs[:, keep] * evals[keep].rsqrt()).to(h)

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return (h - self.mean) @ self.proj


class _Standardize:
    """(h - mean) / std per feature (std 1 for constant features): for layers too wide to whiten."""

    def __init__(self, h: torch.Tensor) -> None:
        self.mean, std = h.mean(0), h.std(0)
        self.std = torch.where(std > 0, std, torch.ones_like(std))

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return (h - self.mean) / self.std


def _gaussianized(
    feats_of: Features,
    post: Posterior,
    settings: Settings,
    generator: torch.Generator,
) -> Features:
    """Wrap `feats_of` so each layer of width <= WHITEN_MAX_WIDTH, or of width up to
    SPECTRUM_MAX_WIDTH and rank <= WHITEN_MAX_WIDTH (such as a conv decoder's feature maps, whose
    rank is at most the latent's size while the decoder is linear), comes out whitened under the
    prior (reduced to its rank first), then `gauss_rounds` rounds of (marginal Gaussianisation,
    whitening), all fitted on 8192 prior samples. Every step is a bijection, so every KL is
    unchanged. Other layers are only standardised per feature. Measured (d=16, KL 8, after
    Linear + LeakyReLU(0.2) + Linear, warm-started critics): KL error -0.37 nats with whitening
    alone (the default, gauss_rounds=0), -1.12 with two rounds.
    """
    z = torch.randn((8192, *post.latent_shape), generator=generator, device=post.mu.device)
    feats = feats_of(z)
    maps: dict[str, list[Callable[[torch.Tensor], torch.Tensor]]] = {}
    for name, h in feats.items():
        steps: list[Callable[[torch.Tensor], torch.Tensor]] = []
        first = None
        if 2 <= h.shape[1] <= SPECTRUM_MAX_WIDTH:
            first = _Whiten(h)
            if h.shape[1] > WHITEN_MAX_WIDTH and first.rank > WHITEN_MAX_WIDTH:
                first = None  # wide and of high rank: whitening every step would cost D^2 a row
        if first is None:
            steps.append(_Standardize(h))
        else:
            if first.rank < h.shape[1]:  # rank-deficient: reduce to the rank first
                steps.append(first)
                h = first(h)
            for _ in range(settings.gauss_rounds if h.shape[1] else 0):  # width 0: constant
                marginal = _Marginal(h, settings.knots)
                h = marginal(h)
                whiten = _Whiten(h)
                h = whiten(h)
                steps += [marginal, whiten]
            if not steps:
                steps.append(first)
        maps[name] = steps

    def gaussianized(z: torch.Tensor) -> Mapping[str, torch.Tensor]:
        return _Mapped(feats_of(z), maps)

    return gaussianized


class _Mapped(Mapping[str, torch.Tensor]):
    """Layer values each put through its maps when first read: a Jacobian pass reads one or two
    of the layers, and whitening every layer on every copy of every sample took 191 of 808 s
    (d = 64, three 64-96 wide layers)."""

    def __init__(
        self,
        raw: Mapping[str, torch.Tensor],
        maps: dict[str, list[Callable[[torch.Tensor], torch.Tensor]]],
    ) -> None:
        self._raw, self._maps = raw, maps
        self._done: dict[str, torch.Tensor] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._done:
            h = self._raw[name]
            for step in self._maps[name]:
                h = step(h)
            self._done[name] = h
        return self._done[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._raw)  # feats_of may serve fewer layers than were fitted

    def __len__(self) -> int:
        return len(self._raw)


def _evaluate(
    feats_of: Features,
    groups: list[_Group],
    agg_groups: list[_Group],
    post: Posterior,
    lv: torch.Tensor,
    settings: Settings,
    generator: torch.Generator,
    seeds: int,
    exact: ExactLatent | None,
) -> list[dict[str, LayerRun]]:
    """KL from `eval_samples` posterior samples per seed, MI from the first `pair_samples` of them
    (`_pair_mi`), aggregate KL = KL - MI.

    With `exact`, each sample's estimate is taken relative to the exact latent value of the z it
    came from: KL = mean(T(h) - log q(z|x)/p(z)) + exact KL, and MI likewise with the exact
    per-sample MI term plus the exact-density MI (whose Monte Carlo error enters the se). Both
    control variates have known means, so the estimates stay unbiased; where the layer keeps
    the latent's information, T(h) tracks the exact term and the evaluation noise nearly
    cancels (measured on warm-started critics at the latent, d=16, KL 8: errors +0.04 / +0.10 /
    -0.06 without it, -0.02 / -0.02 / -0.00 with it).
    """
    device = post.mu.device
    mu_all = post.mu.flatten(1).double()
    logvar_all = post.logvar.flatten(1).double()
    cv_kl: list[torch.Tensor] = []  # [seeds, B] per batch: exact log q(z|x)/p(z)
    kept_z: list[torch.Tensor] = []
    n_levels, heads = lv.shape[0], lv.shape[0] - 1
    b = settings.batch_size
    keys = [k for g in groups for k in g.keys]
    own: dict[Key, list[torch.Tensor]] = {k: [] for k in keys}
    per_head: dict[Key, list[torch.Tensor]] = {k: [] for k in keys}
    correct: dict[Key, list[torch.Tensor]] = {k: [] for k in keys}
    kept_h: dict[Key, list[torch.Tensor]] = {k: [] for k in keys}
    agg_own: dict[Key, list[torch.Tensor]] = {k: [] for g in agg_groups for k in g.keys}
    kept_idx: list[torch.Tensor] = []
    drawn = 0
    head = torch.arange(heads, device=device)
    while drawn < settings.eval_samples:
        idx = torch.randint(post.n, (seeds, b), generator=generator, device=device)
        flat = idx.flatten()
        z = sample_levels(post.mu[flat], post.logvar[flat], lv, generator)
        feats = feats_of(z.flatten(0, 1))
        keep = drawn < settings.pair_samples
        if exact is not None:
            zp = z[-1].flatten(1).double()  # the posterior level's latent samples
            cv_kl.append(log_ratio_to_prior(zp, mu_all[flat], logvar_all[flat]).view(seeds, b))
            if keep:
                kept_z.append(zp.view(seeds, b, -1))
        for g in groups:
            h = g.stack(feats, seeds, b)
            logit = g.logits(h, idx).view(len(g.keys), n_levels, b, heads)
            pos = logit[:, head + 1, :, head]
            neg = logit[:, head, :, head]
            acc = 0.5 * ((pos > 0).float().mean(dim=2) + (neg < 0).float().mean(dim=2))  # [M, G]
            total = logit[:, -1].sum(dim=2)  # [G, B] log q(h|x)/p(h) at posterior samples
            for k, key in enumerate(g.keys):
                own[key].append(total[k])
                per_head[key].append(logit[k, -1].mean(dim=0))
                correct[key].append(acc[:, k])
                if keep:
                    kept_h[key].append(h[k].view(n_levels, b, h.shape[2])[-1])
        for g in agg_groups:
            h = g.stack(feats, seeds, b)
            logit = g.logits(h, idx).view(len(g.keys), n_levels, b)
            for k, key in enumerate(g.keys):
                agg_own[key].append(logit[k, -1])
        if keep:
            kept_idx.append(idx)
        drawn += b
    results: list[dict[str, LayerRun]] = [{} for _ in range(seeds)]
    pair_idx = torch.cat(kept_idx, dim=1)[:, : settings.pair_samples]  # [seeds, E]
    kl_cv = mi_cv = None
    if exact is not None:
        kl_cv = torch.cat(cv_kl, dim=1)  # [seeds, eval rows]
        zs = torch.cat(kept_z, dim=1)[:, : settings.pair_samples]  # [seeds, E, d]
        mi_cv = torch.stack(
            [mi_terms(zs[s], pair_idx[s], mu_all, logvar_all) for s in range(seeds)]
        )
    for g in groups:
        pair_terms = None
        if not agg_groups:
            hp = torch.stack([torch.cat(kept_h[k])[: settings.pair_samples] for k in g.keys])
            pair_terms = _pair_mi(g, hp, pair_idx, post.n)
        for k, key in enumerate(g.keys):
            kl_vals = torch.cat(own[key])
            if kl_cv is not None and exact is not None:
                kl, kl_se = mean_se(kl_vals.double() - kl_cv[key[1]])
                kl += exact.kl
            else:
                kl, kl_se = mean_se(kl_vals)
            accuracy = float(torch.stack(correct[key]).mean(0).max())
            if pair_terms is not None:
                if mi_cv is not None and exact is not None:
                    mi, mi_se = mean_se(pair_terms[k].double() - mi_cv[key[1]])
                    mi, mi_se = mi + exact.mi, math.hypot(mi_se, exact.mi_se)
                else:
                    mi, mi_se = mean_se(pair_terms[k])
                agg, agg_se = kl - mi, math.hypot(kl_se, mi_se)
            else:
                agg_vals = torch.cat(agg_own[key])
                agg, agg_se = mean_se(agg_vals)
                mi, mi_se = mean_se(kl_vals - agg_vals)
            heads_mean = tuple(float(x) for x in torch.stack(per_head[key]).mean(0))
            name, seed = key
            results[seed][name] = LayerRun(kl, kl_se, agg, agg_se, mi, mi_se, accuracy, heads_mean)
    return results


def _pair_mi(g: _Group, h: torch.Tensor, idx: torch.Tensor, n_data: int) -> torch.Tensor:
    """Per-sample MI terms T(h_i, c_i) - log mean_n exp T(h_i, c_n): [G, E], for h [G, E, D]
    with data indices idx [seeds, E].

    The aggregate ratio q_k(h)/p_k(h) = mean_n q_k(h|x_n)/p_k(h) is exact, so each term is at most
    log N. Cost: one [E, P] x [P, N] product per member (separable critic), in chunks of the data.
    """
    groups, e, _ = h.shape
    critic = g.critic
    assert isinstance(critic, SeparableGroup)
    inverse = g.inverse(h)  # once, not per chunk
    own = critic(h, g.c[idx[g.seed_of]], inverse).sum(dim=2)  # [G, E]
    chunk = max(1, (1 << 22) // max(1, groups * e))
    lse = torch.full((groups, e), -math.inf, device=h.device)
    for start in range(0, n_data, chunk):
        vals = critic.pair_totals(h, g.c[start : start + chunk], inverse)
        lse = torch.logaddexp(lse, torch.logsumexp(vals, dim=2))
    return own - (lse - math.log(n_data))
