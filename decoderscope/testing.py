"""Ground truths shared by the tests and benchmarks: posteriors with a known KL, decoders whose
values are known (linear-Gaussian stages, folded layers with every preimage enumerated), and an
encoder that looks up stored posteriors. docs/method.md ("Ground truth") says why each is exact."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.distributions import MultivariateNormal, Normal, kl_divergence

from .estimators.exact import log_mixture_terms
from .estimators.stats import tolerance as tolerance  # re-exported for tests
from .model import VAE

# the truth's Monte Carlo stream must not be the data's: gaussian_case(seed=0) draws from
# Generator(0), and truths drawn from it too read MI off (d = 64, KL 20: by -0.25 at the latent)
TRUTH_SALT = 1_000_003


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
    mu: torch.Tensor, logvar: torch.Tensor, a: torch.Tensor, samples: int = 20000, seed: int = 0
) -> tuple[float, float, float]:
    """Exact (KL, aggregate KL, MI) at h = a @ z for a [k, d] of rank k: q(h|x) = N(a mu, a S a^T),
    p(h) = N(0, a a^T); KL in closed form, MI by Monte Carlo with exact mixture densities."""
    a = a.double()
    mu, var = mu.double(), logvar.double().exp()
    means = mu @ a.T
    covs = a.unsqueeze(0) * var.unsqueeze(1) @ a.T  # [n, k, k]
    prior = torch.distributions.MultivariateNormal(torch.zeros(a.shape[0]).double(), a @ a.T)
    q = torch.distributions.MultivariateNormal(means, covs)
    kl = float(torch.distributions.kl_divergence(q, prior).mean())
    g = torch.Generator().manual_seed(TRUTH_SALT + seed)
    n = mu.shape[0]
    idx = torch.randint(n, (samples,), generator=g)
    z = mu[idx] + var[idx].sqrt() * torch.randn(samples, mu.shape[1], generator=g).double()
    h = z @ a.T
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


class LinearGaussianVAE:
    """Probabilistic PCA, x = W z + b + sigma * noise with z ~ N(0, I_latent), of which the
    decoder uses the first `used` units; N data points drawn from it; and a deliberately
    imperfect encoder: 0.8 x the exact posterior mean map and 1.5 x its variances on the used
    units, the prior (mean 0, variance 1) on the unused ones. `truth` gives the rate, distortion,
    ELBO and log p(x) in closed form (torch.distributions), `iwae_reference` IWAE_k by Monte
    Carlo, independently of the tool's code."""

    def __init__(self, n: int, d: int, latent: int, used: int, sigma: float, seed: int = 0) -> None:
        self.sigma = sigma
        g = torch.Generator().manual_seed(seed)
        f64 = torch.float64
        self.w = torch.zeros(d, latent, dtype=f64)
        self.w[:, :used] = torch.randn(d, used, generator=g, dtype=f64)
        self.b = torch.randn(d, generator=g, dtype=f64)
        z = torch.randn(n, latent, generator=g, dtype=f64)
        self.x = z @ self.w.T + self.b + sigma * torch.randn(n, d, generator=g, dtype=f64)
        wu = self.w[:, :used]
        m_inv = torch.linalg.inv(wu.T @ wu + sigma**2 * torch.eye(used, dtype=f64))
        self.a = torch.zeros(latent, d, dtype=f64)
        self.a[:used] = 0.8 * m_inv @ wu.T
        self.var = torch.ones(latent, dtype=f64)
        self.var[:used] = 1.5 * sigma**2 * torch.diagonal(m_inv)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu = (x.double() - self.b) @ self.a.T
        return mu.float(), self.var.log().float().expand_as(mu)

    def decoder(self) -> nn.Module:
        layer = nn.Linear(self.w.shape[1], self.w.shape[0])
        with torch.no_grad():
            layer.weight.copy_(self.w)
            layer.bias.copy_(self.b)
        return nn.Sequential(layer)

    def truth(self, x: torch.Tensor) -> dict[str, float]:
        mu, _ = self.encode(x)
        mu, std = mu.double(), self.var.sqrt()
        rate = kl_divergence(Normal(mu, std), Normal(0.0, 1.0)).sum(1)
        # E_q ||x - W z - b||^2 = ||x - W mu - b||^2 + tr(W diag(var) W^T)
        err = (x - mu @ self.w.T - self.b).pow(2).sum(1) + (self.w.pow(2) @ self.var).sum()
        d = self.w.shape[0]
        dist = 0.5 * err / self.sigma**2 + d * (math.log(self.sigma) + 0.5 * math.log(2 * math.pi))
        cov = self.w @ self.w.T + self.sigma**2 * torch.eye(self.w.shape[0], dtype=torch.float64)
        logp = MultivariateNormal(self.b, cov).log_prob(x)
        return {
            "rate": float(rate.mean()),
            "distortion": float(dist.mean()),
            "elbo": float((-dist - rate).mean()),
            "log_p": float(logp.mean()),
        }

    def mmd2_truth(self, through: torch.Tensor | None, bandwidth: float) -> float:
        """MMD^2 between the aggregate posterior of the model's data and the prior, at the latent
        (through None) or pushed through the linear map `through` [k, latent]: Gaussian-kernel
        integrals of the Gaussian mixture (`gaussian_kernel_mean`)."""
        a = self.encode(self.x)[0].double()
        a_cov = torch.diag(self.var)
        b, b_cov = torch.zeros(1, a.shape[1], dtype=torch.float64), torch.eye(a.shape[1]).double()
        if through is not None:
            w = through.double()
            a, a_cov, b, b_cov = a @ w.T, w @ a_cov @ w.T, b @ w.T, w @ w.T
        return (
            gaussian_kernel_mean(a, a_cov, a, a_cov, bandwidth)
            + gaussian_kernel_mean(b, b_cov, b, b_cov, bandwidth)
            - 2 * gaussian_kernel_mean(a, a_cov, b, b_cov, bandwidth)
        )

    def iwae_reference(self, x: torch.Tensor, k: int, reps: int, seed: int) -> tuple[float, float]:
        """Monte Carlo IWAE_k with torch.distributions: the mean over `reps` draws per x, and
        its standard error given these data."""
        g = torch.Generator().manual_seed(seed)
        mu, _ = self.encode(x)
        q = Normal(mu.double(), self.var.sqrt())
        values = []
        for _ in range(reps):
            z = q.mean + q.stddev * torch.randn(k, *mu.shape, generator=g, dtype=torch.float64)
            logw = (
                Normal(z @ self.w.T + self.b, self.sigma).log_prob(x).sum(-1)
                + Normal(0.0, 1.0).log_prob(z).sum(-1)
                - q.log_prob(z).sum(-1)
            )
            values.append(torch.logsumexp(logw, 0) - math.log(k))
        per_x = torch.stack(values)  # [reps, N]
        se = math.sqrt(float(per_x.var(0).sum()) / reps) / x.shape[0]
        return float(per_x.mean()), se


