"""Rollout engines: sample responses to tokenised prompts behind one interface.

:class:`HFEngine` (Hugging Face ``generate``) is the default; any object with the
:class:`RolloutEngine` ``generate`` method can replace it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hpt.rollout.base import Rollout, RolloutEngine, SamplingParams

__all__ = ["HFEngine", "Rollout", "RolloutEngine", "SamplingParams"]


def __getattr__(name: str) -> Any:
    if name == "HFEngine":  # transformers loads only when the engine is asked for
        from hpt.rollout.hf import HFEngine

        return HFEngine
    raise AttributeError(f"module 'hpt.rollout' has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    from hpt.rollout.hf import HFEngine
