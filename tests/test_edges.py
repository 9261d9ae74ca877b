"""Truth at the edges: confident posteriors (logvar -40 to +5, KL up to 200 nats), where float32
features stop resolving the posterior, read exactly or explicitly left unread."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import decoderscope as ds
from decoderscope.estimators.exact import exact_latent
from decoderscope.estimators.precision import ROUNDING_LIMIT, rounding_nats
from decoderscope.sampling import Posterior
from decoderscope.structure import read_layout
from decoderscope.testing import (
    OpaqueLeaky,
    bottleneck,
    gaussian_case,
    gaussian_linear_truth,
    index_data,
    linear_chain,
    vae_for,
    within,
)


def _posterior(d: int, n: int, logvar: float, seed: int = 0) -> Posterior:
    g = torch.Generator().manual_seed(seed)
    return Posterior(torch.randn(n, d, generator=g), torch.full((n, d), logvar))


@pytest.mark.parametrize(("d", "logvar"), [(4, -40.0), (8, -40.0), (4, -30.0), (4, 5.0)])
def test_exact_latent_row_holds_from_confident_to_broad_posteriors(d: int, logvar: float) -> None:
    n = 60
    post = _posterior(d, n, logvar)
    ex = exact_latent(post, 4000, torch.Generator().manual_seed(1))
    mu = post.mu.double()
    kl = float((0.5 * (mu**2 + math.exp(logvar) - 1.0 - logvar)).sum(1).mean())
    assert ex.kl == pytest.approx(kl, rel=1e-12)  # d = 8 at -40: about 170 nats
    assert -3 * ex.mi_se <= ex.mi <= math.log(n) + 1e-9
    if logvar <= -30:  # distinct means, posteriors 1e-7 wide: every point told apart
        assert ex.mi == pytest.approx(math.log(n), abs=1e-9)
        assert ex.aggregate_kl == pytest.approx(kl - math.log(n), abs=1e-9)
    else:
        assert ex.mi < 0.05  # sigma^2 = 148: the posteriors barely differ


def _tiny_report(logvar: float) -> ds.Report:
    n, d = 300, 2
    post = _posterior(d, n, logvar)
    torch.manual_seed(0)
    dec = nn.Sequential(nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, 4))
    return ds.inspect(
        vae_for(post.mu, post.logvar, dec),
        index_data(n),
        random_inits=0,
        seeds=2,
        device="cpu",
        settings=ds.Settings(steps=300),
    )


def test_rounding_bound_grows_as_the_posteriors_narrow() -> None:
    bounds = [rounding_nats(_posterior(2, 300, lv)) for lv in (-15.0, -20.0, -30.0)]
    assert bounds[0] < ROUNDING_LIMIT < bounds[1] < bounds[2]


def test_confident_posteriors_within_float32_reach_are_read_within_tolerance() -> None:
    # logvar -15 (rounding bound 0.78 nats): read as usual; Linear-Tanh-Linear is injective,
    # so every layer holds the latent's values
    trained = _tiny_report(-15.0).variant("trained")
    exact = trained.layer("latent").exact
    assert exact is not None
    for row in trained.layers:
        assert row.status is None, (row.name, row.reason)
        for q in ("kl", "aggregate_kl", "mi"):
            assert within(getattr(row, q).mean, getattr(exact, q)), (row.name, q, row)


@pytest.mark.parametrize("logvar", [-20.0, -30.0])
def test_posteriors_beyond_float32_are_left_unread_never_printed(logvar: float) -> None:
    # measured before this rule: logvar -20 read the latent KL 32.8 against an exact 20.0 and
    # MI -25; -30 read KL 5e5 and a layer's KL 26.3 against 30.0
    report = _tiny_report(logvar)
    trained = report.variant("trained")
    exact = trained.layer("latent").exact
    assert exact is not None
    affine = trained.layer("0")  # Linear: exact in closed form, float64
    assert affine.method == "affine" and affine.status is None
    assert abs(affine.kl.mean - exact.kl) < 0.01 and abs(affine.mi.mean - exact.mi) < 0.01
    for name in ("latent", "2"):
        row = trained.layer(name)
        assert row.method == "unresolved" and row.status == "unreliable"
        assert row.unreliable == ("kl", "aggregate_kl", "mi")
        assert "too narrow for float32 features" in (row.reason or "")
        assert math.isnan(row.kl.mean)
    assert "not read" in report.to_markdown()
    back = ds.Report.from_json(report.to_json()).variant("trained").layer("2")
    assert back.status == "unreliable" and math.isnan(back.mi.mean)


@pytest.mark.parametrize(
    ("narrow", "wide", "act", "seed"),
    [(3, 32, "leaky", 0), (2, 16, "tanh", 1), (5, 24, "elu", 2), (1, 8, "leaky", 3)],
)
def test_a_rank_reducing_bottleneck_that_widens_again_reads_its_bottleneck_values(
    narrow: int, wide: int, act: str, seed: int
) -> None:
    # Linear(8, narrow), activation, Linear(narrow, wide), Softplus: everything after the
    # bottleneck is injective on its image, so every layer holds the bottleneck's values.
    # Measured before the graph was read: the Softplus layer at (3, 32, leaky) read KL -4.9
    # and MI -5.3 (critics on a curved 3-d image whitened to 32 directions)
    d, n = 8, 256
    mu, lv = gaussian_case(d=d, n=n, kl=9.2, sigma=math.exp(-9.2 / d), seed=seed)
    torch.manual_seed(seed)
    dec = bottleneck(d, narrow, wide, act)
    report = ds.inspect(
        vae_for(mu, lv, dec), index_data(n), layers=["0", "1", "2", "3"],
        random_inits=0, seeds=1, device="cpu", settings=ds.Settings(steps=200),
    )  # fmt: skip
    truth = gaussian_linear_truth(mu, lv, dec[0].weight.detach())
    rows = report.variant("trained").layers[1:]
    assert [r.method for r in rows] == ["affine", "injective", "injective", "injective"]
    assert report.settings["steps_run"] <= 200
    for row in rows:
        assert row.status is None and row.affine_rank == narrow
        for est, t in zip((row.kl, row.aggregate_kl, row.mi), truth, strict=True):
            assert within(est.mean, t), (row.name, est, truth)


class _Reshaping(nn.Module):
    """Reshapes by the batch size read from z: shapes are metadata, not a function of z."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.up = nn.Linear(4, 8), nn.ConvTranspose2d(2, 1, 2)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.fc(z).view(z.shape[0], 2, 2, 2)
        return self.up(h).reshape(z.size(0), -1)


