"""Shared fixtures: one tiny model and tokenizer built offline per test session."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny Qwen2 model and its tokenizer saved as a Hugging Face folder (hpt.demo.tiny)."""
    from hpt.demo.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    """(model, tokenizer) loaded from `tiny_dir`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    return model, tokenizer


@pytest.fixture(scope="session")
def task_file(tmp_path_factory):
    """16 easy arithmetic questions with demonstrations, as JSONL."""
    import json

    from hpt.demo.task import make_questions

    path = tmp_path_factory.mktemp("task") / "train.jsonl"
    rows = [
        {"id": q.id, "prompt": q.prompt, "answer": q.answer, "demonstration": q.demonstration}
        for q in make_questions("easy", 16, seed=3)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path
