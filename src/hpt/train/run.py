"""The run folder: ``runs/<name>/``, what a run writes and reads back. It trains nothing.

``config.yaml`` (the resolved config), ``metrics.jsonl`` (a line a step), ``eval_before.json``,
``checkpoints/step-<N>/``, ``final/`` (the trained model), ``summary.json`` and ``plots/``. Steps
are numbered across stages, so a two-stage run (SFT -> GRPO) has one step axis, one metrics file
and one checkpoint series. Only rank 0 writes; every method is safe to call on every rank.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpt.errors import ConfigError
from hpt.train import distributed as dist
from hpt.train.config import TrainConfig, save_config

EVAL_BEFORE = "eval_before.json"


@dataclass(frozen=True)
class ResumePoint:
    """Where an interrupted run continues: its newest checkpoint."""

    path: Path
    stage: int  # the stage the checkpoint belongs to
    step: int  # global step (across stages)
    local_step: int  # step within its stage
    world_size: int | None = None  # the processes that wrote a sharded (FSDP2) checkpoint


class Run:
    """``runs/<name>/`` of ``config``: opened with ``with Run(config, total_steps) as run``.

    Opening checks the folder (an existing run is an error unless ``resume`` or ``overwrite``),
    writes ``config.yaml`` and starts the metrics logger; closing stops the logger.
    """

    # what a run writes in its folder; overwrite=true removes exactly these, nothing else
    OUTPUTS = (
        "metrics.jsonl",
        "summary.json",
        EVAL_BEFORE,
        "config.yaml",
        "checkpoints",
        "final",
        "plots",
        "tensorboard",
    )

    def __init__(self, config: TrainConfig, total_steps: int):
        self.config = config
        self.dir = Path(config.output_dir) / config.name
        self.total_steps = total_steps
        self.resume: ResumePoint | None = None
        self.logger: Any = None

    def __enter__(self) -> Run:
        from hpt.train.logger import RunLogger

        if self.config.resume:
            self.resume = self._resume_point()
        elif dist.is_main() and (self.dir / "metrics.jsonl").exists() and not self.config.overwrite:
            raise ConfigError(
                f"run folder {self.dir} already holds a run: set resume=true to continue it, "
                "overwrite=true to replace it, or choose another name"
            )
        if dist.is_main():
            if not self.config.resume and self.config.overwrite:
                self._clear()
            self.dir.mkdir(parents=True, exist_ok=True)
            save_config(self.config, self.dir / "config.yaml")
        self.logger = RunLogger(
            self.dir,
            self.config,
            tensorboard=self.config.logging.tensorboard and dist.is_main(),
            progress=self.config.logging.progress and dist.is_main(),
            total_steps=self.total_steps,
            resume_step=self.resume.step if self.resume else 0,
            enabled=dist.is_main(),
        )
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.logger is not None:
            self.logger.close()

    def _clear(self) -> None:
        for name in self.OUTPUTS:
            path = self.dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()

    # -- what a run writes as it goes ----------------------------------------------------------

    def log(self, message: str) -> None:
        """A line above the progress bar (rank 0 only)."""
        if dist.is_main():
            self.logger.message(message) if self.logger else print(message)

    def log_step(self, step: int, metrics: dict[str, Any]) -> None:
        """One line of ``metrics.jsonl`` (and TensorBoard, and the progress bar)."""
        self.logger.log(step, metrics)

    def eval_before(self) -> dict[str, float] | None:
        """The evaluation before training, saved by the interrupted run (None: not saved)."""
        path = self.dir / EVAL_BEFORE
        return json.loads(path.read_text()) if self.resume and path.exists() else None

    def save_eval_before(self, results: dict[str, float]) -> None:
        if dist.is_main():
            from hpt.utils import atomic_write_json

            atomic_write_json(self.dir / EVAL_BEFORE, results)

    def finish(self, summary: dict[str, Any]) -> dict[str, Any]:
        """Write ``summary.json`` and the plots; return the summary."""
        summary = {**summary, "run_dir": str(self.dir)}
        if dist.is_main():
            self.logger.write_summary(summary)
            if self.config.logging.plots:
                from hpt.train.plots import plot_run

                plot_run(self.dir)
        return summary

    # -- checkpoints -----------------------------------------------------------------------------

    def _resume_point(self) -> ResumePoint | None:
        from hpt.train.checkpoint import latest_checkpoint, read_state

        path = latest_checkpoint(self.dir)
        if path is None:
            return None
        state = read_state(path)
        step = int(state["step"])
        local = int(state.get("local_step", step))
        world = state.get("world_size") if state.get("sharded") else None
        return ResumePoint(path, int(state.get("stage", 0)), step, local, world)

    def restore(self, stage: int, policy: Any, optimizer: Any, scheduler: Any, sampler: Any) -> int:
        """Load the checkpoint to resume from if it belongs to ``stage``; return its local step."""
        point = self.resume
        if point is None or point.stage != stage:
            return 0
        from hpt.train.checkpoint import load_checkpoint, load_sharded_checkpoint

        if dist.is_sharded(policy):
            extra = load_sharded_checkpoint(point.path, policy, optimizer, scheduler)
        elif point.world_size:
            raise ConfigError(
                f"checkpoint {point.path} was written by {point.world_size} processes with "
                f"distributed.strategy fsdp2: resume it the same way"
            )
        else:
            extra = load_checkpoint(
                point.path, policy.model, optimizer, scheduler, value_head=policy.value_head
            )
        sampler.load_state_dict(extra["sampler"])
        self.log(f"resumed from {point.path} (step {point.step})")
        self.resume = None
        return int(extra["local_step"])

    def save_checkpoint(
        self,
        step: int,
        stage: int,
        local_step: int,
        policy: Any,
        optimizer: Any,
        scheduler: Any,
        sampler: Any,
        tokenizer: Any,
    ) -> None:
        """``checkpoints/step-<step>/``, written atomically (all ranks call it)."""
        from hpt.train.checkpoint import save_checkpoint, save_sharded_checkpoint

        extra = {"stage": stage, "local_step": local_step, "step": step}
        extra["sampler"] = sampler.state_dict()
        keep = self.config.keep_checkpoints
        if dist.is_sharded(policy):
            save_sharded_checkpoint(
                self.dir, step, policy, optimizer, scheduler, extra, keep=keep, tokenizer=tokenizer
            )
        elif dist.is_main():
            save_checkpoint(
                self.dir,
                step,
                policy.model,
                optimizer,
                scheduler,
                extra_state=extra,
                keep=keep,
                value_head=policy.value_head,
                tokenizer=tokenizer,
            )

    def save_final(self, model: Any, tokenizer: Any) -> None:
        """The trained model as a Hugging Face folder, ``final/`` (LoRA: the adapter, and with
        ``lora.merge`` the merged model in ``final/merged``); all ranks call it."""
        if not dist.is_main():
            return
        from hpt.train.checkpoint import save_final

        save_final(self.dir / "final", model, tokenizer, merge=self.config.lora.merge)
