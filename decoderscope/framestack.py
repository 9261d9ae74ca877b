"""Long work run on a frame-stack chunk of its own, so that CPython does not map and unmap one
per call.

CPython 3.11, 3.12 and 3.13.0 (python/cpython#142183; later releases keep a spare chunk) keep
Python frames in 16 KiB chunks and unmap a chunk as soon as the call at its base returns. A loop
whose calls cross a chunk's edge then maps, touches and unmaps a chunk on every call. Which
depth sits on an edge depends on the caller's stack: from the CLI, Typer's frames put the
inspection of the library benchmark's AutoencoderKL on one (356k `mmap` calls of 16 KiB, 13% of
its time, docs/speed.md). Work run under `on_fresh_stack` starts in a frame large enough to be
given a chunk of its own with about 480 KiB to spare, so its calls reach no edge until its stack
is that deep (thousands of frames), wherever the caller's stack stood.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from typing import Any, TypeVar, cast

T = TypeVar("T")

# unused local slots: a frame of 64k slots (512 KiB) gets a 1 MiB chunk, ~60k slots to spare
# (a frame of torch.func's or decoderscope's takes 10-100)
SPARE_SLOTS = 65536


def _call(work: Callable[[], Any]) -> Any:
    return work()


@functools.cache
def _large_frame_call() -> Callable[[Callable[[], Any]], Any]:
    """`_call` with SPARE_SLOTS more local variables, never set: the frame's size is all it adds."""
    code = _call.__code__
    spare = tuple(f"_spare{i}" for i in range(SPARE_SLOTS))
    code = code.replace(
        co_varnames=code.co_varnames + spare, co_nlocals=code.co_nlocals + SPARE_SLOTS
    )
    return cast(Callable[[Callable[[], Any]], Any], types.FunctionType(code, _call.__globals__))


def on_fresh_stack(work: Callable[[], T]) -> T:
    """work(), its frames in one frame-stack chunk (see the module's docstring)."""
    return cast(T, _large_frame_call()(work))
