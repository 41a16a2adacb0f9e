"""Verifiers: score model responses against ground truths.

``get_reward("math")`` compares the last ``\\boxed{...}`` of a response with the ground truth
(string normalisation first, math-verify for the rest); ``get_reward("choice")`` compares
multiple-choice letters; ``get_reward("module:function")`` and ``@register_reward`` plug in user
batch functions. Checks that need more than string normalisation run in a pool of worker
processes with a timeout per item: an item that hangs or crashes scores 0.0 and is counted
(:class:`ScoreResult`, :func:`stats`); scoring never raises for an item and never hangs.

Importing this package loads only the standard library (math-verify loads in the workers).
"""

from __future__ import annotations

from hpt.rewards.extract import extract_all_boxed, extract_boxed, extract_choice
from hpt.rewards.normalize import normalize_answer
from hpt.rewards.pool import shutdown, start_pool
from hpt.rewards.registry import (
    DEFAULT_TIMEOUT,
    RewardFunction,
    get_reward,
    list_rewards,
    register_reward,
    reset_stats,
    score,
    stats,
)
from hpt.rewards.result import ScoreResult
from hpt.rewards.stream import StreamingScorer

__all__ = [
    "DEFAULT_TIMEOUT",
    "RewardFunction",
    "ScoreResult",
    "StreamingScorer",
    "extract_all_boxed",
    "extract_boxed",
    "extract_choice",
    "get_reward",
    "list_rewards",
    "normalize_answer",
    "register_reward",
    "reset_stats",
    "score",
    "shutdown",
    "start_pool",
    "stats",
]
