"""The values verifiers exchange: a deferred check and the result of scoring a batch."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Pending:
    """A verdict the calling process could not settle: the worker function decides it.

    Attributes:
        args: positional arguments of the verifier's worker function (picklable).
    """

    args: tuple


@dataclass
class ScoreResult:
    """Scores of a batch, and how many items could not be scored normally.

    Attributes:
        scores: one float per response (0.0 for every item counted below).
        timeouts: items whose check ran past its timeout (its worker was stopped).
        errors: items whose check crashed, or whose user function raised or returned garbage.
        unscored: items the verifier declared it cannot score (a user function's None, a NaN,
            or a ground truth the verifier cannot read).
        checked: items that needed the process pool (not settled by string normalisation).
    """

    scores: list[float]
    timeouts: int = 0
    errors: int = 0
    unscored: int = 0
    checked: int = 0
    error_lines: list[str] = field(default_factory=list, repr=False)

    def metrics(self, prefix: str = "reward_") -> dict[str, float]:
        """Counters as a flat dict for a metrics log (``reward_timeouts``, ...)."""
        return {
            f"{prefix}timeouts": float(self.timeouts),
            f"{prefix}errors": float(self.errors),
            f"{prefix}unscored": float(self.unscored),
            f"{prefix}checked": float(self.checked),
        }
