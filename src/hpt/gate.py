"""HPT's performance feedback: which loss each question trains with this step (arXiv 2509.04419).

For each question, ``P = correct / n`` is the fraction of its ``n`` rollouts the verifier
accepted. The algorithm's ``routes`` names a gate from :data:`GATES`:

- ``rl`` / ``sft`` / ``off_policy``: a fixed route for every question (algorithms without a gate).
- ``switch`` (the released HPT recipe): ``sft`` iff ``P <= gate_threshold``, else ``rl``. An SFT
  question trains on its demonstration only (its rollouts are dropped); an RL question trains on
  its rollouts only. alpha and beta are 0/1: they never mix.
- ``three_band``: ``sft`` if ``P <= gate_threshold``, ``off_policy`` if ``P <= gate_upper``
  (rollouts + the demonstration in one group, LUFFY-style), else ``rl``.
- ``soft``: coefficients ``(alpha_rl, beta_sft)`` from ``soft_gate``, a table of rows
  ``(P_max, alpha, beta)`` (the first row with ``P <= P_max`` applies; ascending ``P_max``,
  the last one covers P = 1) or a callable ``P -> (alpha, beta)``. A question keeps its rollouts
  when ``alpha > 0`` (kind ``rollout``, row weight alpha) and its demonstration when ``beta > 0``
  (kind ``sft``, row weight beta): pass these as ``unified_loss(row_weights=...)``.
  :func:`route` reports the larger side (``"sft"`` if beta > alpha, else ``"rl"``), for logging
  and for callers that want one label; :func:`assignments` says exactly which rows to build.

Route labels: ``"rl"`` (rollouts), ``"sft"`` (the demonstration with the SFT term),
``"off_policy"`` (rollouts and the demonstration, grouped). This module never reads an
algorithm's name, only its fields (``routes``, ``gate_threshold``, ``gate_upper``, ``soft_gate``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from hpt.errors import ConfigError
from hpt.estimator import Registry

TOLERANCE = 1e-9  # P <= threshold compares fractions like 2/8 with 0.25 robustly

GateFn = Callable[[Any, Tensor], tuple[list[str], Tensor, Tensor]]
GATES: Registry[GateFn] = Registry("gate (routes)")
register_gate = GATES.register
FIXED_ROUTES = ("rl", "sft", "off_policy")  # gates that ignore P


class Assignment(NamedTuple):
    """What one question trains on this step.

    Attributes:
        route: "rl" | "sft" | "off_policy" (soft gate: the larger side).
        rollout_weight: alpha, the row weight of its rollouts (0: drop them).
        demo_weight: beta, the row weight of its demonstration (0: no demonstration row).
        demo_kind: the demonstration row's sample kind ("sft" | "off_policy"), None without one.
    """

    route: str
    rollout_weight: float
    demo_weight: float
    demo_kind: str | None


def _fixed(route_name: str, alpha: float, beta: float) -> GateFn:
    def gate(algorithm: Any, fraction: Tensor) -> tuple[list[str], Tensor, Tensor]:
        q = fraction.shape[0]
        return [route_name] * q, torch.full((q,), alpha), torch.full((q,), beta)

    gate.__doc__ = f"Every question routes to {route_name!r} (alpha={alpha}, beta={beta})."
    return gate


register_gate("rl")(_fixed("rl", 1.0, 0.0))
register_gate("sft")(_fixed("sft", 0.0, 1.0))
register_gate("off_policy")(_fixed("off_policy", 1.0, 1.0))


@register_gate("switch")
def switch(algorithm: Any, fraction: Tensor) -> tuple[list[str], Tensor, Tensor]:
    """HPT's hard switch: ``sft`` iff ``P <= gate_threshold`` else ``rl``. fraction [Q] -> [Q]."""
    to_sft = fraction <= algorithm.gate_threshold + TOLERANCE
    routes = ["sft" if flag else "rl" for flag in to_sft.tolist()]
    return routes, (~to_sft).float(), to_sft.float()


