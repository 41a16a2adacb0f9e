"""Accuracy metrics over k samples a question: avg@k, unbiased pass@k and maj@k.

Pure functions of numbers and strings (standard library only). A benchmark's samples are given
per question: ``scores[q][j]`` is the verdict (1.0 correct, 0.0 wrong) of sample ``j`` of
question ``q`` and ``answers[q][j]`` its extracted final answer (``None`` without a box).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from statistics import fmean
from typing import Any

__all__ = [
    "pass_at_k",
    "pass_at_k_mean",
    "pass_ks",
    "avg_at_k",
    "majority_answer",
    "maj_at_k",
    "normalize_answer",
    "summarize",
    "metric_value",
    "kind_averages",
]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k from ``n`` samples of which ``c`` are correct.

    ``1 - C(n - c, k) / C(n, k)``: the chance that a random ``k``-subset of the ``n`` samples
    holds at least one correct one (Chen et al. 2021, "Evaluating Large Language Models Trained
    on Code", arXiv 2107.03374, eq. 1), computed in the numerically stable product form
    ``1 - prod_{i = n - c + 1}^{n} (1 - k / i)``.

    Args:
        n: samples drawn for the question (n >= 1).
        c: correct samples among them (0 <= c <= n).
        k: subset size (1 <= k <= n).

    Returns:
        The estimate in [0, 1].

    Raises:
        ValueError: on counts outside those ranges.
    """
    if not (n >= 1 and 0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 1 <= k <= n and 0 <= c <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def pass_ks(n: int) -> list[int]:
    """The k of a pass@k curve for ``n`` samples: 1, 2, 4, ... up to ``n``, and ``n`` itself."""
    if n < 1:
        return []
    ks = [1 << e for e in range(n.bit_length()) if 1 << e <= n]
    return ks if ks[-1] == n else [*ks, n]


def pass_at_k_mean(scores: Sequence[Sequence[float]], k: int) -> float:
    """Mean unbiased pass@k over questions (a sample counts as correct when its score >= 0.5)."""
    if not scores:
        return 0.0
    return fmean(pass_at_k(len(s), sum(x >= 0.5 for x in s), k) for s in scores)


def avg_at_k(scores: Sequence[Sequence[float]]) -> float:
    """avg@k: the mean score over every sample of every question (the paper's accuracy).

    With the same k for each question this is also the mean of the per-question accuracies.
    """
    flat = [x for s in scores for x in s]
    return fmean(flat) if flat else 0.0


def normalize_answer(answer: str | None) -> str | None:
    """The key under which maj@k counts an extracted answer as a vote.

    Strips whitespace, surrounding ``$`` and a trailing period and collapses inner whitespace,
    so that ``" 3 "``, ``"$3$"`` and ``"3."`` vote together; answers that differ otherwise
    (``\\frac12`` vs ``1/2``) are different votes. ``None`` (no box) stays ``None``.
    """
    if answer is None:
        return None
    text = " ".join(answer.split()).strip().strip("$").strip().rstrip(".").strip()
    return text or None


def majority_answer(answers: Sequence[str | None]) -> int | None:
    """Index of the sample whose answer wins the majority vote, or ``None`` without any answer.

    Samples without an extracted answer do not vote. Ties go to the answer that appears first
    in sample order (deterministic); the returned index is that answer's first sample.
    """
    keys = [normalize_answer(a) for a in answers]
    votes = Counter(key for key in keys if key is not None)
    if not votes:
        return None
    best = max(votes.values())
    return next(i for i, key in enumerate(keys) if key is not None and votes[key] == best)


def maj_at_k(answers: Sequence[Sequence[str | None]], scores: Sequence[Sequence[float]]) -> float:
    """maj@k: the mean over questions of the verdict on the majority-vote answer.

    Args:
        answers: extracted answers, ``answers[q][j]`` for sample j of question q.
        scores: verdicts of the same samples; the majority answer's verdict is that of its
            first sample. A question without any extracted answer scores 0.

    Returns:
        The mean in [0, 1] (0.0 without questions).
    """
    if len(answers) != len(scores):
        raise ValueError(f"maj_at_k: {len(answers)} answer lists but {len(scores)} score lists")
    verdicts = []
    for question_answers, question_scores in zip(answers, scores):
        winner = majority_answer(question_answers)
        verdicts.append(0.0 if winner is None else float(question_scores[winner]))
    return fmean(verdicts) if verdicts else 0.0


def summarize(records: Iterable[Mapping[str, Any]], k: int | None = None) -> dict[str, Any]:
    """The metrics of one benchmark from its per-sample records.

    Args:
        records: dicts with at least ``question_id``, ``sample``, ``verdict``, ``extracted``;
            optional ``boxed`` (whether the response has a ``\\boxed{}``; default: whether an
            answer was extracted), ``response_tokens``, ``finish_reason``, ``timeouts`` (a count). Samples with index
            ``>= k`` are ignored (when ``k`` is given).
        k: samples a question to use (default: all present).

    Returns:
        ``{"questions", "k", "samples", "avg@k", "pass@k": {str(k'): value}, "maj@k",
        "response_tokens", "no_boxed", "truncated", "timeouts"}``; ``k`` is the smallest
        sample count over questions (pass@k is reported up to it).
    """
    by_question: dict[str, dict[int, Mapping[str, Any]]] = {}
    for record in records:
        index = int(record["sample"])
        if k is not None and index >= k:
            continue
        by_question.setdefault(str(record["question_id"]), {})[index] = record
    groups = [[samples[j] for j in sorted(samples)] for samples in by_question.values()]
    scores = [[float(r["verdict"]) for r in group] for group in groups]
    answers = [[r.get("extracted") for r in group] for group in groups]
    flat = [r for group in groups for r in group]
    n_min = min((len(group) for group in groups), default=0)
    tokens = [r["response_tokens"] for r in flat if r.get("response_tokens") is not None]
    return {
        "questions": len(groups),
        "k": n_min,
        "samples": len(flat),
        "avg@k": avg_at_k(scores),
        "pass@k": {str(j): pass_at_k_mean(scores, j) for j in pass_ks(n_min)},
        "maj@k": maj_at_k(answers, scores),
        "response_tokens": fmean(tokens) if tokens else 0.0,
        "no_boxed": fmean(not r.get("boxed", r.get("extracted") is not None) for r in flat)
        if flat
        else 0.0,
        "truncated": fmean(r.get("finish_reason") == "length" for r in flat) if flat else 0.0,
        "timeouts": sum(int(r.get("timeouts") or 0) for r in flat),
    }


def metric_value(summary: Mapping[str, Any], metric: str = "avg@k") -> float | None:
    """One number of a benchmark summary: ``avg@k``, ``maj@k``, ``pass@K`` (an integer K) or
    ``pass@k`` (the largest K measured). ``None`` when the summary lacks it."""
    if metric in ("avg@k", "maj@k"):
        value = summary.get(metric)
        return None if value is None else float(value)
    if not metric.startswith("pass@"):
        raise ValueError(
            f"unknown metric {metric!r}: use avg@k, maj@k, pass@k or pass@K (K an integer)"
        )
    curve = summary.get("pass@k") or {}
    key = metric.removeprefix("pass@")
    if key == "k":
        key = max(curve, key=int, default="")
    value = curve.get(key)
    return None if value is None else float(value)


def kind_averages(
    per_benchmark: Mapping[str, Mapping[str, Any]], metric: str = "avg@k"
) -> dict[str, dict[str, Any]]:
    """The paper's averages: ``id`` over the math sets present, ``ood`` over the multiple-choice sets.

    Args:
        per_benchmark: benchmark name -> summary holding ``kind`` (``id`` / ``ood`` / ``custom``).
        metric: the number to average (see :func:`metric_value`).

    Returns:
        ``{kind: {"value": mean, "benchmarks": [names]}}`` for each of ``id`` / ``ood`` present.
    """
    averages: dict[str, dict[str, Any]] = {}
    for kind in ("id", "ood"):
        values = {
            name: metric_value(s, metric)
            for name, s in per_benchmark.items()
            if s.get("kind") == kind
        }
        values = {name: v for name, v in values.items() if v is not None}
        if values:
            averages[kind] = {"value": fmean(values.values()), "benchmarks": list(values)}
    return averages
