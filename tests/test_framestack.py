"""`on_fresh_stack`: calls that cross a frame-stack chunk's edge stop mapping a chunk each."""

from __future__ import annotations

import sys
from collections.abc import Callable

import pytest
import torch
from torch import nn

import decoderscope as ds
from decoderscope.framestack import SPARE_SLOTS, on_fresh_stack
from decoderscope.testing import gaussian_case, index_data, vae_for


def _leaf(a: int = 0) -> int:
    """A frame larger than `_descend`'s, so some depth's calls to it cross a chunk's edge."""
    x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15 = range(a, a + 16)
    return x0 + x1 + x2 + x3 + x4 + x5 + x6 + x7 + x8 + x9 + x10 + x11 + x12 + x13 + x14 + x15


def _descend(depth: int, calls: int) -> int:
    """`calls` calls of `_leaf` at each of `depth` nested depths (several 16 KiB chunks deep)."""
    total = sum(_leaf() for _ in range(calls))
    return total + (_descend(depth - 1, calls) if depth else 0)


def _faults(work: Callable[[], object]) -> int:
    resource = pytest.importorskip("resource")  # page-fault counts: POSIX only
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


class _StackProbe(nn.Module):
    """A linear decoder that records, at each forward pass, whether a frame of
    `on_fresh_stack`'s size is on the stack."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 4)
        self.seen: list[bool] = []

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        frame = sys._getframe()
        while frame is not None and frame.f_code.co_nlocals < SPARE_SLOTS:
            frame = frame.f_back  # type: ignore[assignment]
        self.seen.append(frame is not None)
        return self.net(z)


def test_inspect_decodes_on_a_fresh_stack() -> None:
    mu, lv = gaussian_case(d=4, n=30)
    probe = _StackProbe()
    fast = ds.Settings(steps=20, eval_samples=256, pair_samples=64, exact_samples=256)
    ds.inspect(vae_for(mu, lv, probe), index_data(30), random_inits=0, seeds=1, settings=fast)
    assert probe.seen and all(probe.seen), probe.seen
