"""Critics for several layers at once: G independent MLPs evaluated with batched matmuls.

Each critic maps (h, c) to M logits, one per bridge step; with logistic loss the optimal logit m is
log r_m(h|x) / r_{m-1}(h|x), so their sum is log q_k(h|x) / p_k(h). Layers of equal width share
one `CriticGroup`, so one step costs a handful of kernel calls whatever the number of layers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


class CriticGroup(nn.Module):
    """G MLP critics of identical shape: input [G, B, d_in] -> logits [G, B, heads].

    `depth` hidden layers (default two) of `hidden` SiLU units; initialised like `nn.Linear`.
    """

    def __init__(
        self, groups: int, d_in: int, hidden: int, heads: int, skip: bool = False, depth: int = 2
    ) -> None:
        super().__init__()
        # optional linear path input -> output: the exact Gaussian solution needs precise linear
        # maps (c -> mu, h -> z for linear layers), which a linear layer learns far faster
        self.skip = nn.Parameter(torch.zeros(groups, d_in, heads)) if skip and d_in > 0 else None
        dims = [(d_in, hidden)] + [(hidden, hidden)] * (depth - 1) + [(hidden, heads)]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in dims:
            bound = 1.0 / math.sqrt(max(fan_in, 1))  # fan_in 0: a constant (dead) layer
            self.weights.append(
                nn.Parameter(torch.empty(groups, fan_in, fan_out).uniform_(-bound, bound))
            )
            self.biases.append(
                nn.Parameter(torch.empty(groups, 1, fan_out).uniform_(-bound, bound))
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.weights) - 1
        inp = x
        for k, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            x = torch.baddbmm(b, x, w)
            if k < last:
                x = nn.functional.silu(x)
        if self.skip is not None:
            x = torch.baddbmm(x, inp, self.skip)
        return x


class Concat:
    """Input map of the plain method: [h, c_n] with the raw values (C may be 0)."""

    def __init__(self, c: torch.Tensor) -> None:
        self.c = c

    def width(self, d: int) -> int:
        return d + self.c.shape[1]

    def __call__(self, h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """h [G, B, D] with data indices idx [G, B] -> critic input [G, B, D + C]."""
        if self.c.shape[1] == 0:
            return h
        return torch.cat([h, self.c[idx]], dim=2)


def gaussian_head_terms(
    levels: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The exact log-ratio of head m in the latent, log r_{a_m}(z|x) / r_{a_{m-1}}(z|x), as
    coefficients on the features (z, z^2 - 1): w1, w2 [..., M, d] and a constant w0 [..., M].

    levels [L] (M = L - 1 heads); mu, logvar [..., d] of the data points. Bridge level a is
    N(a mu, s^2) per unit with s^2 = a^2 sigma^2 + 1 - a^2, so against the prior
    log r_a(z) = z^2 (1 - 1/s^2)/2 + z a mu/s^2 - (a mu)^2/(2 s^2) - log(s^2)/2 per unit.
    """
    a = levels.view(-1, 1).to(mu)
    mu, logvar = mu.unsqueeze(-2), logvar.unsqueeze(-2)  # [..., 1, d]
    s2 = a * a * logvar.exp() + (1.0 - a * a)  # [..., L, d]
    m = a * mu
    quad = 0.5 * (1.0 - 1.0 / s2)
    lin = m / s2
    const = -0.5 * (m * m / s2 + s2.log())
    w2 = quad[..., 1:, :] - quad[..., :-1, :]
    w1 = lin[..., 1:, :] - lin[..., :-1, :]
    # w2 z^2 = w2 (z^2 - 1) + w2: the feature is centred under the prior
    w0 = (const[..., 1:, :] - const[..., :-1, :] + w2).sum(-1)
    return w1, w2, w0


