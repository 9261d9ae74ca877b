"""Ground truths shared by the tests and benchmarks: posteriors with a known KL, decoders whose
values are known (linear-Gaussian stages, folded layers with every preimage enumerated), and an
encoder that looks up stored posteriors. docs/method.md ("Ground truth") says why each is exact."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .estimators.exact import log_mixture_terms
from .estimators.stats import tolerance as tolerance  # re-exported for tests
from .model import VAE
from .report import LayerResult
from .testing_ppca import LinearGaussianVAE as LinearGaussianVAE  # re-exported
from .testing_ppca import gaussian_kernel_mean as gaussian_kernel_mean  # re-exported

# the truth's Monte Carlo stream must not be the data's: gaussian_case(seed=0) draws from
# Generator(0), and truths drawn from it too read MI off (d = 64, KL 20: by -0.25 at the latent)
TRUTH_SALT = 1_000_003


def truth_cells(row: LayerResult, truth: tuple[float, float, float]) -> tuple[str, float]:
    """Markdown cells 'truth KL / agg / MI | estimate ± se (each)' for a report row against its
    truth, and the row's worst error as a share of the stated tolerance (`tolerance`)."""
    est = (row.kl, row.aggregate_kl, row.mi)
    share = max(abs(e.mean - t) / tolerance(t) for e, t in zip(est, truth, strict=True))
    cells = " / ".join(f"{t:.2f}" for t in truth) + " | "
    return cells + " / ".join(f"{e.mean:.2f} ± {e.se:.2f}" for e in est), share


def within(estimate: float, truth: float, share: float = 1.0) -> bool:
    """`estimate` agrees with `truth` up to `share` of the stated tolerance (`tolerance`)."""
    return abs(estimate - truth) <= share * tolerance(truth)


# The decoder zoo the tests and benchmarks share; each takes the latent width d.
def linear_chain(d: int, depth: int = 3, widen: bool = False) -> nn.Sequential:
    """`depth` Linear layers (the first d -> d, then d -> 2d when `widen`): affine, injective."""
    widths = [d] + [2 * d if widen and i > 0 else d for i in range(depth)]
    return nn.Sequential(*[nn.Linear(a, b) for a, b in zip(widths, widths[1:], strict=False)])


