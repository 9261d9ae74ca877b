"""Critics for several layers at once: G independent MLPs evaluated with batched matmuls.

Each critic maps (h, c) to M logits, one per bridge step; with logistic loss the optimal logit m is
log r_m(h|x) / r_{m-1}(h|x), so their sum is log q_k(h|x) / p_k(h). Layers of equal width share
one `CriticGroup`, so one step costs a handful of kernel calls whatever the number of layers.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class CriticGroup(nn.Module):
    """G MLP critics of identical shape: input [G, B, d_in] -> logits [G, B, heads].

    Two hidden layers of `hidden` SiLU units; initialised like `nn.Linear`.
    """

    def __init__(self, groups: int, d_in: int, hidden: int, heads: int, skip: bool = False) -> None:
        super().__init__()
        # optional linear path input -> output: the exact Gaussian solution needs precise linear
        # maps (c -> mu, h -> z for linear layers), which a linear layer learns far faster
        self.skip = nn.Parameter(torch.zeros(groups, d_in, heads)) if skip and d_in > 0 else None
        dims = [(d_in, hidden), (hidden, hidden), (hidden, heads)]
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


class SeparableGroup(nn.Module):
    """G separable critics with M heads: T_m(h, c) = <F(h), G_m(c)> + a_m(h) + b_m(c).

    h: [G, B, D] (whitened under the prior), c: [B, C]. F(h) = [phi(h), h, h^2 - 1], with phi an
    MLP of rank `rank`; G_m, a_m, b_m are MLP outputs. The log-ratio of two Gaussians in z is
    exactly of this form (features z, z^2 against functions of mu and sigma), and an injective
    layer only asks phi to learn its inverse, which is why this beats concatenating (h, c) into
    one MLP. Pairs of every sample with every data point cost one matmul.
    """

    def __init__(
        self, groups: int, width: int, cond: int, hidden: int, heads: int, rank: int, latent: int
    ) -> None:
        super().__init__()
        self.heads, self.feat = heads, rank + 2 * width + 2 * latent
        self.f_net = CriticGroup(groups, width, hidden, rank + heads, skip=True)
        self.g_net = CriticGroup(groups, cond, hidden, heads * (self.feat + 1), skip=True)
        # regression h -> z (the latent as the critic sees it): an approximate inverse of the
        # decoder up to this layer, fitted by least squares on the same samples
        self.r_net = CriticGroup(groups, width, hidden, latent, skip=True)
        self.rank = rank

    def features(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h [G, B, D] -> F [G, B, P] and a [G, B, M].

        F = [phi(h), h, h^2 - 1, r, r^2 - 1] with r = R(h) detached: h itself stays in, so F is an
        injective function of h and no KL changes, while r ~ z makes the Gaussian log-ratio in z
        (nearly) linear in F for any layer the regression can invert.
        """
        out = self.f_net(h)
        r = self.r_net(h).detach()
        parts = [out[..., : self.rank], h, h * h - 1.0, r, r * r - 1.0]
        return torch.cat(parts, dim=2), out[..., self.rank :]

    def regression_loss(self, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Mean squared error of R(h) [G, n, d] against the latent features z [G, n, d]."""
        return (self.r_net(h) - z).pow(2).mean(dim=(1, 2)).sum()

    def conditions(self, c: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
        """c [B, C] (shared) or [G, B, C] (per member) -> G [G, B, M, P] and b [G, B, M]."""
        if c.dim() == 2:
            c = c.unsqueeze(0).expand(groups, -1, -1)
        out = self.g_net(c)
        out = out.view(groups, c.shape[1], self.heads, self.feat + 1)
        return out[..., : self.feat], out[..., self.feat]

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Logits [G, L*B, M] for h [G, L*B, D] whose rows are L blocks of B, each block paired
        row by row with c [B, C] (the same data points at every bridge level): G(c) is computed
        once per data point, not once per level."""
        groups, rows, _ = h.shape
        batch = c.shape[-2]
        levels = rows // batch
        f, a = self.features(h)
        g, b = self.conditions(c, groups)
        f = f.view(groups, levels, batch, -1)
        out = torch.einsum("glbp,gbmp->glbm", f, g) + b.unsqueeze(1)
        return out.reshape(groups, rows, -1) + a

    def pair_totals(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Summed logits (the full log-ratio) of every h [G, E, D] with every c [K, C]:
        [G, E, K]."""
        f, a = self.features(h)
        g, b = self.conditions(c, h.shape[0])
        return (
            torch.einsum("gep,gkp->gek", f, g.sum(dim=2))
            + a.sum(dim=2, keepdim=True)
            + b.sum(dim=2).unsqueeze(1)
        )
