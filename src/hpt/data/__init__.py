"""Data: questions, their loaders and prompt building (light: no heavy import at module level).

``load_questions`` reads JSON / JSONL / parquet files, folders, benchmark names and Hugging Face
dataset ids into :class:`Question` objects; :class:`PromptBuilder` turns them into prompt and
demonstration token ids; :func:`filter_demonstrations` handles over-long demonstrations.
"""

from __future__ import annotations

from hpt.data.loaders import DEFAULT_PATHS, benchmark_dir, load_questions
from hpt.data.prompts import (
    BOXED_INSTRUCTION,
    OVERLONG_POLICIES,
    PLAIN_TEMPLATES,
    PromptBuilder,
    filter_demonstrations,
)
from hpt.data.question import Question, question_text

__all__ = [
    "BOXED_INSTRUCTION",
    "DEFAULT_PATHS",
    "OVERLONG_POLICIES",
    "PLAIN_TEMPLATES",
    "PromptBuilder",
    "Question",
    "benchmark_dir",
    "filter_demonstrations",
    "load_questions",
    "question_text",
]