@register_gate("three_band")
def three_band(algorithm: Any, fraction: Tensor) -> tuple[list[str], Tensor, Tensor]:
    """``sft`` if ``P <= gate_threshold``, ``off_policy`` if ``P <= gate_upper``, else ``rl``."""
    to_sft = fraction <= algorithm.gate_threshold + TOLERANCE
    middle = ~to_sft & (fraction <= algorithm.gate_upper + TOLERANCE)
    routes = [
        "sft" if s else "off_policy" if m else "rl"
        for s, m in zip(to_sft.tolist(), middle.tolist())
    ]
    return routes, (~to_sft).float(), (to_sft | middle).float()


def soft_coefficients(soft_gate: Any, p: float) -> tuple[float, float]:
    """``(alpha_rl, beta_sft)`` at fraction correct ``p`` from a table or a callable."""
    if callable(soft_gate):
        alpha, beta = soft_gate(p)
        return float(alpha), float(beta)
    for p_max, alpha, beta in soft_gate:
        if p <= p_max + TOLERANCE:
            return float(alpha), float(beta)
    _, alpha, beta = soft_gate[-1]
    return float(alpha), float(beta)


@register_gate("soft")
def soft(algorithm: Any, fraction: Tensor) -> tuple[list[str], Tensor, Tensor]:
    """Per-question ``(alpha, beta)`` from ``soft_gate``; route = the larger side (ties: ``rl``)."""
    pairs = [soft_coefficients(algorithm.soft_gate, p) for p in fraction.tolist()]
    alpha = torch.tensor([a for a, _ in pairs], dtype=torch.float32)
    beta = torch.tensor([b for _, b in pairs], dtype=torch.float32)
    routes = ["sft" if b > a else "rl" for a, b in pairs]
    return routes, alpha, beta


def fraction_correct(algorithm: Any, correct: Tensor | Sequence[int], n: int) -> Tensor:
    """``P = correct / n`` per question, [Q] float64; ConfigError on counts outside ``0..n``."""
    counts = torch.as_tensor(correct).reshape(-1).to(torch.float64)
    if algorithm.routes in FIXED_ROUTES:
        return torch.zeros_like(counts) if n < 1 else counts / n
    if n < 1:
        raise ConfigError(
            f"gate {algorithm.routes!r}: n (rollouts per question) must be >= 1, got {n}"
        )
    if counts.numel() and (float(counts.min()) < 0 or float(counts.max()) > n):
        raise ConfigError(f"gate {algorithm.routes!r}: correct counts must lie in 0..{n}")
    return counts / n


def _apply(
    algorithm: Any, correct: Tensor | Sequence[int], n: int
) -> tuple[list[str], Tensor, Tensor]:
    return GATES.get(algorithm.routes)(algorithm, fraction_correct(algorithm, correct, n))


def route(algorithm: Any, correct: Tensor | Sequence[int], n: int) -> list[str]:
    """Each question's route, ``"rl" | "sft" | "off_policy"``.

    Args:
        algorithm: an Algorithm (its ``routes`` names the gate).
        correct: [Q] how many of each question's ``n`` rollouts were right.
        n: rollouts per question.
    """
    return _apply(algorithm, correct, n)[0]


def route_weights(algorithm: Any, correct: Tensor | Sequence[int], n: int) -> tuple[Tensor, Tensor]:
    """``(alpha_rl [Q], beta_sft [Q])`` float32: weights of a question's rollouts and demonstration.

    1/0 for hard gates (``off_policy``: both 1); the table's values for the soft gate.
    """
    _, alpha, beta = _apply(algorithm, correct, n)
    return alpha, beta


def assignments(algorithm: Any, correct: Tensor | Sequence[int], n: int) -> list[Assignment]:
    """Per question: its route, which rows to build, their kinds and row weights (for the trainer)."""
    routes, alpha, beta = _apply(algorithm, correct, n)
    plan = []
    for name, a, b in zip(routes, alpha.tolist(), beta.tolist()):
        demo_kind = None if b <= 0 else ("off_policy" if name == "off_policy" else "sft")
        plan.append(Assignment(name, a, b, demo_kind))
    return plan


__all__ = ["GATES", "Assignment", "assignments", "route", "route_weights", "soft_coefficients"]
