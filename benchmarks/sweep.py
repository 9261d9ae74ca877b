"""`sweep` over one training run of the digits VAE, saved every epoch: the local pool against one
checkpoint at a time (wall time as a ratio), the same numbers on a local Ray cluster, and a
worker killed mid-sweep (only its checkpoint lost; a rerun resumes from the cache).

    .venv/bin/python benchmarks/sweep.py [--epochs 8] [--out FOLDER]

Prints a Markdown table for docs/sweep.md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import decoderscope as ds
from decoderscope.digits import DigitsVAE, digits, train

SETTINGS = {"random_inits": 1, "seeds": 1, "device": "cpu"}
CLI = ["--random-inits", "1", "--seeds", "1", "--device", "cpu"]


def checkpoints(folder: Path, epochs: int) -> None:
    data = digits(500)

    def save(epoch: int, model: DigitsVAE) -> None:
        ds.save_checkpoint(
            model, folder / f"epoch={epoch:02d}.pt", "decoderscope.digits:DigitsVAE", {}, data
        )

    torch.manual_seed(0)  # the initial weights
    train(DigitsVAE(), digits(), epochs=epochs, on_epoch=save, batch=32)


def timed(label: str, **kwargs: object) -> tuple[float, ds.Sweep]:
    start = time.perf_counter()
    result = ds.sweep(progress=False, **SETTINGS, **kwargs)  # type: ignore[arg-type]
    seconds = time.perf_counter() - start
    print(f"{label}: {seconds:.1f} s", file=sys.stderr)
    return seconds, result


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def kill_one_worker(run: Path, out: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Sweep from the CLI with --retries 0, kill one worker (SIGKILL) once the first checkpoint
    is done, then sweep again; the statuses of both runs."""
    cmd = [sys.executable, "-m", "decoderscope", "sweep", str(run), "--out", str(out), *CLI]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    proc = subprocess.Popen([*cmd, "--retries", "0"], **quiet)  # type: ignore[call-overload]
    cache = out / "cache"
    while not (cache.is_dir() and any(cache.glob("*.json"))) and proc.poll() is None:
        time.sleep(0.2)
    victims = children(proc.pid)
    os.kill(victims[0], signal.SIGKILL)
    proc.wait()
    first = json.loads((out / "sweep.json").read_text())["checkpoints"]
    subprocess.run(cmd, check=False, **quiet)  # type: ignore[call-overload]
    second = json.loads((out / "sweep.json").read_text())["checkpoints"]
    return {c["label"]: c["status"] for c in first}, {c["label"]: c["status"] for c in second}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    base = args.out or Path(tempfile.mkdtemp(prefix="decoderscope-sweep-"))
    run = base / "run"
    run.mkdir(parents=True, exist_ok=True)
    checkpoints(run, args.epochs)
    one, serial = timed("one at a time", paths=run, out=base / "serial", workers=1)
    pool_s, pool = timed("pool", paths=run, out=base / "pool", workers=2)
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ray_s, on_ray = timed("ray", paths=run, out=base / "ray", ray="auto")
    finally:
        ray.shutdown()
    first, second = kill_one_worker(run, base / "killed")
    print(f"| checkpoints | {args.epochs} (digits VAE, one per epoch; N = 500) |")
    print("|---|---|")
    print(f"| one at a time (1 worker, 2 threads) | {one:.1f} s |")
    print(f"| local pool (2 workers, 1 thread each) | {pool_s:.1f} s ({one / pool_s:.2f}x) |")
    print(f"| local Ray cluster (2 CPUs, 1 per task) | {ray_s:.1f} s |")
    print(f"| Ray's rows equal the pool's | {on_ray.rows() == pool.rows()} |")
    print(f"| failed in any run | {len(serial.failed) + len(pool.failed) + len(on_ray.failed)} |")
    lost = [k for k, v in first.items() if v == "failed"]
    print(f"| one worker killed (--retries 0): failed | {', '.join(lost) or 'none'} |")
    print(f"| rerun: statuses | {', '.join(sorted(set(second.values())))} |")
    print(f"| rerun: inspected again | {', '.join(k for k, v in second.items() if v == 'done')} |")
    mi = [r["mi"] for r in pool.rows() if r["variant"] == "trained" and r["layer"] == "latent"]
    print(f"| latent MI per epoch (nats) | {', '.join(f'{m:.2f}' for m in mi)} |")


if __name__ == "__main__":
    main()
