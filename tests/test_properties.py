"""Property-based tests (hypothesis): random decoders and posteriors with cheap settings.

- Affine decoders (Linear chains of random widths, rank-reducing ones included; 1x1 conv chains
  on spatial latents): every layer equals the closed-form truth of its end-to-end map.
- Any decoder (depth 1-6, Linear, activations LeakyReLU/Tanh/ELU/Softplus/GELU/SiLU/ReLU, dead
  units, bottlenecks): the exact latent row obeys its bounds, and no value is shown as a plain
  number past a hard bound (KL >= 0, 0 <= MI <= log N, no layer above the latent).

The default profile keeps the suite short (6 cases per property); `DECODERSCOPE_PROPERTIES=large`
(150, benchmarks/properties.sh) or `=N` tries more.
"""

from __future__ import annotations

import math
import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import decoderscope as ds
from decoderscope.estimators.stats import tolerance
from decoderscope.render import MARK
from decoderscope.testing import gaussian_linear_truth, index_data, vae_for

# the default (CI) profile draws the same cases every run, so that CI never fails by chance;
# "large" and a number explore new cases
settings.register_profile(
    "default", max_examples=6, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)  # fmt: skip
settings.register_profile(
    "large", max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
_PROFILE = os.environ.get("DECODERSCOPE_PROPERTIES", "default")
if _PROFILE.isdigit():  # a number of cases per property
    settings.register_profile(
        _PROFILE, max_examples=int(_PROFILE), deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )  # fmt: skip
settings.load_profile(_PROFILE)

CHEAP = ds.Settings(
    steps=100, regression_steps=200, eval_samples=512, pair_samples=128, exact_samples=2048,
    preimage_samples=128, newton_steps=20,
)  # fmt: skip
ACTS = {
    "leaky": lambda: nn.LeakyReLU(0.2), "tanh": nn.Tanh, "elu": nn.ELU, "softplus": nn.Softplus,
    "gelu": nn.GELU, "silu": nn.SiLU, "relu": nn.ReLU,
}  # fmt: skip


@st.composite
def posteriors(draw: st.DrawFn, max_d: int, max_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    d = draw(st.integers(1, max_d))
    n = draw(st.integers(1, max_n))
    seed = draw(st.integers(0, 2**16))
    lo = draw(st.floats(-30.0, 2.0))
    hi = draw(st.floats(lo, 2.0))
    spread = draw(st.floats(0.0, 3.0))
    g = torch.Generator().manual_seed(seed)
    mu = spread * torch.randn(n, d, generator=g)
    logvar = lo + (hi - lo) * torch.rand(n, d, generator=g)
    return mu, logvar


def _inspect(mu: torch.Tensor, lv: torch.Tensor, dec: nn.Module) -> ds.Report:
    return ds.inspect(
        vae_for(mu, lv, dec), index_data(mu.shape[0]), random_inits=0, seeds=1, device="cpu",
        settings=CHEAP, progress=False,
    )  # fmt: skip


@given(post=posteriors(max_d=32, max_n=2000), widths=st.lists(st.integers(1, 64), max_size=5),
       seed=st.integers(0, 1000))  # fmt: skip
def test_affine_decoders_read_their_closed_form_truth(
    post: tuple[torch.Tensor, torch.Tensor], widths: list[int], seed: int
) -> None:
    mu, lv = post
    torch.manual_seed(seed)
    dims = [mu.shape[1], *widths, max(1, widths[-1] if widths else 1)]
    dec = nn.Sequential(*[nn.Linear(a, b) for a, b in zip(dims, dims[1:], strict=False)])
    report = _inspect(mu, lv, dec)
    trained = report.variant("trained")
    product = torch.eye(mu.shape[1], dtype=torch.float64)
    for k, layer in enumerate(dec):
        product = layer.weight.detach().double() @ product
        row = trained.layer(str(k))
        assert row.method == "affine", (row.name, row.method)
        rank = int(torch.linalg.matrix_rank(product, rtol=1e-10))
        assert row.affine_rank == rank
        if 0 < rank < mu.shape[1]:
            u, _, vh = torch.linalg.svd(product, full_matrices=False)
            truth = gaussian_linear_truth(mu, lv, vh[:rank].float(), samples=4000)
        elif rank == 0:
            truth = (0.0, 0.0, 0.0)
        else:
            ex = trained.layer("latent").exact
            assert ex is not None
            truth = (ex.kl, ex.aggregate_kl, ex.mi)
        for est, t in zip((row.kl, row.aggregate_kl, row.mi), truth, strict=True):
            assert abs(est.mean - t) <= tolerance(t) + 4 * est.se, (row.name, est, truth)


@st.composite
def decoders(draw: st.DrawFn, d: int) -> nn.Sequential:
    depth = draw(st.integers(1, 6))
    mods: list[nn.Module] = []
    width = d
    for _ in range(depth):
        out = draw(st.integers(1, 24))
        lin = nn.Linear(width, out)
        if draw(st.booleans()) and out > 1:  # dead units: pre-activations far below 0
            with torch.no_grad():
                lin.bias[: out // 2] = -50.0
        mods += [lin, ACTS[draw(st.sampled_from(sorted(ACTS)))]()]
        width = out
    return nn.Sequential(*mods)


@given(post=posteriors(max_d=6, max_n=300), data=st.data(), seed=st.integers(0, 1000))
def test_no_value_is_shown_as_a_plain_number_past_a_hard_bound(
    post: tuple[torch.Tensor, torch.Tensor], data: st.DataObject, seed: int
) -> None:
    mu, lv = post
    torch.manual_seed(seed)
    dec = data.draw(decoders(mu.shape[1]))
    report = _inspect(mu, lv, dec)
    n = mu.shape[0]
    log_n = math.log(n)
    latent = report.variant("trained").layer("latent")
    ex = latent.exact
    assert ex is not None
    assert ex.kl >= 0 and -3 * ex.mi_se - 1e-9 <= ex.mi <= log_n + 1e-9  # exact, float64
    assert ex.aggregate_kl >= -3 * ex.mi_se - 1e-9
    for row in report.variant("trained").layers:
        for q in ("kl", "aggregate_kl", "mi"):
            est = getattr(row, q)
            if q in row.unreliable:
                continue
            slack = 2 * est.se + tolerance(0.0)
            assert math.isfinite(est.mean), (row.name, q)
            assert est.mean >= -slack, (row.name, q, est)
            truth = getattr(ex, q)
            assert est.mean - 2 * est.se - tolerance(truth) <= truth, (row.name, q, est, truth)
            if q == "mi":
                assert est.mean - 2 * est.se - tolerance(log_n) <= log_n, (row.name, est)
    md = report.to_markdown()
    for row in report.variant("trained").layers:
        line = next(x for x in md.splitlines() if x.startswith(f"| `{row.name}`"))
        assert (MARK in line) == bool(row.unreliable), line
