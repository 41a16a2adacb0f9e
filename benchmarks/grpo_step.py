"""Time one GRPO step of ``hpt`` against TRL's ``GRPOTrainer`` on the same tiny model and settings.

Both sides train the demo's tiny random Qwen2 (``hpt.demo.tiny.build_tiny``) on the same
questions of the bundled arithmetic task (``hpt.demo.task.make_questions("train", N)``), scored by
the same verifier (``hpt.get_reward("math")``), with the same step: ``--questions`` questions x
``--n`` rollouts sampled at temperature 1 up to ``--max-new-tokens`` tokens, all generated in one
batch, group-normalised advantages, no KL and no reference model, the clipped ratio (eps 0.2)
averaged per sequence (TRL ``loss_type="grpo"``, hpt ``seq-mean-token-mean``), micro-batches of
``--micro-batch`` rows and ONE AdamW step per step (lr 1e-5, constant, no weight decay, gradient
norm clipped to 1). A step is timed from the start of generation to the end of the optimiser step:
TRL's by a ``TrainerCallback`` (``on_step_begin`` .. ``on_step_end``), hpt's from
``runs/<name>/metrics.jsonl`` (``time/step``).

Each repeat of each side runs in a fresh subprocess (so that the peak RSS of one side does not hide
the other's), ``--warmup`` steps are dropped, the other steps of all repeats are pooled; the script
prints a table of the median step time, the ratio hpt / TRL and the peak memory, and writes the
numbers to ``benchmarks/results/grpo_step.json``. It is a benchmark, not a test: nothing is asserted.

TRL is not a dependency of ``hpt``; install it in a separate environment (see benchmarks/README.md).
Usage: ``python benchmarks/grpo_step.py [--repeats 3 --steps 5 --warmup 1 ...]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "grpo_step.json"
SIDES = ("trl", "hpt")
INSTALL_HINT = (
    "python3 -m venv /work/bench-venv && /work/bench-venv/bin/pip install torch==2.13.0 && "
    "/work/bench-venv/bin/pip install trl==1.16.0 transformers==5.24.0 && "
    "/work/bench-venv/bin/pip install -e . && /work/bench-venv/bin/python benchmarks/grpo_step.py"
)


@dataclass(frozen=True)
class Settings:
    """The step both trainers run; every field maps to one TRL and one hpt setting."""

    questions: int = 16  # questions per step (TRL: generation batch / num_generations)
    n: int = 8  # rollouts per question (TRL: num_generations; hpt: rollout.n)
    max_new_tokens: int = 64  # TRL: max_completion_length; hpt: data.max_response_tokens
    micro_batch: int = 8  # rows per forward/backward (TRL: per_device_train_batch_size)
    lr: float = 1e-5
    temperature: float = 1.0
    clip: float = 0.2  # TRL: epsilon; hpt: clip_low = clip_high
    grad_clip: float = 1.0
    dataset_size: int = 256  # training questions drawn from the arithmetic task
    model_size: str = "tiny"  # hpt.demo.tiny.MODEL_SIZES key
    seed: int = 0
    steps: int = 5  # timed steps per repeat
    warmup: int = 1  # untimed steps at the start of each repeat
    repeats: int = 3

    @property
    def rows(self) -> int:
        """Rollouts per step."""
        return self.questions * self.n


# ----------------------------------------------------------------------------------------------
# shared inputs: one model folder and one question file for both sides


def prepare_inputs(settings: Settings, workdir: Path) -> tuple[Path, Path]:
    """Build the tiny model once and write the training questions as JSONL; return both paths."""
    from hpt.demo.task import make_questions
    from hpt.demo.tiny import build_tiny

    model_dir = build_tiny(workdir / "model", seed=settings.seed, size=settings.model_size)
    questions_file = workdir / "questions.jsonl"
    with questions_file.open("w") as handle:
        for q in make_questions("train", settings.dataset_size, seed=settings.seed):
            handle.write(json.dumps({"id": q.id, "prompt": q.prompt, "answer": q.answer}) + "\n")
    return model_dir, questions_file


def read_questions(questions_file: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in questions_file.read_text().splitlines() if line.strip()]


class StepClock:
    """Wall-clock and CPU seconds (this process, all its threads) of successive intervals.

    CPU time is less disturbed than wall time by other processes on a shared machine.
    """

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self._started = (0.0, 0.0)

    def start(self) -> None:
        self._started = (time.perf_counter(), time.process_time())

    def stop(self) -> None:
        self.wall.append(time.perf_counter() - self._started[0])
        self.cpu.append(time.process_time() - self._started[1])


def peak_memory() -> dict[str, float | None]:
    """This process's RSS high-water mark, and the CUDA allocator's peak where there is a GPU (MiB)."""
    import torch

    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    cuda = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {"peak_rss_mib": rss_kib / 1024, "peak_cuda_mib": cuda}


# ----------------------------------------------------------------------------------------------
# TRL


def math_reward_for_trl() -> Any:
    """``hpt.get_reward("math")`` with TRL's reward signature (completions as chat messages)."""
    import hpt

    verify = hpt.get_reward("math")

    def math_reward(completions: list[Any], answer: list[str], **_: Any) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [float(score) for score in verify(texts, list(answer))]

    return math_reward


