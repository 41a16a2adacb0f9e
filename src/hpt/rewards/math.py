"""The ``math`` verifier: the last boxed answer of a response against the ground truth.

Two stages. :func:`decide` runs in the calling process and settles what string normalisation
can (no box, equal normalised strings, two plain numbers, two plain-words answers); everything
else is handed to :func:`verify_latex`, which runs math-verify (Hugging Face, "Math-Verify",
https://github.com/huggingface/Math-Verify) inside a worker of ``hpt.rewards.pool`` under a
timeout. math-verify is imported only there, so ``import hpt.rewards`` stays light.
"""

from __future__ import annotations

from hpt.rewards.extract import extract_boxed
from hpt.rewards.normalize import (
    as_number,
    as_text,
    integers_equal,
    is_malformed,
    normalize_answer,
    numbers_differ,
)
from hpt.rewards.result import Pending

VERIFY_FUNCTION = "hpt.rewards.math:verify_latex"
"""Import path of the worker-side check (``module:function``)."""


MAX_CHECKED_CHARS = 5000
"""A normalised prediction longer than this, and not equal to the ground truth as a string,
scores 0.0 without a symbolic check (math-verify would spend its whole timeout on it)."""

RECURSION_LIMIT = 6000
"""Python recursion limit in worker processes (a crash from deeper recursion costs one item)."""


def gold_answer(answer: str) -> str:
    """The ground truth without its box (``\\boxed{5}`` and ``5`` are the same truth)."""
    boxed = extract_boxed(answer)
    return boxed if boxed is not None else answer


def decide(response: str, answer: str) -> float | Pending:
    """Score what string normalisation can settle; return :class:`Pending` for the rest.

    Args:
        response: the model's full response; its last ``\\boxed{...}`` is the prediction.
        answer: the ground truth (boxed or not).

    Returns:
        1.0 or 0.0 when settled here, else ``Pending((prediction, gold))``: the normalised
        pair for :func:`verify_latex`.
    """
    boxed = extract_boxed(response)
    if boxed is None:
        return 0.0
    prediction = normalize_answer(boxed)
    gold = normalize_answer(gold_answer(answer))
    if not prediction or not gold:
        return 0.0
    if prediction == gold:
        return 1.0
    if len(prediction) > MAX_CHECKED_CHARS or is_malformed(prediction):
        return 0.0
    same_integer = integers_equal(prediction, gold)
    if same_integer is not None:
        return float(same_integer)
    numbers = as_number(prediction), as_number(gold)
    if numbers[0] is not None and numbers[1] is not None:
        if numbers[0] == numbers[1]:
            return 1.0
        if numbers_differ(numbers[0], numbers[1]):
            return 0.0
    words = as_text(prediction), as_text(gold)
    if words[0] is not None and words[1] is not None:
        return float(words[0] == words[1])
    return Pending((prediction, gold))


def _latex(answer: str) -> str:
    return f"${answer}$"


def verify_latex(prediction: str, gold: str) -> float:
    """math-verify's verdict on two normalised answers (run in a worker process).

    Both are wrapped in ``$...$`` so that math-verify reads them as LaTeX. Its own signal-based
    timeouts are disabled (``parsing_timeout=None``, ``timeout_seconds=None``): they fail outside
    the main thread, and the pool enforces the timeout by killing the worker instead.

    Args:
        prediction: normalised predicted answer.
        gold: normalised ground truth.

    Returns:
        1.0 when math-verify finds them equivalent, else 0.0.
    """
    from math_verify import LatexExtractionConfig, parse, verify

    # LaTeX extraction only: the plain-expression fallback would read "1+1+...+1", when too deep
    # for the LaTeX parser, as its first number
    config = [LatexExtractionConfig()]
    gold_parsed = parse(_latex(gold), config, parsing_timeout=None)
    prediction_parsed = parse(_latex(prediction), config, parsing_timeout=None)
    if not gold_parsed or not prediction_parsed:
        return 0.0
    return float(verify(gold_parsed, prediction_parsed, timeout_seconds=None))


WARM_UP_PAIRS = (
    ("\\frac{1}{2}", "0.5"),
    ("x(x+1)", "x^{2}+x"),
    ("[1,2)", "[1,2]"),
    ("\\{1,2\\}", "\\{2,1\\}"),
    ("\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", "\\begin{bmatrix}1&2\\\\3&4\\end{bmatrix}"),
    ("\\sin x+\\log_{2}8", "\\sin(x)+3"),
    ("\\sqrt{8}", "2\\sqrt{2}"),
    ("x\\geq3", "x>3"),
    ("y=2x+1", "2x+1"),
)
"""Checks a worker runs before it takes work: sympy loads parts of itself on first use (up to
0.6 s for a first polynomial), which would otherwise count against a user's first items."""


def warm_up() -> None:
    """Import math-verify and exercise its parsers and sympy (once, when a worker starts)."""
    import logging
    import sys

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    # the LaTeX parser recurses once per operator: "1+1+...+1" with 1,000 terms needs ~3,000
    sys.setrecursionlimit(max(sys.getrecursionlimit(), RECURSION_LIMIT))
    for prediction, gold in WARM_UP_PAIRS:
        verify_latex(prediction, gold)
