"""`on_fresh_stack`: calls that cross a frame-stack chunk's edge stop mapping a chunk each."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from decoderscope.framestack import on_fresh_stack

resource = pytest.importorskip("resource")  # page-fault counts: POSIX only


def _leaf(a: int = 0) -> int:
    """A frame larger than `_descend`'s, so some depth's calls to it cross a chunk's edge."""
    x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15 = range(a, a + 16)
    return x0 + x1 + x2 + x3 + x4 + x5 + x6 + x7 + x8 + x9 + x10 + x11 + x12 + x13 + x14 + x15


def _descend(depth: int, calls: int) -> int:
    """`calls` calls of `_leaf` at each of `depth` nested depths (several 16 KiB chunks deep)."""
    total = sum(_leaf() for _ in range(calls))
    return total + (_descend(depth - 1, calls) if depth else 0)


def _faults(work: Callable[[], object]) -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    work()
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)


def test_calls_across_a_chunk_edge_stop_faulting_on_a_fresh_stack() -> None:
    on_fresh_stack(lambda: None)  # builds the large frame's function once
    plain = _faults(lambda: _descend(300, 1000))
    if plain < 1000:
        pytest.skip(f"this Python keeps its frame-stack chunks ({plain} page faults)")
    fresh = _faults(lambda: on_fresh_stack(lambda: _descend(300, 1000)))
    # the fresh frame's own 512 KiB of slots fault once, ~130 pages, whatever the calls
    assert fresh < 400 < plain, (fresh, plain)


def test_the_work_s_value_and_errors_come_back() -> None:
    assert on_fresh_stack(lambda: 7) == 7

    def fail() -> None:
        raise ValueError("from the work")

    with pytest.raises(ValueError, match="from the work"):
        on_fresh_stack(fail)