def soft_logistic(logit: torch.Tensor, latent_logit: torch.Tensor) -> torch.Tensor:
    """Logistic loss of `logit` against the soft label sigmoid(latent_logit), elementwise, nats.

    A head's samples come half from level m (label 1) and half from level m - 1 (label 0); given
    the latent z behind a sample, the label's probability is sigmoid(log r_m(z|x)/r_{m-1}(z|x)),
    which is known exactly (`gaussian_head_terms`). h = g(z) carries no more information about
    the label than z, so replacing the 0/1 label by that probability leaves the expected loss,
    and hence its minimiser log r_m(h|x)/r_{m-1}(h|x), unchanged, while removing the label's
    coin-flip noise from every gradient (Rao-Blackwellisation): where h keeps z's information the
    exact critic has zero loss gradient sample by sample, and only what h loses is left to learn.
    """
    t = torch.sigmoid(latent_logit)
    return t * nn.functional.softplus(-logit) + (1.0 - t) * nn.functional.softplus(logit)


class SeparableGroup(nn.Module):
    """G separable critics with M heads: T_m(h, c) = <F(h), G_m(c)> + a_m(h) + b_m(c).

    h: [G, B, D] (whitened under the prior); c: [B, C + 2d], the critic's conditioning followed by
    the raw (mu, logvar) of the data point. F(h) = [phi(h), h, h^2 - 1, r, r^2 - 1] with phi an
    MLP of rank `rank` and r = R(h) a regression of the latent z on h (an approximate inverse of
    the decoder up to this layer). G_m and b_m are the exact latent log-ratio of head m as a
    function of r (`gaussian_head_terms`: linear in (r, r^2 - 1)), scaled by a learned gate in
    (0, 1), plus a learned residual; a_m is learned. Where R inverts the layer (the latent,
    injective layers) the critic starts at the answer and learns a small correction; elsewhere
    the gate shrinks the exact term and the residual learns the rest.
    Pairs of every sample with every data point cost one matmul.
    """

    def __init__(
        self,
        groups: int,
        width: int,
        cond: int,
        hidden: int,
        levels: torch.Tensor,
        rank: int,
        latent: int,
        regression_depth: int = 3,
    ) -> None:
        super().__init__()
        heads = levels.shape[0] - 1
        self.heads, self.feat = heads, rank + 2 * width + 2 * latent
        self.cond, self.latent, self.rank = cond, latent, rank
        self.f_net = CriticGroup(groups, width, hidden, rank + heads, skip=True)
        self.g_net = CriticGroup(groups, cond, hidden, heads * (self.feat + 1), skip=True)
        self.r_net = CriticGroup(groups, width, hidden, latent, skip=True, depth=regression_depth)
        self.levels: torch.Tensor
        self.register_buffer("levels", levels.float().clone())
        # gate alpha = sigmoid(gate) in (0, 1) on the exact term, starting at sigmoid(8) =
        # 0.99966 (at 0.9975 every warm-started layer read 0.25% of its KL low, beyond its s.e.;
        # lossy layers still shrink it within the run: demo random layers unchanged): a lossy
        # layer shrinks it (R(h) only locates z roughly there, and the full exact term read the
        # aggregate KL of a random GELU layer at 0.43 against a data-processing bound of 0.15);
        # bounded by 1 because an unbounded gate drifted to 1.1-1.2 and over-read (d=64, KL 20:
        # +2.3 nats)
        self.gate = nn.Parameter(torch.full((groups, heads), 8.0))
        # the residual starts at zero, unpenalised: with 0/1 labels it over-fitted each data
        # point's few samples (latent, d=64, KL 20: +2.3 nats); soft labels remove that noise
        with torch.no_grad():
            self.g_net.weights[-1].zero_()
            self.g_net.biases[-1].zero_()
            # so do the heads' own terms a_m(h): at the start each head is its gated exact term
            self.f_net.weights[-1][..., rank:].zero_()
            self.f_net.biases[-1][..., rank:].zero_()
            if self.f_net.skip is not None:
                self.f_net.skip[..., rank:].zero_()

    @torch.no_grad()
    def start_regression(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Start R(h) at the affine map h @ weight + bias (weight [G, D, d], bias [G, d]): the
        least-squares inverse, exact for linear layers; the MLP path starts at zero and learns
        what is left."""
        net = self.r_net
        if net.skip is not None:
            net.skip.copy_(weight)
        net.weights[-1].zero_()
        net.biases[-1].copy_(bias.unsqueeze(1))

    def _feature_parts(
        self, h: torch.Tensor, inverse: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """h [G, B, D] -> phi [G, B, rank] (learned), the fixed features [h, h^2 - 1, r, r^2 - 1]
        [G, B, P - rank], a [G, B, M], R(h) [G, B, d] and the r in the features (detached).

        The fixed features hold r detached: R is fitted by least squares on R(h)
        (`regression_loss`) only. r is `inverse` where given (R(h) refined through the decoder,
        `inverse.refine`; a function of h alone), else R(h). h itself stays in them, so F is an
        injective function of h and no KL changes."""
        out = self.f_net(h)
        r = self.r_net(h)
        rd = r.detach() if inverse is None else inverse
        phi, a = out.split([self.rank, self.heads], dim=2)
        return phi, torch.cat([h, h * h - 1.0, rd, rd * rd - 1.0], dim=2), a, r, rd

    def features(
        self, h: torch.Tensor, inverse: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """h [G, B, D] -> F = [phi, fixed features] [G, B, P] and a [G, B, M]."""
        phi, fixed, a, _, _ = self._feature_parts(h, inverse)
        return torch.cat([phi, fixed], dim=2), a

    @staticmethod
    def regression_loss(r: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Mean squared error of r = R(h) [G, n, d] against the raw latent z [G, n, d], summed
        over members."""
        return (r - z).pow(2).mean(dim=(1, 2)).sum()

    def _condition_parts(
        self, c: torch.Tensor, groups: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """c [B, C + 2d] (shared) or [G, B, C + 2d] (per member) -> the learned residual
        [G, B, M, P + 1] (G_m's part, then b_m's), the exact terms' coefficients w1, w2
        [G, B, M, d] and w0 [G, B, M] (`gaussian_head_terms`), and the gates alpha [G, M]."""
        if c.dim() == 2:
            c = c.unsqueeze(0).expand(groups, -1, -1)
        d = self.latent
        net_in, mu, logvar = c[..., : self.cond], c[..., self.cond : self.cond + d], c[..., -d:]
        out = self.g_net(net_in).view(groups, c.shape[1], self.heads, self.feat + 1)
        w1, w2, w0 = gaussian_head_terms(self.levels, mu, logvar)
        return out, w1, w2, w0, torch.sigmoid(self.gate)

    def conditions(self, c: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
        """c as in `_condition_parts` -> G [G, B, M, P] and b [G, B, M]: the learned residual
        plus the gated exact term."""
        out, w1, w2, w0, alpha = self._condition_parts(c, groups)
        skip = self.feat - 2 * self.latent  # phi, h and h^2 - 1 carry no exact term
        alpha = alpha.view(groups, 1, self.heads)
        exact = torch.cat([w1, w2], dim=3) * alpha.unsqueeze(3)
        g = out[..., : self.feat] + nn.functional.pad(exact, (skip, 0))
        return g, out[..., self.feat] + alpha * w0

    def forward(
        self, h: torch.Tensor, c: torch.Tensor, inverse: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits [G, L*B, M] for h [G, L*B, D] whose rows are L blocks of B, each block paired
        row by row with c [B, C + 2d] (the same data points at every bridge level): G(c) is
        computed once per data point, not once per level."""
        groups, rows, _ = h.shape
        batch = c.shape[-2]
        levels = rows // batch
        f, a = self.features(h, inverse)
        g, b = self.conditions(c, groups)
        f = f.view(groups, levels, batch, -1)
        out = torch.einsum("glbp,gbmp->glbm", f, g) + b.unsqueeze(1)
        return out.reshape(groups, rows, -1) + a

    def head_pairs(
        self,
        h: torch.Tensor,
        c: torch.Tensor,
        z: torch.Tensor,
        inverse: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training logits: head m at its own two levels only. h [G, L*B, D] as in `forward`
        (L = M + 1 levels), c [G, B, C + 2d] per member and z [G, L*B, d] the latent samples
        behind h's rows; returns (level m+1 under head m, level m under head m), each [G, M, B],
        the exact latent log-ratios of head m at the z behind those rows (the same shapes; the
        soft labels of `soft_logistic`), and the regression loss of R against z (one R pass
        serves both).

        The same logits as `forward`, computed in parts: <F, G_m> splits into the learned
        phi-part, the fixed features' part and the gated exact term, whose only parameter is the
        gate (r is detached), so no [G, B, M, P] tensor and no concatenation of F is built or
        differentiated (8% of a step for 20 critics). Dot products per head instead of the [L, M]
        grid: the grid's batched matmul over G*B tiny matrices cost 6x more."""
        groups, rows, _ = h.shape
        batch = c.shape[-2]
        levels = rows // batch
        d = self.latent
        phi, fixed, a, r, rd = self._feature_parts(h, inverse)
        g, w1, w2, w0, alpha = self._condition_parts(c, groups)
        g_phi, g_fixed, g_b = g.split([self.rank, self.feat - self.rank, 1], dim=3)
        # unbind, not slices: a slice's backward zero-fills a gradient of the full size
        phis = phi.view(groups, levels, batch, self.rank).unbind(1)
        fixeds = fixed.view(groups, levels, batch, -1).unbind(1)
        rs = rd.view(groups, levels, batch, d).unbind(1)
        av = a.view(groups, levels, batch, self.heads).unbind(1)
        zs = z.view(groups, levels, batch, d).unbind(1)

        @torch.no_grad()
        def exact(xs: Sequence[torch.Tensor], level: int, m: int) -> torch.Tensor:
            """Head m's exact latent log-ratio at the latent points xs[level] [G, B, d]: at the
            inverse rd in the logit (its only parameter is the gate), at the true z in the soft
            label."""
            x = xs[level]
            return (
                torch.linalg.vecdot(x, w1[:, :, m])
                + torch.linalg.vecdot(x * x - 1.0, w2[:, :, m])
                + w0[:, :, m]
            )

        def logit(level: int, m: int) -> torch.Tensor:
            return (
                torch.linalg.vecdot(phis[level], g_phi[:, :, m])
                + torch.linalg.vecdot(fixeds[level], g_fixed[:, :, m])
                + g_b[:, :, m, 0]
                + alpha[:, m : m + 1] * exact(rs, level, m)
                + av[level][..., m]
            )

        heads = range(self.heads)
        pos = torch.stack([logit(m + 1, m) for m in heads], dim=1)
        neg = torch.stack([logit(m, m) for m in heads], dim=1)
        pos_z = torch.stack([exact(zs, m + 1, m) for m in heads], dim=1)
        neg_z = torch.stack([exact(zs, m, m) for m in heads], dim=1)
        return pos, neg, pos_z, neg_z, self.regression_loss(r, z)

    def pair_totals(
        self, h: torch.Tensor, c: torch.Tensor, inverse: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Summed logits (the full log-ratio) of every h [G, E, D] with every c [K, C + 2d]:
        [G, E, K]."""
        f, a = self.features(h, inverse)
        g, b = self.conditions(c, h.shape[0])
        return (
            torch.einsum("gep,gkp->gek", f, g.sum(dim=2))
            + a.sum(dim=2, keepdim=True)
            + b.sum(dim=2).unsqueeze(1)
        )
