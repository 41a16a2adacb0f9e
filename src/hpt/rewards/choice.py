"""The ``choice`` verifier: the option letter a response commits to against the true letter."""

from __future__ import annotations

from hpt.rewards.extract import choice_of_answer, extract_choice


def decide(response: str, answer: str) -> float | None:
    """1.0 when the response's last committed letter is the ground truth's letter, else 0.0.

    Args:
        response: the model's full response (see :func:`hpt.rewards.extract_choice`).
        answer: the true letter (``B``, ``(B)``, ``\\boxed{B}``; case-insensitive).

    Returns:
        The score, or None when the ground truth is not a letter A-J (cannot score).
    """
    truth = choice_of_answer(answer)
    if truth is None:
        return None
    return float(extract_choice(response) == truth)
