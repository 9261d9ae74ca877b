"""`inspect`: the pipeline model -> taps -> samples -> critics -> estimates -> report."""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from rich.console import Console
from rich.progress import TaskID
from torch import nn

from .coalitions import CoalitionRead
from .diagnostics import diagnose
from .errors import ArgumentError, DataError
from .estimators.batches import Progress as StepCallback  # rich has its own Progress
from .estimators.batches import quiet
from .estimators.runs import LATENT, LayerRun, RunResult
from .estimators.settings import Settings
from .framestack import on_fresh_stack
from .guard import guard
from .joint import coalition_read, exact_and_levels, keyed, run_decoders
from .latent_stats import latent_stats
from .likelihood import Likelihood, LogLikelihood, parse_likelihood
from .model import VAE, resolve_decoder
from .pooling import pool_row
from .reinit import copy_seed, reinitialised
from .render import progress_display
from .report import Diagnostic, ModelInfo, Report, VariantResult
from .sampling import Posterior, as_data_tensor, encode_all, module_device, stream_seed
from .sections import likelihood_sections, with_attribution, with_mmd
from .taps import OUTPUT, probe, resolve_layers, tapped
from .version import __version__

if TYPE_CHECKING:
    from .checkpoints import Loaded


def resolve_device(device: str | torch.device) -> torch.device:
    """`auto` -> CUDA when available, else CPU; `cuda` without CUDA is an error."""
    if isinstance(device, torch.device):
        return device
    if not isinstance(device, str):
        raise ArgumentError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ArgumentError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ArgumentError(
            f"device {device!r} asked for, but this torch build sees no CUDA device; "
            "use --device cpu (or auto)"
        )
    if dev.type not in ("cpu", "cuda"):
        raise ArgumentError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    return dev


