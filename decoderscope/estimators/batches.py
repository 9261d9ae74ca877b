"""Batches for the critics and inverses: data indices, every bridge level's latent samples, and
the tapped layers' values from ONE decoder pass, laid out per seed."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch

from ..sampling import Posterior, reparameterise, sample_levels
from .settings import Settings

# features(z [n, *latent_shape]) -> {layer name: h [n, D]}: one pass of the tapped decoder
Features = Callable[[torch.Tensor], Mapping[str, torch.Tensor]]
Key = tuple[str, int]  # one member of a critic group: (layer name, seed index)
# progress(phase, steps done, steps planned): after every step, and once more when a phase stops
# early, with planned = done
Progress = Callable[[str, int, int], None]
Batch = tuple[torch.Tensor, Mapping[str, torch.Tensor], torch.Tensor]


def quiet(_phase: str, _done: int, _total: int) -> None:
    """The `Progress` of a run that shows none."""


# the layers the passes in a `reading` block will read: a hint the decoders' features use to
# stop each decoder after the last of them (a layer read beyond it is still computed, by a
# second, whole pass)
_READING: ContextVar[frozenset[str] | None] = ContextVar("reading", default=None)


@contextmanager
def reading(names: Collection[str]) -> Iterator[None]:
    """Passes of the features inside this block read only `names`: the Jacobian passes and
    line searches of Gauss-Newton through the decoder, each reading one member's layer."""
    token = _READING.set(frozenset(names))
    try:
        yield
    finally:
        _READING.reset(token)


def read_names() -> frozenset[str] | None:
    """The layers the enclosing `reading` block reads; None outside one (every layer may be)."""
    return _READING.get()


class Lazy(Mapping[str, torch.Tensor]):
    """{name: compute(name)} over `names`, each computed when first read and kept. Most reads
    want one layer of one decoder (a Jacobian pass of the refined inverse, a preimage search,
    the members still training); running every decoder for each of them multiplied their cost
    by the number of decoders (1 + random_inits)."""

    def __init__(self, names: Sequence[str], compute: Callable[[str], torch.Tensor]) -> None:
        self._names, self._compute = list(names), compute
        self._done: dict[str, torch.Tensor] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._done:
            if name not in self._names:
                raise KeyError(name)
            self._done[name] = self._compute(name)
        return self._done[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


@dataclass(frozen=True)
class Sampler:
    """What every phase of a run draws from: the tapped (and whitened) decoder, the posterior,
    the bridge levels lv [L], the settings, the run's generator and the number of seeds."""

    feats_of: Features
    post: Posterior
    lv: torch.Tensor
    settings: Settings
    generator: torch.Generator
    seeds: int

    def batch(self, b: int, posterior_only: bool = False) -> Batch:
        """`draw_batch` of b data points per seed, at every bridge level or (posterior_only) at
        the posterior's alone (L = 1)."""
        lv = self.lv[-1:] if posterior_only else self.lv
        return draw_batch(self.feats_of, self.post, lv, self.generator, self.seeds, b)


def by_seed(h: torch.Tensor, seeds: int, rows: int) -> torch.Tensor:
    """[seeds, L*rows, D] from a layer's [L*seeds*rows, D] (levels, then seeds, then rows): each
    seed's own rows, levels kept in order. Sizes are explicit: a dead layer has width 0."""
    levels = h.shape[0] // (seeds * rows)
    d = h.shape[1]
    return h.view(levels, seeds, rows, d).transpose(0, 1).reshape(seeds, levels * rows, d)


def draw_batch(
    feats_of: Features,
    post: Posterior,
    lv: torch.Tensor,
    generator: torch.Generator,
    seeds: int,
    b: int,
) -> Batch:
    """One batch: b data points per seed (idx [seeds, b]), a sample of each at every bridge
    level lv [L], decoded in one pass ({name: h [L*seeds*b, D]}), and the latent samples per
    seed ([seeds, L*b, d]: the regression target, the raw coordinates of the exact terms)."""
    idx = torch.randint(post.n, (seeds, b), generator=generator, device=post.mu.device)
    flat = idx.flatten()
    with torch.inference_mode():
        z = sample_levels(post.mu[flat], post.logvar[flat], lv, generator).flatten(0, 1)
    return idx, feats_of(z), by_seed(z.flatten(1), seeds, b)


def draw_posterior(
    feats_of: Features, name: str, post: Posterior, samples: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`samples` posterior draws for one layer: data indices [A], latent z [A, d] and the
    layer's values [A, D], decoded 4096 at a time."""
    idx = torch.randint(post.n, (samples,), generator=generator, device=post.mu.device)
    mu, logvar = post.mu.flatten(1)[idx], post.logvar.flatten(1)[idx]
    eps = torch.randn(mu.shape, generator=generator, device=mu.device)
    z = reparameterise(mu, logvar, eps)
    with torch.no_grad():
        h = torch.cat([feats_of(c.view(-1, *post.latent_shape))[name] for c in z.split(4096)])
    return idx, z, h
