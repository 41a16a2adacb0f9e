"""The reference-policy denominator ``1/pi_ref`` of the UPGE (arXiv 2509.04419, section 3).

Each reference turns the (possibly shaped) log-likelihood ``log g(pi_theta)`` of every token into a
differentiable *surrogate* ``rho`` whose derivative is the UPGE factor

    d rho / d theta = (1 / pi_ref) * grad g(pi_theta)        (g = identity, or LUFFY's f)

and reports the detached importance ratio ``pi_theta / pi_ref`` that stabilisation masks compare
with their clip range. Signature of every reference::

    fn(log_likelihood[N,T], logprobs[N,T], old_logprobs[N,T], mask[N,T]) -> Reference

``log_likelihood`` is ``log g(pi_theta)`` (``logprobs`` when unshaped), ``logprobs`` the current
token log-probabilities, ``old_logprobs`` those of the sampling policy, ``mask`` 0/1 floats.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from hpt.estimator import Registry

# exp() of a log-ratio beyond this is treated as saturated (as verl's vanilla / cispo losses do):
# the ratio is clamped and its gradient is zero there.
LOG_RATIO_CLAMP = 20.0
# GSPO's token-form sequence ratio is clamped above at exp(10) (as verl's gspo loss does).
SEQUENCE_LOG_RATIO_MAX = 10.0


class Reference(NamedTuple):
    """Output of a reference.

    Attributes:
        surrogate: [N, T] differentiable ``rho`` with ``d rho = (1/pi_ref) d g(pi_theta)``.
        ratio: [N, T] detached ``pi_theta / pi_ref``, what clip masks compare with ``1 +- eps``.
    """

    surrogate: Tensor
    ratio: Tensor


ReferenceFn = Callable[[Tensor, Tensor, Tensor, Tensor], Reference]
REFERENCES: Registry[ReferenceFn] = Registry("reference policy")
register_reference = REFERENCES.register


def get_reference(name: str) -> ReferenceFn:
    """The reference registered as ``name`` (ConfigError listing the valid ones otherwise)."""
    return REFERENCES.get(name)


@register_reference("current", symbol="pi_theta")
def current(
    log_likelihood: Tensor, logprobs: Tensor, old_logprobs: Tensor, mask: Tensor
) -> Reference:
    """``pi_ref = sg(pi_theta)``: ``(1/pi) grad pi = grad log pi`` (SFT, on-policy REINFORCE).

    The surrogate's value is the log-likelihood ``log pi_theta`` (so SFT's loss is the familiar
    NLL) and its derivative w.r.t. ``logprobs`` is ``g'(pi)`` (1 when unshaped)::

        rho = sg(log pi) + exp(log g - sg(log pi)) - sg(exp(log g - sg(log pi)))

    Shapes: all [N, T]. Source: the UPGE table, SFT / REINFORCE rows (arXiv 2509.04419).
    """
    detached = logprobs.detach()
    scaled = torch.exp(log_likelihood - detached)
    surrogate = detached + scaled - scaled.detach()
    return Reference(surrogate, torch.ones_like(detached))


@register_reference("old", needs_old=True, ratio=True, symbol="pi_old")
def old(log_likelihood: Tensor, logprobs: Tensor, old_logprobs: Tensor, mask: Tensor) -> Reference:
    """``pi_ref = pi_theta_old``: the importance ratio ``r = pi_theta / pi_old`` (PPO, GRPO, CISPO).

    ``rho = exp(clamp(log g(pi) - log pi_old, -20, 20))``, ``ratio = exp(clamp(log pi - log pi_old))``.
    Shapes: all [N, T]. Source: PPO (Schulman et al. 2017, arXiv 1707.06347).
    """
    old_logprobs = old_logprobs.detach()
    surrogate = torch.exp(
        torch.clamp(log_likelihood - old_logprobs, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    )
    log_ratio = torch.clamp(logprobs.detach() - old_logprobs, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return Reference(surrogate, torch.exp(log_ratio))


@register_reference("one", symbol="1")
def one(log_likelihood: Tensor, logprobs: Tensor, old_logprobs: Tensor, mask: Tensor) -> Reference:
    """``pi_ref = 1``: the gradient of the probability itself, ``grad g(pi)`` (SRFT, LUFFY demos).

    Used for demonstrations whose behaviour probability is unknown: ``rho = g(pi_theta)``,
    ``ratio = pi_theta``. Shapes: all [N, T]. Source: LUFFY (arXiv 2504.14945), SRFT (2506.19767).
    """
    return Reference(torch.exp(log_likelihood), torch.exp(logprobs.detach()))


def sequence_log_ratio(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor) -> Tensor:
    """GSPO's length-normalised sequence log-ratio ``(1/|tau|) sum_t log(pi/pi_old)``, detached.

    Shapes: logprobs, old_logprobs, mask [N, T] -> [N, 1]. Rows without tokens give 0.
    """
    diff = torch.where(mask > 0, logprobs.detach() - old_logprobs.detach(), 0.0)
    lengths = mask.sum(dim=-1, keepdim=True).clamp_min(1.0)
    return diff.sum(dim=-1, keepdim=True) / lengths


@register_reference(
    "sequence", needs_old=True, ratio=True, symbol="pi_theta (pi_old/pi_theta)^(1/|tau|)"
)
def sequence(
    log_likelihood: Tensor, logprobs: Tensor, old_logprobs: Tensor, mask: Tensor
) -> Reference:
    """GSPO's sequence-level reference ``pi_ref = pi_theta * (pi_old(tau)/pi_theta(tau))^(1/|tau|)``.

    Token form (GSPO-token, arXiv 2507.18071 eq. 10): ``s_i = exp(mean_t log(pi/pi_old))`` and

        rho_t = exp(sg(log s_i) + log g(pi_t) - sg(log pi_t)),   d rho_t = s_i * grad g(pi_t) / pi_t

    clamped above at ``exp(10)`` as verl does. ``ratio = s_i`` on every token of the row.
    Shapes: all [N, T].
    """
    log_s = sequence_log_ratio(logprobs, old_logprobs, mask)
    surrogate = torch.exp(
        torch.clamp(log_s + log_likelihood - logprobs.detach(), max=SEQUENCE_LOG_RATIO_MAX)
    )
    ratio = torch.exp(torch.clamp(log_s, max=SEQUENCE_LOG_RATIO_MAX)).expand_as(logprobs)
    return Reference(surrogate, ratio)
