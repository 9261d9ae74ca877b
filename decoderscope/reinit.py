"""Re-initialised copies of a decoder: the "random" variant."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def copy_seed(seed: int, init: int) -> int:
    """The seed `inspect(seed=seed)` re-initialises its copy number `init` (0, 1, ...) with."""
    return seed * 7919 + 104729 * (init + 1)


def reinitialised(decoder: nn.Module, seed: int) -> tuple[nn.Module, list[str]]:
    """A deep copy of `decoder` with fresh parameters drawn under `torch.manual_seed(seed)`.

    Every submodule with a `reset_parameters()` method gets it called (torch's own default
    initialisation). Modules that hold parameters directly but have no such method get the
    fallback: parameters with 2 or more dimensions are drawn as `nn.Linear` weights
    (Kaiming-uniform, a = sqrt(5)), others uniformly from +-1/sqrt(size). Their names are returned
    so that the report can say so. The caller's RNG state is left as it was.
    """
    clone = copy.deepcopy(decoder)
    fallback: list[str] = []
    devices = sorted({p.device.index or 0 for p in clone.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        for name, module in clone.named_modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
                continue
            own = list(module.parameters(recurse=False))
            if not own:
                continue
            fallback.append(name or type(module).__name__)
            for p in own:
                if p.dim() >= 2:
                    nn.init.kaiming_uniform_(p, a=math.sqrt(5))
                else:
                    bound = 1.0 / math.sqrt(max(1, p.numel()))
                    nn.init.uniform_(p, -bound, bound)
    return clone, fallback
