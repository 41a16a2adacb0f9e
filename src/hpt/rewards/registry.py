"""The reward registry: names to verifiers, and :func:`score`, which never raises or hangs.

Two kinds of verifier:

- :class:`ItemVerifier` (``math``, ``choice``, ``exact``): a cheap in-process ``decide(response,
  answer)`` settles most items; the rest go one item per task to the process pool
  (``hpt.rewards.pool``) under the per-item timeout.
- :class:`BatchFunction` (user functions: ``"module:function"`` or ``@register_reward``): called on
  chunks of the batch, ``(responses, answers) -> list[float | None]``, in the process pool; a
  chunk of k items may take ``k * timeout`` seconds.

An item that times out, crashes or cannot be scored scores 0.0 and is counted, in the returned
:class:`~hpt.rewards.result.ScoreResult` and in the process-wide :func:`stats`.
"""

from __future__ import annotations

import logging
import math
import pkgutil
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from hpt.errors import RewardError
from hpt.rewards import choice as choice_verifier
from hpt.rewards import math as math_verifier
from hpt.rewards.extract import extract_boxed
from hpt.rewards.normalize import normalize_answer
from hpt.rewards.pool import Outcome, Task, get_pool, run_in_thread
from hpt.rewards.result import Pending, ScoreResult

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 5.0
"""Seconds one item's check may take before it scores 0.0 and counts as a timeout."""

DEFAULT_CHUNK_SIZE = 8
"""Items per call of a user's batch function (each call runs in one worker)."""

UserFunction = Callable[[list[str], list[str]], Sequence[float | None]]


class Reward(Protocol):
    """A registered verifier."""

    name: str

    def score(
        self, responses: list[str], answers: list[str], *, timeout: float, workers: int | None
    ) -> ScoreResult: ...


def _tally(outcomes: Sequence[Outcome], scores: list[float | None]) -> ScoreResult:
    """Fold worker outcomes (already applied to ``scores``) into counted totals."""
    result = ScoreResult(scores=[0.0 if s is None else s for s in scores])
    result.timeouts = sum(o.status == "timeout" for o in outcomes)
    result.errors = sum(o.status == "error" for o in outcomes)
    result.error_lines = [str(o.value) for o in outcomes if o.status == "error"]
    return result


@dataclass(frozen=True)
class ItemVerifier:
    """A verifier that judges one (response, answer) pair at a time.

    Attributes:
        name: registry name.
        decide: in-process judgement: a score, None (cannot score), or
            :class:`~hpt.rewards.result.Pending` for ``check``.
        check: import path of the worker function that settles a ``Pending`` (returns a float).
        description: one line for listings.
    """

    name: str
    decide: Callable[[str, str], float | None | Pending]
    check: str | None = None
    description: str = ""

    def score(
        self, responses: list[str], answers: list[str], *, timeout: float, workers: int | None
    ) -> ScoreResult:
        """Score a batch: decide in-process, then check the pending items in the pool."""
        scores: list[float | None] = []
        pending: list[tuple[int, Pending]] = []
        unscored = 0
        for index, (response, answer) in enumerate(zip(responses, answers)):
            verdict = self.decide(response, answer)
            if isinstance(verdict, Pending):
                pending.append((index, verdict))
                verdict = 0.0
            elif verdict is None:
                unscored += 1
            scores.append(verdict)
        outcomes: list[Outcome] = []
        if pending and self.check is not None:
            tasks = [Task(self.check, item.args, timeout) for _, item in pending]
            outcomes = get_pool(workers).run(tasks)
            for (index, _), outcome in zip(pending, outcomes):
                if outcome.status == "ok":
                    scores[index] = _as_score(outcome.value) or 0.0
        result = _tally(outcomes, scores)
        result.unscored = unscored
        result.checked = len(pending)
        return result


def _as_score(value: Any) -> float | None:
    """A user's per-item value as a float; None for None and NaN; ValueError for garbage."""
    if value is None:
        return None
    number = float(value)
    return None if math.isnan(number) else number


def _reference(function: Callable[..., Any]) -> str | None:
    """``module:qualname`` when a fresh process can import ``function`` that way, else None."""
    module = getattr(function, "__module__", None)
    qualname = getattr(function, "__qualname__", "")
    if not module or module == "__main__" or "<locals>" in qualname or "<lambda>" in qualname:
        return None
    try:
        target = pkgutil.resolve_name(f"{module}:{qualname}")
    except (ImportError, AttributeError, ValueError):
        return None
    return f"{module}:{qualname}" if target is function else None


def call_batch(
    reference: str, responses: list[str], answers: list[str], sys_path: Sequence[str] = ()
) -> list[float | None]:
    """Worker side of :class:`BatchFunction`: import and call a user function on one chunk.

    ``sys_path`` is the caller's ``sys.path`` (entries added after the worker started count).
    Checks the shape of what the function returns, so that a wrong return value is reported as
    the user's error with its reason.
    """
    for entry in sys_path:
        if entry not in sys.path:
            sys.path.append(entry)
    target = pkgutil.resolve_name(reference)
    return _checked_values(target(list(responses), list(answers)), len(responses), reference)