def check_count(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ArgumentError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


@contextmanager
def _progress(enabled: bool) -> Iterator[Callable[[str], StepCallback]]:
    """Rich progress bars on stderr, one per training phase; yields a factory of step callbacks.
    A phase that stops early is shown complete at the steps it ran."""
    if not enabled:
        yield lambda _label: quiet
        return
    with progress_display(Console(stderr=True)) as bar:

        def for_run(label: str) -> StepCallback:
            tasks: dict[str, TaskID] = {}

            def on_step(phase: str, done: int, total: int) -> None:
                if phase not in tasks:
                    tasks[phase] = bar.add_task(f"{phase}: {label}", total=total)
                bar.update(tasks[phase], completed=done, total=total)

            return on_step

        yield for_run


def inspect(
    vae: VAE | nn.Module,
    data: Any,
    layers: Sequence[str] | None = None,
    random_inits: int = 3,
    seeds: int = 3,
    device: str | torch.device = "auto",
    *,
    seed: int = 0,
    estimator: str = "telescoping",
    settings: Settings | None = None,
    progress: bool | None = None,
    source: str = "python",
    output_key: str | int | None = None,
    likelihood: str | LogLikelihood | None = None,
    attribution: bool = False,
) -> Report:
    """Estimate KL, aggregate KL and MI (nats) at the latent and every chosen decoder layer.

    vae: a `VAE` (or a model that `VAE.from_model` understands). data: tensor or array [N, ...],
    encoded once. layers: module names or glob patterns (`decoder.named_modules()` names, plus
    `output` for the decoder's return value); None picks the parametrised leaf modules in
    execution order and the output. Runs `seeds` critic trainings on the trained decoder and on
    each of `random_inits` re-initialised copies (pooled as variant `random`). output_key: the
    entry of a tuple/dict return value that `output` reads (default: its first tensor). The
    user's model is left as it was: mode, hooks, parameters and the caller's RNG state.
    likelihood: 'gaussian:SIGMA', 'bernoulli', 'bernoulli:logits' or a callable (x, decoder
    output) -> log p(x|z) per row, for the bounds and per-layer ELBOs. attribution: the rows'
    Shapley values over the latent units (`attribution.py`).
    """
    if not isinstance(vae, VAE):
        vae = VAE.from_model(vae)
    random_inits = check_count("random_inits", random_inits, 0)
    seeds = check_count("seeds", seeds, 1)
    seed = check_count("seed", seed, 0)
    if not isinstance(attribution, bool):
        raise ArgumentError(f"attribution must be True or False, got {attribution!r}")
    if settings is None:
        settings = Settings(estimator=estimator)
    elif estimator != settings.estimator and estimator != "telescoping":
        raise ArgumentError("pass the estimator either as estimator= or in settings=, not both")
    dev = resolve_device(device)
    like = parse_likelihood(likelihood)
    data = as_data_tensor(data)
    if progress is None:
        progress = sys.stderr.isatty()
    rng_devices = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(stream_seed(seed, "global"))
        return on_fresh_stack(
            lambda: _inspect(
                vae,
                data,
                layers,
                random_inits,
                seeds,
                dev,
                seed,
                settings,
                progress,
                source,
                output_key,
                like,
                attribution,
            )
        )


def inspect_loaded(loaded: Loaded, data: Any = None, **inspect_args: Any) -> Report:
    """Inspect a loaded checkpoint as every entry point does (the CLI, `compare`, `sweep`'s
    workers): on `data`, else the checkpoint's own (neither is an error), named by its source,
    with the likelihood it stores unless one is given. inspect_args: `inspect`'s."""
    values = data if data is not None else loaded.data
    if values is None:
        name = loaded.path.name if loaded.path is not None else loaded.source
        raise DataError(
            f"{name} carries no data; pass --data PATH (.pt, .npy or .npz; data= in Python) with "
            "inputs for the encoder"
        )
    if inspect_args.get("likelihood") is None:
        inspect_args["likelihood"] = loaded.likelihood
    return inspect(loaded.model, values, source=loaded.source, **inspect_args)


def _inspect(
    vae: VAE,
    data: torch.Tensor,
    layers: Sequence[str] | None,
    random_inits: int,
    seeds: int,
    dev: torch.device,
    seed: int,
    settings: Settings,
    progress: bool,
    source: str,
    output_key: str | int | None,
    like: Likelihood | None,
    attribution: bool,
) -> Report:
    notes: list[Diagnostic] = []
    post_cpu = encode_all(vae, data)
    post = post_cpu.to(dev)
    decoder, note = resolve_decoder(vae.decoder, post_cpu.mu[:2].to(module_device(vae.decoder)))
    if note is not None:
        notes.append(Diagnostic("info", note))
    if module_device(decoder) != dev:
        decoder = copy.deepcopy(decoder).to(dev)  # the user's decoder stays where it is
    names, types, shapes = _layers(decoder, layers, post, notes, output_key)
    exact, levels = exact_and_levels(post_cpu, settings, seed)

    decoders = _decoders(decoder, random_inits, seed, notes)
    with _progress(progress) as for_run:
        run = run_decoders(
            [d for _, d in decoders],
            names,
            post,
            levels,
            settings,
            seed,
            seeds,
            dev,
            lambda ks: for_run(_run_label(ks, len(decoders), seeds)),
            exact,
            output_key,
        )
    # the latent row does not depend on the decoder: estimated once, shown in every variant
    latent_runs = [r[LATENT] for r in run.layers]
    runs: dict[str, dict[str, list[LayerRun]]] = {}
    for k, (variant, _) in enumerate(decoders):
        rows_of = runs.setdefault(variant, {LATENT: latent_runs})
        for n in names:
            rows_of.setdefault(n, []).extend(r[keyed(k, n)] for r in run.layers)
    run_counts = {v: sum(1 for name, _ in decoders if name == v) * seeds for v in runs}
    variants = [
        VariantResult(v, run_counts[v], guard([pool_row(n, types[n], shapes[n], runs[v][n], exact)
                                               for n in [LATENT, *names]], post.n))
        for v in ("trained", "random") if v in runs
    ]  # fmt: skip
    settings_dict: dict[str, Any] = {
        "seeds": seeds,
        "random_inits": random_inits,
        "device": str(dev),
        "seed": seed,
        "layers": list(names),
        "bridges": len(levels) - 1,
        "bridge_levels": [round(a, 6) for a in levels],
        "log_n": math.log(post.n),
        "steps_run": run.steps,
        "regression_steps_run": run.regression_steps,
        "first_tensor_rule": "tuple/list/dict outputs use their first tensor",
        **{"output_key": output_key, "attribution": attribution, **settings.as_dict()},
    }
    if attribution:
        variants = _attributed(variants, decoders, run, post, settings, seed, notes, progress,
                               dev, output_key)  # fmt: skip
    variants = with_mmd(variants, decoders, names, post, settings, seed, output_key)
    bounds, variants = likelihood_sections(decoder, data, post, like, output_key, settings, seed,
                                           variants, notes)  # fmt: skip
    diagnostics = tuple(notes) + diagnose(variants, post.n)
    model = ModelInfo(post.latent_shape, post.n, source)
    stats = latent_stats(post_cpu.mu, post_cpu.logvar)
    return Report(__version__, model, settings_dict, tuple(variants), diagnostics, bounds, stats)


def _run_label(ks: Sequence[int], decoders: int, seeds: int) -> str:
    """The progress label of a run of decoders `ks` (0: the trained one, k: random copy k)."""
    if len(ks) == decoders:
        return f"{decoders} decoder(s) x {seeds} seed(s)"
    which = ", ".join("trained" if k == 0 else f"random {k}" for k in ks)
    return f"{which} x {seeds} seed(s)"


def _attributed(
    variants: list[VariantResult], decoders: list[tuple[str, nn.Module]], run: RunResult,
    post: Posterior, settings: Settings, seed: int, notes: list[Diagnostic], progress: bool,
    dev: torch.device, output_key: str | int | None,
) -> list[VariantResult]:  # fmt: skip
    """`sections.with_attribution`, its coalition runs by `joint.coalition_read` on these
    decoders, with progress bars over the runs and the rows."""
    modules = [d for _, d in decoders]

    def read_runs(needed: Sequence[tuple[int, str]]) -> CoalitionRead:
        return coalition_read(modules, needed, settings, seed, dev, output_key)

    with _progress(progress) as for_run:
        return with_attribution(variants, [v for v, _ in decoders], run, read_runs, post,
                                settings, seed, notes, for_run("attribution"))  # fmt: skip


def _layers(
    decoder: nn.Module,
    layers: Sequence[str] | None,
    post: Posterior,
    notes: list[Diagnostic],
    output_key: str | int | None,
) -> tuple[list[str], dict[str, str], dict[str, tuple[int, ...]]]:
    """The layers to read (`taps.resolve_layers`), each one's type and per-sample shape (the
    latent's too; `output` typed by the entry of the return value it reads, e.g.
    "output['recon']"); notes on layers left out of the defaults or read through a container."""
    found = probe(decoder, post.mu[:2])
    names = resolve_layers(decoder, layers, found)
    reused = [i.name for i in found.layers if i.params > 0 and i.calls > 1]
    if layers is None and reused:
        notes.append(
            Diagnostic(
                "info",
                f"left out of the default layers: called more than once per forward pass: "
                f"{', '.join(reused)}",
            )
        )
    with tapped(decoder, names, output_key) as tap:
        shapes = {n: tuple(h.shape[1:]) for n, h in tap(post.mu[:2]).items()}
        entry = tap.output_entry
    shapes[LATENT] = post.latent_shape
    modules = dict(decoder.named_modules())
    types = {
        n: (type(modules[n]).__name__ if n != OUTPUT else f"output{entry or ''}") for n in names
    }
    types[LATENT] = "latent"
    for info in found.layers:
        if info.name in names and info.first_tensor_rule:
            notes.append(
                Diagnostic(
                    "info", "output is a tuple/list/dict: its first tensor is used", info.name
                )
            )
    return names, types, shapes


def _decoders(
    decoder: nn.Module, random_inits: int, seed: int, notes: list[Diagnostic]
) -> list[tuple[str, nn.Module]]:
    """The trained decoder and `random_inits` re-initialised copies, each with its variant."""
    decoders: list[tuple[str, nn.Module]] = [("trained", decoder)]
    for init in range(random_inits):
        copy_, fallback = reinitialised(decoder, copy_seed(seed, init))
        decoders.append(("random", copy_))
        if fallback and init == 0:
            notes.append(
                Diagnostic(
                    "warning",
                    "no reset_parameters(); re-initialised with the fallback "
                    "(Kaiming-uniform weights, uniform 1-d parameters)",
                    ", ".join(fallback),
                    "random",
                )
            )
    return decoders
