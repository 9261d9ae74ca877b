"""Where a sweep's inspections run: a local pool of worker processes (a worker that dies takes
only the checkpoint it was running with it) or a Ray cluster (one task per checkpoint). Both
report each checkpoint as it finishes through `on_done`."""

from __future__ import annotations

import multiprocessing.connection
import os
import pickle
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import ArgumentError, DecoderscopeError


@dataclass(frozen=True)
class Job:
    """One checkpoint to inspect, with everything a worker needs (picklable).

    result: where the worker writes the report's JSON (atomically); error: where it writes why
    it failed, for a failure that is not a crash. inspect_args: keyword arguments of `inspect`.
    """

    checkpoint: str
    label: str
    key: str
    result: str
    error: str
    model: str | None
    trust: bool
    data: torch.Tensor | None
    inspect_args: dict[str, Any]
    threads: int


@dataclass(frozen=True)
class Outcome:
    """How a job ended: `ok` (text: the report's JSON), `error` (text: why; a failure that would
    repeat, so not retried) or `died` (the worker crashed on every attempt; text: what is known)."""

    status: str
    text: str
    seconds: float
    attempts: int


OnDone = Callable[[Job, Outcome], None]


def usable_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def write_atomic(path: str | Path, text: str) -> None:
    """Write `text` so that a reader sees the old file or the whole new one, never a part."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, p)


def inspect_job(job: Job) -> str:
    """Load and inspect one checkpoint; returns the report's JSON. Raises DecoderscopeError for a
    checkpoint or data that cannot be used."""
    from .checkpoints import load_checkpoint
    from .pipeline import inspect_loaded

    torch.set_num_threads(job.threads)
    loaded = load_checkpoint(job.checkpoint, model=job.model, trust=job.trust)
    return inspect_loaded(loaded, job.data, progress=False, **job.inspect_args).to_json()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, DecoderscopeError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _run(job: Job) -> None:
    """Inspect one checkpoint; write its JSON, or why it failed, next to the cache."""
    try:
        text = inspect_job(job)
    except Exception as exc:
        write_atomic(job.error, _describe(exc))
        return
    write_atomic(job.result, text)


def serve(reply_fd: int) -> None:
    """A pool worker's loop: read pickled jobs from stdin, run each, answer b"d" on `reply_fd`;
    stop at None or at the end of stdin."""
    with os.fdopen(reply_fd, "wb", buffering=0) as reply:
        try:
            while (job := pickle.load(sys.stdin.buffer)) is not None:
                _run(job)
                reply.write(b"d")
        except (KeyboardInterrupt, EOFError):
            return


class _Worker:
    """A worker process and its two pipes: jobs go in on its stdin, b"d" comes back when one is
    done. It is a fresh interpreter (`python -c`), not a fork, so no state of this process leaks
    in and the caller's script is never re-run; it sees the modules this process sees
    (PYTHONPATH from sys.path). It lives for many jobs and is replaced when it dies."""

    def __init__(self) -> None:
        read, write = os.pipe()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p] + [os.getcwd()])
        code = f"from decoderscope.workers import serve; serve({write})"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, pass_fds=(write,), env=env
        )
        os.close(write)
        self.reply = os.fdopen(read, "rb", buffering=0)

    def send(self, job: Job | None) -> None:
        assert self.proc.stdin is not None
        pickle.dump(job, self.proc.stdin)
        self.proc.stdin.flush()

    def finished(self) -> bool:
        """Whether the job sent last has finished (False: the worker died running it)."""
        return self.reply.read(1) == b"d"

    def stop(self, now: bool) -> None:
        if now:
            self.proc.kill()
        else:
            try:
                self.send(None)
            except OSError:
                self.proc.kill()
        self.proc.wait()
        self.reply.close()
        if self.proc.stdin is not None:
            self.proc.stdin.close()


def run_local(jobs: Sequence[Job], workers: int, retries: int, on_done: OnDone) -> None:
    """Run `jobs` on up to `workers` processes. A worker that dies takes only the job it was
    running: that job is run again (on a new worker) up to `retries` times, then reported as
    `died`; the other jobs go on."""
    queue = deque((job, 1) for job in jobs)
    idle: list[_Worker] = []
    busy: dict[_Worker, tuple[Job, int, float]] = {}
    try:
        while queue or busy:
            while queue and len(busy) < workers:
                worker = idle.pop() if idle else _Worker()
                job, attempt = queue.popleft()
                for stale in (job.result, job.error):
                    Path(stale).unlink(missing_ok=True)
                worker.send(job)
                busy[worker] = (job, attempt, time.perf_counter())
            ready = set(multiprocessing.connection.wait([w.reply.fileno() for w in busy]))
            for worker in [w for w in busy if w.reply.fileno() in ready]:
                job, attempt, start = busy.pop(worker)
                seconds = time.perf_counter() - start
                if worker.finished():
                    idle.append(worker)
                    result, error = Path(job.result), Path(job.error)
                    if result.is_file():
                        on_done(job, Outcome("ok", result.read_text(), seconds, attempt))
                    else:
                        why = error.read_text() if error.is_file() else "no result written"
                        error.unlink(missing_ok=True)
                        on_done(job, Outcome("error", why, seconds, attempt))
                    continue
                worker.stop(now=True)
                if attempt <= retries:
                    queue.append((job, attempt + 1))
                else:
                    code = worker.proc.returncode
                    why = f"the worker died (exit code {code}) on each of {attempt} tries"
                    on_done(job, Outcome("died", why, seconds, attempt))
    finally:
        for worker in idle:
            worker.stop(now=False)
        for worker in busy:
            worker.stop(now=True)


def _ray_task(job: Job) -> tuple[str, str, float]:
    """A Ray task: (status, text, seconds); errors that would repeat are returned, not raised,
    so that Ray retries only crashes."""
    start = time.perf_counter()
    try:
        return "ok", inspect_job(job), time.perf_counter() - start
    except Exception as exc:
        return "error", _describe(exc), time.perf_counter() - start


def import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ArgumentError(
            "--ray needs Ray, an optional extra: pip install 'decoderscope[ray]'"
        ) from exc
    return ray


def run_ray(jobs: Sequence[Job], address: str, retries: int, on_done: OnDone) -> None:
    """Run `jobs` as Ray tasks (one per checkpoint, `job.threads` CPUs each) on the cluster at
    `address` ('auto': the running one; 'local': start one on this machine), or on the one this
    process is already connected to. Results arrive as tasks finish. Ray reruns a task whose
    worker died up to `retries` times; checkpoint paths must be readable on the workers."""
    ray = import_ray()
    started = False
    if not ray.is_initialized():
        try:
            if address == "local":
                ray.init(num_cpus=usable_cores(), include_dashboard=False, log_to_driver=False)
            else:
                ray.init(address=address, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ArgumentError(
                f"cannot connect to a Ray cluster at {address!r}: {exc}. Start one (ray start "
                "--head) or pass --ray local to start one on this machine"
            ) from exc
        started = True
    try:
        task = ray.remote(max_retries=retries, retry_exceptions=False)(_ray_task)
        refs = {task.options(num_cpus=job.threads).remote(job): job for job in jobs}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            job = refs[done[0]]
            try:
                status, text, seconds = ray.get(done[0])
                on_done(job, Outcome(status, text, seconds, 1))
            except ray.exceptions.RayError as exc:
                why = f"the Ray task failed after {retries + 1} tries: {type(exc).__name__}"
                on_done(job, Outcome("died", why, 0.0, retries + 1))
    finally:
        if started:
            ray.shutdown()
