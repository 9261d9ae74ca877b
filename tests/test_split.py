"""Decoders read in processes of their own (`joint.run_decoders` where `joint.split`): the
trained decoder reads what it reads alone, the parts give what they give in this process, and
each part's progress is shown under its own label."""

from __future__ import annotations

import multiprocessing
from typing import Any

import pytest
import torch

import decoderscope as ds
from decoderscope import joint
from decoderscope.estimators import beside

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("two_threads")  # conftest.py


def _inspect(random_inits: int, progress: bool = False) -> ds.Report:
    """Layers 0 and 2 of Linear(6, 6), SiLU, Linear(6, 6) (`test_preimages._inspect_silu`'s
    decoder: layer 2 read from its preimages, beside the critics), one seed."""
    from tests.test_preimages import _silu_case

    vae, data, *_ = _silu_case()
    settings = ds.Settings(eval_samples=512, preimage_samples=256)
    return ds.inspect(vae, data, layers=["0", "2"], random_inits=random_inits, seeds=1,
                      device="cpu", settings=settings, progress=progress)  # fmt: skip


def test_each_decoder_in_its_own_process_reads_what_it_reads_here(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if not joint.split(2, CPU):
        pytest.skip("no fork here")
    assert not joint.split(3, CPU)  # more decoders than threads: one joint run
    forked: list[bool] = []  # whether each part beside decoder 0's ran in a worker

    class Spy(beside.Beside[joint.RunResult]):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            forked.append(self.forked)

    monkeypatch.setattr(joint, "Beside", Spy)
    split = _inspect(random_inits=1)
    assert forked == [True]
    alone = _inspect(random_inits=0)
    assert split.variant("trained") == alone.variant("trained")
    assert split.variant("random").layer("2").method == "preimages"
    assert split.variant("random").layer("0") != split.variant("trained").layer("0")
    assert multiprocessing.active_children() == []
    monkeypatch.setattr(beside, "can_fork", lambda _device: False)  # the parts run here
    assert joint.split(2, CPU)
    here = _inspect(random_inits=1)
    assert forked == [True, False]
    assert here.variants == split.variants
    assert torch.get_num_threads() == 2


def test_each_part_shows_its_progress_under_its_own_label(
    capsys: pytest.CaptureFixture[str],
) -> None:
    if not joint.split(2, CPU):
        pytest.skip("no fork here")
    _inspect(random_inits=1, progress=True)
    shown = capsys.readouterr().err
    assert "critics: trained x 1 seed(s)" in shown
    assert "critics: random 1 x 1 seed(s)" in shown
