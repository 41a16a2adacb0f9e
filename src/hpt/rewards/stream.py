"""Scoring that overlaps generation: rollouts are scored as they finish, in a background thread.

The rollout engine hands finished rollouts to :meth:`StreamingScorer.submit` while it is still
decoding the others (rows that stop early leave the batch together; a batch's rest when it ends).
Each submission is scored by :func:`hpt.rewards.score` in one background thread, whose work is
mostly waiting on the verifier processes, so the decode loop keeps running meanwhile.
:meth:`StreamingScorer.result` then waits only for what is still being scored, and scores here
whatever was never submitted (an engine that reports nothing scores everything at the end).

Scores are those of one :func:`~hpt.rewards.score` call over all rollouts: each item is judged on
its own, so how the rollouts were split into submissions does not change them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

from hpt.rewards.registry import DEFAULT_TIMEOUT, resolve_reward, score
from hpt.rewards.result import ScoreResult


class StreamingScorer:
    """Score ``len(answers)`` responses, submitted in any order and in pieces, in the background.

    Args:
        answers: the ground truth of each response, by its index.
        reward: a reward name or ``module:function`` path, as :func:`hpt.rewards.score` takes;
            resolved now, so an unknown one fails before any generation.
        timeout: seconds per item (as :func:`~hpt.rewards.score`).
        workers: verifier processes (as :func:`~hpt.rewards.score`).

    Example:
        >>> scorer = StreamingScorer(answers, "math")
        >>> rollouts = scorer.generate(engine, prompts, n, sampling)  # scored meanwhile
        >>> result = scorer.result([r.text for r in rollouts])
    """

    def __init__(
        self,
        answers: Sequence[str],
        reward: str = "math",
        *,
        timeout: float = DEFAULT_TIMEOUT,
        workers: int | None = None,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"score: timeout must be > 0 seconds, got {timeout}")
        resolve_reward(reward)
        self.answers = [str(a) for a in answers]
        self.reward = reward
        self.timeout = timeout
        self.workers = workers
        self.submitted = [False] * len(self.answers)
        self.busy_s = 0.0  # seconds the background thread spent scoring
        self._pieces: list[tuple[list[int], Future[ScoreResult]]] = []
        self._executor: ThreadPoolExecutor | None = None

    def generate(self, engine: Any, prompts: list[list[int]], n: int, sampling: Any) -> list[Any]:
        """``engine.generate(prompts, n, sampling)``, its rollouts handed to :meth:`submit` as
        they finish where the engine reports them (:func:`hpt.rollout.streams_finished`).
        The background thread is stopped if generation fails."""
        from hpt.rollout.base import streams_finished

        streaming = {"on_finished": self.submit} if streams_finished(engine) else {}
        try:
            return engine.generate(prompts, n, sampling, **streaming)
        except BaseException:
            self.close()
            raise

    def submit(self, finished: Sequence[tuple[int, Any]]) -> None:
        """Start scoring ``(index, rollout)`` pairs (anything with a ``text``); returns at once."""
        indices, texts = [], []
        for index, rollout in finished:
            if not 0 <= index < len(self.answers):
                raise IndexError(f"StreamingScorer: response {index} of {len(self.answers)}")
            if self.submitted[index]:
                continue  # a response is scored once
            self.submitted[index] = True
            indices.append(index)
            texts.append(str(rollout.text))
        if not indices:
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hpt-score")
        answers = [self.answers[i] for i in indices]
        self._pieces.append((indices, self._executor.submit(self._score, texts, answers)))

    def _score(self, texts: list[str], answers: list[str]) -> ScoreResult:
        started = time.perf_counter()
        try:
            return score(texts, answers, self.reward, timeout=self.timeout, workers=self.workers)
        finally:
            self.busy_s += time.perf_counter() - started

    def result(self, texts: Sequence[str]) -> ScoreResult:
        """All scores, in index order: waits for the submitted pieces, scores the rest now.

        Args:
            texts: every response's text, by index (used for those never submitted).
        """
        scores = [0.0] * len(self.answers)
        total = ScoreResult(scores=scores)
        try:
            if len(texts) != len(self.answers):
                raise ValueError(f"score: {len(texts)} responses but {len(self.answers)} answers")
            missing = [i for i, sent in enumerate(self.submitted) if not sent]
            if missing:
                self.submit([(i, SimpleNamespace(text=texts[i])) for i in missing])
            for indices, future in self._pieces:
                piece = future.result()
                for index, value in zip(indices, piece.scores):
                    scores[index] = value
                total.timeouts += piece.timeouts
                total.errors += piece.errors
                total.unscored += piece.unscored
                total.checked += piece.checked
                total.error_lines += piece.error_lines
        finally:
            self.close()
        return total

    def close(self) -> None:
        """Stop the background thread (after the piece it is scoring)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
