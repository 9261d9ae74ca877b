"""The Gauss-Newton step's linear algebra: the least-squares step for a batch of small
Jacobians, in float64."""

from __future__ import annotations

import torch


def newton_step(jt: torch.Tensor, res: torch.Tensor, eye: torch.Tensor) -> torch.Tensor:
    """The Gauss-Newton step [A, d] for J^T [A, d, D] and residuals res [A, D]. A square J (a
    layer as wide as the latent) gives J^-1 res by LU in J's own float32: LU with partial
    pivoting solves a system within float32 rounding of J, which is how precisely J was
    computed, so float64 would add nothing but time (16384 systems of 16: 19 ms against 47 ms
    in float64 and 96 ms through the normal equations, which square J's condition number);
    where LU meets a singular J, the damped normal equations below."""
    if jt.shape[1] != jt.shape[2]:
        return normal_step(jt, res, eye)
    step, info = torch.linalg.solve_ex(jt.transpose(1, 2), res)
    bad = (info != 0) | ~step.isfinite().all(dim=1)
    if bool(bad.any()):
        step[bad] = normal_step(jt[bad], res[bad], eye)
    return step


def normal_step(jt: torch.Tensor, res: torch.Tensor, eye: torch.Tensor) -> torch.Tensor:
    """`newton_step` through the normal equations, damped by 1e-12 of J^T J's trace. J^T J in
    float64: J can be ill-conditioned (condition ~5000 on a LeakyReLU chain), and squaring it in
    float32 stalled the iteration."""
    jt64 = jt.double()
    normal = jt64 @ jt64.transpose(1, 2)
    damp = 1e-12 * normal.diagonal(dim1=1, dim2=2).sum(1).clamp_min(1e-30)
    rhs = (jt64 @ res.double().unsqueeze(2)).squeeze(2)
    return torch.linalg.solve(normal + damp.view(-1, 1, 1) * eye, rhs).float()
