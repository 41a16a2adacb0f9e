"""Each UPGE part on its own: registries, references, advantages, masks, shaping, aggregation."""

from __future__ import annotations

import math

import pytest
import torch

from hpt.errors import ConfigError
from hpt.estimator.advantage import ADVANTAGES, gae, get_advantage, group_stats
from hpt.estimator.aggregate import AGGREGATIONS, aggregate
from hpt.estimator.mask import MASKS, Clip, get_mask
from hpt.estimator.reference import REFERENCES, get_reference
from hpt.estimator.shaping import SHAPINGS, get_shaping


@pytest.mark.parametrize(
    "registry,names",
    [
        (REFERENCES, ["current", "old", "one", "sequence"]),
        (
            ADVANTAGES,
            ["one", "sign", "group_norm", "group_centered", "rloo", "batch_whiten", "gae"],
        ),
        (MASKS, ["none", "clip", "cispo", "sequence_clip"]),
        (SHAPINGS, ["none", "luffy"]),
        (
            AGGREGATIONS,
            [
                "token-mean",
                "seq-mean-token-mean",
                "seq-mean-token-sum",
                "seq-mean-token-sum-norm",
                "token-sum-norm",
            ],
        ),
    ],
)
def test_registries_hold_the_parts_and_reject_unknown_names(registry, names):
    assert registry.names() == names
    with pytest.raises(ValueError) as error:
        registry.get("nope")
    assert isinstance(error.value, ConfigError)
    message = str(error.value)
    assert "'nope'" in message and all(name in message for name in names) and "\n" not in message


def test_every_part_documents_itself():
    for registry in (REFERENCES, ADVANTAGES, MASKS, SHAPINGS, AGGREGATIONS):
        for name in registry:
            assert registry.get(name).__doc__, f"{registry.what} {name} has no docstring"


# ---- references: d rho / d logp -------------------------------------------------------------


def _grad(fn, lp):
    x = lp.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(x).sum(), x)
    return g


def test_reference_derivatives():
    g = torch.Generator().manual_seed(0)
    lp = (torch.rand(3, 5, generator=g, dtype=torch.float64) * 0.9 + 0.05).log()
    old = lp + 0.3 * torch.randn(3, 5, generator=g, dtype=torch.float64)
    mask = torch.ones(3, 5, dtype=torch.float64)
    mask[2, 3:] = 0
    pi = lp.exp()
    # current: value log pi, derivative 1 (grad log pi = grad pi / pi)
    out = get_reference("current")(lp, lp, old, mask)
    torch.testing.assert_close(out.surrogate, lp)
    torch.testing.assert_close(
        _grad(lambda x: get_reference("current")(x, x, old, mask).surrogate, lp),
        torch.ones_like(lp),
    )
    # old: value r, derivative r (= pi / pi_old)
    r = (lp - old).exp()
    torch.testing.assert_close(get_reference("old")(lp, lp, old, mask).surrogate, r)
    torch.testing.assert_close(
        _grad(lambda x: get_reference("old")(x, x, old, mask).surrogate, lp), r
    )
    # one: value pi, derivative pi (grad pi itself)
    torch.testing.assert_close(
        _grad(lambda x: get_reference("one")(x, x, old, mask).surrogate, lp), pi
    )
    # sequence: value s_i on every token, derivative s_i
    log_s = ((lp - old) * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True)
    seq = get_reference("sequence")(lp, lp, old, mask)
    torch.testing.assert_close(seq.surrogate, log_s.exp().expand_as(lp))
    torch.testing.assert_close(seq.ratio, log_s.exp().expand_as(lp))
    d = _grad(lambda x: get_reference("sequence")(x, x, old, mask).surrogate, lp)
    torch.testing.assert_close(d, log_s.exp().expand_as(lp))


def test_current_reference_with_shaping_has_derivative_f_prime():
    lp = torch.linspace(-4, -0.01, 7, dtype=torch.float64)[None]
    gamma = 0.1

    def shaped(x):
        return get_reference("current")(
            get_shaping("luffy")(x, gamma), x, x, torch.ones_like(x)
        ).surrogate

    pi = lp.exp()
    torch.testing.assert_close(_grad(shaped, lp), gamma / (pi + gamma) ** 2)


def test_luffy_shaping():
    lp = torch.tensor([[-60.0, -5.0, -0.5, 0.0]], dtype=torch.float64)
    f = get_shaping("luffy")(lp, 0.1).exp()
    pi = lp.exp()
    torch.testing.assert_close(f, pi / (pi + 0.1))
    assert torch.isfinite(get_shaping("luffy")(torch.full((1, 1), -1e4), 0.1)).all()
    assert torch.equal(get_shaping("none")(lp, 0.1), lp)


