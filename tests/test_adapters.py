"""Models as libraries build them, read with no adapter code: encoders returning distributions,
dicts and output objects; the decode path preferred over a decoder module; the PyTorch examples
layout; a Lightning checkpoint from the CLI."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torch.distributions import Independent, Normal
from typer.testing import CliRunner

import decoderscope as ds
from decoderscope.cli import app
from decoderscope.digits import digits
from decoderscope.model import DecodePath, posterior_parameters

runner = CliRunner()
SMALL = ds.Settings(steps=100, eval_samples=1024, exact_samples=4096, pair_samples=256)
CHEAP = {"random_inits": 1, "seeds": 1, "device": "cpu", "settings": SMALL}


def test_encoder_outputs_in_the_common_shapes() -> None:
    mu, logvar = torch.randn(3, 4), torch.randn(3, 4)
    std = (0.5 * logvar).exp()
    shapes = {
        "Normal": Normal(mu, std),
        "Independent(Normal)": Independent(Normal(mu, std), 1),
        "pythae dict": {"embedding": mu, "log_covariance": logvar},
        "object": SimpleNamespace(mean=mu, log_var=logvar),
        "diffusers": SimpleNamespace(latent_dist=SimpleNamespace(mean=mu, logvar=logvar)),
        "dict with std": {"mu": mu, "std": std},
    }
    for name, out in shapes.items():
        got_mu, got_logvar = posterior_parameters(out)
        assert torch.equal(got_mu, mu), name
        assert torch.allclose(got_logvar, logvar, atol=1e-5), name
    unknown = {"z": mu}
    assert posterior_parameters(unknown) is unknown  # refused by name later, not guessed


def test_an_unknown_encoder_output_is_refused_by_name() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.decoder = nn.Linear(2, 2)

        def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"z": x}

    with pytest.raises(ds.EncodeError, match="must return two tensors .* got dict"):
        ds.inspect(Odd(), torch.randn(8, 2), **CHEAP)


class _Decoded(nn.Module):
    """A model with both a decoder module and a decode method, optionally with a convolution
    that decode runs first (as diffusers' post_quant_conv)."""

    def __init__(self, post: bool) -> None:
        super().__init__()
        self.encoder = nn.Linear(6, 8)
        self.post = nn.Linear(4, 4) if post else None
        self.decoder = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 6))

    def encode(self, x: torch.Tensor) -> Normal:
        mu, logvar = self.encoder(x).chunk(2, -1)
        return Normal(mu, (0.5 * logvar).exp())

    def decode(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"sample": self.decoder(self.post(z) if self.post is not None else z)}


def test_the_decode_path_is_inspected_where_it_does_more_than_the_decoder() -> None:
    torch.manual_seed(0)
    data = torch.randn(64, 6)
    plain = ds.inspect(_Decoded(post=False), data, **CHEAP)
    assert [r.name for r in plain.variant("trained").layers] == ["latent", "0", "2"]
    assert not any("decode path" in d.message for d in plain.diagnostics)
    with_post = ds.inspect(_Decoded(post=True), data, **CHEAP)
    names = [r.name for r in with_post.variant("trained").layers]
    assert names == ["latent", "model.post", "model.decoder.0", "model.decoder.2"]
    assert any("the decode path is inspected" in d.message for d in with_post.diagnostics)
    assert isinstance(ds.VAE.from_model(_Decoded(post=True)).decoder, DecodePath)


def test_the_pytorch_examples_layout(tmp_path: Path) -> None:
    from .lit_models import ExamplesVAE

    torch.manual_seed(0)
    model = ExamplesVAE(hidden=64)
    data = digits(256)
    report = ds.inspect(model, data, **{**CHEAP, "random_inits": 0})
    trained = report.variant("trained")
    # only the modules that run in decode are candidates: fc3 and fc4, not the encoder's
    assert [r.name for r in trained.layers] == ["latent", "model.fc3", "model.fc4", "output"]
    for v in report.variants:
        for r in v.layers:
            assert math.isfinite(r.mi.mean) and r.mi.mean <= math.log(256) + 3 * r.mi.se + 0.15


def test_a_lightning_checkpoint_from_the_cli(tmp_path: Path) -> None:
    pl = pytest.importorskip("pytorch_lightning")
    from .lit_models import LitVAE

    torch.manual_seed(0)
    module = LitVAE(latent_dim=6, hidden=24)
    data = digits()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=64)
    trainer = pl.Trainer(
        max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(module, loader)
    ckpt = tmp_path / "vae.ckpt"
    trainer.save_checkpoint(ckpt)
    np.save(tmp_path / "x.npy", data[:256].numpy())
    js = tmp_path / "r.json"
    args = ["inspect", str(ckpt), "--model", "tests.lit_models:LitVAE"]
    args += ["--data", str(tmp_path / "x.npy"), "--random-inits", "0", "--seeds", "1"]
    result = runner.invoke(app, [*args, "--steps", "100", "--device", "cpu", "--json", str(js)])
    assert result.exit_code == 0, result.output
    report = ds.Report.from_json(js.read_text())
    assert report.model.latent_shape == (6,)  # rebuilt from the checkpoint's hyper-parameters
    here = ds.inspect(module, data[:256], random_inits=0, seeds=1, device="cpu",
                      settings=ds.Settings(steps=100))  # fmt: skip
    assert report.to_dict()["variants"] == here.to_dict()["variants"]  # the CLI reads the same


def _autoencoder_kl() -> nn.Module:
    """diffusers' AutoencoderKL from a small config (8x8 grey digits, latent 2x4x4)."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(
        in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
        layers_per_block=1, latent_channels=2, norm_num_groups=4, sample_size=8,
    ).eval()  # fmt: skip


def test_diffusers_autoencoder_kl_from_python_and_the_cli(tmp_path: Path) -> None:
    """encode() gives an AutoencoderKLOutput (latent_dist.mean/logvar), decode() runs the
    post-quant convolution before the decoder and returns a DecoderOutput: read as they are.
    The two affine layers at the start of the decode path are exact, so both routes agree to
    the last digit (the rest of the decoder is left to the image-scale benchmarks)."""
    vae = _autoencoder_kl()
    x = digits(128).view(-1, 1, 8, 8)
    layers = ["model.post_quant_conv", "model.decoder.conv_in"]
    report = ds.inspect(vae, x, layers=layers, **CHEAP)
    assert report.model.latent_shape == (2, 4, 4)
    rows = report.variant("trained").layers
    assert [r.name for r in rows] == ["latent", *layers]
    assert [r.method for r in rows[1:]] == ["affine", "affine"]
    exact = rows[0].exact
    assert exact is not None and all(abs(r.kl.mean - exact.kl) < 1e-3 for r in rows[1:])
    assert any("the decode path is inspected" in d.message for d in report.diagnostics)
    config = {k: v for k, v in vae.config.items() if not k.startswith("_")}
    bundle = tmp_path / "akl.pt"
    ds.save_checkpoint(vae, bundle, factory="diffusers:AutoencoderKL", kwargs=config, data=x)
    js = tmp_path / "r.json"
    args = ["inspect", str(bundle), "--layers", ",".join(layers), "--random-inits", "1"]
    result = runner.invoke(app, [*args, "--seeds", "1", "--device", "cpu", "--json", str(js)])
    assert result.exit_code == 0, result.output
    from_cli = ds.Report.from_json(js.read_text())
    same = ds.inspect(vae, x, layers=layers, random_inits=1, seeds=1, device="cpu")
    assert from_cli.to_dict()["variants"] == same.to_dict()["variants"]