def test_graph_reading_names_affine_and_injective_layers_and_nothing_else() -> None:
    names = ["0", "1", "2", "3", "output"]
    assert read_layout(linear_chain(4, 8), [str(i) for i in range(8)]).affine == frozenset(
        str(i) for i in range(8)
    )
    layout = read_layout(bottleneck(8, 3, 32, "tanh"), names)
    assert layout.affine == {"0"}
    assert layout.injective == {"1": "0", "2": "0", "3": "0", "output": "0"}
    torch.manual_seed(0)
    narrowing = nn.Sequential(nn.Linear(8, 3), nn.Tanh(), nn.Linear(3, 2), nn.Tanh())
    assert read_layout(narrowing, names).injective == {"1": "0"}  # Linear(3, 2) may fold
    for act in (nn.GELU(), nn.ReLU(), nn.SiLU(), nn.LeakyReLU(-0.5)):
        assert read_layout(nn.Sequential(nn.Linear(8, 3), act), ["0", "1"]).injective == {}
    bn = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Unflatten(1, (6, 1, 1)))
    bn.append(nn.ConvTranspose2d(6, 2, 3)).append(nn.Upsample(scale_factor=2))
    assert read_layout(bn, ["0", "1", "2", "3", "4"]).affine == {"0", "1", "2", "3", "4"}
    assert read_layout(_Reshaping(), ["fc", "up", "output"]).affine == {"fc", "up", "output"}
    free = nn.BatchNorm1d(6, track_running_stats=False)  # batch statistics even in eval mode
    assert read_layout(nn.Sequential(nn.Linear(4, 6), free), ["0", "1"]).affine == {"0"}


def _conv_decoder() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 8), nn.LeakyReLU(0.2), nn.Unflatten(1, (2, 2, 2)),
        nn.ConvTranspose2d(2, 3, 4, stride=2, padding=1), nn.Tanh(),  # 8 -> 48 features
        nn.Conv2d(3, 1, 3), nn.Tanh(),  # 48 -> 4: folds
    )  # fmt: skip


