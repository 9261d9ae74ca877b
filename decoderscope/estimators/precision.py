"""Whether float32 features resolve the posteriors: a guard on the critics' exact term.

The critics hold the exact latent log-ratio as coefficients on (r, r^2 - 1) (`critic.
gaussian_head_terms`), which are of order 1 / sigma^2 per latent unit at the posterior's bridge
level: those terms cancel to a few nats, so float32 rounding leaves an error of about
eps32 * sum_j (1 + mu_j^2) / (2 sigma_j^2) nats per sample. Measured (latent 2, Linear-Tanh-Linear,
N = 300, every logvar equal): logvar -15 (bound 0.78 nats) read the latent KL 0.18 low; logvar
-20 (bound 116) read it 12.8 high and MI -25; logvar -30 read it 5e5. Past ROUNDING_LIMIT the
critic readers (and the preimage sums, whose Gauss-Newton solutions are float32 too) are not
applicable: those layers are left unread, never printed as numbers.
"""

from __future__ import annotations

import torch

from ..sampling import Posterior

EPS32 = float(torch.finfo(torch.float32).eps)
# nats of the rounding bound above which critics are not trusted (the bound over-reads the
# measured error about 4-fold, so 1.0 keeps the error near 0.25 nats)
ROUNDING_LIMIT = 1.0


def rounding_nats(post: Posterior) -> float:
    """Bound on the float32 rounding error (nats per sample, mean over the data points) of the
    critics' exact latent term: eps32 * sum_j (1 + mu_j^2) / (2 sigma_j^2)."""
    mu, logvar = post.mu.double().flatten(1), post.logvar.double().flatten(1)
    per_point = (0.5 * (1.0 + mu * mu) * torch.exp(-logvar)).sum(1)
    return EPS32 * float(per_point.mean())


def resolved(post: Posterior) -> bool:
    return rounding_nats(post) <= ROUNDING_LIMIT
