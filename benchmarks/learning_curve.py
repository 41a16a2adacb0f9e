"""Positive control: GRPO raises sampled accuracy on a fixed probe set, in hpt and in TRL alike.

A correct gradient is not a learning run. This benchmark trains GRPO from the embedded demo's base
model (the tiny Qwen2 pre-trained on easy additions, ``hpt.demo.default``) on the task's ``train``
split, with ``hpt train`` and with TRL's ``GRPOTrainer`` at the same settings (``--questions``
questions x ``--n`` rollouts at temperature 1, responses <= ``--max-new-tokens`` tokens, clip 0.2,
group-normalised advantages, per-sequence token mean, no KL, one AdamW step per step, constant
``--lr``), for every seed of ``--seeds``. Every ``--eval-every`` steps both sides' models are scored
by the same function (``hpt.eval.evaluate_questions``) on the same probe: the first ``--probe``
questions of the held-out ``test`` split, ``--k`` samples each at temperature 1 (avg@k, the
sampled accuracy that RL sharpens; greedy accuracy would hide it).

It prints both curves (mean and spread over seeds) and the probe accuracy before and after, and
writes ``benchmarks/results/learning_curve.json`` and ``learning_curve.png``. It is a benchmark,
not a test: nothing is asserted. TRL is not a dependency of hpt; run it in the benchmark
environment (``make learning-curve``, see benchmarks/README.md). ``--sides hpt`` runs hpt alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import grpo_step  # the sibling benchmark: its settings -> hpt / TRL mappings

RESULTS = Path(__file__).resolve().parent / "results"
SIDES = ("hpt", "trl")


@dataclass(frozen=True)
class Settings:
    """The run both trainers do; every field maps to one TRL and one hpt setting."""

    questions: int = 16  # TRL: generation batch / num_generations; hpt: data.questions_per_step
    n: int = 8  # TRL: num_generations; hpt: rollout.n
    max_new_tokens: int = 64  # TRL: max_completion_length; hpt: data.max_response_tokens
    lr: float = 3e-5
    steps: int = 30
    eval_every: int = 10
    probe: int = 96  # probe questions: the first of the test split
    k: int = 4  # samples a probe question (temperature 1)
    clip: float = 0.2
    micro_batch: int = 64
    threads: int = 2


def demo_paths() -> dict[str, Path]:
    """The demo's base model and task files (built once and cached, as `make run` builds them)."""
    from hpt.demo.default import default_config, demo_dir

    config = default_config(["logging.progress=false"])
    root = demo_dir(config)
    return {
        "base": Path(config.model.path),
        "train": root / "data" / "train.jsonl",
        "test": root / "data" / "test.jsonl",
    }


class Probe:
    """Sampled accuracy (avg@k at temperature 1) on a fixed set of questions, one function for both sides."""

    def __init__(self, settings: Settings, path: Path):
        from hpt.data import load_questions

        self.settings = settings
        self.questions = load_questions(path)[: settings.probe]

    def __call__(self, model: Any, tokenizer: Any) -> float:
        from hpt.data import PromptBuilder
        from hpt.eval import evaluate_questions
        from hpt.rollout import SamplingParams

        sampling = SamplingParams(
            temperature=1.0, top_p=1.0, max_new_tokens=self.settings.max_new_tokens, seed=1234
        )
        was_training = model.training
        builder = PromptBuilder(tokenizer)  # the training prompts: chat template, no instruction
        out = evaluate_questions(
            model, tokenizer, self.questions, k=self.settings.k, sampling=sampling, builder=builder
        )
        model.train(was_training)
        return float(out["avg@k"])


# ----------------------------------------------------------------------------------------------
# the two sides


def step_settings(settings: Settings, seed: int) -> grpo_step.Settings:
    """The GRPO step of ``settings`` in grpo_step's terms (its hpt and TRL mappings are reused)."""
    return grpo_step.Settings(
        questions=settings.questions,
        n=settings.n,
        max_new_tokens=settings.max_new_tokens,
        micro_batch=settings.micro_batch,
        lr=settings.lr,
        temperature=1.0,
        clip=settings.clip,
        grad_clip=1.0,
        seed=seed,
    )


def run_hpt(settings: Settings, seed: int, paths: dict[str, Path], workdir: Path) -> list[float]:
    """hpt train GRPO; the probe after every `eval_every` steps (step 0 included)."""
    from hpt.train.config import load_config
    from hpt.train.recipe import Callback, train

    probe = Probe(settings, paths["test"])
    curve: list[float] = []

    class Probed(Callback):
        def on_stage_begin(self, stage: int, model: Any, tokenizer: Any) -> None:
            curve.append(probe(model, tokenizer))

        def on_step_end(self, step: int, metrics: Any, model: Any, tokenizer: Any) -> None:
            if step % settings.eval_every == 0:
                curve.append(probe(model, tokenizer))

    overrides = grpo_step.hpt_overrides(
        step_settings(settings, seed), paths["base"], paths["train"], workdir
    )
    overrides += ["name=curve", f"max_steps={settings.steps}", "data.max_prompt_tokens=96"]
    train(load_config(None, overrides), callbacks=[Probed()])
    return curve


