"""Advantage estimates ``A_hat`` of the UPGE, and per-sequence weights that multiply them.

Outcome estimators (one scalar reward per row) share one signature::

    fn(rewards[N], group[N] long, include[N] bool) -> advantages[N]

``group`` is the question index of each row; ``include`` marks the rows whose rewards enter the
group statistics (the rollouts; or rollouts *and* demonstrations, as SRFT and LUFFY do). Every
row, included or not, gets an advantage relative to its group's included rows. A group with
fewer than two included rows, or whose rewards are all equal, gives advantage 0 for the
normalised / centred / leave-one-out estimators (never NaN).

``gae`` is token-level (it needs a critic's values) and has its own signature, see :func:`gae`.

Per-sequence weights (SRFT) share::

    fn(advantages[N,T], seq_entropy[N,1]) -> weights[N,T]   (detached, multiply A_hat)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from hpt.estimator import Registry

EPS = 1e-6  # GRPO's std epsilon (verl / TRL)

OutcomeFn = Callable[[Tensor, Tensor, Tensor], Tensor]
ADVANTAGES: Registry[OutcomeFn] = Registry("advantage estimator")
register_advantage = ADVANTAGES.register

WeightFn = Callable[[Tensor, Tensor], Tensor]
SEQUENCE_WEIGHTS: Registry[WeightFn] = Registry("sequence weight")
register_sequence_weight = SEQUENCE_WEIGHTS.register


def get_advantage(name: str) -> OutcomeFn:
    """The outcome estimator registered as ``name`` (ConfigError listing valid ones otherwise)."""
    return ADVANTAGES.get(name)


def get_sequence_weight(name: str) -> WeightFn:
    """The per-sequence weight registered as ``name`` (ConfigError listing valid ones otherwise)."""
    return SEQUENCE_WEIGHTS.get(name)


class GroupStats(NamedTuple):
    """Statistics of each row's group over its included rows, broadcast back to rows [N].

    Attributes:
        count: included rows in the group. total: their reward sum. mean: their mean.
        std: unbiased sample std (0 with fewer than two rows). constant: all included rewards equal.
    """

    count: Tensor
    total: Tensor
    mean: Tensor
    std: Tensor
    constant: Tensor


def group_stats(rewards: Tensor, group: Tensor, include: Tensor) -> GroupStats:
    """Per-group count, sum, mean, unbiased std and constancy over ``include`` rows, in float64.

    Shapes: rewards [N] float, group [N] long (any ids), include [N] bool -> fields [N].
    """
    r = rewards.detach().to(torch.float64)
    _, inverse = torch.unique(group, return_inverse=True)
    size = int(inverse.max()) + 1 if inverse.numel() else 0
    weight = include.to(torch.float64)
    zeros = torch.zeros(size, dtype=torch.float64, device=r.device)
    count = zeros.index_add(0, inverse, weight)
    total = zeros.index_add(0, inverse, weight * r)
    mean = total / count.clamp_min(1.0)
    deviation = torch.where(include, r - mean[inverse], 0.0)
    var = zeros.index_add(0, inverse, deviation**2) / (count - 1.0).clamp_min(1.0)
    std = torch.where(count > 1, var.sqrt(), 0.0)
    inf = torch.full_like(zeros, float("inf"))
    high = inf.scatter_reduce(
        0, inverse, torch.where(include, r, -torch.inf), "amax", include_self=False
    )
    low = inf.scatter_reduce(
        0, inverse, torch.where(include, r, torch.inf), "amin", include_self=False
    )
    constant = (high <= low) | (count < 2)
    return GroupStats(
        count[inverse], total[inverse], mean[inverse], std[inverse], constant[inverse]
    )


@register_advantage("one", symbol="1")
def one(rewards: Tensor, group: Tensor, include: Tensor) -> Tensor:
    """``A = 1`` for every row (SFT: maximise the demonstration's likelihood). [N] -> [N]."""
    return torch.ones_like(rewards, dtype=torch.float32)


@register_advantage("sign", symbol="+-1")
def sign(rewards: Tensor, group: Tensor, include: Tensor) -> Tensor:
    """REINFORCE's ``A = +1`` for a positive (correct) reward, ``-1`` otherwise. [N] -> [N].

    Source: the UPGE table's REINFORCE row (arXiv 2509.04419); SRFT's rollout terms.
    """
    return torch.where(rewards > 0, 1.0, -1.0).to(torch.float32)


@register_advantage("group_norm", symbol="(R - mean)/std")
def group_norm(rewards: Tensor, group: Tensor, include: Tensor) -> Tensor:
    """GRPO: ``(r - mean_group) / (std_group + 1e-6)`` with the unbiased sample std, as verl and TRL.

    Groups of one or with equal rewards give 0. [N] -> [N]. Source: DeepSeekMath (arXiv 2402.03300).
    """
    stats = group_stats(rewards, group, include)
    value = (rewards.to(torch.float64) - stats.mean) / (stats.std + EPS)
    return torch.where(stats.constant, 0.0, value).to(torch.float32)


@register_advantage("group_centered", symbol="R - mean")
def group_centered(rewards: Tensor, group: Tensor, include: Tensor) -> Tensor:
    """Dr.GRPO: ``r - mean_group`` (no std; arXiv 2503.20783). Groups of one give 0. [N] -> [N]."""
    stats = group_stats(rewards, group, include)
    value = rewards.to(torch.float64) - stats.mean
    return torch.where(stats.constant, 0.0, value).to(torch.float32)


@register_advantage("rloo", symbol="R - mean(others)")
def rloo(rewards: Tensor, group: Tensor, include: Tensor) -> Tensor:
    """RLOO: ``r - mean of the OTHER included rows of the group`` (Ahmadian et al., arXiv 2402.14740).

    Equal to ``n/(n-1) (r - mean)`` for an included row; a row with no other row in its group
    (a group of one) gets 0. [N] -> [N].
    """
    stats = group_stats(rewards, group, include)
    r = rewards.to(torch.float64)
    mine = include.to(torch.float64)
    others = stats.count - mine
    value = r - (stats.total - mine * r) / others.clamp_min(1.0)
    return torch.where((others < 1) | stats.constant, 0.0, value).to(torch.float32)


@register_advantage("batch_whiten", symbol="(R - mean_batch)/std_batch")
def batch_whiten(rewards: Tensor, group: Tensor, include: Tensor) -> Tensor:
    """REINFORCE++ (outcome form, arXiv 2501.03262): ``(r - mean_batch) / (std_batch + 1e-6)``.

    Statistics over all included rows of the batch (the group ids are ignored). [N] -> [N].
    """
    return group_norm(rewards, torch.zeros_like(group), include)


@register_advantage("gae", symbol="GAE", token_level=True)  # needs values, not rewards only
def gae_outcome(rewards: Tensor, group: Tensor, include: Tensor) -> Tensor:
    """GAE needs a critic's values: use :func:`gae` (token-level), not the outcome form."""
    raise ValueError(
        "the 'gae' advantage needs values: call hpt.estimator.advantage.gae(values, rewards, "
        "response_mask, gamma, lam)"
    )


def gae(
    values: Tensor,
    rewards: Tensor,
    response_mask: Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten: bool = True,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation for an outcome reward (Schulman et al., arXiv 1506.02438).

    The reward sits on the row's last response token; masked tokens are skipped (their value and
    advantage carry over), as in verl's ``compute_gae_advantage_return``. With ``whiten`` the
    advantages are whitened over all valid tokens of the batch (verl's default).

    Args:
        values: [N, T] critic values of the response tokens.
        rewards: [N] outcome rewards (or [N, T] token-level rewards).
        response_mask: [N, T] 0/1 valid response tokens.
        gamma: discount. lam: GAE's lambda. whiten: whiten the advantages over valid tokens.

    Returns:
        (advantages [N, T], returns [N, T]); both 0 on masked tokens.
    """
    mask = response_mask.to(torch.float32)
    values = values.detach().to(torch.float32) * mask
    if rewards.dim() == 1:
        last = (mask.cumsum(-1) == mask.sum(-1, keepdim=True)) & (mask > 0)
        token_rewards = torch.where(last, rewards.to(torch.float32)[:, None], 0.0)
    else:
        token_rewards = rewards.to(torch.float32) * mask
    next_value = torch.zeros_like(values[:, 0])
    running = torch.zeros_like(values[:, 0])
    reversed_advantages = []
    for t in reversed(range(values.shape[1])):
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        step = delta + gamma * lam * running
        m = mask[:, t]
        next_value = values[:, t] * m + (1 - m) * next_value
        running = step * m + (1 - m) * running
        reversed_advantages.append(running)
    advantages = torch.stack(reversed_advantages[::-1], dim=1) * mask
    returns = (advantages + values) * mask
    if whiten:
        count = mask.sum()
        if count > 1:
            mean = advantages.sum() / count
            var = (((advantages - mean) * mask) ** 2).sum() / (count - 1)
            advantages = (advantages - mean) * torch.rsqrt(var + 1e-8) * mask
    return advantages, returns


def sequence_entropy(entropy: Tensor | None, logprobs: Tensor, mask: Tensor) -> Tensor:
    """Detached mean token entropy ``H`` of each sequence, [N, T] -> [N, 1].

    Without ``entropy`` the mean token NLL ``-mean_t log pi`` stands in (the Monte Carlo estimate
    of the entropy for on-policy samples). Rows without tokens give 0.
    """
    per_token = (-logprobs if entropy is None else entropy).detach().to(logprobs.dtype)
    total = torch.where(mask > 0, per_token, 0.0).sum(-1, keepdim=True)
    return total / mask.sum(-1, keepdim=True).clamp_min(1.0)


@register_sequence_weight("none")
def no_weight(advantages: Tensor, seq_entropy: Tensor) -> Tensor:
    """Weight 1. Shapes: advantages [N, T], seq_entropy [N, 1] -> [N, T]."""
    return torch.ones_like(advantages)


@register_sequence_weight("srft_sft", uses_entropy=True)
def srft_sft(advantages: Tensor, seq_entropy: Tensor) -> Tensor:
    """SRFT's demonstration SFT weight ``0.5 * exp(-H)`` (arXiv 2506.19767). [N,T],[N,1] -> [N,T]."""
    return (0.5 * torch.exp(-seq_entropy)).expand_as(advantages)


@register_sequence_weight("srft_rollout", uses_entropy=True)
def srft_rollout(advantages: Tensor, seq_entropy: Tensor) -> Tensor:
    """SRFT's rollout weight: ``0.1 * exp(H)`` for correct rollouts (A > 0), 1 for incorrect ones.

    With the ``sign`` advantage this gives ``-(0.1 exp(H)) log pi`` for correct and ``+log pi``
    for incorrect rollouts (arXiv 2506.19767). Shapes: [N, T], [N, 1] -> [N, T].
    """
    return torch.where(advantages > 0, 0.1 * torch.exp(seq_entropy), 1.0)
