"""What a route through the decoder costs, counted before it runs: FLOPs of one decoder row
(torch's `FlopCounterMode`: matrix products, convolutions and attention, the work a decoder pass
is made of) times the rows the route decodes. Counted rather than timed, so a model takes the
same route on every machine and in every run."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from .batches import Features, reading


def row_flops(
    feats_of: Features, name: str, latent_shape: tuple[int, ...], device: torch.device
) -> int:
    """FLOPs of computing layer `name` for one latent sample (the decoder pass that holds it, up
    to that layer as Gauss-Newton's passes run it, and the whitening of its features), at
    least 1."""
    z = torch.zeros((1, *latent_shape), device=device)
    with torch.no_grad(), reading({name}), FlopCounterMode(display=False) as counter:
        feats_of(z)[name]
    return max(1, int(counter.get_total_flops()))