def run_trl(settings: Settings, seed: int, paths: dict[str, Path], workdir: Path) -> list[float]:
    """TRL GRPOTrainer at the same settings; the probe after every `eval_every` steps."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOTrainer

    probe = Probe(settings, paths["test"])
    tokenizer = AutoTokenizer.from_pretrained(paths["base"])
    model = AutoModelForCausalLM.from_pretrained(paths["base"], dtype=torch.float32)
    rows = grpo_step.read_questions(paths["train"])
    dataset = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])
    curve: list[float] = [probe(model, tokenizer)]

    class Probed(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step % settings.eval_every == 0:
                curve.append(probe(model, tokenizer))

    trainer = GRPOTrainer(
        model=model,
        reward_funcs=grpo_step.math_reward_for_trl(),
        args=grpo_step.trl_config(step_settings(settings, seed), workdir / "trl", settings.steps),
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[Probed()],
    )
    trainer.train()
    return curve


RUNNERS = {"hpt": run_hpt, "trl": run_trl}


# ----------------------------------------------------------------------------------------------
# report


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(settings: Settings, curves: dict[str, dict[int, list[float]]]) -> dict[str, Any]:
    steps = list(range(0, settings.steps + 1, settings.eval_every))
    sides = {}
    for side, by_seed in curves.items():
        points = list(zip(*by_seed.values()))  # per eval point, the seeds' values
        gains = [c[-1] - c[0] for c in by_seed.values()]
        sides[side] = {
            "curves": {str(s): c for s, c in by_seed.items()},
            "mean": [mean_std(list(p))[0] for p in points],
            "std": [mean_std(list(p))[1] for p in points],
            "gain_mean": mean_std(gains)[0],
            "gain_std": mean_std(gains)[1],
        }
    return {
        "settings": asdict(settings),
        "steps": steps[: len(next(iter(sides.values()))["mean"])],
        "sides": sides,
    }


def table(summary: dict[str, Any]) -> str:
    lines = ["probe avg@k at T=1 (mean ± std over seeds)"]
    lines.append("step  " + "  ".join(f"{side:>15}" for side in summary["sides"]))
    for i, step in enumerate(summary["steps"]):
        cells = [
            f"{100 * s['mean'][i]:6.1f} ± {100 * s['std'][i]:4.1f}"
            for s in summary["sides"].values()
        ]
        lines.append(f"{step:4d}  " + "  ".join(f"{c:>15}" for c in cells))
    for side, s in summary["sides"].items():
        lines.append(
            f"{side}: before -> after {100 * s['mean'][0]:.1f} -> {100 * s['mean'][-1]:.1f} "
            f"(gain {100 * s['gain_mean']:+.1f} ± {100 * s['gain_std']:.1f} points)"
        )
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    steps = summary["steps"]
    for side, s in summary["sides"].items():
        mean = [100 * v for v in s["mean"]]
        std = [100 * v for v in s["std"]]
        ax.plot(steps, mean, marker="o", label=f"{side} (mean of {len(s['curves'])} seeds)")
        ax.fill_between(
            steps, [m - d for m, d in zip(mean, std)], [m + d for m, d in zip(mean, std)], alpha=0.2
        )
    settings = summary["settings"]
    ax.set_xlabel("GRPO step")
    ax.set_ylabel(f"probe avg@{settings['k']} at T=1 (%)")
    ax.set_title(f"GRPO from the demo base, lr {settings['lr']:g}: hpt vs TRL")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Settings()
    for field, value in asdict(defaults).items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--sides", default="hpt,trl")
    parser.add_argument("--output", default=str(RESULTS / "learning_curve"))
    args = parser.parse_args(argv)
    settings = replace(defaults, **{f: getattr(args, f) for f in asdict(defaults)})
    sides = [s for s in args.sides.split(",") if s]
    unknown = [s for s in sides if s not in SIDES]
    if unknown:
        print(f"unknown side(s) {unknown}; choose from {list(SIDES)}", file=sys.stderr)
        return 2
    if "trl" in sides:
        try:
            import trl  # noqa: F401
        except ImportError:
            print(
                "TRL is not installed here: run `make learning-curve` (benchmarks/README.md)",
                file=sys.stderr,
            )
            return 2
    import tempfile

    import torch

    torch.set_num_threads(settings.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    paths = demo_paths()
    curves: dict[str, dict[int, list[float]]] = {side: {} for side in sides}
    for seed in seeds:
        for side in sides:
            started = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                torch.manual_seed(seed)
                curve = RUNNERS[side](settings, seed, paths, Path(tmp))
            curves[side][seed] = curve
            shown = " ".join(f"{100 * v:.1f}" for v in curve)
            print(
                f"{side} seed {seed}: {shown}  ({time.perf_counter() - started:.0f} s)", flush=True
            )
    summary = summarise(settings, curves)
    print(table(summary))
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(summary, output.with_suffix(".png"))
    print(f"wrote {output.with_suffix('.json')} and {output.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
