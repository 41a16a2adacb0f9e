"""The stabilisation mask ``1_stable`` of the UPGE: where (and how much) a token's gradient counts.

Every mask turns the reference's surrogate into the per-token *objective* (to be maximised)::

    fn(surrogate[N,T], ratio[N,T], advantages[N,T], logprobs[N,T], old_logprobs[N,T],
       mask[N,T], clip: Clip) -> Masked

with ``d objective / d logprobs = 1_stable * A * d surrogate / d logprobs``. ``surrogate`` and
``ratio`` come from :mod:`hpt.estimator.reference`; ``ratio`` is the detached ``pi_theta/pi_ref``.
Values match the original formulations (PPO's ``min(rA, clip(r)A)``, CISPO's
``sg(clip(r)) A log pi``, ...), not only their gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from hpt.estimator import Registry
from hpt.estimator.reference import SEQUENCE_LOG_RATIO_MAX, sequence_log_ratio


@dataclass(frozen=True)
class Clip:
    """Clip settings: the ratio is kept in ``[1 - low, 1 + high]``; ``dual`` (c > 1) bounds A < 0.

    Attributes:
        low: epsilon below 1 (PPO 0.2). high: epsilon above 1 (DAPO's clip-higher 0.28).
        dual: dual-clip constant c > 1 (Ye et al., arXiv 1912.09729), None for no dual clip.
    """

    low: float = 0.2
    high: float = 0.2
    dual: float | None = None


class Masked(NamedTuple):
    """A mask's output.

    Attributes:
        objective: [N, T] per-token objective (the loss is its negative).
        clipped_low: [N, T] bool, tokens clipped at ``1 - low`` (their gradient is zero or reduced).
        clipped_high: [N, T] bool, tokens clipped at ``1 + high``.
        clipped_dual: [N, T] bool, tokens held by the dual clip.
    """

    objective: Tensor
    clipped_low: Tensor
    clipped_high: Tensor
    clipped_dual: Tensor


MaskFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Clip], Masked]
MASKS: Registry[MaskFn] = Registry("stabilisation mask")
# trait scales_with_advantage: the objective is the advantage times a finite factor, so a token
# with advantage 0 adds 0 to the loss and nothing to the gradient (rows_without_gradient)
register_mask = MASKS.register


def get_mask(name: str) -> MaskFn:
    """The mask registered as ``name`` (ConfigError listing the valid ones otherwise)."""
    return MASKS.get(name)


@register_mask("none", symbol="none", scales_with_advantage=True)
def none(
    surrogate: Tensor,
    ratio: Tensor,
    advantages: Tensor,
    logprobs: Tensor,
    old_logprobs: Tensor,
    mask: Tensor,
    clip: Clip,
) -> Masked:
    """``1_stable = 1``: objective ``A * rho`` (SFT, REINFORCE, LUFFY, HPT). Shapes: [N, T]."""
    never = torch.zeros_like(ratio, dtype=torch.bool)
    return Masked(advantages * surrogate, never, never, never)


def clipped_objective(surrogate: Tensor, ratio: Tensor, advantages: Tensor, clip: Clip) -> Masked:
    """PPO's clipped objective with clip-higher and dual-clip, written on ``ratio``'s conditions.

    ``min(A rho, A clip(ratio))``, then ``max(., c A)`` for ``A < 0``: tokens whose ratio left
    ``[1 - low, 1 + high]`` in the direction A pushes (and, for A < 0, ratios above c) take a
    constant value and no gradient. When ``rho`` equals ``ratio`` in value (references ``old``
    and ``sequence``) this is exactly ``-loss`` of verl's ``vanilla`` policy loss. Shapes: [N, T].
    """
    ratio = ratio.detach()
    high = (advantages > 0) & (ratio > 1.0 + clip.high)
    low = (advantages < 0) & (ratio < 1.0 - clip.low)
    bounded = advantages * torch.clamp(ratio, 1.0 - clip.low, 1.0 + clip.high)
    objective = torch.where(high | low, bounded, advantages * surrogate)
    if clip.dual is None:
        dual = torch.zeros_like(high)
    else:
        dual = (advantages < 0) & (ratio > clip.dual)
        objective = torch.where(dual, advantages * clip.dual, objective)
    return Masked(objective, low, high, dual)


@register_mask("clip", needs_old=True, symbol="clip {bounds}{dual}", scales_with_advantage=True)
def clip_mask(
    surrogate: Tensor,
    ratio: Tensor,
    advantages: Tensor,
    logprobs: Tensor,
    old_logprobs: Tensor,
    mask: Tensor,
    clip: Clip,
) -> Masked:
    """PPO / GRPO clip: ``1_stable = 0`` where ``A > 0, r > 1 + high`` or ``A < 0, r < 1 - low``.

    Asymmetric ``low``/``high`` is DAPO's clip-higher (arXiv 2503.14476); ``clip.dual`` adds
    dual-clip for ``A < 0, r > c``. See :func:`clipped_objective`. Shapes: [N, T].
    Source: PPO (arXiv 1707.06347).
    """
    return clipped_objective(surrogate, ratio, advantages, clip)


@register_mask(
    "cispo", needs_old=True, symbol="sg clip IS weight {bounds}", scales_with_advantage=True
)
def cispo(
    surrogate: Tensor,
    ratio: Tensor,
    advantages: Tensor,
    logprobs: Tensor,
    old_logprobs: Tensor,
    mask: Tensor,
    clip: Clip,
) -> Masked:
    """CISPO's clipped importance weight under stop-gradient (MiniMax-M1, arXiv 2506.13585).

    ``1_stable = sg(clip(r, 1 - low, 1 + high)) / r``: every token keeps a gradient, reweighted.
    The objective's value is CISPO's (and verl's ``cispo``) ``sg(clip(r)) * A * log pi``::

        objective = sg(clip(r)) * A * (sg(log pi) + (rho - sg(rho)) / sg(r))

    Shapes: [N, T]. ``clip.dual`` does not apply.
    """
    ratio = ratio.detach()
    weight = torch.clamp(ratio, 1.0 - clip.low, 1.0 + clip.high)
    unit = logprobs.detach() + (surrogate - surrogate.detach()) / ratio.clamp_min(1e-30)
    never = torch.zeros_like(ratio, dtype=torch.bool)
    return Masked(
        weight * advantages * unit, ratio < 1.0 - clip.low, ratio > 1.0 + clip.high, never
    )


@register_mask(
    "sequence_clip", needs_old=True, symbol="sequence clip {bounds}", scales_with_advantage=True
)
def sequence_clip(
    surrogate: Tensor,
    ratio: Tensor,
    advantages: Tensor,
    logprobs: Tensor,
    old_logprobs: Tensor,
    mask: Tensor,
    clip: Clip,
) -> Masked:
    """GSPO's sequence clip (arXiv 2507.18071): PPO's clip applied to the sequence ratio ``s_i``.

    ``s_i = exp(mean_t log(pi/pi_old))``; a whole response is dropped when ``s_i`` left
    ``[1 - low, 1 + high]`` in the direction its advantage pushes. With the ``sequence``
    reference this is verl's ``gspo`` loss. Shapes: [N, T].
    """
    log_s = torch.clamp(
        sequence_log_ratio(logprobs, old_logprobs, mask), max=SEQUENCE_LOG_RATIO_MAX
    )
    return clipped_objective(surrogate, torch.exp(log_s).expand_as(surrogate), advantages, clip)
