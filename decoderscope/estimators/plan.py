"""The planning step: which reader gives each layer's values, decided once per layer (and seed)
before any critic trains, by measured criteria:

- `affine` where every feature is an affine function of z (`affine.affine_fit`);
- `preimages` where R(h) neither inverts the layer nor refines to z, the layer is `solvable`,
  and `preimages.check` finds every probable preimage on held-out samples;
- `inverse` where R(h) (refined through the decoder where that helps) recovers z within
  `regression_tol` nats: the critic keeps its warm start, the exact latent log-ratio at R(h);
- `critic` otherwise: the critic trains;
- `injective` where the graph shows the layer an injective function of an affine one, or a
  later layer read at the latent's values is a function of it alone (`imply`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch

from ..dependence import carried
from ..errors import DecoderError
from ..sampling import Posterior, reparameterise
from .affine import EXACT_RANK_CUT, EXACT_TOL, AffineLayer, affine_fit
from .batches import Features, Key, Progress, Sampler
from .cost import row_flops
from .groups import Members
from .preimages import Bank, Check, check
from .refinement import Carry, solvable
from .runs import AFFINE, CRITIC, INJECTIVE, INVERSE, LATENT, PREIMAGES
from .saturation import required_steps, resolved_steps
from .search import reading_flops
from .settings import Settings

FOLD_PHASE = "checking folding layers"  # progress of `preimages.check`, one step a layer
BLUR_PATIENCE = 0.25  # nats of R's price above which a critic gets more patience:
BLUR_PATIENCE_X = 4  # this many times `patience`


@dataclass(frozen=True)
class Plan:
    """Each member's reader (`runs.WHY`'s keys), with what decided it: the affine layers' maps,
    the folding layers' banks of starts and hop directions, each member's R(h) price (nats;
    None without a regression phase), and the layers whose preimage search was not run for its
    projected cost (layer -> FLOPs, over `Settings.preimage_flops`)."""

    methods: dict[Key, str]
    affine: dict[str, AffineLayer]
    folds: dict[str, tuple[Bank, Check]]
    blur: dict[Key, float] | None
    costly: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Structural:
    """What the decoders' graphs show (`structure.read_layout`): layers affine in z, layers that
    are injective functions of an affine module (layer -> module), float64 copies of the
    decoders that compute both: {name: h [n, ...]} for z [n, *latent_shape] in float64, and the
    layers whose values are a reshape of another chosen layer's (layer -> that layer)."""

    names: frozenset[str]
    injective: dict[str, str]
    features: Features
    copies: dict[str, str] = field(default_factory=dict)


def find_affine(
    feats_of: Features,
    names: Sequence[str],
    post: Posterior,
    tol: float,
    generator: torch.Generator,
    structural: Structural | None = None,
    raw: Features | None = None,
) -> dict[str, AffineLayer]:
    """The layers among `names` that are affine in z (`affine.affine_fit`), checked on n prior
    and n posterior samples (n = max(2048, 2(d + 1))): the posterior's too, because a layer can
    be linear where the prior lives and bend where a posterior sits far out. Layers affine by
    construction are fitted in float64 (`structural`), so rounding cannot hide it; the fit must
    still hold there. raw: the float32 features before whitening, where rounding happens
    (default: feats_of)."""
    d = int(math.prod(post.latent_shape))
    n = max(2048, 2 * (d + 1))
    device = post.mu.device
    idx = torch.randint(post.n, (n,), generator=generator, device=device)
    noise = torch.randn((2 * n, *post.latent_shape), generator=generator, device=device)
    z = torch.cat([noise[:n], reparameterise(post.mu[idx], post.logvar[idx], noise[n:])])
    found = {}
    if structural is not None:
        found = _structural_fits(structural, names, z, raw or feats_of, post, generator)
    if tol > 0 and len(found) < len(names):
        with torch.inference_mode():
            feats = feats_of(z)
        for name in names:
            fit = None if name in found else affine_fit(feats[name], z.flatten(1), tol)
            if fit is not None:
                found[name] = fit
    return found


