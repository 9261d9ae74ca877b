"""Exact values at layers that are affine functions of the latent: no critic needed.

A layer h = A z + b (checked on prior and posterior samples) carries exactly the information in
the projection y = V^T z of the latent onto A's row space (V: [d, k] orthonormal, k = rank A):
q(y|x) = N(V^T mu, V^T diag(sigma^2) V) and p(y) = N(0, I_k). So the KL is closed form per data
point and MI is an exact-density Monte Carlo integral, as at the latent: a rank-reducing linear
layer of a Gaussian keeps it Gaussian. Rank d: the layer is injective and every value is the
latent's; rank 0: a constant layer, every value 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..sampling import Posterior, reparameterise
from .exact import ExactLatent, mi_terms
from .runs import AFFINE, LayerRun
from .stats import mean_se, with_control

# singular values of A below this share of the largest are float32 rounding, not directions: the
# same cut as the whitening's 1e-12 of the largest variance
RANK_CUT = 1e-6
# for layers affine by construction (`structure.py`), fitted on a float64 copy of the decoder:
# residuals and singular values at float64 rounding
EXACT_TOL = 1e-16
EXACT_RANK_CUT = 1e-12
PROBE = 32  # features fitted first: where one of them is not affine, the layer is not


@dataclass(frozen=True)
class AffineLayer:
    """A layer found affine in z: `basis` V^T [k, d] (float64, orthonormal rows) spans what it
    keeps. `via`: the layer is not affine itself but an injective function of this affine
    layer, so it holds that layer's values."""

    basis: torch.Tensor
    via: str | None = None

    @property
    def rank(self) -> int:
        return int(self.basis.shape[0])


def affine_fit(
    h: torch.Tensor, z: torch.Tensor, tol: float, rank_cut: float = RANK_CUT
) -> AffineLayer | None:
    """Least-squares fit h [n, D] ~ z [n, d] @ W + c (float64). The layer counts as affine when
    every non-constant feature's residual variance is below `tol` times its variance; returns
    its basis then (singular values of W below `rank_cut` of the largest dropped), else None.
    n must exceed d + 1 (more rows than unknowns per feature)."""
    h64, z64 = h.double(), z.double()
    if h64.shape[1] == 0:  # a dead layer, reduced to nothing by the whitening
        return AffineLayer(z64.new_zeros(0, z64.shape[1]))
    var = h64.var(dim=0)
    live = var > 0  # constant features are affine (W = 0) whatever tol is
    if not bool(live.any()):
        return AffineLayer(z64.new_zeros(0, z64.shape[1]))
    x = torch.cat([z64, z64.new_ones(z64.shape[0], 1)], dim=1)
    columns = live.nonzero().squeeze(1)
    # each feature is fitted on its own, so one that fails among the first PROBE fails the
    # whole fit: a nonlinear layer is told from those (the diffusers AutoencoderKL's 70
    # layers, up to 1024 wide, took 4-6 s to fit whole)
    for cols in (columns[:PROBE], columns) if columns.numel() > PROBE else (columns,):
        sol = torch.linalg.lstsq(x, h64[:, cols]).solution  # [d + 1, len(cols)]
        resid = (h64[:, cols] - x @ sol).var(dim=0) / var[cols]
        if not float(resid.max()) < tol:
            return None
    weight = sol[:-1]  # [d, D_live]: h = z @ weight + c
    u, s, _ = torch.linalg.svd(weight, full_matrices=False)  # weight = U S V'^T, U [d, r]
    keep = s > rank_cut * float(s.max())
    return AffineLayer(u[:, keep].T.contiguous())


def affine_values(
    post: Posterior,
    basis: torch.Tensor,
    samples: int,
    generator: torch.Generator,
    exact: ExactLatent | None = None,
    chunk_elems: int = 1 << 22,
) -> LayerRun:
    """KL, aggregate KL and MI of y = basis @ z (basis [k, d], orthonormal rows): KL closed form
    averaged over all N data points; MI by `samples` draws (i uniform, z ~ q(z|x_i)) of
    log q(y|x_i) - log mean_n q(y|x_n) with full-covariance Gaussian densities; aggregate KL =
    KL - MI. With `exact` the latent's per-sample MI terms of the same z serve as a control
    variate (known mean exact.mi): where the layer keeps most of the latent's information the
    noise cancels. Cost: samples x N x k^2 multiply-adds, in chunks of about `chunk_elems`."""
    k, d = basis.shape
    if k == d and exact is not None:  # injective: every value is the latent's
        return _run(exact.kl, exact.mi, exact.mi_se, k)
    if k == 0:  # constant: nothing left
        return _run(0.0, 0.0, 0.0, k)
    mu = post.mu.flatten(1).double()
    logvar = post.logvar.flatten(1).double()
    var = logvar.exp()
    p = basis.to(mu)
    means = mu @ p.T  # [N, k]
    cov = torch.einsum("id,nd,jd->nij", p, var, p)  # [N, k, k]
    chol = torch.linalg.cholesky(cov)
    logdet = 2.0 * torch.diagonal(chol, dim1=1, dim2=2).log().sum(dim=1)  # [N]
    trace = torch.diagonal(cov, dim1=1, dim2=2).sum(dim=1)
    kl = float((0.5 * (trace + (means * means).sum(dim=1) - k - logdet)).mean())

    prec = torch.cholesky_inverse(chol)  # [N, k, k]
    prec_mean = torch.einsum("nij,nj->ni", prec, means)  # [N, k]
    # log q(y|x_n) + k/2 log 2 pi = -1/2 (y'P y - 2 y'P m + m'P m + log det C)
    const = (prec_mean * means).sum(dim=1) + logdet  # [N]
    prec_flat = prec.flatten(1).T  # [k^2, N]

    n = mu.shape[0]
    idx = torch.randint(n, (samples,), generator=generator, device=mu.device)
    eps = torch.randn(samples, d, generator=generator, device=mu.device).double()
    z = reparameterise(mu[idx], logvar[idx], eps)
    y = z @ p.T  # [samples, k]
    step = max(1, chunk_elems // max(n, k * k))
    terms = []
    for start in range(0, samples, step):
        yc = y[start : start + step]
        outer = (yc.unsqueeze(2) * yc.unsqueeze(1)).flatten(1)  # [e, k^2]
        log_q = -0.5 * (outer @ prec_flat - 2.0 * yc @ prec_mean.T + const)  # [e, N]
        own = log_q.gather(1, idx[start : start + step, None]).squeeze(1)
        terms.append(own - (torch.logsumexp(log_q, dim=1) - math.log(n)))
    values = torch.cat(terms)
    if exact is None:
        mi, mi_se = mean_se(values)
    else:
        mi, mi_se = with_control(values, mi_terms(z, idx, mu, logvar), exact.mi, exact.mi_se)
    return _run(kl, mi, mi_se, k)


def _run(kl: float, mi: float, mi_se: float, rank: int) -> LayerRun:
    """An affine layer's row: KL closed form (s.e. 0), aggregate KL = KL - MI."""
    return LayerRun(kl, 0.0, kl - mi, mi_se, mi, mi_se, AFFINE, affine_rank=rank)
