from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import decoderscope as ds
from decoderscope.testing import gaussian_case, index_data, vae_for

FAST = ds.Settings(steps=20, eval_samples=256, pair_samples=64, exact_samples=256)


def _vae() -> ds.VAE:
    mu, lv = gaussian_case(d=4, n=30)
    return vae_for(mu, lv, nn.Sequential(nn.Linear(4, 4)))


def _run(vae: ds.VAE, data: object, **kw: object) -> ds.Report:
    args: dict[str, object] = {"random_inits": 0, "seeds": 1, "device": "cpu", "settings": FAST}
    args.update(kw)
    return ds.inspect(vae, data, **args)  # type: ignore[arg-type]


def test_nan_data() -> None:
    data = index_data(30)
    data[3, 0] = float("nan")
    with pytest.raises(
        ds.DataError, match=r"1 NaN or infinite value\(s\), first in row\(s\) \[3\]"
    ):
        _run(_vae(), data)


def test_inf_data_numpy() -> None:
    data = index_data(30).numpy()
    data[5, 0] = np.inf
    with pytest.raises(ds.DataError, match=r"row\(s\) \[5\]"):
        _run(_vae(), data)


def test_empty_and_wrong_type() -> None:
    with pytest.raises(ds.DataError, match=r"data is empty \(shape \[0, 1\]\)"):
        _run(_vae(), torch.zeros(0, 1))
    with pytest.raises(ds.DataError, match="got list"):
        _run(_vae(), [[1.0]])


def test_encode_must_return_two_tensors() -> None:
    dec = nn.Linear(4, 4)
    three = ds.VAE(encode=lambda x: (x, x, x), decoder=dec)
    with pytest.raises(ds.EncodeError, match="got tuple of 3 item"):
        _run(three, index_data(5))
    one = ds.VAE(encode=lambda x: x, decoder=dec)  # type: ignore[arg-type,return-value]
    with pytest.raises(ds.EncodeError, match="got Tensor"):
        _run(one, index_data(5))


def test_encode_shape_mismatch_and_batch_mismatch() -> None:
    dec = nn.Linear(4, 4)
    uneven = ds.VAE(encode=lambda x: (torch.zeros(len(x), 4), torch.zeros(len(x), 3)), decoder=dec)
    with pytest.raises(ds.EncodeError, match=r"mu of shape \[5, 4\] and logvar of shape \[5, 3\]"):
        _run(uneven, index_data(5))
    short = ds.VAE(encode=lambda x: (torch.zeros(2, 4), torch.zeros(2, 4)), decoder=dec)
    with pytest.raises(ds.EncodeError, match=r"batch of 5 returned mu of shape \[2, 4\]"):
        _run(short, index_data(5))


def test_bad_arguments() -> None:
    with pytest.raises(ds.ArgumentError, match="random_inits must be an integer >= 0, got -1"):
        _run(_vae(), index_data(30), random_inits=-1)
    with pytest.raises(ds.ArgumentError, match="seeds must be an integer >= 1, got 0"):
        _run(_vae(), index_data(30), seeds=0)
    with pytest.raises(ds.ArgumentError, match="estimator must be one of"):
        ds.Settings(estimator="magic")
    with pytest.raises(ds.ArgumentError, match="patience must be an integer >= 0, got -1"):
        ds.Settings(patience=-1)
    with pytest.raises(
        ds.ArgumentError, match="regression_patience must be an integer >= 0, got -2"
    ):
        ds.Settings(regression_patience=-2)
    with pytest.raises(
        ds.ArgumentError, match="regression_depth must be a positive integer, got 0"
    ):
        ds.Settings(regression_depth=0)
    with pytest.raises(ds.ArgumentError, match="stop_tol must be a number >= 0, got -0.1"):
        ds.Settings(stop_tol=-0.1)
    with pytest.raises(ds.ArgumentError, match="check_every must be a positive integer, got 0"):
        ds.Settings(check_every=0)
    with pytest.raises(ds.ArgumentError, match="lr must be a positive number, got 0"):
        ds.Settings(lr=0)
    with pytest.raises(ds.ArgumentError, match="steps must be a positive integer, got 0"):
        ds.Settings(steps=0)
    with pytest.raises(ds.ArgumentError, match="preimages must be True or False, got 'yes'"):
        ds.Settings(preimages="yes")  # type: ignore[arg-type]
    with pytest.raises(ds.ArgumentError, match="preimage_samples must be an integer >= 2, got 1"):
        ds.Settings(preimage_samples=1)
    if not torch.cuda.is_available():
        with pytest.raises(ds.ArgumentError, match="sees no CUDA device"):
            _run(_vae(), index_data(30), device="cuda")


def test_decoder_must_be_module_and_from_model() -> None:
    with pytest.raises(ds.DecoderscopeError, match="must be a torch.nn.Module, got function"):
        ds.VAE(encode=lambda x: (x, x), decoder=lambda z: z)  # type: ignore[arg-type]
    with pytest.raises(ds.DecoderscopeError, match="has no `encode` method"):
        ds.VAE.from_model(nn.Linear(2, 2))


def test_user_model_and_rng_left_as_they_were() -> None:
    mu, lv = gaussian_case(d=4, n=30)
    # in training mode, where a forward pass would update BatchNorm's running statistics
    dec = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.1), nn.Linear(4, 2))
    dec.train()
    before = {k: v.clone() for k, v in dec.state_dict().items()}
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    _run(vae_for(mu, lv, dec), index_data(30), random_inits=1)
    assert torch.equal(torch.rand(3), expected)  # caller's RNG stream unchanged
    assert dec.training and all(m.training for m in dec.modules())
    assert all(torch.equal(before[k], v) for k, v in dec.state_dict().items())
    assert all(not m._forward_hooks for m in dec.modules())


def test_reproducible_for_a_seed() -> None:
    vae = _vae()
    a = _run(vae, index_data(30), random_inits=1, seed=7)
    b = _run(vae, index_data(30), random_inits=1, seed=7)
    assert a.to_json() == b.to_json()
    c = _run(vae, index_data(30), random_inits=1, seed=8)
    assert c.to_json() != a.to_json()


def test_unset_lr_and_steps_take_the_estimators_own_defaults() -> None:
    """lr and steps left at None resolve per estimator (telescoping critics learn from soft
    labels at 1e-2 for up to 12000 steps; the plain method keeps 2e-3 and 1000), and the report
    records the values used."""
    tele, plain = ds.Settings(), ds.Settings(estimator="plain")
    assert (tele.lr, tele.steps) == (1e-2, 12000)
    assert (plain.lr, plain.steps) == (2e-3, 1000)
    assert ds.Settings(lr=5e-3, steps=300, estimator="plain").lr == 5e-3
