"""A run: its folder, stages, evaluation before and after, checkpoints, metrics and summary.

``runs/<name>/`` holds ``config.yaml`` (the resolved config), ``metrics.jsonl`` (a line a step),
``checkpoints/step-<N>/`` and ``summary.json``. Steps are numbered across stages, so a two-stage
run (SFT -> GRPO) has one step axis, one metrics file and one checkpoint series.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from hpt.train import distributed as dist
from hpt.train.config import TrainConfig, save_config


class Run:
    """Owns the run folder and the state shared by stages; ``execute`` runs them in order."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.dir = Path(config.output_dir) / config.name
        self.logger: Any = None
        self.started = time.time()
        self.stage_index = 0
        self.stage_offset = 0  # global step at which the current stage starts
        self.stage_config = config
        self.eval_questions: dict[str, list[Any]] = {}
        self.history: list[dict[str, Any]] = []
        self.resume_state: dict[str, Any] | None = None
        self.model: Any = None
        self.tokenizer: Any = None
        self.first_data: Any = None  # the first stage's data, loaded before the model

    def stage_data(self, config: TrainConfig, tokenizer: Any, algorithm: Any) -> Any:
        """The stage's tokenised training data (the first stage's was loaded up front)."""
        from hpt.train.setup import load_train_data

        if self.stage_index == 0 and self.first_data is not None:
            data, self.first_data = self.first_data, None
            return data
        return load_train_data(config, tokenizer, algorithm, log=self.log)

    # -- lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> Run:
        from hpt.train.logger import RunLogger

        dist.init_from_env()
        if self.config.resume:
            self._find_resume_state()
        elif dist.is_main() and (self.dir / "metrics.jsonl").exists() and not self.config.overwrite:
            from hpt.errors import ConfigError

            raise ConfigError(
                f"run folder {self.dir} already holds a run: set resume=true to continue it, "
                "overwrite=true to replace it, or choose another name"
            )
        if dist.is_main():
            if not self.config.resume and self.config.overwrite:
                self._clear_previous_run()
            self.dir.mkdir(parents=True, exist_ok=True)
            save_config(self.config, self.dir / "config.yaml")
        total = sum(stage.max_steps for stage in self.stages())
        self.logger = RunLogger(
            self.dir,
            self.config,
            tensorboard=self.config.logging.tensorboard and dist.is_main(),
            progress=self.config.logging.progress and dist.is_main(),
            total_steps=total,
            resume_step=self.resume_state["step"] if self.resume_state else 0,
            enabled=dist.is_main(),
        )
        return self

    # what a run writes in its folder; overwrite=true removes exactly these, nothing else
    RUN_OUTPUTS = (
        "metrics.jsonl",
        "summary.json",
        "eval_before.json",
        "config.yaml",
        "checkpoints",
        "final",
        "plots",
        "tensorboard",
    )

    def _clear_previous_run(self) -> None:
        import shutil

        for name in self.RUN_OUTPUTS:
            path = self.dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()

    def __exit__(self, *exc: Any) -> None:
        if self.logger is not None:
            self.logger.close()
        dist.shutdown()

    def stages(self) -> list[TrainConfig]:
        """The configs of the stages, in order (one stage when ``stages`` is empty)."""
        return self.config.resolved_stages()

    def log(self, message: str) -> None:
        if dist.is_main():
            self.logger.message(message) if self.logger else print(message)

    # -- the run --------------------------------------------------------------------------------

    def execute(self, stage_fn: Any) -> dict[str, Any]:
        from hpt.algorithms import get_algorithm
        from hpt.train.setup import load_model_and_tokenizer, load_tokenizer, load_train_data

        stages = self.stages()
        # validate the data before the (slow) model load: a bad file fails in a second
        self.tokenizer = load_tokenizer(self.config.model)
        first = stages[0]
        algorithm = get_algorithm(first.algorithm, **dict(first.algo))
        self.first_data = load_train_data(first, self.tokenizer, algorithm, log=self.log)
        self.eval_questions = self._load_eval_questions()
        self.model, self.tokenizer = load_model_and_tokenizer(self.config.model, self.tokenizer)
        summary: dict[str, Any] = {"name": self.config.name, "stages": []}
        before_file = self.dir / "eval_before.json"
        if self.resume_state and before_file.exists():
            summary["eval_before"] = json.loads(before_file.read_text())
        else:
            summary["eval_before"] = self.evaluate(step=0)
            if dist.is_main():
                from hpt.utils import atomic_write_json

                atomic_write_json(before_file, summary["eval_before"])
        resume_stage = self.resume_state["stage"] if self.resume_state else 0
        offset = 0
        for index, stage in enumerate(stages):
            self.stage_index, self.stage_offset, self.stage_config = index, offset, stage
            if index < resume_stage:
                offset += (
                    stage.max_steps
                )  # done before the interruption; weights come from the checkpoint
                continue
            self.model, self.tokenizer, algorithm = stage_fn(
                stage, self, self.model, self.tokenizer
            )
            summary["stages"].append({"algorithm": algorithm.name, "steps": stage.max_steps})
            offset += stage.max_steps
        summary["eval_after"] = self.evaluate(step=offset, final=True)
        self.save_final()
        summary.update(
            steps=offset,
            seconds=round(time.time() - self.started, 2),
            totals=self._totals(),
            run_dir=str(self.dir),
        )
        if dist.is_main():
            self.logger.write_summary(summary)
            if self.config.logging.plots:
                from hpt.train.plots import plot_run

                plot_run(self.dir)
        return summary

    def begin_stage(self, config: TrainConfig, algorithm: Any, data: Any, start_step: int) -> None:
        self.log(
            f"stage {self.stage_index + 1}: {algorithm.name} on {len(data.questions)} questions "
            f"({data.report.get('with_demonstration', 0)} with demonstrations), "
            f"steps {self.stage_offset + start_step + 1}..{self.stage_offset + config.max_steps}"
        )

    def step_done(
        self,
        local_step: int,
        metrics: dict[str, float],
        policy: Any,
        optimizer: Any,
        scheduler: Any,
        sampler: Any,
    ) -> None:
        """Log a finished step; evaluate and checkpoint when due."""
        step = self.stage_offset + local_step
        metrics = {"step": step, "stage": self.stage_index, **metrics}
        config = self.stage_config
        if config.eval.every and step % config.eval.every == 0 and local_step < config.max_steps:
            metrics.update(self.evaluate(step=step, quick=True, prefix="eval/"))
        self.history.append(metrics)
        self.logger.log(step, metrics)
        last = local_step == config.max_steps
        if config.save_every and (step % config.save_every == 0 or last):
            self.save(policy, optimizer, scheduler, sampler, local_step)

    # -- evaluation -----------------------------------------------------------------------------

    def _load_eval_questions(self) -> dict[str, list[Any]]:
        from hpt.data import load_questions

        sets: dict[str, list[Any]] = {}
        for name, source in (self.config.eval.sets or {}).items():
            sets[name] = load_questions(source, fields=self.config.data.fields or None)[
                : self.config.eval.limit or None
            ]
        return sets

    def evaluate(
        self, step: int, *, final: bool = False, quick: bool = False, prefix: str = ""
    ) -> dict[str, float]:
        """Held-out accuracy (avg@k) of the current model on every eval set."""
        if not self.eval_questions:
            return {}
        from hpt.data import PromptBuilder
        from hpt.eval import evaluate_questions
        from hpt.rollout import SamplingParams

        first = self.stages()[0]  # evaluation settings of the first stage (derived keys filled)
        cfg, data = first.eval, first.data
        builder = PromptBuilder(
            self.tokenizer,
            system_prompt=data.system_prompt,
            instruction=data.instruction,
            template=data.template,
            drop_system=data.drop_system,
        )
        results: dict[str, float] = {}
        was_training = self.model.training
        for name, questions in self.eval_questions.items():
            sampling = SamplingParams(
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                max_new_tokens=cfg.max_new_tokens,
                seed=self.config.seed,
            )
            out = evaluate_questions(
                self.model,
                self.tokenizer,
                questions,
                reward=data.reward,
                k=cfg.k,
                sampling=sampling,
                builder=builder,
                progress=self.config.logging.progress and not quick,
            )
            results[f"{prefix}{name}"] = float(out["avg@k"])
            if final or not quick:
                for key, value in out.items():
                    if key.startswith(("pass@", "maj@")) and isinstance(value, (int, float)):
                        results[f"{prefix}{name}/{key}"] = float(value)
        self.model.train(was_training)
        if results:
            headline = {k[len(prefix) :]: v for k, v in results.items()}
            self.log(
                "eval: " + ", ".join(f"{k} {v:.3f}" for k, v in headline.items() if "/" not in k)
            )
        return results

    # -- checkpoints ----------------------------------------------------------------------------

    def _find_resume_state(self) -> None:
        from hpt.train.checkpoint import latest_checkpoint

        path = latest_checkpoint(self.dir)
        if path is None:
            self.resume_state = None
            return
        state = json.loads((path / "state.json").read_text())
        self.resume_state = {
            "path": path,
            "stage": int(state.get("stage", 0)),
            "step": int(state["step"]),
            "local_step": int(state.get("local_step", state["step"])),
        }

    def restore(self, policy: Any, optimizer: Any, scheduler: Any, sampler: Any) -> int:
        """Load the checkpoint to resume from, if it belongs to this stage; return the local start step."""
        state = self.resume_state
        if not state or state["stage"] != self.stage_index:
            return 0
        from hpt.train.checkpoint import load_checkpoint

        extra = load_checkpoint(
            state["path"], policy.model, optimizer, scheduler, value_head=policy.value_head
        )
        sampler.load_state_dict(extra["sampler"])
        self.log(f"resumed from {state['path']} (step {state['step']})")
        self.resume_state = None
        return int(extra["local_step"])

    def save(
        self, policy: Any, optimizer: Any, scheduler: Any, sampler: Any, local_step: int
    ) -> None:
        from hpt.train.checkpoint import save_checkpoint

        if not dist.is_main():
            return
        step = self.stage_offset + local_step
        save_checkpoint(
            self.dir,
            step,
            policy.model,
            optimizer,
            scheduler,
            extra_state={
                "stage": self.stage_index,
                "local_step": local_step,
                "step": step,
                "sampler": sampler.state_dict(),
            },
            keep=self.config.keep_checkpoints,
            value_head=policy.value_head,
            tokenizer=self.tokenizer,
        )

    def save_final(self) -> None:
        """The final model as a plain Hugging Face folder: ``runs/<name>/final``."""
        if not dist.is_main():
            return
        from hpt.utils import atomic_dir

        with atomic_dir(self.dir / "final") as tmp:
            self.model.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)

    def _totals(self) -> dict[str, float]:
        keys = ("tokens/generated", "tokens/demonstration", "skipped_updates", "updates")
        return {k: float(sum(m.get(k, 0.0) for m in self.history)) for k in keys}