def test_convolutions_of_full_column_rank_continue_an_injective_chain_at_known_shapes() -> None:
    decoder = _conv_decoder()
    names = [str(i) for i in range(7)]
    assert read_layout(decoder, names).injective == {"1": "0", "2": "0"}  # no shapes, no convs
    chain = {"1": "0", "2": "0", "3": "0", "4": "0"}
    assert read_layout(decoder, names, latent_shape=(4,)).injective == chain
    with torch.no_grad():
        decoder[3].weight[1].zero_()  # input channel 1 dropped: rank 4 of 8
    assert read_layout(decoder, names, latent_shape=(4,)).injective == {"1": "0", "2": "0"}
    # a shape that does not fit the decoder: no shapes, nothing known about the convolutions
    assert read_layout(_conv_decoder(), names, latent_shape=(5,)).injective == {"1": "0", "2": "0"}


def test_a_transposed_convolution_chain_is_read_as_the_latent_with_no_critic_step() -> None:
    mu, lv = gaussian_case(d=4, n=400, kl=6.0, sigma=0.4, seed=2)
    decoder = _conv_decoder()[:5]
    report = ds.inspect(
        vae_for(mu, lv, decoder), index_data(400), layers=["0", "1", "3", "4"],
        random_inits=0, seeds=1, device="cpu", progress=False,
    )  # fmt: skip
    trained = report.variant("trained")
    exact = trained.layer("latent").exact
    assert exact is not None
    methods = [r.method for r in trained.layers[1:]]
    assert methods == ["affine", "injective", "injective", "injective"]
    assert report.settings["steps_run"] == 0
    for row in trained.layers[1:]:
        assert abs(row.kl.mean - exact.kl) <= 0.01 and abs(row.mi.mean - exact.mi) <= 0.01
    notes = [x.message for x in report.diagnostics if x.message.startswith("injective functions")]
    assert len(notes) == 1 and notes[0].endswith(": 1 (rank 4), 3 (rank 4), 4 (rank 4)")


def test_a_layer_that_reshapes_another_is_read_once_as_that_layer() -> None:
    torch.manual_seed(0)
    decoder = nn.Sequential(
        nn.Linear(4, 8), OpaqueLeaky(), nn.Linear(8, 8), nn.Unflatten(1, (2, 4)), nn.Flatten()
    )
    layout = read_layout(decoder, ["1", "2", "3", "4", "output"])
    assert layout.copies == {"3": "2", "4": "2", "output": "2"}
    sliced = nn.Sequential(nn.Linear(4, 8), OpaqueLeaky(), nn.Linear(8, 8))
    assert read_layout(sliced, ["2", "output"]).copies == {"output": "2"}  # the same node
    mu, lv = gaussian_case(d=4, n=300, kl=5.0, sigma=0.4, seed=1)
    report = ds.inspect(
        vae_for(mu, lv, decoder), index_data(300), layers=["1", "2", "4"], random_inits=0,
        seeds=1, device="cpu", progress=False,
    )  # fmt: skip
    rows = report.variant("trained")
    assert rows.layer("2").method == "inverse"
    copy, source = rows.layer("4").to_dict(), rows.layer("2").to_dict()
    assert copy == {**source, "name": "4", "type": "Flatten"}


def test_a_deep_linear_chain_is_exact_in_closed_form_with_no_critic_step() -> None:
    # float32 rounding made the numerical affine test fail at this chain's layers 7-8, whose
    # critics then trained for every step and read 0.49 nats off
    mu, lv = gaussian_case(d=16, n=1000, kl=7.7, sigma=0.5, seed=0)
    torch.manual_seed(1)
    report = ds.inspect(
        vae_for(mu, lv, linear_chain(16, 8)), index_data(1000), random_inits=0, seeds=1,
        device="cpu",
    )  # fmt: skip
    assert report.settings["steps_run"] == 0
    trained = report.variant("trained")
    exact = trained.layer("latent").exact
    assert exact is not None
    for row in trained.layers[1:]:
        assert row.method == "affine" and row.affine_rank == 16
        assert abs(row.kl.mean - exact.kl) <= 0.01 and abs(row.mi.mean - exact.mi) <= 0.01
