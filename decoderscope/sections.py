"""The report's sections beside the per-layer estimates: MMD^2 per layer, with a likelihood the
rate-distortion and IWAE bounds and the per-layer ELBOs, and on request the rows' attribution to
the latent units."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
from torch import nn

from .attribution import Game, Reader, attribute_row, reader_for
from .bounds import Bounds, compute_bounds
from .coalitions import CoalitionRead, CoalitionRuns, mean_values, runs_needed
from .estimate import Estimate
from .estimators.batches import Progress
from .estimators.runs import LATENT, RunResult, unread
from .estimators.settings import Settings
from .joint import keyed
from .likelihood import Likelihood
from .mmd import Mmd, mmd_by_layer, sample_pair
from .report import Diagnostic, LayerResult, VariantResult
from .sampling import Posterior, stream_seed
from .taps import modes_restored, select_output, tapped

NO_LIKELIHOOD = (
    "no likelihood given, so the rate, distortion, ELBO and IWAE bounds and the per-layer ELBOs "
    "are left out: pass likelihood='gaussian:SIGMA', 'bernoulli' or a callable (--likelihood)"
)


def with_mmd(
    variants: list[VariantResult], decoders: list[tuple[str, nn.Module]], names: Sequence[str],
    post: Posterior, settings: Settings, seed: int, output_key: str | int | None,
) -> list[VariantResult]:  # fmt: skip
    """Every row with its MMD^2 (aggregate posterior vs prior, the same latent samples for every
    decoder); a variant of several decoders (the random copies) pools their estimates: the mean,
    the mean standard error (their errors are correlated through the shared samples) and the
    mean bandwidth."""
    generator = torch.Generator(device=post.mu.device).manual_seed(stream_seed(seed, "mmd"))
    q, p = sample_pair(post, settings.mmd_samples, generator)
    found: dict[str, list[dict[str, Mmd]]] = {}
    for variant, decoder in decoders:
        with tapped(decoder, list(names), output_key) as tap:
            found.setdefault(variant, []).append(mmd_by_layer(tap, names, q, p))

    def pooled(runs: list[dict[str, Mmd]], name: str) -> Mmd:
        if name == LATENT:  # the same in every decoder
            return runs[0][name]
        got = [r[name] for r in runs]
        mean = math.fsum(m.mean for m in got) / len(got)
        se = math.fsum(m.se for m in got) / len(got)  # the decoders share their samples
        return Mmd(mean, se, math.fsum(m.bandwidth for m in got) / len(got))

    return [
        replace(v, layers=tuple(replace(r, mmd2=pooled(found[v.name], r.name)) for r in v.layers))
        for v in variants
    ]


def likelihood_sections(
    decoder: nn.Module, data: torch.Tensor, post: Posterior, like: Likelihood | None,
    output_key: str | int | None, settings: Settings, seed: int, variants: list[VariantResult],
    notes: list[Diagnostic],
) -> tuple[Bounds | None, list[VariantResult]]:  # fmt: skip
    """Rate, distortion, ELBO and IWAE of the trained decoder, and its rows' ELBO = -D - KL
    (left out where the KL is marked unreliable); without a likelihood, a note saying why."""
    if like is None:
        notes.append(Diagnostic("info", NO_LIKELIHOOD))
        return None, variants
    generator = torch.Generator(device=post.mu.device).manual_seed(stream_seed(seed, "bounds"))
    with modes_restored(decoder):
        decoder.eval()
        bounds = compute_bounds(
            lambda z: select_output(decoder(z), output_key)[0], like, data, post,
            settings.distortion_samples, settings.iwae_k, generator,
        )  # fmt: skip
    d = bounds.distortion

    def with_elbo(r: LayerResult) -> LayerResult:
        if "kl" in r.unreliable or not math.isfinite(r.kl.mean):
            return r
        return replace(r, elbo=Estimate(-d.mean - r.kl.mean, math.hypot(d.se, r.kl.se), r.kl.n))

    out = [
        replace(v, layers=tuple(with_elbo(r) for r in v.layers)) if v.name == "trained" else v
        for v in variants
    ]
    return bounds, out


def with_attribution(
    variants: list[VariantResult], decoder_variants: Sequence[str], run: RunResult,
    read_runs: Callable[[Sequence[tuple[int, str]]], CoalitionRead], post: Posterior,
    settings: Settings, seed: int, notes: list[Diagnostic], on_step: Progress,
) -> list[VariantResult]:  # fmt: skip
    """Every row with its Shapley attribution over the latent units (`attribution.py`): read
    without training where its reader allows, else by one estimator run per coalition
    (`coalitions.py`) while those runs fit in settings.attribution_runs. decoder_variants: each
    decoder's variant, in the run's order; read_runs((k, name) pairs) -> the coalition reader of
    those layers. on_step(phase, done, total) after each row and each coalition run."""
    game = Game(post, settings.attribution_samples, stream_seed(seed, "attribution"))
    # each row's decoders: a training-free reader, or the key of a layer only runs can read,
    # or None where the layer was left unread (no values to split)
    entries: dict[tuple[str, str], list[tuple[str, Reader] | str | None]] = {}
    needed: list[tuple[int, str]] = []
    for k, variant in enumerate(decoder_variants):
        for name in [r.name for v in variants if v.name == variant for r in v.layers]:
            key = LATENT if name == LATENT else keyed(k, name)
            runs = [res[key] for res in run.layers]
            found = reader_for(key, runs, run.bases.get(key), game)
            skipped = any(unread(r.method) for r in runs)
            entries.setdefault((variant, name), []).append(None if skipped else found or key)
            needed += [] if found or skipped else [(k, name)]
    total = runs_needed(game.size, settings.attribution_permutations)
    coalitions = None
    if needed and total <= settings.attribution_runs:
        full = {}
        for k, n in needed:
            full[keyed(k, n)] = mean_values([res[keyed(k, n)] for res in run.layers])
        coalitions = CoalitionRuns(
            game, read_runs(needed), full, total, lambda i, n: on_step("coalition runs", i, n)
        )
    elif needed:
        left = sorted({f"{v} {n}" for (v, n), got in entries.items() if str in map(type, got)})
        notes.append(Diagnostic("info", (
            f"{NO_ATTRIBUTION}: it takes {total} estimator runs (one per coalition of the "
            f"{game.size} latent groups), over attribution_runs={settings.attribution_runs} "
            f"(raise it: Settings(attribution_runs=...), --attribution-runs): {', '.join(left)}"
        )))  # fmt: skip
    no_values: list[str] = []

    def attributed(variant: str, r: LayerResult) -> LayerResult:
        readers = []
        for x in entries[variant, r.name]:
            if isinstance(x, str) and coalitions is not None:
                readers.append(coalitions.reader(x))
            elif x is None or isinstance(x, str):
                return r
            else:
                readers.append(x)
        got = attribute_row(game, readers, r.kl.mean, r.mi.mean, settings.attribution_permutations)
        if not all(math.isfinite(x) for x in got.kl + got.mi):
            no_values.append(f"{variant} {r.name}")
            return r
        return replace(r, attribution=got)

    out: list[VariantResult] = []
    done, rows_total = 0, sum(len(v.layers) for v in variants)
    for v in variants:
        rows = []
        for r in v.layers:
            rows.append(attributed(v.name, r))
            done += 1
            on_step("rows", done, rows_total)
        out.append(replace(v, layers=tuple(rows)))
    if no_values:
        notes.append(Diagnostic("info", f"{UNREAD_COALITION}: {', '.join(no_values)}"))
    return out


NO_ATTRIBUTION = "no attribution where a trained critic or a preimage search reads the layer"
UNREAD_COALITION = (
    "no attribution where a coalition of latent units left the layer unread (its posteriors too "
    "narrow for float32 features)"
)