# ---- advantages ----------------------------------------------------------------------------


def test_group_norm_uses_unbiased_std_and_epsilon():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.5])
    group = torch.tensor([5, 5, 5, 5, 9, 9])
    include = torch.ones(6, dtype=torch.bool)
    first = rewards[:4]
    want = (first - first.mean()) / (first.std(unbiased=True) + 1e-6)
    out = get_advantage("group_norm")(rewards, group, include)
    torch.testing.assert_close(out[:4], want)
    second = rewards[4:]
    torch.testing.assert_close(out[4:], (second - second.mean()) / (second.std() + 1e-6))


def test_group_centered_rloo_and_sign():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    group = torch.zeros(4, dtype=torch.long)
    include = torch.ones(4, dtype=torch.bool)
    torch.testing.assert_close(
        get_advantage("group_centered")(rewards, group, include), rewards - 0.5
    )
    loo = torch.tensor([1 - 1 / 3, 0 - 2 / 3, 0 - 2 / 3, 1 - 1 / 3])
    torch.testing.assert_close(get_advantage("rloo")(rewards, group, include), loo)
    torch.testing.assert_close(
        get_advantage("sign")(rewards, group, include), torch.tensor([1.0, -1, -1, 1])
    )
    torch.testing.assert_close(get_advantage("one")(rewards, group, include), torch.ones(4))


def test_statistics_over_included_rows_only():
    """A demonstration outside the statistics still gets an advantage against its group."""
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])  # the last row is a demonstration
    group = torch.zeros(4, dtype=torch.long)
    rollouts_only = torch.tensor([True, True, True, False])
    stats = group_stats(rewards, group, rollouts_only)
    assert float(stats.count[0]) == 3 and float(stats.mean[0]) == pytest.approx(1 / 3)
    centered = get_advantage("group_centered")(rewards, group, rollouts_only)
    torch.testing.assert_close(centered, rewards - 1 / 3)
    loo = get_advantage("rloo")(rewards, group, rollouts_only)
    torch.testing.assert_close(loo[3], torch.tensor(1 - 1 / 3))  # all three rollouts are "others"
    torch.testing.assert_close(loo[0], torch.tensor(1.0))  # others: the two wrong rollouts


def test_batch_whiten_ignores_groups():
    rewards = torch.tensor([1.0, 0.0, 3.0, 2.0])
    out = get_advantage("batch_whiten")(
        rewards, torch.tensor([0, 1, 2, 3]), torch.ones(4, dtype=torch.bool)
    )
    torch.testing.assert_close(out, (rewards - rewards.mean()) / (rewards.std() + 1e-6))


