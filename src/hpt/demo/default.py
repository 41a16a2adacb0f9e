"""The embedded default: what ``make run`` / ``hpt train`` without a config trains.

A config whose ``model.path`` is null gets the demo's base model: the tiny Qwen2 of
:mod:`hpt.demo.tiny`, pre-trained with SFT on the easy part of the arithmetic task
(:mod:`hpt.demo.task`) so that it solves some but not all training questions. A config whose
``data.train`` is null gets the task's training split, and with no ``eval.sets`` its held-out
``test`` split in two parts: ``id_easy`` (1-2 digits) and ``id_hard`` (3 digits). All of it is built
once and cached under ``$HPT_CACHE`` (default ``~/.cache/hpt``), keyed by the settings that
shape it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from hpt.train.config import TrainConfig, load_config

# The demo run's settings, as `--set` overrides of the defaults; configs/demo.yaml holds the same.
DEMO_SETTINGS: dict[str, Any] = {
    "name": "default",
    "overwrite": True,  # `make run` twice replaces the previous embedded run
    "algorithm": "hpt",
    "max_steps": 60,
    "save_every": 20,
    "data.questions_per_step": 16,
    "data.max_response_tokens": 64,
    "data.max_prompt_tokens": 96,
    "rollout.n": 8,
    "rollout.temperature": 1.0,
    "rollout.batch_size": 128,
    # a fresh AdamW at 1e-4 knocks this tiny base off its optimum (RL and SFT alike); 3e-5 learns
    "optim.lr": 3e-5,
    # the released recipe's RL normaliser: token sums / the response limit (8192 there, 64 here)
    "algo": "{norm_length: 64}",
    "optim.micro_batch_size": 64,
    "optim.warmup_steps": 0,
    # sampled accuracy (avg@8 at the rollout temperature): greedy decoding hides RL's gains
    "eval.k": 8,
    "eval.temperature": 1.0,
    "eval.top_p": 1.0,
    "eval.limit": 100,
}

EASY_QUESTIONS = 8000  # the pre-training split: 400 steps of 32 see each question about 1.6 times


def split_sizes(config: TrainConfig) -> dict[str, int]:
    """How many questions each split of the task gets (``demo.train_questions``, ...)."""
    held_out = config.demo.test_questions
    return {
        "easy": EASY_QUESTIONS,
        "train": config.demo.train_questions,
        "test": held_out,
        "ood": held_out,
        "val": held_out,
    }


def cache_root() -> Path:
    from hpt.demo.tiny import default_cache_dir

    return default_cache_dir()


def _key(config: TrainConfig) -> str:
    demo = dataclasses.asdict(config.demo)
    blob = json.dumps(
        {"demo": demo, "seed": config.seed, "sizes": split_sizes(config), "v": 2}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def demo_dir(config: TrainConfig) -> Path:
    """The cache folder of this config's demo base and data."""
    return cache_root() / f"demo-{config.demo.size}-{_key(config)}"


def write_task_data(directory: Path, seed: int, sizes: dict[str, int]) -> dict[str, Path]:
    """The task's splits as JSONL files (``<split>.jsonl``), written once."""
    from hpt.demo.task import make_questions
    from hpt.utils import atomic_write_text

    paths = {}
    directory.mkdir(parents=True, exist_ok=True)
    for split, size in sizes.items():
        path = directory / f"{split}.jsonl"
        if not path.exists():
            rows = [
                json.dumps(
                    {
                        "id": q.id,
                        "prompt": q.prompt,
                        "answer": q.answer,
                        "demonstration": q.demonstration,
                        "source": q.source,
                        "level": q.meta.get("level"),
                    }
                )
                for q in make_questions(split, size, seed=seed)
            ]
            atomic_write_text(path, "\n".join(rows) + "\n")
        paths[split] = path
    # the held-out test split by difficulty: 1-2 digits (what the base half solves, where RL's
    # sharpening shows) and 3 digits (what it rarely solves, what SFT must teach)
    for name, levels in (("test_easy", (1, 2)), ("test_hard", (3,))):
        path = directory / f"{name}.jsonl"
        if not path.exists():
            lines = paths["test"].read_text().splitlines()
            rows = [line for line in lines if line and json.loads(line).get("level") in levels]
            atomic_write_text(path, "\n".join(rows) + "\n")
        paths[name] = path
    return paths


def pretrain_config(config: TrainConfig, root: Path, data: dict[str, Path]) -> TrainConfig:
    """SFT on the easy split: the short pre-training that gives the base partial competence."""
    overrides = [
        "name=pretrain",
        "algorithm=sft",
        f"max_steps={config.demo.pretrain_steps}",
        "save_every=0",
        f"seed={config.seed}",
        f"output_dir={root / 'runs'}",
        "overwrite=true",
        f"model.path={root / 'init'}",
        f"data.train={data['easy']}",
        "data.questions_per_step=32",
        "data.max_response_tokens=64",
        f"optim.lr={config.demo.pretrain_lr}",
        "optim.betas=[0.9, 0.98]",
        "optim.schedule=cosine",
        "optim.warmup_steps=20",
        "optim.micro_batch_size=32",
        "logging.plots=false",
        f"logging.progress={str(config.logging.progress).lower()}",
    ]
    return load_config(None, overrides)


def ensure_base(config: TrainConfig, *, log: Any = print) -> Path:
    """Build (once) and return the demo's pre-trained base model folder."""
    from hpt.demo.tiny import build_tiny

    root = demo_dir(config)
    base = root / "base"
    data = write_task_data(root / "data", config.seed, split_sizes(config))
    if (base / "config.json").exists():
        return base
    log(f"building the demo base model in {root} (once; cached)")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bars only
    if not (root / "init" / "config.json").exists():
        build_tiny(root / "init", seed=config.seed, size=config.demo.size)
    from hpt.train.recipe import train

    summary = train(pretrain_config(config, root, data))
    final = Path(summary["run_dir"]) / "final"
    tmp = root / "base.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(final, tmp)
    tmp.replace(base)
    return base


def resolve(config: TrainConfig, *, prepare: bool = True, log: Any = print) -> TrainConfig:
    """Fill null ``model.path``, ``data.train`` and empty ``eval.sets`` with the demo's.

    With ``prepare=False`` nothing is built: the paths are where the demo would put them.
    """
    if config.model.path is not None and config.data.train is not None:
        return config
    root = demo_dir(config)
    data = (
        write_task_data(root / "data", config.seed, split_sizes(config))
        if prepare
        else {
            split: root / "data" / f"{split}.jsonl"
            for split in (*split_sizes(config), "test_easy", "test_hard")
        }
    )
    model = config.model
    if model.path is None:
        base = ensure_base(config, log=log) if prepare else root / "base"
        model = dataclasses.replace(model, path=str(base))
    data_config = config.data
    if data_config.train is None:
        data_config = dataclasses.replace(data_config, train=str(data["train"]))
    eval_config = config.eval
    if not eval_config.sets:
        sets = {"id_easy": str(data["test_easy"]), "id_hard": str(data["test_hard"])}
        eval_config = dataclasses.replace(eval_config, sets=sets)
    return dataclasses.replace(config, model=model, data=data_config, eval=eval_config)


def default_config(
    overrides: list[str] | tuple[str, ...] = (), *, prepare: bool = True
) -> TrainConfig:
    """The embedded default run (HPT on the tiny model), with ``--set`` overrides applied."""
    settings = [f"{key}={value}" for key, value in DEMO_SETTINGS.items()]
    config = load_config(None, settings + list(overrides))
    return resolve(config, prepare=prepare)
