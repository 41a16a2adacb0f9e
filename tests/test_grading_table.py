"""The verifiers agree with every verdict of the grading table, each within its timeout."""

from __future__ import annotations

import time
from collections import Counter

import pytest

from grading_cases import CASES, Case
from hpt.rewards import extract_boxed, score

TIMEOUT = 2.0
SLACK = 1.5  # the pool kills a worker `grace` (0.5 s) past the budget; the rest is scheduling


@pytest.fixture(scope="module", autouse=True)
def warm_pool():
    """Start the verifier processes first, so no case pays their start-up."""
    warm = score([r"\boxed{x^2}"], ["x^{3}"], timeout=30.0)
    assert warm.scores == [0.0] and warm.checked == 1


def test_table_is_large_and_balanced():
    verdicts = Counter(case.expected for case in CASES)
    assert len(CASES) >= 150
    assert verdicts[1.0] >= 60 and verdicts[0.0] >= 60
    assert len({case.note for case in CASES}) == len(CASES), "notes name cases uniquely"
    assert sum(case.reward == "choice" for case in CASES) >= 20
    assert max(len(case.response) for case in CASES) >= 100_000
    assert any(extract_boxed(case.response) is None for case in CASES if case.reward == "math")


@pytest.mark.parametrize("case", CASES, ids=[case.note for case in CASES])
def test_case(case: Case):
    started = time.perf_counter()
    result = score([case.response], [case.answer], case.reward, timeout=TIMEOUT)
    seconds = time.perf_counter() - started
    assert result.scores == [case.expected], f"{case.note}: {case.answer!r}"
    assert seconds < TIMEOUT + SLACK, f"{case.note} took {seconds:.2f} s"
    assert result.errors == 0


@pytest.mark.parametrize("reward", ["math", "choice"])
def test_whole_table_in_one_batch(reward: str):
    """The batch path (items spread over the workers) gives the same verdicts as one by one."""
    cases = [case for case in CASES if case.reward == reward]
    started = time.perf_counter()
    result = score([c.response for c in cases], [c.answer for c in cases], reward, timeout=TIMEOUT)
    seconds = time.perf_counter() - started
    wrong = [c.note for c, s in zip(cases, result.scores) if s != c.expected]
    assert wrong == []
    assert result.errors == 0
    assert seconds < 30.0
