"""The `decoderscope` command line (Typer). Errors become a short message and exit code 1/2."""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console

from .errors import ArgumentError, DecoderscopeError

if TYPE_CHECKING:
    from .outputs import Outputs, Written
    from .report import Report

app = typer.Typer(
    name="decoderscope",
    help="How much of a VAE's latent information survives each decoder layer (trained vs random).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True, soft_wrap=True)
T = TypeVar("T")


def _guard(fn: Callable[[], T]) -> T:
    """Run a command body: usage errors exit 2, unusable models or data exit 1, with a message."""
    try:
        return fn()
    except ArgumentError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from None
    except DecoderscopeError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(130) from None


def _load(checkpoint: Path, model: str | None, trust: bool) -> Any:
    from .checkpoints import load_checkpoint

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_checkpoint(checkpoint, model=model, trust=trust)
    for w in caught:
        err.print(f"[yellow]warning:[/yellow] {w.message}", highlight=False)
    return loaded


def _layers_arg(layers: str | None) -> list[str] | None:
    if layers is None:
        return None
    names = [x.strip() for x in layers.split(",") if x.strip()]
    if not names:
        raise ArgumentError("--layers is empty; give comma-separated names or globs, e.g. 'net.*'")
    return names


@app.command()
def inspect(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint: bundle, state_dict, Lightning")],
    data: Annotated[
        Path | None, typer.Option(help="Data [N, ...] as .pt, .npy or .npz (else the bundle's)")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Factory 'module:callable' or 'file.py:callable'")
    ] = None,
    layers: Annotated[
        str | None, typer.Option(help="Comma-separated layer names or globs (default: all)")
    ] = None,
    random_inits: Annotated[int, typer.Option(help="Re-initialised decoder copies")] = 3,
    seeds: Annotated[int, typer.Option(help="Critic trainings per decoder")] = 3,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N]")] = "auto",
    seed: Annotated[int, typer.Option(help="Seed for every random choice")] = 0,
    estimator: Annotated[str, typer.Option(help="telescoping (default) or plain")] = "telescoping",
    steps: Annotated[
        int | None,
        typer.Option(help="Most critic steps per run \\[default: 12000; plain: 1000]"),
    ] = None,
    output_key: Annotated[
        str | None,
        typer.Option(help="Entry of a tuple/dict decoder output that 'output' reads (key/index)"),
    ] = None,
    likelihood: Annotated[
        str | None,
        typer.Option(
            help="p(x|z): gaussian:SIGMA, bernoulli, bernoulli:logits (else the bundle's)"
        ),
    ] = None,
    attribution: Annotated[
        bool,
        typer.Option("--attribution", help="Shapley values of each row's KL, MI over latent units"),
    ] = False,
    attribution_runs: Annotated[
        int, typer.Option(help="Most estimator runs (one per coalition) for critic rows")
    ] = 30,
    json_out: Annotated[
        str | None, typer.Option("--json", help="Write JSON to PATH, or '-' for stdout")
    ] = None,
    markdown: Annotated[Path | None, typer.Option(help="Write a Markdown report")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write a figure (PNG unless named)")] = None,
    strict: Annotated[
        bool, typer.Option(help="Exit 3 when a value is marked unreliable (beyond a hard bound)")
    ] = False,
    trust: Annotated[
        bool, typer.Option(help="Allow pickled modules (runs code from the file)")
    ] = False,
) -> None:
    """Estimate KL, aggregate KL and MI per decoder layer, trained vs re-initialised."""

    def body() -> None:
        from .checkpoints import load_data
        from .estimators.settings import Settings
        from .outputs import check_outputs
        from .pipeline import inspect_loaded
        from .render import print_report

        outputs = check_outputs(json_out, markdown, plot)  # before any work
        settings = Settings(estimator=estimator, steps=steps, attribution_runs=attribution_runs)
        loaded = _load(checkpoint, model, trust)
        report = inspect_loaded(
            loaded,
            load_data(data) if data is not None else None,
            layers=_layers_arg(layers),
            random_inits=random_inits,
            seeds=seeds,
            device=device,
            seed=seed,
            settings=settings,
            progress=True,
            output_key=output_key,
            likelihood=likelihood,
            attribution=attribution,
        )
        _write_outputs(report, outputs, lambda console: print_report(report, console))
        if strict:
            _exit_if_unreliable(report)

    _guard(body)


def _exit_if_unreliable(report: Report) -> None:
    """--strict: exit 3 naming the rows marked unreliable, if there are any."""
    bad = report.unreliable_rows()
    if bad:
        names = ", ".join(f"{v}/{r.name}" for v, r in bad)
        err.print(f"[red]unreliable:[/red] {names} (--strict)", highlight=False)
        raise typer.Exit(3)


def _write_outputs(result: Written, outputs: Outputs, show: Callable[[Console], None]) -> None:
    """JSON on stdout for '-', else `show` the result on the console; then every output file."""
    from .outputs import write_outputs

    if outputs.stdout:
        sys.stdout.write(result.to_json() + "\n")
    else:
        show(Console())
    done, failed = write_outputs(result, outputs)
    for path in done:
        err.print(f"wrote {path}", highlight=False)
    if failed:
        for why in failed:
            err.print(f"[red]error:[/red] could not write {why}", highlight=False)
        raise typer.Exit(1)


@app.command()
def layers(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint: bundle, state_dict, Lightning")],
    model: Annotated[
        str | None, typer.Option(help="Factory 'module:callable' or 'file.py:callable'")
    ] = None,
    data: Annotated[
        Path | None, typer.Option(help="Data [N, ...] as .pt, .npy or .npz (else the bundle's)")
    ] = None,
    trust: Annotated[bool, typer.Option(help="Allow pickled modules")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table")] = False,
) -> None:
    """List the decoder's layers (torchinfo): names, types, shapes, parameters, defaults."""

    def body() -> None:
        from .checkpoints import load_data
        from .layers import describe, layers_table

        loaded = _load(checkpoint, model, trust)
        info = describe(loaded.model, load_data(data) if data is not None else loaded.data)
        if json_out:
            sys.stdout.write(json.dumps(info, indent=2) + "\n")
        else:
            Console().print(layers_table(info))

    _guard(body)


@app.command()
def compare(
    a: Annotated[str, typer.Argument(help="Reference: a report (.json) or a checkpoint")],
    b: Annotated[str, typer.Argument(help="New: a report (.json) or a checkpoint")],
    max_mi_drop: Annotated[
        float | None, typer.Option(help="Fail (exit 3) where a layer's MI falls by more (nats)")
    ] = None,
    max_kept_drop: Annotated[
        float | None,
        typer.Option(help="Fail (exit 3) where the share of latent MI kept falls by more (0-1)"),
    ] = None,
    data: Annotated[Path | None, typer.Option(help="Data for checkpoints without it")] = None,
    model: Annotated[str | None, typer.Option(help="Factory for plain state_dicts")] = None,
    random_inits: Annotated[int, typer.Option(help="For checkpoints: re-initialised copies")] = 3,
    seeds: Annotated[int, typer.Option(help="For checkpoints: critic trainings per decoder")] = 3,
    steps: Annotated[int | None, typer.Option(help="For checkpoints: most critic steps")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N]")] = "auto",
    seed: Annotated[int, typer.Option(help="Seed for both inspections")] = 0,
    json_out: Annotated[
        str | None, typer.Option("--json", help="Write JSON to PATH, or '-' for stdout")
    ] = None,
    markdown: Annotated[
        Path | None, typer.Option(help="Write Markdown for a pull-request comment")
    ] = None,
    plot: Annotated[
        Path | None, typer.Option(help="Write a figure of ΔMI per layer (the Markdown shows it)")
    ] = None,
    trust: Annotated[bool, typer.Option(help="Allow pickled modules")] = False,
) -> None:
    """Compare two reports or checkpoints per layer: B - A with standard errors; exit 3 when a
    threshold is broken."""

    def body() -> None:
        from .checkpoints import load_data
        from .compare import compare as run_compare
        from .estimators.settings import Settings
        from .outputs import check_outputs
        from .render_compare import table, verdict

        outputs = check_outputs(json_out, markdown, plot)
        result = run_compare(
            a, b, max_mi_drop, max_kept_drop,
            data=load_data(data) if data is not None else None, model=model, trust=trust,
            random_inits=random_inits, seeds=seeds, device=device, seed=seed,
            settings=Settings(steps=steps), progress=True,
        )  # fmt: skip

        def show(console: Console) -> None:
            console.print(table(result))
            console.print(verdict(result), highlight=False)

        _write_outputs(result, outputs, show)
        if result.broken:
            raise typer.Exit(3)

    _guard(body)


@app.command()
def sweep(
    paths: Annotated[
        list[str], typer.Argument(help="Checkpoints, reports (.json), folders or globs")
    ],
    out: Annotated[Path, typer.Option(help="Folder for sweep.json/.csv/.png, reports/, cache/")],
    workers: Annotated[
        int | None, typer.Option(help="Local processes \\[default: one per core]")
    ] = None,
    ray: Annotated[
        str | None, typer.Option(help="Run on Ray: auto, local or a cluster ADDRESS")
    ] = None,
    threads: Annotated[
        int | None, typer.Option(help="Torch threads per worker \\[default: cores / workers]")
    ] = None,
    data: Annotated[Path | None, typer.Option(help="Data for every checkpoint")] = None,
    model: Annotated[str | None, typer.Option(help="Factory for plain state_dicts")] = None,
    layers: Annotated[str | None, typer.Option(help="Comma-separated layer names or globs")] = None,
    random_inits: Annotated[int, typer.Option(help="Re-initialised decoder copies")] = 3,
    seeds: Annotated[int, typer.Option(help="Critic trainings per decoder")] = 3,
    steps: Annotated[int | None, typer.Option(help="Most critic training steps per run")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N]")] = "auto",
    seed: Annotated[int, typer.Option(help="Seed for every inspection")] = 0,
    retries: Annotated[int, typer.Option(help="Reruns of a checkpoint whose worker died")] = 1,
    likelihood: Annotated[str | None, typer.Option(help="p(x|z) for the bounds")] = None,
    trust: Annotated[bool, typer.Option(help="Allow pickled modules")] = False,
) -> None:
    """Inspect many checkpoints with the same settings and seed; resumable (cached by content and
    settings). Exit 1 when a checkpoint failed (the others are kept)."""

    def body() -> None:
        from .checkpoints import load_data
        from .estimators.settings import Settings
        from .render_sweep import print_summary
        from .sweep import sweep as run_sweep

        result = run_sweep(
            paths, out, workers=workers, ray=ray, threads=threads,
            data=load_data(data) if data is not None else None, model=model, trust=trust,
            layers=_layers_arg(layers), random_inits=random_inits, seeds=seeds, device=device,
            seed=seed, settings=Settings(steps=steps), retries=retries, likelihood=likelihood,
            progress=True,
        )  # fmt: skip
        print_summary(result, Console())
        err.print(f"wrote {out / 'sweep.json'}, {out / 'sweep.csv'}, {out / 'reports'}")
        if result.failed:
            raise typer.Exit(1)

    _guard(body)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for report.json, report.md, layers.png")] = Path(
        "demo-output"
    ),
    seed: Annotated[int, typer.Option(help="Seed")] = 0,
) -> None:
    """Train the paper's small VAE on a 2-D Gaussian mixture, then inspect trained vs random."""

    def body() -> None:
        from .demo import run_demo

        run_demo(out, seed=seed, console=Console(), err=err)

    _guard(body)


def _version(value: bool) -> None:
    if value:
        from .version import __version__

        typer.echo(f"decoderscope {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version"),
    ] = False,
) -> None:
    """How much of a VAE's latent information survives each decoder layer."""


def main() -> None:
    app()


if __name__ == "__main__":
    main()
