"""The unit of data every layer passes around: one question with its answer and demonstration."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Message = dict[
    str, str
]  # one chat message: {"role": "system" | "user" | "assistant", "content": ...}


@dataclass
class Question:
    """A question, its ground-truth answer and (optionally) a demonstration.

    Attributes:
        id: A stable identifier (the dataset's own id or index, else ``"<source>-<position>"``).
        prompt: Plain text, or chat messages ``[{"role", "content"}]`` (the verl / LUFFY schema).
        answer: The ground truth the verifier compares with; it may itself be ``\\boxed{...}``.
        demonstration: The assistant's worked solution (an offline trace, e.g. DeepSeek-R1's in
            the paper's OpenR1 data), used by the SFT and off-policy terms; None when absent.
        source: ``data_source`` or the benchmark's name.
        meta: Everything else: the row's other fields, and marks left by filters
            (``"truncated"``, ``"demonstration_dropped"``, ...).
    """

    id: str
    prompt: str | list[Message]
    answer: str
    demonstration: str | None = None
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


def question_text(prompt: str | list[Message]) -> str:
    """The question as plain text: the prompt itself, or its user turns joined by blank lines.

    System and assistant messages are left out, so a chat-style dataset can be fed to a base
    model through a plain template (the paper's LLaMA-3.1-8B format).
    """
    if isinstance(prompt, str):
        return prompt
    return "\n\n".join(m["content"] for m in prompt if m.get("role") == "user")
