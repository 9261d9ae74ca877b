"""Which chosen layers are functions of another chosen layer alone: within a residual block the
convolution after a normalisation reads nothing else, so what the later layer holds the earlier
one holds too (data processing), and a later layer read at the latent's values settles the
earlier one (`estimators.plan.imply`)."""

from __future__ import annotations

from collections.abc import Container, Mapping, Sequence

import torch

from .taps import OUTPUT, Tap

PAIRS = 8  # latent draws the test decodes twice over
SAME = 1e-4  # relative difference (to the layer's largest value) below which two values agree


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    scale = float(b.abs().max()) if b.numel() else 0.0
    return a.shape == b.shape and bool(((a - b).abs() <= SAME * max(scale, 1e-30)).all())


@torch.inference_mode()
def determined(
    tap: Tap, names: Sequence[str], latent_shape: tuple[int, ...], device: torch.device
) -> dict[str, frozenset[str]]:
    """{A: the chosen layers after A (in `names`' execution order) that depend on z only through
    A's value}. Decoding z2 with A's output replaced by its value at z1 must give each such B
    its value at z1 (B depends on nothing else that z moves), and B's values at z1 and z2 must
    differ (B depends on z at all). Tested on PAIRS prior draws from a generator of its own
    (no other draw moves); layers whose module returns something other than a plain tensor
    are not replaced, so nothing is found after them."""
    generator = torch.Generator(device=device).manual_seed(0)
    z1 = torch.randn((PAIRS, *latent_shape), generator=generator, device=device)
    z2 = torch.randn((PAIRS, *latent_shape), generator=generator, device=device)
    h1, h2 = tap(z1), tap(z2)
    moving = {b for b in names if not _same(h2[b], h1[b])}  # the layers that depend on z
    found: dict[str, frozenset[str]] = {}
    for i, a in enumerate(names):
        later = [b for b in names[i + 1 :] if b in moving]
        if a == OUTPUT or not later:
            continue
        patched = tap(z2, patch={a: h1[a].clone()})
        found[a] = frozenset(b for b in later if _same(patched[b], h1[b]))
    return found


def carried(determines: Mapping[str, frozenset[str]], valued: Container[str]) -> dict[str, str]:
    """{A: a later layer B that A determines (`determined`'s map) and that holds the latent's
    values: one in `valued`, or one carried so itself}. By data processing A then holds them
    too: at least what B holds, at most what z does. Latest layer first, so chains resolve."""
    out: dict[str, str] = {}
    for a in reversed(list(determines)):
        source = next((b for b in sorted(determines[a]) if b in valued or b in out), None)
        if source is not None:
            out[a] = source
    return out
