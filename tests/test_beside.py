"""Work beside the critics' training (`estimators/beside.py`): a forked worker gives what the
same work gives in this process, passes its progress on, and leaves the threads as they were."""

from __future__ import annotations

import multiprocessing
import os
import time

import pytest
import torch

import decoderscope as ds
from decoderscope.errors import DecoderError
from decoderscope.estimators import beside
from decoderscope.estimators.batches import Progress
from decoderscope.estimators.beside import Beside

Report = Progress | None
CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("two_threads")  # conftest.py


def _draws(report: Report) -> tuple[torch.Tensor, int]:
    """Seeded draws through a matmul (OpenMP kernels in the worker), and the worker's pid."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(256, 64, generator=g)
    for k in range(3):
        x = torch.tanh(x @ torch.randn(64, 64, generator=g))
        if report is not None:
            report("drawing", k + 1, 3)
    return x, os.getpid()


def test_a_worker_gives_what_this_process_gives_and_passes_its_progress_on() -> None:
    if not beside.can_fork(CPU):
        pytest.skip("no fork here")
    steps: list[tuple[str, int, int]] = []
    with Beside(_draws, CPU, lambda *s: steps.append(s)) as side:
        assert side.forked
        assert torch.get_num_threads() == 1  # the worker has the other
        forked, pid = side.collect()
        assert torch.get_num_threads() == 2
    assert pid != os.getpid()
    with Beside(_draws, CPU, fork=False) as here:
        assert not here.forked and torch.get_num_threads() == 2
        local, local_pid = here.collect()
    assert local_pid == os.getpid()
    assert torch.equal(forked, local)
    # each phase's first and last report, those between at most REPORTS_PER_S a second
    assert steps[0] == ("drawing", 1, 3) and steps[-1] == ("drawing", 3, 3)
    assert steps == sorted(set(steps)) and set(steps) <= {("drawing", k, 3) for k in (1, 2, 3)}


def test_poll_takes_the_threads_back_once_the_worker_is_done() -> None:
    if not beside.can_fork(CPU):
        pytest.skip("no fork here")
    with Beside(_draws, CPU) as side:
        assert torch.get_num_threads() == 1
        deadline = time.monotonic() + 60
        while torch.get_num_threads() == 1 and time.monotonic() < deadline:
            side.poll()  # reads the progress, then the result
            time.sleep(0.01)
        assert torch.get_num_threads() == 2
        assert side.collect()[0].shape == (256, 64)


def _fails(report: Report) -> None:
    raise DecoderError("no forward-mode derivative for this layer")


def _dies(report: Report) -> int:
    if multiprocessing.parent_process() is not None:  # in the worker: killed mid-way
        os._exit(3)
    return os.getpid()


def test_an_error_in_the_worker_is_raised_here_and_a_dead_worker_is_replaced() -> None:
    for fork in (True, False):
        with (
            Beside(_fails, CPU, fork=fork) as side,
            pytest.raises(DecoderError, match="no forward-mode derivative"),
        ):
            side.collect()
        assert torch.get_num_threads() == 2
    if not beside.can_fork(CPU):
        pytest.skip("no fork here")
    with Beside(_dies, CPU, lambda *s: None) as side:
        assert side.forked
        assert side.collect() == os.getpid()  # computed here, after the worker died
    assert torch.get_num_threads() == 2


def test_inspect_reads_the_same_folding_rows_with_or_without_the_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Linear-SiLU-Linear decoder whose last layer is read from its preimages: the same rows,
    to the bit, whether the readings ran beside the critics in a worker or here after them."""
    from tests.test_preimages import _inspect_silu

    if not beside.can_fork(CPU):
        pytest.skip("no fork here")
    settings = ds.Settings(eval_samples=512, preimage_samples=256)
    forked = _inspect_silu(settings)[0].variant("trained").layer("2")
    assert forked.method == "preimages"
    monkeypatch.setattr(beside, "can_fork", lambda _device: False)
    here = _inspect_silu(settings)[0].variant("trained").layer("2")
    assert forked == here


def _chatty(report: Report) -> float:
    """A critic's way of reporting: every step, fast; returns when it finished."""
    for k in range(20000):
        if report is not None:
            report("chatting", k + 1, 20000)
    return time.monotonic()


def test_a_worker_is_not_held_up_by_a_parent_that_does_not_poll() -> None:
    """20000 reports would fill the pipe ~20 times over: the worker sends at most
    REPORTS_PER_S a second (and each phase's first and last), so it is done while this
    process is busy elsewhere."""
    if not beside.can_fork(CPU):
        pytest.skip("no fork here")
    steps: list[tuple[str, int, int]] = []
    with Beside(_chatty, CPU, lambda *s: steps.append(s)) as side:
        time.sleep(1.5)  # busy, not polling
        asked = time.monotonic()
        finished = side.collect()
    assert finished < asked
    assert steps[0] == ("chatting", 1, 20000)
    assert steps[-1] == ("chatting", 20000, 20000)
    assert len(steps) <= 2 + 1.5 * beside.REPORTS_PER_S + 5
