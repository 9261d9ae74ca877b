"""Values and Jacobians of chosen layers at latent points, rows of several layers in one decoder
pass: what every Gauss-Newton iteration through the decoder is made of (`inverse.solve`)."""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.autograd.forward_ad as fwad
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..errors import DecoderError
from .batches import Features, reading

CHUNK = 4096  # decoder rows per pass, as in a training pass (a Jacobian pass: d per sample)
REVERSE_WIDTH = 1  # reverse-mode Jacobians up to this many times the latent's width


def _by_member(
    out: Mapping[str, torch.Tensor], names: Sequence[str], member: torch.Tensor
) -> torch.Tensor:
    """Row i of layer names[member[i]]: [A, ...] from every layer's [A, ...]."""
    if len(names) == 1:  # one layer (a preimage search): its rows as they are
        return out[names[0]]
    first = out[names[int(member[0])]]
    result = first.new_empty(first.shape)
    for m in member.unique().tolist():
        rows = member == m
        result[rows] = out[names[m]][rows]
    return result


def _present(names: Sequence[str], member: torch.Tensor) -> set[str]:
    """The layers rows of `member` [A] read."""
    if len(names) == 1:
        return {names[0]}
    return {names[m] for m in member.unique().tolist()}


def values(
    feats_of: Features,
    names: Sequence[str],
    member: torch.Tensor,
    z: torch.Tensor,
    latent_shape: tuple[int, ...],
) -> torch.Tensor:
    """h = g_member(z) [A, D] for z [A, d], in chunks."""
    parts = []
    for start in range(0, z.shape[0], CHUNK):
        zc, rows = z[start : start + CHUNK], member[start : start + CHUNK]
        with reading(_present(names, rows)):
            parts.append(_by_member(feats_of(zc.view(-1, *latent_shape)), names, rows))
    return torch.cat(parts)


def reverse_mode(width: int, d: int) -> bool:
    """Whether `jacobians` of a layer `width` wide on a latent of d units uses reverse mode."""
    return width <= REVERSE_WIDTH * d


def jacobian_copies(width: int, d: int) -> int:
    """Decoder rows per sample in one pass of `jacobians`: the layer's width in reverse mode,
    else d."""
    return width if reverse_mode(width, d) else d


# features whose decoder torch.func could not transform (an old-style `autograd.Function`,
# without `setup_context`, or an op whose batching rule raises): forward mode by copies
_UNBATCHED: weakref.WeakSet[Callable[..., object]] = weakref.WeakSet()


def _forward(
    feats_of: Features, present: Sequence[str], z: torch.Tensor, latent_shape: tuple[int, ...]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{name: (h [n, D], J^T [n, d, D])} in forward mode, one tangent e_j per latent unit: by
    `torch.func.vmap` over the tangents of one `jvp`, so the decoder's primal values are
    computed once, not once per tangent; a decoder vmap cannot batch takes d copies of each
    sample, copy j carrying e_j (the same numbers, about twice the work: on the diffusers
    AutoencoderKL's layers 1.5-2.3x the time, docs/speed.md)."""
    n, d = z.shape
    if feats_of not in _UNBATCHED:

        def layers(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            out = feats_of(x.view(n, *latent_shape))
            return tuple(out[name] for name in present)

        def pushed(t: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
            pair = torch.func.jvp(layers, (z,), (t,))
            return pair[0], pair[1]

        tangents = torch.eye(d, device=z.device, dtype=z.dtype).unsqueeze(1).expand(d, n, d)
        try:
            with warnings.catch_warnings():  # an op without a batching rule runs in a loop
                warnings.filterwarnings("ignore", message=".*performance drop.*")
                values, pushes = torch.func.vmap(pushed)(tangents)
        except DecoderError:
            _UNBATCHED.add(feats_of)
        else:  # the primal values come back broadcast over the tangents: any copy is them
            return {
                name: (p[0].reshape(n, -1), t.transpose(0, 1).reshape(n, d, -1))
                for name, p, t in zip(present, values, pushes, strict=True)
            }
    copies = z.repeat_interleave(d, dim=0).view(n * d, *latent_shape)
    units = torch.eye(d, device=z.device, dtype=z.dtype).repeat(n, 1)
    with fwad.dual_level():
        out = feats_of(fwad.make_dual(copies, units.view(n * d, *latent_shape)))
        split = {}
        for name in present:
            p, t = fwad.unpack_dual(out[name])
            if t is None:  # the layer does not depend on z (constant)
                t = torch.zeros_like(p)
            split[name] = (p.reshape(n, d, -1)[:, 0], t.reshape(n, d, -1))
    return split


def jacobians(
    feats_of: Features,
    names: Sequence[str],
    member: torch.Tensor,
    z: torch.Tensor,
    latent_shape: tuple[int, ...],
    width: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """h = g(z) [A, D] (D = width, the layer's) and its Jacobian transposed, J^T [A, d, D]:
    reverse mode (D copies of each sample, copy j's output j differentiated) for layers at most
    as wide as the latent, else forward mode (`_forward`: d tangents on one primal pass).
    Measured, 2 threads, d = D = 16, 2560 samples: reverse 2.9 ms, forward 2.9 (4.7 by copies);
    256 samples, 0.5 against 0.9; d = 16, D = 32: reverse 13.8 ms, forward 4.8."""
    d = z.shape[1]
    reverse = reverse_mode(width, d)
    copies = jacobian_copies(width, d)
    per = max(1, CHUNK // copies)
    vals, jacs = [], []
    for start in range(0, z.shape[0], per):
        zc, rows = z[start : start + per], member[start : start + per]
        n = zc.shape[0]
        present = _present(names, rows)
        if reverse:
            zr = zc.repeat_interleave(width, dim=0).view(n * width, *latent_shape)
            zr.requires_grad_(True)
            with torch.enable_grad(), reading(present):  # `refine` runs under no_grad
                out = feats_of(zr)
                by_name = {name: out[name].reshape(n, width, width) for name in present}
                picked = _by_member(
                    {k: v.diagonal(dim1=1, dim2=2) for k, v in by_name.items()}, names, rows
                )
                grad = torch.zeros_like(zr)
                if picked.requires_grad:  # else the layer does not depend on z (constant)
                    (grad,) = torch.autograd.grad(picked.sum(), zr)
            vals.append(_by_member({k: v[:, 0].detach() for k, v in by_name.items()}, names, rows))
            jacs.append(grad.view(n, width, d).transpose(1, 2))
            continue
        # attention through the math kernel: the fused ones (flash, memory-efficient) have no
        # forward-mode derivative (diffusers' AutoencoderKL has an attention block)
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), reading(present):
            split = _forward(feats_of, sorted(present), zc, latent_shape)
        vals.append(_by_member({k: v[0] for k, v in split.items()}, names, rows))
        jacs.append(_by_member({k: v[1] for k, v in split.items()}, names, rows))
    return torch.cat(vals), torch.cat(jacs)
