"""Jacobian passes that stop the decoder after the layer they read, against whole passes, in the
same process: one `jacobian.jacobians` call (128 samples, the pass Gauss-Newton through the
decoder repeats every step) at layers of diffusers' AutoencoderKL (the small config of
benchmarks/libraries.py, untrained: 8x8 images, latent 2x4x4, d = 32), each way twice (the
faster kept). The whole pass is the same code with `batches.reading` made a no-op. Prints
both times, their ratio and whether the values and Jacobians are identical.

Run: .venv/bin/python benchmarks/stops.py
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Collection, Iterator

import torch

import decoderscope as ds
from decoderscope.estimators import jacobian
from decoderscope.joint import decoder_features, keyed
from decoderscope.model import resolve_decoder
from decoderscope.taps import probe, tapped

LAYERS = [
    "model.decoder.mid_block.resnets.0.conv1",
    "model.decoder.up_blocks.0.resnets.1.conv2",
    "model.decoder.up_blocks.1.resnets.0.conv2",
    "model.decoder.conv_out",
]
LATENT = (2, 4, 4)


@contextlib.contextmanager
def _anything(_names: Collection[str]) -> Iterator[None]:
    yield


def main() -> None:
    import diffusers

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
        layers_per_block=1, latent_channels=2, norm_num_groups=4, sample_size=8,
    ).eval()  # fmt: skip
    z0 = torch.zeros(2, *LATENT)
    decoder, _ = resolve_decoder(ds.VAE.from_model(vae).decoder, z0)
    names = probe(decoder, z0).default_layers()
    z = torch.randn(128, 32)
    member = torch.zeros(128, dtype=torch.long)
    stopping = jacobian.reading
    print("| layer | width | whole pass s | stopped s | ratio | identical |")
    print("|---|---:|---:|---:|---:|---|")
    with tapped(decoder, names) as tap:
        features = decoder_features([tap], names)
        for name in LAYERS:
            key = keyed(0, name)

            def feats(zz: torch.Tensor, key: str = key) -> dict[str, torch.Tensor]:
                return {key: features(zz)[key].flatten(1)}

            width = int(feats(z0)[key].shape[1])
            best: dict[str, float] = {}
            got: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
            ways: dict[str, Callable[[Collection[str]], contextlib.AbstractContextManager[None]]]
            ways = {"whole": _anything, "stopped": stopping}
            for _ in range(2):
                for way, hint in ways.items():
                    jacobian.reading = hint  # type: ignore[assignment]
                    t = time.perf_counter()
                    got[way] = jacobian.jacobians(feats, [key], member, z, LATENT, width)
                    best[way] = min(best.get(way, float("inf")), time.perf_counter() - t)
            jacobian.reading = stopping
            same = all(torch.equal(a, b) for a, b in zip(got["whole"], got["stopped"], strict=True))
            print(
                f"| {name} | {width} | {best['whole']:.2f} | {best['stopped']:.2f} | "
                f"{best['whole'] / best['stopped']:.1f}x | {same} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