def gaussian_kernel_mean(
    a: torch.Tensor, a_cov: torch.Tensor, b: torch.Tensor, b_cov: torch.Tensor, ell: float
) -> float:
    """E exp(-|X - Y|^2 / (2 ell^2)) for X ~ N(a_i, A), Y ~ N(b_j, B), averaged over all pairs
    (i, j): det(I + (A + B) / ell^2)^(-1/2) exp(-(a - b)^T (ell^2 I + A + B)^(-1) (a - b) / 2).
    a [I, d], b [J, d], covariances [d, d] (float64)."""
    d = a.shape[1]
    s = ell**2 * torch.eye(d, dtype=torch.float64) + a_cov + b_cov
    det = torch.linalg.det(torch.eye(d, dtype=torch.float64) + (a_cov + b_cov) / ell**2)
    diff = a.unsqueeze(1) - b.unsqueeze(0)  # [I, J, d]
    quad = (diff @ torch.linalg.inv(s) * diff).sum(-1)
    return float((-0.5 * quad).exp().mean() / det.sqrt())


def shapley_truth(
    mu: torch.Tensor, logvar: torch.Tensor, a: torch.Tensor, samples: int = 4000
) -> tuple[list[float], list[float]]:
    """Exact Shapley values of (KL, MI) over the latent units of h = a @ z (a [k, d] of rank k),
    a unit outside a coalition having the prior's posterior N(0, 1): every coalition's values by
    `gaussian_linear_truth` (the same Monte Carlo stream for each), the Shapley values by
    captum's `ShapleyValues` over every permutation (not the tool's sum over subsets). mu,
    logvar [N, d]; d <= 6 (d! permutations)."""
    from captum.attr import ShapleyValues

    d = mu.shape[1]
    values: dict[tuple[float, ...], tuple[float, float]] = {}

    def game(masks: torch.Tensor, target: int) -> torch.Tensor:
        out = []
        for row in masks:
            key = tuple(row.tolist())
            if key not in values:
                m = row.to(mu.dtype)
                kl, _, mi = gaussian_linear_truth(mu * m, logvar * m, a, samples=samples)
                values[key] = (kl, mi)
            out.append(values[key][target])
        return torch.tensor(out, dtype=torch.float64)

    ones, zeros = torch.ones(1, d, dtype=torch.float64), torch.zeros(1, d, dtype=torch.float64)
    kl = ShapleyValues(lambda m: game(m, 0)).attribute(ones, zeros)
    mi = ShapleyValues(lambda m: game(m, 1)).attribute(ones, zeros)
    return kl[0].tolist(), mi[0].tolist()