def _structural_fits(
    structural: Structural,
    names: Sequence[str],
    z: torch.Tensor,
    raw: Features,
    post: Posterior,
    generator: torch.Generator,
) -> dict[str, AffineLayer]:
    """Layers affine by construction, fitted in float64 (the fit must hold there too), and
    injective functions of an affine module, which hold that module's values exactly
    (`AffineLayer.via`): of the latent's values where the module keeps every latent unit. Those
    must also keep every latent direction in float32 (`saturation.resolved_steps` on the raw
    features `raw`); else the other readers see what the rounded features hold. Where the
    module drops units, R(h) cannot recover z and critics read the curved low-dimensional image
    badly (Linear(8, 3), LeakyReLU, Linear(3, 32), Softplus: KL -4.9 at the Softplus), so that
    image is read in closed form."""
    z64 = z.double().flatten(1)
    with torch.inference_mode():
        exact = structural.features(z.double())
    fits: dict[str, AffineLayer] = {}
    full: dict[str, AffineLayer] = {}
    wanted = [n for n in names if n in structural.names or n in structural.injective]
    for name in wanted:
        source = structural.injective.get(name, name)
        fit = affine_fit(exact[source].flatten(1), z64, EXACT_TOL, EXACT_RANK_CUT)
        if fit is None:
            continue
        if name in structural.names:
            fits[name] = fit
        elif fit.rank < z64.shape[1]:
            fits[name] = replace(fit, via=source)
        else:
            full[name] = replace(fit, via=source)
    if full:
        steps = resolved_steps(raw, list(full), post, generator)
        need = required_steps(z64.shape[1])
        fits.update({n: f for n, f in full.items() if steps[n] >= need})
    return fits


class FoldSearch:
    """Layers whose values come from their preimages: in every seed R(h) is not within
    `regression_tol` of exact and not refined (the refinement lands on some preimage, not z),
    no later refined layer settles the layer (`carry`), it is `solvable`, its search fits in
    `preimage_flops`, and it passes `preimages.check`. Each layer is checked once: during the
    regression phase as soon as the refinement has settled every seed's member `unrefinable`
    (`settle`: R's fit is then no longer needed where the check passes, so it stops), else
    after it (`finish`). `found`: each such layer's bank of starts and the check it passed
    (whose hop directions and rounds its values use); `costly`: the layers left to their
    critics for the search's projected cost (FLOPs: the readings of every seed and about one
    more for the check, `search.reading_flops`)."""

    def __init__(
        self, run: Sampler, carry: Carry | None = None, on_step: Progress | None = None
    ) -> None:
        self.run, self.carry, self.on_step = run, carry, on_step
        self.found: dict[str, tuple[Bank, Check]] = {}
        self.costly: dict[str, float] = {}
        self.checked: set[str] = set()

    def settle(self, groups: list[Members], prices: list[torch.Tensor]) -> set[Key]:
        """Check the layers whose every member is settled `unrefinable` at R's prices [members]
        per group (all of each group's members, in `all_keys` order); returns the members of
        every folding layer found so far."""
        self._check(self._lossy(groups, prices, settled=True))
        return {key for g in groups for key in g.all_keys if key[0] in self.found}

    def finish(self, groups: list[Members], blur: list[torch.Tensor]) -> None:
        """Check the layers not yet checked, at R's final prices."""
        self._check(self._lossy(groups, blur, settled=False))

    def _lossy(
        self, groups: list[Members], prices: list[torch.Tensor], settled: bool
    ) -> dict[str, int]:
        """Candidate layers not yet checked -> width: every member past `regression_tol`, not
        refined (settled: marked `unrefinable`), its layer `solvable`."""
        post, tol = self.run.post, self.run.settings.regression_tol
        carried = set() if self.carry is None else self.carry.layers(groups)
        lossy: dict[str, bool] = {}
        widths: dict[str, int] = {}
        for g, p in zip(groups, prices, strict=True):
            for k, key in enumerate(g.all_keys):
                name = key[0]
                ok = (
                    name != LATENT
                    and name not in carried
                    and solvable(g.width, post)
                    and (key in g.unrefinable if settled else key not in g.refined)
                    and float(p[k]) > tol
                )
                lossy[name] = lossy.get(name, True) and ok
                widths[name] = g.width
        return {n: widths[n] for n, ok in lossy.items() if ok and n not in self.checked}

    def _check(self, layers: dict[str, int]) -> None:
        run = self.run
        feats_of, post, settings, generator = run.feats_of, run.post, run.settings, run.generator
        d = int(math.prod(post.latent_shape))
        samples = (run.seeds + 1) * min(settings.eval_samples, settings.preimage_samples)
        before = len(self.checked)  # the phase's total grows as later calls find more layers
        for name, width in layers.items():
            self.checked.add(name)
            self._report(len(self.checked) - 1, before + len(layers))
            row = row_flops(feats_of, name, post.latent_shape, post.mu.device)
            cost = reading_flops(d, width, row, samples)
            if cost > settings.preimage_flops:
                self.costly[name] = cost
                continue
            bank = Bank(feats_of, name, post, generator)
            try:
                verdict = check(feats_of, name, bank, post, generator)
            except DecoderError:  # no forward-mode AD (warned when the refinement was tried)
                continue
            if verdict.passed:
                self.found[name] = (bank, verdict)
        if layers:
            self._report(len(self.checked), len(self.checked))

    def _report(self, done: int, total: int) -> None:
        """Progress of the checks (a few seconds each on the demo's layers), as a phase."""
        if self.on_step is not None:
            self.on_step(FOLD_PHASE, done, total)


