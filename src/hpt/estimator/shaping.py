"""Likelihood shaping: ``f(pi)`` in place of ``pi`` in the UPGE's ``grad pi_theta``.

Every shaping maps token log-probabilities to ``log g(pi)``::

    fn(logprobs[N,T], gamma: float) -> log_likelihood[N,T]

which the reference (:mod:`hpt.estimator.reference`) differentiates.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from hpt.estimator import Registry

ShapingFn = Callable[[Tensor, float], Tensor]
SHAPINGS: Registry[ShapingFn] = Registry("shaping")
register_shaping = SHAPINGS.register


def get_shaping(name: str) -> ShapingFn:
    """The shaping registered as ``name`` (ConfigError listing the valid ones otherwise)."""
    return SHAPINGS.get(name)


@register_shaping("none")
def none(logprobs: Tensor, gamma: float) -> Tensor:
    """No shaping: ``g(pi) = pi``, so ``log g = log pi``. Shapes: [N, T] -> [N, T]."""
    return logprobs


@register_shaping("luffy")
def luffy(logprobs: Tensor, gamma: float) -> Tensor:
    """LUFFY's policy shaping ``f(p) = p / (p + gamma)`` (arXiv 2504.14945, eq. 7; gamma = 0.1).

    Returns ``log f(pi) = log pi - log(pi + gamma)``, computed as ``logp - logaddexp(logp,
    log gamma)`` so it stays finite for any log-probability. ``f'(p) = gamma / (p + gamma)^2``
    boosts the gradient of low-probability demonstration tokens. Shapes: [N, T] -> [N, T].
    """
    if gamma <= 0:
        raise ValueError(f"shaping_gamma must be > 0, got {gamma}")
    log_gamma = torch.full_like(logprobs, math.log(gamma))
    return logprobs - torch.logaddexp(logprobs, log_gamma)
