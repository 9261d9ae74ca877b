"""Work that runs beside this process's: the folding layers' preimage readings beside the
critics' training (`run.py`), and each decoder's own estimator run where the decoders are read
in processes of their own (`joint.py`).

On a CPU with 2 or more torch threads the work runs in a forked worker process on some of them
while this process works on the rest: the critics' and the searches' small kernels gain only
~1.2x from a second thread, while two single-thread processes side by side lose nothing (the
demo: critics 41.3 s and preimage values 22.7 s on one thread each, against 34.9 s and 19.4 s on
two, one after the other; docs/speed.md). The fork inherits the tapped decoders, the plan and
its banks, so nothing is pickled but the result. Elsewhere (CUDA, no fork, one thread), or where
the worker dies, the work runs in this process when collected: the same code on the same random
stream, so the values do not depend on where it ran.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import pickle
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import TracebackType
from typing import Any, Generic, TypeVar, cast

import torch

from .batches import Progress

T = TypeVar("T")
REPORTS_PER_S = 10  # a worker's progress reports a second, at most (the display's refresh)

# whether this process shares the cores with others of one inspection (a worker, or a decoder's
# process of `joint.run_decoders`): then its work beside may fork on its one thread (a decoder's
# process reads its folding layers beside its critics; the other decoders' finish at other
# times, and the system shares the cores among what is left)
_SHARING = False


@contextmanager
def sharing_cores() -> Iterator[None]:
    """Within it, this process is one of several that share the cores (`_SHARING`)."""
    global _SHARING
    before, _SHARING = _SHARING, True
    try:
        yield
    finally:
        _SHARING = before


def can_fork(device: torch.device) -> bool:
    """Whether work beside gets a worker process: a CPU run on Linux (fork is safe there for
    torch's CPU kernels, not after CUDA has started) with 2 or more torch threads, or one where
    this process shares the cores (`sharing_cores`, and every worker)."""
    return (
        device.type == "cpu"
        and not torch.cuda.is_initialized()
        and sys.platform.startswith("linux")
        and "fork" in multiprocessing.get_all_start_methods()
        and (torch.get_num_threads() >= 2 or _SHARING)
    )


def _terminated(_signum: int, _frame: object) -> None:
    # unwinds the work, so a worker of this worker's is stopped too (`Beside.__exit__`)
    raise SystemExit(1)


def _child(
    conn: multiprocessing.connection.Connection,
    work: Callable[[Progress], T],
    threads: int,
) -> None:
    global _SHARING
    _SHARING = True
    # Ctrl-C reaches the whole process group: the parent stops the worker, which keeps quiet
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _terminated)
    torch.set_num_threads(threads)

    last_phase, last_sent = "", 0.0

    def report(phase: str, done: int, total: int) -> None:
        # at most REPORTS_PER_S a phase, and its first and last: a critic reports every step
        # (~100 a second), and the pipe holds ~1000 reports, so a parent busy in a phase that
        # does not poll would stop the worker until it did
        nonlocal last_phase, last_sent
        now = time.monotonic()
        if phase != last_phase or done >= total or now - last_sent >= 1 / REPORTS_PER_S:
            _send(conn, ("progress", phase, done, total))
            last_phase, last_sent = phase, now

    try:
        outcome: tuple[str, object] = ("ok", work(report))
    except Exception as exc:  # raised again in the parent, as the in-process run would
        outcome = ("error", exc)
    try:
        _send(conn, outcome)
    except Exception as exc:  # an unpicklable result or exception: say what it was
        _send(conn, ("error", RuntimeError(f"work in a worker process failed: {exc!r}")))
    finally:
        conn.close()


def _send(conn: multiprocessing.connection.Connection, message: tuple[object, ...]) -> None:
    """By value, with plain pickle: torch's own reducers would share a tensor's memory through
    the worker, which exits once it has sent its result."""
    conn.send_bytes(pickle.dumps(message))


class Beside(Generic[T]):
    """`work(report)` (its result picklable) started at once in a forked worker where `fork` and
    `can_fork`, else run by `collect`; `report` is `on_step`, or in the worker a messenger whose
    steps `poll` and `collect` pass on to `on_step` here. threads: the worker's torch threads
    (default half of this process's), taken from this process's (it keeps at least one) until
    the worker is done. A context manager: leaving it stops a worker still running and gives
    this process its threads back."""

    def __init__(
        self,
        work: Callable[[Progress | None], T],
        device: torch.device,
        on_step: Progress | None = None,
        fork: bool = True,
        threads: int | None = None,
    ) -> None:
        self._work, self._on_step = work, on_step
        self._conn: multiprocessing.connection.Connection | None = None
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._outcome: tuple[Any, ...] | None = None
        self._taken = 0  # this process's threads the worker has
        if fork and can_fork(device):
            ctx = multiprocessing.get_context("fork")
            recv, send = ctx.Pipe(duplex=False)
            mine = torch.get_num_threads()
            theirs = max(1, mine // 2 if threads is None else threads)
            # not a daemon: a decoder's worker may start one of its own (`_SHARING`); every
            # worker is stopped on the way out (`_stop`), so none outlives its parent's work
            self._proc = ctx.Process(target=_child, args=(send, work, theirs), daemon=False)
            self._proc.start()
            send.close()
            self._conn = recv
            self._taken = mine - max(1, mine - theirs)
            torch.set_num_threads(mine - self._taken)

    @property
    def forked(self) -> bool:
        """Whether the work runs in a worker process."""
        return self._proc is not None

    def poll(self) -> None:
        """Between steps: pass on the worker's progress; once it is done, take its threads."""
        while self._conn is not None and self._outcome is None and self._conn.poll():
            self._receive()

    def _receive(self) -> None:
        assert self._conn is not None
        try:
            message = pickle.loads(self._conn.recv_bytes())
        except EOFError:  # the worker died (killed, out of memory): `collect` does the work
            message = ("died",)
        if message[0] == "progress":
            if self._on_step is not None:
                self._on_step(*message[1:])
            return
        self._outcome = message
        self._give_back()

    def _give_back(self) -> None:
        torch.set_num_threads(torch.get_num_threads() + self._taken)
        self._taken = 0

    def collect(self) -> T:
        """The work's result: the worker's (waiting for it), or computed here. An exception the
        work raised is raised here."""
        if self._conn is None:
            return self._work(self._on_step)
        while self._outcome is None:
            self._receive()
        status, *rest = self._outcome
        self._stop()
        if status == "died":
            return self._work(self._on_step)
        if status == "error":
            raise rest[0]
        return cast(T, rest[0])

    def _stop(self) -> None:
        if self._proc is not None:
            if self._proc.is_alive():
                self._proc.terminate()
            self._proc.join()
            self._proc = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._give_back()

    def __enter__(self) -> Beside[T]:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop()


def polling(sides: Sequence[Beside[Any]], on_step: Progress | None) -> Progress:
    """`on_step` that first polls the work beside (`Beside.poll`: a worker's progress is passed
    on, and one that is done hands back its threads)."""

    def stepped(phase: str, done: int, total: int) -> None:
        for side in sides:
            side.poll()
        if on_step is not None:
            on_step(phase, done, total)

    return stepped
