"""The joint run: every decoder (the trained one and its re-initialised copies) read in one
estimator run, their layers keyed by decoder."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack

import torch
from torch import nn

from .dependence import determined
from .estimators.batches import Features, Lazy, quiet, read_names
from .estimators.batches import Progress as StepCallback
from .estimators.beside import Beside, can_fork, polling, sharing_cores
from .estimators.exact import ExactLatent, exact_latent
from .estimators.run import run_critics
from .estimators.runs import LATENT, LayerRun, RunResult
from .estimators.settings import Settings, levels_for
from .sampling import Posterior, stream_seed
from .structure import float64_layers
from .taps import OUTPUT, Tap, tapped


def keyed(k: int, name: str) -> str:
    """Layer `name` of decoder k in the joint run (the latent is shared)."""
    return f"{k}/{name}"


def exact_and_levels(
    post: Posterior, settings: Settings, seed: int
) -> tuple[ExactLatent, list[float]]:
    """A run's latent inputs from a posterior on the CPU: the latent's exact values and the
    bridge levels."""
    gen = torch.Generator(device="cpu").manual_seed(stream_seed(seed, "exact"))
    return exact_latent(post, settings.exact_samples, gen), levels_for(post, settings)


def split(decoders: int, dev: torch.device) -> bool:
    """Whether each decoder is read in a process of its own (`run_decoders`): 2 or more of
    them, at most as many as the torch threads, where work beside gets a worker (`can_fork`)."""
    return 2 <= decoders <= torch.get_num_threads() and can_fork(dev)


def run_decoders(
    decoders: list[nn.Module],
    names: list[str],
    post: Posterior,
    levels: list[float],
    settings: Settings,
    seed: int,
    seeds: int,
    dev: torch.device,
    steps_for: Callable[[Sequence[int]], StepCallback],
    exact: ExactLatent,
    output_key: str | int | None,
) -> RunResult:
    """Every decoder (trained and re-initialised copies) and every seed read at once. Layers are
    named `keyed(k, name)` (the latent: LATENT, read with decoder 0). steps_for(the indices of
    the decoders a run reads) -> that run's progress callback.

    Where `split`, each decoder is read in a process of its own (decoder 0 in this one) on
    threads // decoders threads and a random stream of its own (decoder 0's is the joint run's:
    the trained decoder reads the same rows with or without copies beside it); elsewhere, in one
    joint run (`_joint_run`). Measured, 2 threads, alternating: diffusers' AutoencoderKL with
    one random copy (refinement through the decoder, no critics) 47.9 / 45.7 -> 35.6 / 37.2 s;
    the demo VAE with one random copy 22.8 / 24.3 -> 21.2 / 20.9 s; the demo's 4 decoders in 2
    processes of 2 took 50-53 s against 46-48 s joint, so more decoders than threads stay joint
    (docs/method.md item 5)."""
    parts = (
        [[k] for k in range(len(decoders))]
        if split(len(decoders), dev)
        else [list(range(len(decoders)))]
    )

    def part(ks: Sequence[int], on_step: StepCallback) -> RunResult:
        run_seed = stream_seed(seed, "run" if ks[0] == 0 else f"run/{ks[0]}")
        mine = [decoders[k] for k in ks]
        return _joint_run(mine, names, post, levels, settings, run_seed, seeds, dev, on_step,
                          exact, output_key)  # fmt: skip

    def work(ks: Sequence[int]) -> Callable[[StepCallback | None], RunResult]:
        return lambda report: part(ks, report or quiet)

    each = max(1, torch.get_num_threads() // len(parts))
    with ExitStack() as stack:
        sides = [
            stack.enter_context(Beside(work(ks), dev, steps_for(ks), threads=each))
            for ks in parts[1:]
        ]
        if sides:  # this process is one decoder's of several: it shares the cores
            stack.enter_context(sharing_cores())
        first = part(parts[0], polling(sides, steps_for(parts[0])))
        results = [first, *(side.collect() for side in sides)]
    return _merged(parts, results)


def _merged(parts: Sequence[Sequence[int]], results: Sequence[RunResult]) -> RunResult:
    """The parts' runs as one: their layers keyed by decoder in the whole, the latent's from
    decoder 0's run, the steps the longest run took."""

    def rekeyed(key: str, ks: Sequence[int]) -> str:
        k, _, name = key.partition("/")
        return keyed(ks[int(k)], name)

    layers: list[dict[str, LayerRun]] = [{} for _ in results[0].layers]
    bases: dict[str, torch.Tensor] = {}
    for ks, run in zip(parts, results, strict=True):
        for whole, own in zip(layers, run.layers, strict=True):
            whole.update({rekeyed(key, ks) if key != LATENT else key: row
                          for key, row in own.items() if key != LATENT or ks[0] == 0})  # fmt: skip
        bases.update({rekeyed(key, ks): basis for key, basis in run.bases.items()})
    steps = max(run.steps for run in results)
    return RunResult(layers, steps, max(run.regression_steps for run in results), bases)


