"""The rollout interface: sampling settings, one generated response, and the engine protocol.

A rollout engine turns tokenised prompts into ``n`` sampled responses each. The trainer and the
evaluator depend only on :class:`RolloutEngine`, so the Hugging Face engine (the default) and a
vLLM engine are interchangeable.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from hpt.errors import ConfigError

FINISH_REASONS = ("stop", "length")


@dataclass
class SamplingParams:
    """How to sample responses.

    Attributes:
        temperature: softmax temperature; 0 means greedy decoding.
        top_p: nucleus sampling mass (1.0: off).
        top_k: keep the k most likely tokens (0: off).
        max_new_tokens: the most response tokens, EOS included.
        seed: the sampling seed; the same seed and prompts give the same rollouts, whatever the
            global RNG state. None: draw from the global RNG.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ConfigError(f"sampling temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"sampling top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"sampling top_k must be >= 0, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"sampling max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def greedy(self) -> bool:
        """Whether decoding is greedy (temperature 0)."""
        return self.temperature == 0


@dataclass
class Rollout:
    """One generated response to one prompt.

    Attributes:
        prompt_index: index of its prompt in the list given to ``generate``.
        prompt_ids: the prompt's token ids (unpadded).
        response_ids: the generated token ids; ends with the EOS (or stop) token when
            ``finish_reason == "stop"``, and nothing follows it.
        text: the decoded response, special tokens skipped.
        finish_reason: ``"stop"`` (an EOS / stop token was generated) or ``"length"``
            (``max_new_tokens`` reached).
        logprobs: log-probability of each response token under the distribution it was sampled
            from (after temperature, top-k and top-p; the model's own distribution when greedy),
            one per response token, or None where the engine has none.
    """

    prompt_index: int
    prompt_ids: list[int]
    response_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[float] | None = None


@runtime_checkable
class RolloutEngine(Protocol):
    """Anything that samples ``n`` responses for each tokenised prompt."""

    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams) -> list[Rollout]:
        """Sample ``n`` responses per prompt.

        Returns:
            ``len(prompts) * n`` rollouts, prompt-major: those of prompt ``i`` are
            ``[i * n, (i + 1) * n)``.
        """
        ...


def streams_finished(engine: Any) -> bool:
    """Whether ``engine.generate`` takes ``on_finished`` and reports rollouts as they finish
    (:meth:`hpt.rollout.hf.HFEngine.generate`), so that scoring can overlap generation."""
    try:
        parameters = inspect.signature(engine.generate).parameters
    except (AttributeError, TypeError, ValueError):
        return False
    return "on_finished" in parameters
