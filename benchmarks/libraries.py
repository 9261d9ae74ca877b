"""Library models, trained briefly on scikit-learn's bundled digits and inspected with no adapter
code, from Python and from the command line: diffusers' AutoencoderKL (a small config, 8x8
grey digits, latent 2x4x4), a Lightning VAE (its .ckpt rebuilt from the hyper-parameters) and
the PyTorch examples' layout (layers on the model, a `decode` method). Each inspection: one
random copy, one seed, default settings, every default layer. Prints per model the time from
Python and from the CLI, and per layer the values with the bounds they must keep (finite,
MI <= log N, no layer above the latent beyond its error: the rows the report's guard marks).

Run: .venv/bin/python benchmarks/libraries.py [model ...] [--out DIR]   (needs the dev extras;
--out keeps the checkpoints, e.g. DIR/akl.pt, for `decoderscope inspect` by hand)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

import decoderscope as ds
from decoderscope.digits import digits

N = 512
EPOCHS = 30  # 3 (24 steps) left the examples-layout and Lightning VAEs collapsed (MI < 0.1)
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.lit_models: the Lightning and examples-layout models


def _kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).flatten(1).sum(1)


def _fit(model: nn.Module, loss: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> None:
    """Adam, EPOCHS epochs of batches of 64 (the caller's RNG state kept)."""
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model.train()
        for _ in range(EPOCHS):
            for batch in x[torch.randperm(len(x))].split(64):
                opt.zero_grad()
                loss(batch).mean().backward()
                opt.step()
        model.eval()


def examples_layout(folder: Path) -> tuple[nn.Module, torch.Tensor, list[str]]:
    from tests.lit_models import ExamplesVAE

    torch.manual_seed(0)
    model, x = ExamplesVAE(), digits(N)

    def loss(b: torch.Tensor) -> torch.Tensor:
        recon, mu, logvar = model(b)
        bce = nn.functional.binary_cross_entropy(recon, b, reduction="none").sum(1)
        return bce + _kl(mu, logvar)

    _fit(model, loss, x)
    path = folder / "examples.pt"
    ds.save_checkpoint(model, path, factory="tests.lit_models:ExamplesVAE", data=x)
    return model, x, [str(path)]


def lightning(folder: Path) -> tuple[nn.Module, torch.Tensor, list[str]]:
    import pytorch_lightning as pl

    from tests.lit_models import LitVAE

    torch.manual_seed(0)
    module, x = LitVAE(), digits(N)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=64)
    trainer = pl.Trainer(
        max_epochs=EPOCHS, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(module, loader)
    module.eval()
    ckpt, data = folder / "vae.ckpt", folder / "x.npy"
    trainer.save_checkpoint(ckpt)
    np.save(data, x.numpy())
    return module, x, [str(ckpt), "--model", "tests.lit_models:LitVAE", "--data", str(data)]


def autoencoder_kl(folder: Path) -> tuple[nn.Module, torch.Tensor, list[str]]:
    import diffusers

    torch.manual_seed(0)
    config = dict(
        in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
        layers_per_block=1, latent_channels=2, norm_num_groups=4, sample_size=8,
    )  # fmt: skip
    vae, x = diffusers.AutoencoderKL(**config), digits(N).view(-1, 1, 8, 8)

    def loss(b: torch.Tensor) -> torch.Tensor:
        dist = vae.encode(b).latent_dist
        recon = vae.decode(dist.sample()).sample
        return 0.5 * (recon - b).pow(2).flatten(1).sum(1) / 0.1**2 + _kl(dist.mean, dist.logvar)

    _fit(vae, loss, x)
    path = folder / "akl.pt"
    saved = {k: v for k, v in vae.config.items() if not k.startswith("_")}
    ds.save_checkpoint(vae, path, factory="diffusers:AutoencoderKL", kwargs=saved, data=x)
    return vae, x, [str(path)]


MODELS = {
    "examples layout": examples_layout,
    "Lightning": lightning,
    "diffusers AutoencoderKL": autoencoder_kl,
}


def check(report: ds.Report) -> list[str]:
    """Rows breaking a bound (not finite, MI above log N, above the latent beyond its error, ...):
    those the report's guard marked unreliable, with its reasons."""
    return [
        f"{v.name}/{r.name}: {r.reason}" for v in report.variants for r in v.layers if r.unreliable
    ]


def run(name: str, out: Path | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) if out is None else out
        model, x, cli_args = MODELS[name](folder)
        t0 = time.perf_counter()
        report = ds.inspect(model, x, random_inits=1, seeds=1, device="cpu", progress=False)
        python_s = time.perf_counter() - t0
        js = Path(tmp) / "r.json"
        cmd = [sys.executable, "-m", "decoderscope", "inspect", *cli_args, "--random-inits", "1"]
        cmd += ["--seeds", "1", "--device", "cpu", "--json", str(js)]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
        cli_s = time.perf_counter() - t0
        if done.returncode != 0:
            print(f"{name}: the CLI failed:\n{done.stdout}\n{done.stderr}")
            return
        same = (
            ds.Report.from_json(js.read_text()).to_dict()["variants"]
            == report.to_dict()["variants"]
        )
    print(f"\n{name}: Python {python_s:.1f} s, CLI {cli_s:.1f} s (whole process), same rows: "
          f"{same}; bounds broken: {check(report) or 'none'}")  # fmt: skip
    for v in report.variants:
        for r in v.layers:
            print(
                f"  {v.name:8} {r.name:40} {r.method or '':10} KL {r.kl.mean:7.2f} "
                f"agg {r.aggregate_kl.mean:6.2f} MI {r.mi.mean:5.2f} ± {r.mi.se:.2f}"
            )
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="*", help=f"a subset of: {list(MODELS)}")
    parser.add_argument("--out", type=Path, help="keep the checkpoints in this folder")
    args = parser.parse_args()
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    print(f"torch threads: {torch.get_num_threads()}, N = {N}")
    for name in args.models or list(MODELS):
        run(name, args.out)


if __name__ == "__main__":
    main()