def _joint_run(
    decoders: list[nn.Module],
    names: list[str],
    post: Posterior,
    levels: list[float],
    settings: Settings,
    run_seed: int,
    seeds: int,
    dev: torch.device,
    on_step: StepCallback,
    exact: ExactLatent,
    output_key: str | int | None,
) -> RunResult:
    """Every decoder and every seed in ONE training run: each step's latent samples go through
    every decoder, and all their layers' critics train together in batched kernels. Layers are
    named `keyed(k, name)` (the latent: LATENT). Measured (demo, 2 cores): 1.4x faster than one
    run per decoder, before counting the latent critics that are no longer trained once per
    decoder."""
    torch.manual_seed(run_seed)  # critic initialisation
    generator = torch.Generator(device=dev).manual_seed(run_seed)
    keys = [keyed(k, n) for k in range(len(decoders)) for n in names]
    with ExitStack() as stack:
        # the float64 copies are made before any hook is on the decoders, and only where used
        structural = None
        if settings.reads_affine:
            structural = float64_layers(
                decoders, names, stack, output_key, keyed, post.latent_shape
            )
        taps = [stack.enter_context(tapped(d, names, output_key)) for d in decoders]
        determines: dict[str, frozenset[str]] = {}
        if settings.reads_affine:
            for k, tap in enumerate(taps):
                found = determined(tap, names, post.latent_shape, dev)
                determines |= {
                    keyed(k, a): frozenset(keyed(k, b) for b in bs) for a, bs in found.items()
                }
        return run_critics(
            decoder_features(taps, names),
            keys,
            post,
            levels,
            settings,
            generator,
            on_step,
            seeds,
            exact,
            structural,
            determines,
        )


def decoder_features(taps: Sequence[Tap], names: Sequence[str]) -> Features:
    """The joint run's features: {keyed(k, name): h} for z, each decoder run when one of its
    layers is first read. Inside `batches.reading(keys)` a decoder stops after the last of those
    keys' layers (`names` is in execution order): the layers after it cost nothing; a layer read
    beyond it runs that decoder again, whole."""
    keys = [keyed(k, n) for k in range(len(taps)) for n in names]
    where = {keyed(k, n): (k, n) for k in range(len(taps)) for n in names}
    order = {n: i for i, n in enumerate(names)}

    def features(z: torch.Tensor) -> Lazy:
        runs: dict[int, dict[str, torch.Tensor]] = {}
        wanted = read_names()

        def last(k: int) -> str | None:
            if wanted is None:
                return None
            mine = [where[key][1] for key in wanted if key in where and where[key][0] == k]
            stop = max(mine, key=order.__getitem__, default=OUTPUT)
            return None if stop == OUTPUT else stop

        def compute(key: str) -> torch.Tensor:
            k, name = where[key]
            if k not in runs:
                runs[k] = taps[k](z, last(k))
            if name not in runs[k]:  # beyond where the hint stopped it
                runs[k] = taps[k](z)
            return runs[k][name]

        return Lazy(keys, compute)

    return features


def coalition_read(
    decoders: list[nn.Module],
    needed: Sequence[tuple[int, str]],
    settings: Settings,
    seed: int,
    dev: torch.device,
    output_key: str | int | None,
) -> Callable[[Posterior], dict[str, LayerRun]]:
    """A reader of the layers `needed` ((decoder k, layer name) pairs) on any posterior: one
    `run_decoders` on the decoders they are in, one seed, its own exact latent and bridge levels,
    no progress bars. Returns {keyed(k, name): LayerRun}."""
    ks = sorted({k for k, _ in needed})
    names = list(dict.fromkeys(name for _, name in needed))

    def read(post: Posterior) -> dict[str, LayerRun]:
        exact, levels = exact_and_levels(post.to(torch.device("cpu")), settings, seed)
        run = run_decoders(
            [decoders[k] for k in ks], names, post, levels, settings, seed, 1, dev,
            lambda _ks: quiet, exact, output_key,
        )  # fmt: skip
        return {keyed(k, name): run.layers[0][keyed(ks.index(k), name)] for k, name in needed}

    return read