def _checked_values(values: Any, expected: int, reference: str) -> list[float | None]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"{reference} returned {type(values).__name__}, not a list of floats")
    if len(values) != expected:
        raise ValueError(f"{reference} returned {len(values)} scores for {expected} responses")
    return [_as_score(value) for value in values]


@dataclass(frozen=True)
class BatchFunction:
    """A user's batch reward function ``(responses, answers) -> list[float | None]``.

    Attributes:
        name: registry name (or the ``module:function`` path it was given as).
        function: the function itself.
        reference: ``module:qualname`` a worker process imports it by; None when it cannot
            (defined in ``__main__`` or inside a function): it then runs in a thread of this
            process, where a hang is abandoned, not killed.
        chunk_size: items per call.
    """

    name: str
    function: UserFunction
    reference: str | None
    chunk_size: int = DEFAULT_CHUNK_SIZE

    def score(
        self, responses: list[str], answers: list[str], *, timeout: float, workers: int | None
    ) -> ScoreResult:
        """Score a batch chunk by chunk; a failed chunk scores 0.0 for each of its items."""
        starts = range(0, len(responses), self.chunk_size)
        chunks = [
            (responses[s : s + self.chunk_size], answers[s : s + self.chunk_size]) for s in starts
        ]
        outcomes = self._run(chunks, timeout, workers)
        scores: list[float | None] = []
        item_outcomes: list[Outcome] = []
        unscored = 0
        for (chunk, _), outcome in zip(chunks, outcomes):
            if outcome.status == "ok":
                scores.extend(outcome.value)
                unscored += sum(value is None for value in outcome.value)
            else:
                scores.extend([0.0] * len(chunk))
            item_outcomes.extend([outcome] * len(chunk))
        result = _tally(item_outcomes, scores)
        result.unscored = unscored
        result.checked = len(responses)
        return result

    def _run(
        self, chunks: list[tuple[list[str], list[str]]], timeout: float, workers: int | None
    ) -> list[Outcome]:
        if not chunks:
            return []
        if self.reference is not None:
            tasks = [
                Task(
                    "hpt.rewards.registry:call_batch",
                    (self.reference, r, a, tuple(p for p in sys.path if isinstance(p, str))),
                    timeout * len(r),
                )
                for r, a in chunks
            ]
            return get_pool(workers).run(tasks)
        outcomes = []
        for responses, answers in chunks:
            outcome = run_in_thread(self.function, (responses, answers), timeout * len(responses))
            if outcome.status == "ok":
                try:
                    outcome = Outcome(
                        "ok", _checked_values(outcome.value, len(responses), self.name)
                    )
                except (TypeError, ValueError) as error:
                    outcome = Outcome("error", f"{type(error).__name__}: {error}")
            outcomes.append(outcome)
        return outcomes


def _exact_decide(response: str, answer: str) -> float:
    """1.0 when the last boxed answer (or the whole response) equals the answer, normalised."""
    boxed = extract_boxed(response)
    prediction = normalize_answer(boxed if boxed is not None else response)
    gold = normalize_answer(answer)
    return float(bool(gold) and prediction == gold)


BUILTIN_REWARDS = ("math", "choice", "exact")
_REGISTRY: dict[str, Reward] = {
    "math": ItemVerifier(
        "math",
        math_verifier.decide,
        math_verifier.VERIFY_FUNCTION,
        "last \\boxed{} answer equals the ground truth (normalisation, then math-verify)",
    ),
    "choice": ItemVerifier(
        "choice", choice_verifier.decide, None, "multiple-choice letter A-J (boxed or stated)"
    ),
    "exact": ItemVerifier(
        "exact", _exact_decide, None, "normalised string equality of the boxed answer or response"
    ),
}