def test_gae_outcome_reward_on_last_token_matches_a_loop():
    values = torch.tensor([[0.1, 0.2, 0.3, 0.0], [0.5, 0.4, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    rewards = torch.tensor([1.0, 0.0])
    gamma, lam = 0.9, 0.8
    adv, ret = gae(values, rewards, mask, gamma, lam, whiten=False)
    for i in range(2):
        n = int(mask[i].sum())
        running, want = 0.0, [0.0] * 4
        for t in reversed(range(n)):
            next_value = float(values[i, t + 1]) if t + 1 < n else 0.0
            reward = float(rewards[i]) if t == n - 1 else 0.0
            delta = reward + gamma * next_value - float(values[i, t])
            running = delta + gamma * lam * running
            want[t] = running
        torch.testing.assert_close(adv[i], torch.tensor(want))
    torch.testing.assert_close(ret, (adv + values) * mask)
    whitened, _ = gae(values, rewards, mask, gamma, lam)
    valid = mask.bool()
    assert float(whitened[valid].mean()) == pytest.approx(0.0, abs=1e-6)
    assert torch.all(whitened[~valid] == 0)
    with pytest.raises(ValueError, match="values"):
        get_advantage("gae")(
            rewards, torch.zeros(2, dtype=torch.long), torch.ones(2, dtype=torch.bool)
        )


# ---- masks ---------------------------------------------------------------------------------


def test_clip_mask_zeroes_tokens_outside_the_trust_region():
    ratio = torch.tensor([[0.5, 0.9, 1.1, 1.5, 4.0]], dtype=torch.float64)
    surrogate = ratio.clone().requires_grad_(True)
    for advantage, kept in [(1.0, [1, 1, 1, 0, 0]), (-1.0, [0, 1, 1, 1, 0])]:
        adv = torch.full_like(ratio, advantage)
        out = get_mask("clip")(
            surrogate,
            ratio,
            adv,
            ratio.log(),
            ratio * 0,
            torch.ones_like(ratio),
            Clip(0.2, 0.28, 3.0),
        )
        (g,) = torch.autograd.grad(out.objective.sum(), surrogate)
        torch.testing.assert_close(g, advantage * torch.tensor([kept], dtype=torch.float64))
    # values: the constant where clipped (min(rA, clip(r)A), dual bound c A)
    torch.testing.assert_close(
        out.objective.detach(), -torch.tensor([[0.8, 0.9, 1.1, 1.5, 3.0]], dtype=torch.float64)
    )
    assert out.clipped_low.tolist() == [[True, False, False, False, False]]
    assert out.clipped_dual.tolist() == [[False, False, False, False, True]]


def test_cispo_keeps_every_gradient_reweighted():
    ratio = torch.tensor([[0.5, 1.0, 2.0]], dtype=torch.float64)
    lp = torch.tensor([[-1.0, -2.0, -0.5]], dtype=torch.float64, requires_grad=True)
    old = lp.detach() - ratio.log()
    surrogate = torch.exp(lp - old)
    adv = torch.ones_like(ratio)
    out = get_mask("cispo")(surrogate, ratio, adv, lp, old, torch.ones_like(ratio), Clip(0.2, 0.28))
    (g,) = torch.autograd.grad(out.objective.sum(), lp)
    torch.testing.assert_close(g, torch.tensor([[0.8, 1.0, 1.28]], dtype=torch.float64))
    torch.testing.assert_close(
        out.objective.detach(), torch.tensor([[0.8, 1.0, 1.28]], dtype=torch.float64) * lp.detach()
    )


# ---- aggregation (verl's agg_loss, normalised by given counts) ------------------------------


def test_aggregations_match_verl_definitions():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 0.0], [7.0, 8.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0]])
    assert float(aggregate("token-mean", loss, mask)) == pytest.approx(15 / 5)
    assert float(aggregate("seq-mean-token-mean", loss, mask)) == pytest.approx((2 + 4.5 + 0) / 3)
    assert float(aggregate("seq-mean-token-sum", loss, mask)) == pytest.approx(15 / 3)
    assert float(aggregate("seq-mean-token-sum-norm", loss, mask)) == pytest.approx(15 / 3 / 3)
    assert float(
        aggregate("seq-mean-token-sum-norm", loss, mask, norm_length=8192)
    ) == pytest.approx(15 / 8192 / 3)
    assert float(aggregate("token-sum-norm", loss, mask)) == pytest.approx(15 / 3)
    assert float(aggregate("token-sum-norm", loss, mask, norm_length=8192)) == pytest.approx(
        15 / 8192
    )
    # mini-batch counts replace the local ones
    assert float(aggregate("token-mean", loss, mask, tokens=10)) == pytest.approx(1.5)
    assert float(aggregate("seq-mean-token-sum", loss, mask, sequences=6)) == pytest.approx(2.5)


def test_aggregation_ignores_nan_outside_the_mask_and_empty_is_zero():
    loss = torch.tensor([[1.0, float("nan")], [float("inf"), 2.0]])
    mask = torch.tensor([[1, 0], [0, 1]])
    for name in AGGREGATIONS:
        assert math.isfinite(float(aggregate(name, loss, mask)))
        assert float(aggregate(name, torch.zeros(0, 4), torch.zeros(0, 4))) == 0.0
        assert float(aggregate(name, loss, torch.zeros_like(mask))) == 0.0


def test_part_traits_live_with_the_registration():
    """What a part needs is declared where it is registered; the algorithm reads it from there."""
    from hpt.algorithms import Term, get_algorithm
    from hpt.estimator import Registry

    registry: Registry = Registry("thing")
    registry.register("a", needs_old=True, symbol="A")(lambda: None)
    assert registry.trait("a", "needs_old") is True and registry.trait("a", "symbol") == "A"
    assert registry.trait("a", "token_level") is False
    with pytest.raises(ValueError, match="unknown thing 'b'"):
        registry.trait("b", "needs_old")
    assert REFERENCES.trait("old", "needs_old") and not REFERENCES.trait("current", "needs_old")
    assert ADVANTAGES.trait("gae", "token_level") and MASKS.trait("clip", "needs_old")
    # an on-policy term needs no pi_old; the same term clipped does
    sft = get_algorithm("sft")
    assert not sft.needs_old_logprobs and not sft.needs_values
    assert get_algorithm("grpo").needs_old_logprobs and get_algorithm("ppo").needs_values
    assert get_algorithm("srft").needs_entropy and Term("sft", "current", "one").mask == "none"
