"""The ``--set`` overrides of the short training runs the tests launch (imported by name)."""

from __future__ import annotations

from pathlib import Path


def settings(out: Path, tiny_dir: Path, task_file: Path, **extra: object) -> list[str]:
    """A 2-step run ``t`` under ``out`` of the tiny model on ``task_file``; ``extra`` overrides."""
    values = {
        "name": "t",
        "output_dir": str(out),
        "model.path": str(tiny_dir),
        "data.train": str(task_file),
        "max_steps": 2,
        "save_every": 0,
        "data.questions_per_step": 4,
        "data.max_response_tokens": 48,
        "data.max_prompt_tokens": 128,
        "rollout.n": 4,
        "rollout.max_new_tokens": 12,
        "optim.lr": 1e-3,
        "optim.micro_batch_size": 8,
        "logging.progress": False,
        "logging.plots": False,
        **extra,
    }
    return [f"{key}={value}" for key, value in values.items()]