def make_plan(
    groups: list[Members],
    affine: dict[str, AffineLayer],
    folds: dict[str, tuple[Bank, Check]],
    blur: list[torch.Tensor] | None,
    settings: Settings,
    costly: dict[str, float] | None = None,
) -> Plan:
    """Every member's reader. `inverse` needs early stopping (patience > 0): without it every
    critic trains for all its steps."""
    prices: dict[Key, float] | None = None
    if blur is not None:
        prices = {}
        for g, p in zip(groups, blur, strict=True):
            prices.update(zip(g.keys, p.tolist(), strict=True))
    keeps_warm_start = not settings.plain and settings.patience > 0
    methods: dict[Key, str] = {}
    for g in groups:
        for key in g.keys:
            if key[0] in folds:
                methods[key] = PREIMAGES
            elif keeps_warm_start and prices is not None and prices[key] <= settings.regression_tol:
                methods[key] = INVERSE
            else:
                methods[key] = CRITIC
    seeds = sorted({s for g in groups for _, s in g.keys})
    for name, layer in affine.items():
        methods.update({(name, s): AFFINE if layer.via is None else INJECTIVE for s in seeds})
    return Plan(methods, affine, folds, prices, costly or {})


def latent_valued(affine: Mapping[str, AffineLayer], d: int) -> frozenset[str]:
    """The affine layers (`affine` of a latent of d units) that hold the latent's values: those
    of full rank."""
    return frozenset(name for name, layer in affine.items() if layer.rank == d)


def imply(
    plan: Plan, groups: list[Members], determines: Mapping[str, frozenset[str]], post: Posterior
) -> Plan:
    """The plan with every layer that a later layer read at the latent's values (affine or
    injective of full rank, or `inverse` in every seed) is a function of alone (`determines`,
    from `dependence.determined`; `dependence.carried`) read as `injective` at the latent's
    values too: its members leave their critic groups (`run.run_critics`), so they are neither
    refined nor evaluated (the diffusers AutoencoderKL's resnet normalisations and convolutions
    before the last of each block were each refined through the decoder for their own
    `inverse` reading)."""
    d = int(math.prod(post.latent_shape))
    seeds = sorted({s for g in groups for _, s in g.keys})
    served = {key[0] for g in groups for key in g.keys}
    valued = set(latent_valued(plan.affine, d))
    valued |= {n for n in served if all(plan.methods.get((n, s)) == INVERSE for s in seeds)}
    eye = torch.eye(d, dtype=torch.float64, device=post.mu.device)
    implied = {
        name: AffineLayer(eye, via=source)
        for name, source in carried(determines, valued).items()
        if name in served and name not in plan.affine
    }
    methods = plan.methods | {(name, s): INJECTIVE for name in implied for s in seeds}
    return replace(plan, affine=plan.affine | implied, methods=methods)


def patience(plan: Plan, groups: list[Members], settings: Settings) -> list[torch.Tensor]:
    """Each group's patience per member [members] (the groups hold only members their critics
    read, `run._read_by_critics`): 0 where the critic keeps its warm start (`inverse`: retired
    at the first check), BLUR_PATIENCE_X times `patience` where R(h) blurs z by more than
    BLUR_PATIENCE nats (its warm start is not the answer, and its loss only starts to fall once
    the gate has moved, after ~200 steps: with patience 4 the last layer of a two-LeakyReLU
    chain stopped at step 200 and read KL -1.63 nats, with 8 -0.95; with 2x a GELU layer
    stopped on a plateau of the still high rate)."""
    out = []
    for g in groups:
        p = []
        for key in g.keys:
            if plan.methods[key] == INVERSE:
                p.append(0)
            elif plan.blur is not None and plan.blur[key] > BLUR_PATIENCE:
                p.append(BLUR_PATIENCE_X * settings.patience)
            else:
                p.append(settings.patience)
        out.append(torch.tensor(p, dtype=torch.long, device=g.c.device))
    return out