def trl_config(settings: Settings, output_dir: Path, max_steps: int) -> Any:
    """TRL's ``GRPOConfig`` for the step of ``settings`` (one optimiser step per generation batch)."""
    import torch
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=settings.micro_batch,
        gradient_accumulation_steps=settings.rows // settings.micro_batch,  # one optimiser step
        num_generations=settings.n,
        max_completion_length=settings.max_new_tokens,
        temperature=settings.temperature,
        top_p=1.0,
        top_k=0,
        beta=0.0,  # no KL, no reference model
        num_iterations=1,
        epsilon=settings.clip,
        loss_type="grpo",  # per-sequence token mean, then mean over sequences
        scale_rewards="group",
        learning_rate=settings.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=settings.grad_clip,
        gradient_checkpointing=False,  # TRL's GRPO turns it on by default; hpt's default is off
        use_vllm=False,
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        fp16=False,
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=settings.seed,
    )


def run_trl(
    settings: Settings, model_dir: Path, questions_file: Path, workdir: Path
) -> dict[str, Any]:
    """Train ``warmup + steps`` GRPO steps with TRL; return the step times and peak memory."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOTrainer

    class StepTimer(TrainerCallback):
        """Wall and CPU seconds of each optimiser step, generation included."""

        def __init__(self) -> None:
            self.clock = StepClock()
            self.open = False

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if not self.open:  # the first micro-step of an optimiser step
                self.clock.start()
                self.open = True

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.clock.stop()
            self.open = False

    setup_started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    rows = read_questions(questions_file)
    dataset = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])
    config = trl_config(settings, workdir / "trl", settings.warmup + settings.steps)
    timer = StepTimer()
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=math_reward_for_trl(),
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[timer],
    )
    setup_seconds = time.perf_counter() - setup_started
    trainer.train()
    return {
        "step_times": timer.clock.wall,
        "cpu_times": timer.clock.cpu,
        "setup_s": setup_seconds,
        **peak_memory(),
    }


# ----------------------------------------------------------------------------------------------
# hpt


def hpt_overrides(
    settings: Settings, model_dir: Path, questions_file: Path, workdir: Path
) -> list[str]:
    """The ``--set`` overrides that make ``hpt train`` run the same step as the TRL side."""
    return [
        "name=bench",
        "algorithm=grpo",
        f"max_steps={settings.warmup + settings.steps}",
        "save_every=0",
        f"seed={settings.seed}",
        "overwrite=true",
        f"output_dir={workdir / 'hpt'}",
        f"model.path={model_dir}",
        "model.dtype=float32",
        f"data.train={questions_file}",
        f"data.questions_per_step={settings.questions}",
        f"data.max_response_tokens={settings.max_new_tokens}",
        f"rollout.n={settings.n}",
        f"rollout.temperature={settings.temperature}",
        "rollout.top_p=1.0",
        "rollout.top_k=0",
        f"rollout.batch_size={settings.rows}",  # all rollouts in one generate call, as TRL
        f"algo.clip_low={settings.clip}",
        f"algo.clip_high={settings.clip}",
        "algo.aggregation=seq-mean-token-mean",
        f"optim.lr={settings.lr}",
        "optim.weight_decay=0.0",
        "optim.schedule=constant",
        "optim.warmup_steps=0",
        f"optim.grad_clip={settings.grad_clip}",
        "optim.skip_grad_norm_above=.inf",  # TRL never skips an update
        f"optim.mini_batch_questions={settings.questions}",  # one optimiser step per step
        f"optim.micro_batch_size={settings.micro_batch}",
        "optim.ppo_epochs=1",
        "logging.progress=false",
        "logging.plots=false",
        "logging.tensorboard=false",
    ]


def run_hpt(
    settings: Settings, model_dir: Path, questions_file: Path, workdir: Path
) -> dict[str, Any]:
    """Train ``warmup + steps`` GRPO steps with ``hpt``; return the step times and peak memory."""
    from hpt.train.config import load_config
    from hpt.train.recipe import train

    config = load_config(None, hpt_overrides(settings, model_dir, questions_file, workdir))
    clock = StepClock()
    watch = watch_hpt_steps(clock)
    started = time.perf_counter()
    train(config, callbacks=[watch])
    seconds = time.perf_counter() - started
    metrics_file = Path(config.output_dir) / config.name / "metrics.jsonl"
    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    times = [float(r["time/step"]) for r in records if "time/step" in r]
    return {
        "step_times": times,
        "cpu_times": clock.cpu,
        "setup_s": seconds - sum(times),
        **peak_memory(),
    }


def watch_hpt_steps(clock: StepClock) -> Any:
    """A training callback stamping ``clock`` at the start of hpt's stage and after each step.

    hpt measures each step's wall time itself (``time/step``); its CPU time comes from the
    intervals between the stage's start and successive step ends, which also hold the (cheap)
    logging of the previous step.
    """
    from hpt.train.recipe import Callback

    class Watch(Callback):
        def on_stage_begin(self, stage: int, model: Any, tokenizer: Any) -> None:
            clock.start()

        def on_step_end(self, step: int, metrics: Any, model: Any, tokenizer: Any) -> None:
            clock.stop()
            clock.start()

    return Watch()


RUNNERS = {"trl": run_trl, "hpt": run_hpt}


# ----------------------------------------------------------------------------------------------
# orchestration


def run_side(
    side: str, settings: Settings, model_dir: Path, questions_file: Path, workdir: Path
) -> dict[str, Any]:
    """Run one repeat of one side in a fresh Python process; return what it measured."""
    out = workdir / f"{side}-{time.monotonic_ns()}.json"
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        side,
        "--settings",
        json.dumps(asdict(settings)),
        "--model-dir",
        str(model_dir),
        "--questions-file",
        str(questions_file),
        "--workdir",
        str(workdir / f"{side}-run"),
        "--child-output",
        str(out),
    ]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        tail = "\n".join((completed.stdout + completed.stderr).strip().splitlines()[-25:])
        raise RuntimeError(f"the {side} run failed (exit {completed.returncode}):\n{tail}")
    return json.loads(out.read_text())


def summarise(settings: Settings, measured: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Median step time (after warmup, pooled over repeats), its spread, peak memory, the ratio."""
    sides: dict[str, Any] = {}
    for side, repeats in measured.items():
        timed = [t for r in repeats for t in r["step_times"][settings.warmup :]]
        cpu = [t for r in repeats for t in r["cpu_times"][settings.warmup :]]
        cuda = [r["peak_cuda_mib"] for r in repeats if r["peak_cuda_mib"] is not None]
        sides[side] = {
            "median_step_s": statistics.median(timed),
            "median_cpu_s": statistics.median(cpu),
            "min_step_s": min(timed),
            "max_step_s": max(timed),
            "repeat_medians_s": [
                statistics.median(r["step_times"][settings.warmup :]) for r in repeats
            ],
            "warmup_step_s": [r["step_times"][: settings.warmup] for r in repeats],
            "setup_s": statistics.median(r["setup_s"] for r in repeats),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in repeats),
            "peak_cuda_mib": max(cuda) if cuda else None,
            "rollouts_per_s": settings.rows / statistics.median(timed),
            "step_times_s": [r["step_times"] for r in repeats],
            "cpu_times_s": [r["cpu_times"] for r in repeats],
        }
    ratio = sides["hpt"]["median_step_s"] / sides["trl"]["median_step_s"]
    cpu_ratio = sides["hpt"]["median_cpu_s"] / sides["trl"]["median_cpu_s"]
    return {
        "settings": asdict(settings),
        "sides": sides,
        "ratio_hpt_over_trl": ratio,
        "cpu_ratio_hpt_over_trl": cpu_ratio,
    }


