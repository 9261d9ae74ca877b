"""Training machinery: per-critic best parameters for early stopping."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from decoderscope.estimators.train import _BestKeeper


def test_best_keeper_keeps_each_members_best_parameters() -> None:
    critic = nn.Module()
    critic.w = nn.Parameter(torch.tensor([[1.0, 1.0], [2.0, 2.0]]))  # members 0 and 1
    keeper = _BestKeeper([SimpleNamespace(critic=critic)])  # type: ignore[list-item]
    with torch.no_grad():
        critic.w.copy_(torch.tensor([[3.0, 3.0], [4.0, 4.0]]))  # trained before the first check
    assert keeper.update([torch.tensor([1.0, 1.0])], tol=0.1)  # first check: saves as they are
    with torch.no_grad():
        critic.w.copy_(torch.tensor([[5.0, 5.0], [6.0, 6.0]]))
    # member 0 improves by less than tol (saved, but not counted); member 1 gets worse
    assert not keeper.update([torch.tensor([0.95, 1.5])], tol=0.1)
    with torch.no_grad():
        critic.w.copy_(torch.tensor([[7.0, 7.0], [8.0, 8.0]]))
    keeper.restore()
    assert torch.equal(critic.w, torch.tensor([[5.0, 5.0], [4.0, 4.0]]))
