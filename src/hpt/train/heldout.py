"""Held-out evaluation during a run: the ``eval.sets`` of the config, scored as avg@k."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hpt.train.config import TrainConfig


class HeldOut:
    """The run's held-out sets, loaded once; :meth:`evaluate` scores a model on all of them.

    Evaluation uses the first stage's settings (``eval``, prompts and reward of ``data``), so every
    evaluation of a multi-stage run is comparable.
    """

    def __init__(self, config: TrainConfig):
        from hpt.data import load_questions

        self.config = config
        self.sets: dict[str, list[Any]] = {}
        for name, source in (config.eval.sets or {}).items():
            questions = load_questions(source, fields=config.data.fields or None)
            self.sets[name] = questions[: config.eval.limit or None]

    def evaluate(
        self,
        model: Any,
        tokenizer: Any,
        *,
        final: bool = False,
        quick: bool = False,
        prefix: str = "",
        log: Callable[[str], None] = print,
    ) -> dict[str, float]:
        """avg@k of ``model`` on every set (``<prefix><name>``); pass@k / maj@k too unless quick."""
        if not self.sets:
            return {}
        from hpt.eval import evaluate_questions
        from hpt.rollout import SamplingParams
        from hpt.train.setup import prompt_builder

        cfg, data = self.config.eval, self.config.data
        builder = prompt_builder(tokenizer, data)
        sampling = SamplingParams(
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            max_new_tokens=cfg.max_new_tokens,
            seed=self.config.seed,
        )
        results: dict[str, float] = {}
        was_training = model.training
        for name, questions in self.sets.items():
            out = evaluate_questions(
                model,
                tokenizer,
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
        model.train(was_training)
        headline = {k[len(prefix) :]: v for k, v in results.items() if "/" not in k}
        log("eval: " + ", ".join(f"{k} {v:.3f}" for k, v in headline.items()))
        return results
