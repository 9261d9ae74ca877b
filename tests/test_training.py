"""Training machinery: per-critic early stopping, the inverse-blur diagnostic, re-initialisation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from decoderscope.estimators.batches import Sampler
from decoderscope.estimators.groups import Members
from decoderscope.estimators.members import MemberStopping
from decoderscope.estimators.settings import Settings
from decoderscope.sampling import Posterior


class _Members:
    """A group's view of its members (what `MemberStopping` tells a `_Group`); member i's key
    is "m{i}"."""

    def __init__(self, n: int = 0) -> None:
        self.members: list[int] = list(range(n))

    def select(self, members: torch.Tensor) -> None:
        self.members = members.tolist()

    @property
    def keys(self) -> list[str]:
        return [f"m{i}" for i in self.members]


def _batched(rows: list[list[float]]) -> tuple[nn.Module, torch.optim.Optimizer]:
    critic = nn.Module()
    critic.w = nn.Parameter(torch.tensor(rows))  # one row per member
    return critic, torch.optim.Adam(critic.parameters(), lr=0.1)


def test_member_stopping_keeps_each_members_best_parameters() -> None:
    critic, opt = _batched([[1.0, 1.0], [2.0, 2.0]])
    group = _Members()
    stopper = MemberStopping([group], [critic], patience=2, tol=0.1, keep_best=True)
    with torch.no_grad():
        critic.w.copy_(torch.tensor([[3.0, 3.0], [4.0, 4.0]]))  # trained before the first check
    assert stopper.check([torch.tensor([1.0, 1.0])], opt)  # first check: saves both as they are
    with torch.no_grad():
        critic.w.copy_(torch.tensor([[5.0, 5.0], [6.0, 6.0]]))
    # member 0 improves by more than tol (kept); member 1 by less (noise: not kept, stale)
    assert stopper.check([torch.tensor([0.8, 0.95])], opt)
    with torch.no_grad():
        critic.w.copy_(torch.tensor([[7.0, 7.0], [8.0, 8.0]]))
    stopper.finish()
    assert torch.equal(critic.w, torch.tensor([[5.0, 5.0], [4.0, 4.0]]))
    assert group.members == [0, 1]


def test_a_member_at_the_scores_floor_retires_at_once_with_what_it_would_have_kept() -> None:
    """Scores bounded below (R's price >= 0): a best within tol of the floor can never again
    improve by more than tol, so waiting out the patience would only burn steps."""
    critic, opt = _batched([[1.0], [2.0]])
    group = _Members()
    stopper = MemberStopping([group], [critic], patience=8, tol=0.01, keep_best=True, floor=0.0)
    # member 0 is already exact (price 0.005); member 1 is not (0.5) and trains on
    assert stopper.check([torch.tensor([0.005, 0.5])], opt)
    assert group.members == [1]
    with torch.no_grad():
        critic.w.copy_(torch.tensor([[7.0]]))
    stopper.finish()
    assert torch.equal(critic.w, torch.tensor([[1.0], [2.0]]))  # member 1 kept its best: 2.0
    # without a floor the same member waits out its patience
    critic, opt = _batched([[1.0], [2.0]])
    group = _Members()
    stopper = MemberStopping([group], [critic], patience=8, tol=0.01, keep_best=True)
    assert stopper.check([torch.tensor([0.005, 0.5])], opt)
    assert stopper.active[0].tolist() == [0, 1]


def test_a_stopped_member_leaves_the_batched_tensors_and_training_goes_on() -> None:
    critic, opt = _batched([[1.0], [2.0], [3.0]])
    group = _Members()
    stopper = MemberStopping([group], [critic], patience=1, tol=0.0, keep_best=False)
    critic.w.sum().backward()
    opt.step()  # Adam now holds moments for all three members
    assert stopper.check([torch.tensor([1.0, 1.0, 1.0])], opt)
    # member 1 does not improve: it stops with the parameters it has now
    stopped_at = float(critic.w.detach()[1])
    assert stopper.check([torch.tensor([0.5, 1.0, 0.5])], opt)
    w = critic.w  # a new, smaller parameter, also in the optimizer, moments cut to match
    assert w.shape == (2, 1) and group.members == [0, 2]
    assert opt.param_groups[0]["params"] == [w]
    assert opt.state[w]["exp_avg"].shape == (2, 1)
    opt.zero_grad(set_to_none=True)
    (w * torch.tensor([[1.0], [2.0]])).sum().backward()  # autograd accepts the new shape
    opt.step()
    stopper.finish()  # everyone back: members 0 and 2 as trained, member 1 as it stopped
    assert critic.w.shape == (3, 1) and group.members == [0, 1, 2]
    assert float(critic.w.detach()[1]) == stopped_at
    assert torch.equal(critic.w[[0, 2]], w.detach())
    # once every member has stopped, training is over
    last = MemberStopping([group], [critic], patience=1, tol=0.0, keep_best=True)
    assert last.check([torch.tensor([1.0, 1.0, 1.0])], opt)
    assert not last.check([torch.tensor([1.0, 2.0, 1.0])], opt)
    assert critic.w.shape == (0, 1) and group.members == []


def test_members_retired_by_key_keep_their_best_and_the_rest_train_on() -> None:
    """An inverse no longer needed (its layer is read from its preimages) stops at once, with
    the parameters of its best price; the others go on."""
    critic, opt = _batched([[1.0], [2.0], [3.0]])
    group = _Members(3)
    stopper = MemberStopping([group], [critic], patience=8, tol=0.01, keep_best=True)
    assert stopper.check([torch.tensor([0.5, 0.5, 0.5])], opt)  # every member's best so far
    with torch.no_grad():
        critic.w.copy_(torch.tensor([[4.0], [5.0], [6.0]]))
    assert stopper.retire({"m1", "x"}, opt)
    assert group.members == [0, 2] and critic.w.shape == (2, 1)
    assert opt.state[critic.w] == {} or opt.state[critic.w]["exp_avg"].shape == (2, 1)
    assert not stopper.retire({"m0", "m2"}, opt)  # none left training
    stopper.finish()
    assert torch.equal(critic.w, torch.tensor([[1.0], [2.0], [3.0]]))
    assert stopper.last[0][1] == 0.5


def test_inverse_blur_above_threshold_is_diagnosed() -> None:
    from decoderscope.diagnostics import BLUR_WARNING, diagnose
    from decoderscope.report import Estimate, Exact, LayerResult, VariantResult

    est = Estimate(1.0, 0.01, 3)
    latent = LayerResult("latent", "latent", (4,), est, est, est, exact=Exact(1.0, 0.0, 1.0))

    def row(name: str, blur: float) -> LayerResult:
        return LayerResult(name, "Linear", (4,), est, est, est, inverse_blur=blur)

    variant = VariantResult(
        "trained", 3, (latent, row("0", BLUR_WARNING / 2), row("1", 2 * BLUR_WARNING))
    )
    found = [d for d in diagnose([variant], 1000) if "learned inverse" in d.message]
    assert [d.layer for d in found] == ["1"]
    assert "blur worth 0.50 nats" in found[0].message


def test_each_member_can_have_its_own_patience() -> None:
    # critics whose inverse is blurred get more patience (their gate needs time to move)
    critic, opt = _batched([[1.0], [2.0]])
    group = _Members()
    stopper = MemberStopping([group], [critic], [torch.tensor([1, 3])], tol=0.0, keep_best=True)
    assert stopper.check([torch.tensor([1.0, 1.0])], opt)
    assert stopper.check([torch.tensor([1.0, 1.0])], opt)  # member 0 stops after one stale check
    assert group.members == [1]
    assert stopper.check([torch.tensor([1.0])], opt)
    assert not stopper.check([torch.tensor([1.0])], opt)  # member 1 after three


def test_inverse_blur_and_affine_rank_are_reported_and_survive_json() -> None:
    import decoderscope as ds
    from decoderscope.testing import gaussian_case, index_data, vae_for

    mu, lv = gaussian_case(d=4, n=200, kl=2.0)
    dec = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    settings = ds.Settings(steps=60, regression_steps=100, eval_samples=512, pair_samples=128)
    report = ds.inspect(
        vae_for(mu, lv, dec), index_data(200), random_inits=0, seeds=1, settings=settings
    )
    rows = report.variant("trained").layers
    # the linear layer is affine in z: exact values, no critic, no inverse
    assert rows[1].affine_rank == 4 and rows[1].inverse_blur is None
    assert rows[1].critic_accuracy is None
    # after tanh, 2 features of 4 latent units: lossy, R(h) blurs
    assert rows[2].affine_rank is None
    assert rows[2].inverse_blur is not None and rows[2].inverse_blur > 0.05
    text = report.to_json()
    assert '"affine_rank": 4' in text
    assert ds.Report.from_json(text) == report


class _Scale(nn.Module):
    """A module with parameters of its own and no reset_parameters()."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((4, 4), 0.5))
        self.bias = nn.Parameter(torch.full((4,), 2.0))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.weight + self.bias


def test_reinit_fallback_for_modules_without_reset_parameters() -> None:
    from decoderscope.reinit import reinitialised

    dec = nn.Sequential(nn.Linear(4, 4), _Scale())
    before = {k: v.clone() for k, v in dec.state_dict().items()}
    state = torch.random.get_rng_state()
    copy, fallback = reinitialised(dec, seed=3)
    assert fallback == ["1"]
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    for k, v in dec.state_dict().items():
        assert torch.equal(v, before[k])  # the original is untouched
    w, b = copy[1].weight.detach(), copy[1].bias.detach()
    assert not torch.equal(w, before["1.weight"]) and not torch.equal(b, before["1.bias"])
    assert float(w.abs().max()) <= 0.5 + 1e-6  # Kaiming-uniform(a=sqrt(5)): bound 1/sqrt(4)
    assert float(b.abs().max()) <= 0.5 + 1e-6  # uniform(+-1/sqrt(4))
    again, _ = reinitialised(dec, seed=3)
    assert torch.equal(again[1].weight, w)  # seeded


def test_reinit_fallback_is_diagnosed_in_the_report() -> None:
    import decoderscope as ds
    from decoderscope.testing import gaussian_case, index_data, vae_for

    mu, lv = gaussian_case(d=4, n=100, kl=2.0)
    settings = ds.Settings(steps=20, regression_steps=20, eval_samples=256, pair_samples=64)
    report = ds.inspect(
        vae_for(mu, lv, nn.Sequential(nn.Linear(4, 4), _Scale())),
        index_data(100),
        random_inits=1,
        seeds=1,
        settings=settings,
    )
    notes = [d for d in report.diagnostics if "fallback" in d.message]
    assert len(notes) == 1 and notes[0].variant == "random" and notes[0].layer == "1"


def test_training_logits_match_the_full_critic() -> None:
    """head_pairs computes the separable critic's logits in parts for speed; they must equal
    `forward`'s (head m at levels m+1 and m), gradients included."""
    from decoderscope.estimators.critic import SeparableGroup

    torch.manual_seed(0)
    groups, width, cond, d, b = 3, 5, 4, 6, 7
    levels = torch.tensor([0.0, 0.3, 0.7, 1.0])
    critic = SeparableGroup(groups, width, cond, 16, levels, 8, d)
    with torch.no_grad():  # move every part off its start (zeroed heads, saturated gate)
        for p in critic.parameters():
            p.add_(0.3 * torch.randn_like(p))
        critic.gate.copy_(torch.randn_like(critic.gate))
    h = torch.randn(groups, 4 * b, width)
    c = torch.randn(groups, b, cond + 2 * d)
    c[..., -d:] = -1.0 + 0.5 * c[..., -d:]  # logvar
    z = torch.randn(groups, 4 * b, d)
    pos, neg, pos_z, neg_z, _ = critic.head_pairs(h, c, z)
    full = critic(h, c).view(groups, 4, b, 3)
    # the soft labels' logits: head m's exact log-ratio at the latent rows behind each logit
    mu, var = c[..., cond : cond + d], c[..., -d:].exp()
    zl = z.view(groups, 4, b, d)

    def log_level(k: int, rows: torch.Tensor) -> torch.Tensor:
        a = float(levels[k])
        normal = torch.distributions.Normal(a * mu, (a * a * var + 1 - a * a).sqrt())
        return normal.log_prob(rows).sum(-1)

    for m in range(3):
        for got, k in ((pos_z, m + 1), (neg_z, m)):
            want = log_level(m + 1, zl[:, k]) - log_level(m, zl[:, k])
            assert torch.allclose(got[:, m], want, atol=1e-4)
    for m in range(3):
        assert torch.allclose(pos[:, m], full[:, m + 1, :, m], atol=1e-5)
        assert torch.allclose(neg[:, m], full[:, m, :, m], atol=1e-5)
    params = list(critic.parameters())
    grads = torch.autograd.grad((pos.sum() - 2 * neg.sum()), params, allow_unused=True)
    pick = (
        full[:, 1:, :, :].diagonal(dim1=1, dim2=3).sum()
        - 2 * full[:, :-1].diagonal(dim1=1, dim2=3).sum()
    )
    expect = torch.autograd.grad(pick, params, allow_unused=True)
    for got, want in zip(grads, expect, strict=True):
        if want is None:
            assert got is None or bool((got == 0).all())
        else:
            assert got is not None and torch.allclose(got, want, atol=1e-4)


def test_soft_labels_are_the_expected_hard_loss_with_zero_gradient_at_the_truth() -> None:
    """soft_logistic is the 0/1-label logistic loss averaged over the label given z; at the exact
    log-ratio its gradient vanishes sample by sample (a hard label's does not)."""
    from decoderscope.estimators.critic import soft_logistic

    latent = torch.tensor([-3.0, -0.5, 0.0, 1.2, 4.0])
    logit = torch.tensor([0.7, -2.0, 0.3, 1.0, 2.5])
    t = torch.sigmoid(latent)
    sp = nn.functional.softplus
    hard = t * sp(-logit) + (1 - t) * sp(logit)  # E over label ~ Bernoulli(t)
    assert torch.allclose(soft_logistic(logit, latent), hard)
    at_truth = latent.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(soft_logistic(at_truth, latent).sum(), at_truth)
    assert torch.allclose(grad, torch.zeros_like(grad), atol=1e-6)
    (hard_grad,) = torch.autograd.grad(sp(-at_truth).sum(), at_truth)  # label 1
    assert bool((hard_grad.abs() > 0.01).all())


def test_a_group_that_keeps_some_members_reads_them_as_before() -> None:
    """After the plan, members read without their critic leave their group: the others' logits
    are unchanged, and the parameters of those that left are gone."""
    torch.manual_seed(0)
    d, width, b, levels = 3, 5, 4, torch.linspace(0.0, 1.0, 4)
    keys = [("a", 0), ("b", 0), ("c", 0)]
    c = torch.randn(b, 2 + 2 * d)  # two conditioning columns, then mu and logvar
    group = Members(keys, width, 3, Settings(), c, separable=True, latent=d, levels=levels)
    with torch.no_grad():
        for p in group.critic.parameters():  # every member's critic its own, none at zero
            p.normal_()
    h, idx = torch.randn(3, 4 * b, width), torch.arange(b).view(1, b)
    before = group.logits(h, idx)
    group.refined = {("b", 0), ("c", 0)}
    group.keep({("a", 0), ("c", 0)})
    assert group.keys == group.all_keys == [("a", 0), ("c", 0)]
    assert group.refined == {("c", 0)}
    assert all(p.shape[0] == 2 for p in group.critic.parameters())
    assert torch.allclose(group.logits(h[[0, 2]], idx), before[[0, 2]])


def test_a_posterior_only_batch_draws_the_posterior_level_alone() -> None:
    """The evaluation's batches after its first: q(z|x) samples, no other bridge level."""
    mu, logvar = torch.full((2, 3), 5.0), torch.full((2, 3), math.log(0.01))
    post = Posterior(mu, logvar)
    levels = torch.linspace(0.0, 1.0, 5)
    sampler = Sampler(
        lambda z: {"h": z.flatten(1)}, post, levels, Settings(), torch.Generator(), seeds=2
    )
    idx, feats, z = sampler.batch(1000, posterior_only=True)
    assert idx.shape == (2, 1000) and feats["h"].shape == (2000, 3) and z.shape == (2, 1000, 3)
    assert float((z - 5.0).std()) == pytest.approx(0.1, rel=0.05)  # q(z|x), not the prior
    _, every, _ = sampler.batch(1000)
    assert every["h"].shape == (5 * 2000, 3)