class OpaqueLeaky(nn.Module):
    """LeakyReLU(0.2) as a function call inside a module of its own: the decoder's traced graph
    does not show it monotone, so what follows it is read numerically (R(h), critics), as a
    user's own activation would be, not structurally."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.leaky_relu(x, 0.2)


def leaky_mlp(d: int, depth: int = 1, opaque: bool = False) -> nn.Sequential:
    """(Linear, LeakyReLU(0.2)) x `depth`, then Linear: injective, locally ill-conditioned
    behind the second LeakyReLU. opaque: `OpaqueLeaky` activations."""
    mods: list[nn.Module] = []
    for _ in range(depth):
        mods += [nn.Linear(d, d), OpaqueLeaky() if opaque else nn.LeakyReLU(0.2)]
    return nn.Sequential(*mods, nn.Linear(d, d))


def conv_upsample(d: int, width: int = 4, side: int = 2) -> nn.Sequential:
    """Latent [d / side^2, side, side] -> nearest 2x upsampling -> two 1x1 convs of `width`
    channels; injective. `conv_latent_shape` gives the latent shape."""
    c = d // side**2
    up = nn.Upsample(scale_factor=2, mode="nearest")
    return nn.Sequential(up, nn.Conv2d(c, width, 1), nn.Conv2d(width, width, 1))


def conv_latent_shape(d: int, side: int = 2) -> tuple[int, int, int]:
    return (d // side**2, side, side)


def project(d: int) -> nn.Sequential:
    """One rank-reducing Linear d -> max(1, d // 4), no bias: lossy, closed-form truth."""
    return nn.Sequential(nn.Linear(d, max(1, d // 4), bias=False))


def bottleneck(d: int, narrow: int = 3, wide: int = 32, act: str = "leaky") -> nn.Sequential:
    """Linear(d, narrow), an injective activation, Linear(narrow, wide), Softplus: rank-reducing,
    then injective on the narrow image, so every layer from the first holds that layer's values."""
    acts: dict[str, nn.Module] = {"leaky": nn.LeakyReLU(0.2), "tanh": nn.Tanh(), "elu": nn.ELU()}
    return nn.Sequential(nn.Linear(d, narrow), acts[act], nn.Linear(narrow, wide), nn.Softplus())


def gaussian_case(
    d: int = 8, n: int = 500, kl: float = 4.0, sigma: float = 0.5, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior parameters with mean conditional KL `kl` nats: mu, logvar [n, d]."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d, generator=g)
    logvar = torch.full((n, d), 2 * math.log(sigma))
    lo, hi = 0.0, 10.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        mu = base * mid
        value = (0.5 * (logvar.exp() + mu * mu - 1 - logvar).sum(1)).mean()
        lo, hi = (lo, mid) if value > kl else (mid, hi)
    return base * lo, logvar


class Lookup:
    """encode(x) for data that are row indices: returns the stored (mu, logvar) of each row."""

    def __init__(self, mu: torch.Tensor, logvar: torch.Tensor) -> None:
        self.mu, self.logvar = mu, logvar

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        i = x[:, 0].long()
        return self.mu[i], self.logvar[i]


def index_data(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.float32).unsqueeze(1)


def vae_for(mu: torch.Tensor, logvar: torch.Tensor, decoder: nn.Module) -> VAE:
    return VAE(encode=Lookup(mu, logvar), decoder=decoder)


def gaussian_linear_truth(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    a: torch.Tensor,
    samples: int = 20000,
    seed: int = 0,
    noise: float = 0.0,
) -> tuple[float, float, float]:
    """Exact (KL, aggregate KL, MI) at h = a @ z for a [k, d] of rank k: q(h|x) = N(a mu, a S a^T),
    p(h) = N(0, a a^T); KL in closed form, MI by Monte Carlo with exact mixture densities.
    noise: of h + noise * e instead, e ~ N(0, a a^T) (standard normal in h's prior-whitened
    coordinates), as `benchmarks/demo_truth.py` smooths a layer."""
    a = a.double()
    mu, var = mu.double(), logvar.double().exp()
    means = mu @ a.T
    spread = noise**2 * (a @ a.T)
    covs = a.unsqueeze(0) * var.unsqueeze(1) @ a.T + spread  # [n, k, k]
    prior = torch.distributions.MultivariateNormal(
        torch.zeros(a.shape[0]).double(), a @ a.T + spread
    )
    q = torch.distributions.MultivariateNormal(means, covs)
    kl = float(torch.distributions.kl_divergence(q, prior).mean())
    g = torch.Generator().manual_seed(TRUTH_SALT + seed)
    n = mu.shape[0]
    idx = torch.randint(n, (samples,), generator=g)
    z = mu[idx] + var[idx].sqrt() * torch.randn(samples, mu.shape[1], generator=g).double()
    h = z @ a.T
    if noise > 0:
        h = h + torch.randn(samples, a.shape[0], generator=g).double() @ (
            noise * torch.linalg.cholesky(a @ a.T).T
        )
    terms = []
    for chunk in h.split(500):
        terms.append(q.log_prob(chunk.unsqueeze(1)))  # [c, n]
    lp = torch.cat(terms)
    own = lp.gather(1, idx.unsqueeze(1)).squeeze(1)
    mi = float((own - torch.logsumexp(lp, 1) + math.log(n)).mean())
    return kl, kl - mi, mi


class Fold(nn.Module):
    """h = |z|: not injective (the sign of every unit is lost)."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z.abs()


def folded_truth(
    mu: torch.Tensor, logvar: torch.Tensor, samples: int = 20000, seed: int = 0
) -> tuple[float, float, float]:
    """Exact (KL, aggregate KL, MI) at h = |z|, by Monte Carlo with exact densities: each unit
    of h is a folded normal, density N(h; m, s) + N(h; -m, s) on h >= 0, and units are
    independent given x (the prior's are folded N(0, 1))."""
    mu, std = mu.double().flatten(1), (0.5 * logvar.double().flatten(1)).exp()
    g = torch.Generator().manual_seed(TRUTH_SALT + seed)
    n = mu.shape[0]
    idx = torch.randint(n, (samples,), generator=g)
    h = (mu[idx] + std[idx] * torch.randn(samples, mu.shape[1], generator=g).double()).abs()

    def log_folded(h: torch.Tensor, m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        normal = torch.distributions.Normal(m, s)
        return torch.logaddexp(normal.log_prob(h), normal.log_prob(-h)).sum(-1)

    prior = log_folded(h, torch.zeros(()).double(), torch.ones(()).double())
    own = log_folded(h, mu[idx], std[idx])
    kl = float((own - prior).mean())
    lse = torch.cat(
        [
            torch.logsumexp(log_folded(c.unsqueeze(1), mu.unsqueeze(0), std.unsqueeze(0)), 1)
            for c in h.split(500)
        ]
    )
    mi = float((own - lse + math.log(n)).mean())
    return kl, kl - mi, mi


def _gelu_slope(u: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(u / math.sqrt(2.0))) + u * torch.exp(-0.5 * u * u) / math.sqrt(
        2.0 * math.pi
    )


def _silu_slope(u: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(u)
    return s * (1.0 + u * (1.0 - s))


# activations that fold (-inf, 0) onto (min, 0): (function, slope, where the minimum is)
Fold1d = tuple[
    Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor], float
]
FOLDS: dict[str, Fold1d] = {
    "gelu": (nn.functional.gelu, _gelu_slope, -0.7517916),
    "silu": (nn.functional.silu, _silu_slope, -1.2784645),
}


def _other_preimage(v: torch.Tensor, u: torch.Tensor, act: str) -> torch.Tensor:
    """For v = f(u) < 0 (two preimages, one on each side of f's minimum), the other one, by
    bisection in float64."""
    f, _, at = FOLDS[act]
    left = u < at  # u on the decreasing branch: the other one is in (at, 0)
    lo = torch.where(left, torch.full_like(u, at), torch.full_like(u, -40.0))
    hi = torch.where(left, torch.zeros_like(u), torch.full_like(u, at))
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        above = f(mid) > v
        go_left = torch.where(left, above, ~above)
        hi, lo = torch.where(go_left, mid, hi), torch.where(go_left, lo, mid)
    return 0.5 * (lo + hi)


def fold_truth(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor,
    act: str = "gelu",
    samples: int = 8000,
    pair: int = 2000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Exact (KL, aggregate KL, MI) at v = f(w z + b) for f in FOLDS (GELU, SiLU), w [d, d]
    invertible (and at any injective map of v, e.g. a following invertible Linear), by Monte
    Carlo with exact densities.

    f is not injective: each v_i in (min f, 0) has two preimages u_i. So v has 2^k preimages
    z_c = w^-1 (u_c - b) (k ambiguous units), all enumerated, and
    q(v|x) = sum_c q(z_c|x) / |det dv/dz (z_c)|, likewise p(v); |det w| cancels in every ratio.
    MI from the first `pair` samples against all N mixture components. Cost grows as 2^d: for
    d <= 10."""
    f, slope, _ = FOLDS[act]
    mu, std = mu.double(), (0.5 * logvar.double()).exp()
    w, b = w.double(), b.double()
    winv_t = torch.linalg.inv(w).T
    n, d = mu.shape
    g = torch.Generator().manual_seed(TRUTH_SALT + seed)
    idx = torch.randint(n, (samples,), generator=g)
    u = (mu[idx] + std[idx] * torch.randn(samples, d, generator=g).double()) @ w.T + b
    v = f(u)
    ambiguous = v < 0
    alt = _other_preimage(v, u, act)
    half_log_2pi = 0.5 * math.log(2.0 * math.pi)
    own = torch.empty(samples, dtype=torch.float64)
    prior = torch.empty(samples, dtype=torch.float64)
    mixture = torch.empty(min(pair, samples), dtype=torch.float64)
    count = ambiguous.sum(1)
    for k in count.unique().tolist():
        rows = (count == k).nonzero().squeeze(1)
        bits = torch.arange(2**k).unsqueeze(1).bitwise_right_shift(torch.arange(k)) & 1  # [C, k]
        # the ambiguous units of each row first (stable), so bit j picks its j-th ambiguous unit
        units = torch.sort((~ambiguous[rows]).int(), dim=1, stable=True).indices[:, :k]
        choose = torch.zeros(rows.numel(), 2**k, d, dtype=torch.bool)
        choose.scatter_(
            2, units.unsqueeze(1).expand(-1, 2**k, -1), bits.bool().expand(rows.numel(), -1, -1)
        )
        uc = torch.where(choose, alt[rows].unsqueeze(1), u[rows].unsqueeze(1))  # [R, C, d]
        zc = (uc - b) @ winv_t
        log_jac = slope(uc).abs().log().sum(2)  # [R, C]
        prior[rows] = torch.logsumexp((-0.5 * zc * zc - half_log_2pi).sum(2) - log_jac, 1)
        m, s = mu[idx[rows]].unsqueeze(1), std[idx[rows]].unsqueeze(1)
        lq_own = (-0.5 * ((zc - m) / s) ** 2 - s.log() - half_log_2pi).sum(2) - log_jac
        own[rows] = torch.logsumexp(lq_own, 1)
        # every preimage against every data point, about 2^23 pair terms at a time
        per = max(1, (1 << 23) // (2**k * n))
        for part in rows[rows < len(mixture)].split(per):
            if part.numel() == 0:  # split of an empty selection yields one empty part
                continue
            pos = torch.searchsorted(rows, part)
            zp = zc[pos].flatten(0, 1)  # [P * C, d]
            acc = torch.full((zp.shape[0],), -math.inf, dtype=torch.float64)
            step = 1 << 13
            for c0 in range(0, zp.shape[0], step):
                terms = log_mixture_terms(zp[c0 : c0 + step], mu, 2.0 * std.log())
                acc[c0 : c0 + step] = torch.logsumexp(terms, 1)
            lq = acc.view(len(part), -1) - log_jac[pos]  # [P, C]: log sum_n q(z_c|x_n)
            mixture[part] = torch.logsumexp(lq, 1) - math.log(n)
    kl = float((own - prior).mean())
    mi = float((own[: len(mixture)] - mixture).mean())
    return kl, kl - mi, mi


def shapley_truth(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    truth: Callable[[torch.Tensor, torch.Tensor], tuple[float, float, float]],
) -> tuple[list[float], list[float]]:
    """Exact Shapley values of (KL, MI) over the latent units, a unit outside a coalition having
    the prior's posterior N(0, 1): every coalition's values by truth(mu, logvar) -> (KL,
    aggregate KL, MI) on the masked posterior (e.g. `gaussian_linear_truth` of h = a @ z,
    `folded_truth`), the Shapley values by captum's `ShapleyValues` over every permutation (not
    the tool's sum over subsets). mu, logvar [N, d]; d <= 6 (d! permutations)."""
    from captum.attr import ShapleyValues

    d = mu.shape[1]
    values: dict[tuple[float, ...], tuple[float, float]] = {}

    def game(masks: torch.Tensor, target: int) -> torch.Tensor:
        out = []
        for row in masks:
            key = tuple(row.tolist())
            if key not in values:
                m = row.to(mu.dtype)
                kl, _, mi = truth(mu * m, logvar * m)
                values[key] = (kl, mi)
            out.append(values[key][target])
        return torch.tensor(out, dtype=torch.float64)

    ones, zeros = torch.ones(1, d, dtype=torch.float64), torch.zeros(1, d, dtype=torch.float64)
    kl = ShapleyValues(lambda m: game(m, 0)).attribute(ones, zeros)
    mi = ShapleyValues(lambda m: game(m, 1)).attribute(ones, zeros)
    return kl[0].tolist(), mi[0].tolist()
