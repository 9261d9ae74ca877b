"""A preimage search that weighs only the distinct solutions (`search.weigh`: J^T J formed and
decomposed where a solution is kept) against one that weighs every start's solution and then
drops duplicates, in the same process: one `preimages.values` call (1024 samples, the default
search: 13 starts, the own z and two rounds of hops per sample) on a re-initialised copy of
the demo's decoder up to layer `2` (Linear, GELU, Linear on a 16-unit latent: ~10 preimages
per value), under the trained demo VAE's posterior. Each way twice (the faster kept). Prints
both times, their ratio and whether the values are identical.

Run: .venv/bin/python benchmarks/weighing.py
"""

from __future__ import annotations

import math
import time

import torch

from decoderscope.demo import DemoVAE, train_demo
from decoderscope.estimators import preimages, search
from decoderscope.estimators.batches import Features
from decoderscope.estimators.search import Found, Solutions
from decoderscope.sampling import Posterior


def weigh_every(
    feats_of: Features,
    latent_shape: tuple[int, ...],
    name: str,
    width: int,
    sol: Solutions,
    before: Found | None = None,
) -> Found:
    """The baseline: every solved start's J^T J decomposed, then duplicates dropped."""
    a, s, d = sol.z.shape
    flat = sol.z.reshape(a * s, d)
    eig = search.gram_eigenvalues(feats_of, latent_shape, name, flat, width)
    weight = -0.5 * flat.pow(2).sum(1) - 0.5 * eig.clamp_min(1e-300).log().sum(1)
    ok = sol.ok.reshape(a * s) & ~search.rank_deficient(eig)
    new = Found(sol.z, torch.where(ok, weight, -math.inf).view(a, s))
    if before is None:
        return new.distinct()
    return Found(
        torch.cat([before.z, new.z], 1), torch.cat([before.log_weight, new.log_weight], 1)
    ).distinct()


def main() -> None:
    model, data = train_demo(0)
    with torch.no_grad():
        mu, logvar = model.encode(data)
    post = Posterior(mu, logvar)
    torch.manual_seed(1)
    layer = DemoVAE().decoder[:3]  # a re-initialised copy, up to the demo's layer `2`

    def feats_of(z: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"2": layer(z)}

    kept = search.weigh
    ways = {"every solution": weigh_every, "distinct only": kept}
    best: dict[str, float] = {}
    rows: dict[str, tuple[float, float, float]] = {}
    with torch.no_grad():
        for _ in range(2):
            for way, weigh in ways.items():
                search.weigh = preimages.weigh = weigh  # type: ignore[assignment]
                g = torch.Generator().manual_seed(0)
                bank = preimages.Bank(feats_of, "2", post, g)
                t = time.perf_counter()
                got = preimages.values(feats_of, "2", bank, post, 1024, 512, g, None)
                best[way] = min(best.get(way, math.inf), time.perf_counter() - t)
                rows[way] = (got.kl, got.mi, got.preimages or 0.0)
    search.weigh = preimages.weigh = kept
    base, new = best["every solution"], best["distinct only"]
    print("| weighing | s | KL | MI | preimages per sample |")
    print("|---|---:|---:|---:|---:|")
    for way in ways:
        kl, mi, count = rows[way]
        print(f"| {way} | {best[way]:.2f} | {kl:.4f} | {mi:.4f} | {count:.2f} |")
    same = rows["every solution"] == rows["distinct only"]
    print(f"\nratio {base / new:.2f}x; identical values: {same}")


if __name__ == "__main__":
    main()
