"""The report's sections beside the per-layer estimates: MMD^2 per layer, with a likelihood the
rate-distortion and IWAE bounds and the per-layer ELBOs, and on request the rows' attribution to
the latent units."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
from torch import nn

from .attribution import Game, attribute_row, reader_for
from .bounds import Bounds, compute_bounds
from .estimate import Estimate
from .estimators.runs import LATENT, RunResult
from .estimators.settings import Settings
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


NO_ATTRIBUTION = (
    "no attribution where a trained critic or a preimage search reads the layer (it would take "
    "one more training or search per coalition of latent units)"
)


def with_attribution(
    variants: list[VariantResult], decoder_variants: Sequence[str], run: RunResult,
    keyed: Callable[[int, str], str], post: Posterior, settings: Settings, seed: int,
    notes: list[Diagnostic], on_row: Callable[[int, int], None],
) -> list[VariantResult]:  # fmt: skip
    """Every row whose reader needs no training with its Shapley attribution over the latent
    units (`attribution.py`); decoder_variants: each decoder's variant, in the run's order.
    on_row(done, total) after each row."""
    game = Game(post, settings.attribution_samples, stream_seed(seed, "attribution"))
    total = sum(len(v.layers) for v in variants)
    done = 0
    left_out: list[str] = []

    def attributed(variant: str, r: LayerResult) -> LayerResult:
        readers = []
        for k, name in enumerate(decoder_variants):
            if name != variant:
                continue
            key = LATENT if r.name == LATENT else keyed(k, r.name)
            runs = [res[key] for res in run.layers]
            found = reader_for(key, runs, run.bases.get(key), game)
            if found is None:
                left_out.append(f"{variant} {r.name}")
                return r
            readers.append(found)
        got = attribute_row(game, readers, r.kl.mean, r.mi.mean, settings.attribution_permutations)
        return replace(r, attribution=got)

    out = []
    for v in variants:
        rows = []
        for r in v.layers:
            rows.append(attributed(v.name, r))
            done += 1
            on_row(done, total)
        out.append(replace(v, layers=tuple(rows)))
    if left_out:
        notes.append(Diagnostic("info", f"{NO_ATTRIBUTION}: {', '.join(left_out)}"))
    return out