def register_reward(
    name: str, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> Callable[[UserFunction], UserFunction]:
    """Decorator: make a batch function available as ``get_reward(name)``.

    The function takes ``(responses, answers)`` (two lists of equal length) and returns one
    float per item, or None for "cannot score" (counted as ``unscored``, scored 0.0). It runs in
    the verifier processes, which import it by its module, so define it at the top level of an
    importable module; a function defined in ``__main__`` runs in a thread instead, where a hang
    is abandoned rather than killed.

    Args:
        name: the registry name (the built-ins ``math``, ``choice``, ``exact`` are reserved).
        chunk_size: items per call; a call may take ``chunk_size * timeout`` seconds.

    Returns:
        The decorator, which returns the function unchanged.
    """
    if name in BUILTIN_REWARDS or ":" in name:
        raise RewardError(f"reward name {name!r} is reserved; choose another name")

    def decorator(function: UserFunction) -> UserFunction:
        _REGISTRY[name] = BatchFunction(name, function, _reference(function), chunk_size)
        return function

    return decorator


def list_rewards() -> list[str]:
    """Registered reward names (``module:function`` paths are accepted too)."""
    return sorted(_REGISTRY)


def _import_function(path: str) -> BatchFunction:
    module_name, _, qualname = path.partition(":")
    if not module_name or not qualname:
        raise RewardError(f"reward {path!r}: expected 'module:function'")
    try:
        target: Any = pkgutil.resolve_name(path)
    except Exception as error:
        line = (str(error).splitlines() or [""])[0]
        raise RewardError(
            f"cannot import reward {path!r}: {type(error).__name__}: {line}"
        ) from error
    if not callable(target):
        raise RewardError(f"reward {path!r} is a {type(target).__name__}, not a function")
    return BatchFunction(path, target, path if _reference(target) is not None else None)


def resolve_reward(name: str) -> Reward:
    """The verifier registered as ``name``, or the function at import path ``module:function``.

    Raises:
        RewardError: an unknown name (the message lists the registered ones) or a path that
            does not import.
    """
    reward = _REGISTRY.get(name)
    if reward is not None:
        return reward
    if ":" in name:
        return _import_function(name)
    raise RewardError(
        f"unknown reward {name!r}; registered: {', '.join(list_rewards())}, or 'module:function'"
    )


_STATS_LOCK = threading.Lock()
_STATS: dict[str, float] = {}


def reset_stats() -> None:
    """Zero the process-wide counters of :func:`stats`."""
    with _STATS_LOCK:
        _STATS.clear()
        _STATS.update(calls=0, items=0, timeouts=0, errors=0, unscored=0, checked=0, seconds=0.0)


reset_stats()


def stats() -> dict[str, float]:
    """Process-wide totals since start (or :func:`reset_stats`) over every scoring call.

    Keys: ``calls``, ``items``, ``timeouts``, ``errors``, ``unscored``, ``checked`` (items that
    needed the process pool) and ``seconds``.
    """
    with _STATS_LOCK:
        return dict(_STATS)


def _record(name: str, result: ScoreResult, seconds: float) -> None:
    with _STATS_LOCK:
        _STATS["calls"] += 1
        _STATS["items"] += len(result.scores)
        _STATS["timeouts"] += result.timeouts
        _STATS["errors"] += result.errors
        _STATS["unscored"] += result.unscored
        _STATS["checked"] += result.checked
        _STATS["seconds"] += seconds
    if result.errors:
        logger.warning(
            "hpt.rewards: reward %r failed on %d of %d items: %s",
            name,
            result.errors,
            len(result.scores),
            result.error_lines[0] if result.error_lines else "",
        )


def score(
    responses: Sequence[str],
    answers: Sequence[str],
    reward: str = "math",
    *,
    timeout: float = DEFAULT_TIMEOUT,
    workers: int | None = None,
) -> ScoreResult:
    """Score responses against their ground truths; never raises for an item, never hangs.

    Args:
        responses: model responses [N].
        answers: ground truths [N] (for ``math``, possibly boxed).
        reward: a registered name (``math``, ``choice``, ``exact``, or ``@register_reward``
            ones) or an import path ``module:function``.
        timeout: seconds per item before it scores 0.0 and counts as a timeout.
        workers: verifier processes (default: the usable CPUs, at most 8).

    Returns:
        The scores [N] and the counts of timeouts, errors and unscored items.

    Raises:
        RewardError: an unknown reward name or an import path that does not import.
        ValueError: ``responses`` and ``answers`` differ in length, or ``timeout`` <= 0.
    """
    if len(responses) != len(answers):
        raise ValueError(f"score: {len(responses)} responses but {len(answers)} answers")
    if timeout <= 0:
        raise ValueError(f"score: timeout must be > 0 seconds, got {timeout}")
    verifier = resolve_reward(reward)
    started = time.perf_counter()
    result = verifier.score(
        [str(r) for r in responses], [str(a) for a in answers], timeout=timeout, workers=workers
    )
    _record(reward, result, time.perf_counter() - started)
    return result


class RewardFunction:
    """``get_reward(name)``: a callable ``(responses, answers) -> list[float]``.

    Attributes:
        name: the reward's name.
        timeout: seconds per item.
        workers: verifier processes (None: default).
        last: the :class:`ScoreResult` of the latest call (its timeout and error counts).
    """

    def __init__(self, name: str, *, timeout: float = DEFAULT_TIMEOUT, workers: int | None = None):
        resolve_reward(name)  # fail now, with the user's name in the message
        self.name = name
        self.timeout = timeout
        self.workers = workers
        self.last: ScoreResult | None = None

    def __call__(self, responses: Sequence[str], answers: Sequence[str]) -> list[float]:
        self.last = score(responses, answers, self.name, timeout=self.timeout, workers=self.workers)
        return self.last.scores

    def __repr__(self) -> str:
        return f"RewardFunction({self.name!r}, timeout={self.timeout})"


def get_reward(
    name: str, *, timeout: float = DEFAULT_TIMEOUT, workers: int | None = None
) -> RewardFunction:
    """The reward called ``name`` as a function ``(responses, answers) -> list[float]``.

    Args:
        name: ``math``, ``choice``, ``exact``, a name from ``@register_reward``, or an import path
            ``module:function``.
        timeout: seconds per item (see :func:`score`).
        workers: verifier processes (default: the usable CPUs, at most 8).

    Raises:
        RewardError: unknown name (lists the registered ones) or import failure.
    """
    return RewardFunction(name, timeout=timeout, workers=workers)