def environment() -> dict[str, Any]:
    from importlib import metadata

    import torch

    versions = {}
    for name in ("torch", "transformers", "trl", "accelerate", "hybrid-post-training"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "versions": versions,
    }


def format_table(summary: dict[str, Any]) -> str:
    """A plain-text table: one row per side, and the ratio."""
    memory = "peak CUDA MiB" if summary["sides"]["hpt"]["peak_cuda_mib"] is not None else None
    header = ["side", "median step s", "min s", "max s", "median CPU s", "rollouts/s", "setup s"]
    header += ["peak RSS MiB"]
    header += [memory] if memory else []
    lines = [header]
    for side in SIDES:
        s = summary["sides"][side]
        row = [
            side,
            f"{s['median_step_s']:.3f}",
            f"{s['min_step_s']:.3f}",
            f"{s['max_step_s']:.3f}",
            f"{s['median_cpu_s']:.3f}",
        ]
        row += [f"{s['rollouts_per_s']:.1f}", f"{s['setup_s']:.1f}", f"{s['peak_rss_mib']:.0f}"]
        row += [f"{s['peak_cuda_mib']:.0f}"] if memory else []
        lines.append(row)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = [
        "  ".join(
            cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths))
        )
        for line in lines
    ]
    text.insert(1, "  ".join("-" * w for w in widths))
    text.append(f"ratio hpt / TRL (median step time): {summary['ratio_hpt_over_trl']:.2f}")
    text.append(f"ratio hpt / TRL (median CPU time):  {summary['cpu_ratio_hpt_over_trl']:.2f}")
    return "\n".join(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = Settings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--questions", type=int, default=defaults.questions, help="questions per step"
    )
    parser.add_argument("--n", type=int, default=defaults.n, help="rollouts per question")
    parser.add_argument(
        "--max-new-tokens", type=int, default=defaults.max_new_tokens, help="response length limit"
    )
    parser.add_argument(
        "--micro-batch", type=int, default=defaults.micro_batch, help="rows per forward/backward"
    )
    parser.add_argument("--lr", type=float, default=defaults.lr, help="AdamW learning rate")
    parser.add_argument(
        "--model-size", default=defaults.model_size, help="hpt.demo.tiny model size"
    )
    parser.add_argument("--steps", type=int, default=defaults.steps, help="timed steps per repeat")
    parser.add_argument(
        "--warmup", type=int, default=defaults.warmup, help="untimed steps per repeat"
    )
    parser.add_argument(
        "--repeats", type=int, default=defaults.repeats, help="fresh processes per side"
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--output", type=Path, default=RESULTS, help="where to write the JSON results"
    )
    # internal: one repeat of one side, run by the orchestrator in a subprocess
    parser.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--questions-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-output", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        settings = Settings(**json.loads(args.settings))
        result = RUNNERS[args.child](settings, args.model_dir, args.questions_file, args.workdir)
        args.child_output.write_text(json.dumps(result))
        return 0
    if importlib.util.find_spec("trl") is None:
        print(
            f"grpo_step: TRL is not installed in {sys.prefix}; install it in a separate venv: {INSTALL_HINT}"
        )
        return 2
    settings = Settings(
        questions=args.questions,
        n=args.n,
        max_new_tokens=args.max_new_tokens,
        micro_batch=args.micro_batch,
        lr=args.lr,
        model_size=args.model_size,
        steps=args.steps,
        warmup=args.warmup,
        repeats=args.repeats,
        seed=args.seed,
    )
    if settings.rows % settings.micro_batch:
        print(
            f"grpo_step: --micro-batch {settings.micro_batch} must divide questions x n = {settings.rows}"
        )
        return 2
    measured: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
    with tempfile.TemporaryDirectory(prefix="hpt-bench-") as tmp:
        workdir = Path(tmp)
        model_dir, questions_file = prepare_inputs(settings, workdir)
        for repeat in range(settings.repeats):
            order = SIDES if repeat % 2 == 0 else SIDES[::-1]  # alternate, so drift hits both sides
            for side in order:
                started = time.perf_counter()
                result = run_side(side, settings, model_dir, questions_file, workdir)
                measured[side].append(result)
                median = statistics.median(result["step_times"][settings.warmup :] or [math.nan])
                print(
                    f"repeat {repeat + 1}/{settings.repeats} {side}: median step {median:.3f} s "
                    f"({time.perf_counter() - started:.0f} s in all)",
                    flush=True,
                )
    summary = summarise(settings, measured)
    summary["environment"] = environment()
    print(format_table(summary))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
