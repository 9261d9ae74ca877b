"""Shared fixtures: a small decoderscope bundle of the demo VAE with bundled data; two torch
threads for the tests of work in worker processes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import decoderscope as ds
from decoderscope.demo import DemoVAE

FACTORY = "decoderscope.demo:DemoVAE"
KWARGS = {"latent_dim": 3, "hidden": 8}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "vae.pt"
    ds.save_checkpoint(  # the README's first call: exported at the package root
        DemoVAE(**KWARGS), path, factory=FACTORY, kwargs=KWARGS, data=torch.randn(64, 2)
    )
    return path


@pytest.fixture
def two_threads() -> object:
    """Two torch threads (worker processes need 2 or more), as they were afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)
