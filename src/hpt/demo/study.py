"""``hpt demo``: the paper's comparison study on the embedded task, small enough for a laptop.

From one partially competent base (the embedded default's tiny Qwen2, SFT-pretrained on the easy
additions and cached), train SFT, GRPO, SFT->GRPO, LUFFY, SRFT and HPT on the task's training
split with the same number of optimiser steps each, for several seeds; then evaluate every final
model on a fixed subset of the in-distribution ``test`` split and the harder ``ood`` split with
avg@k and pass@k (k up to 16, temperature 0.6, top-p 0.95: the paper's evaluation sampling).

Fairness rule (chosen once, never tuned per method): every method uses its paper's recipe
(PAPER.md, section 5; ``configs/*.yaml``) with

- one optimiser for all: AdamW at :data:`STUDY_LR` = 3e-5 (the embedded demo's lr), constant, no
  warmup, weight decay 0.01, grad clip 1.0, update skipped above norm 80, one optimiser step a
  training step. (Tried first: every paper lr times 20 gave SFT 1e-3, and a fresh Adam at that lr
  wrecked the base in a few steps; one lr of 1e-4 for all made GRPO's and HPT's training reward
  and held-out accuracy drift down on the embedded demo (0.655 -> 0.60 greedy test accuracy in 40
  HPT steps). 3e-5 was then fixed for every method before the study ran; the paper's values stay
  in :data:`PAPER_LR` for the record);
- the same questions a step (16), rollouts (8; LUFFY: 7 + the demonstration, as its paper),
  response limit (64 tokens), rollout temperature (1.0);
- the paper's entropy bonus 0.001 for every RL method (none for SFT);
- constants counted in tokens scaled with the response limit: HPT's Dr.GRPO normaliser 8192 (the
  paper's response limit) becomes 64.

The recipes are :data:`METHODS` (written as YAML to ``<output>/configs/`` and kept in
``configs/study/``). Writes ``<output>/`` (default ``runs/demo``): a run folder per (method,
seed), ``results.json``, ``results.md`` (methods as rows, mean +- std over seeds) and
``plots/*.png``. A (method, seed) whose ``study.json`` exists is not run again (resumable).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hpt.errors import ConfigError

# --------------------------------------------------------------------------------------------
# The recipes: the paper's, scaled to the task by one rule
# --------------------------------------------------------------------------------------------

STUDY_LR = 3e-5  # one learning rate for every method and stage (the embedded demo's)

# The learning rate of each method's paper recipe (PAPER.md, sections 2 and 5), for the record:
# the study does not use their ratios (see the module docstring).
PAPER_LR: dict[str, float] = {
    "sft": 5e-5,  # LUFFY's SFT baseline setting
    "grpo": 1e-6,  # as the paper's other RL baselines (configs/grpo.yaml)
    "luffy": 1e-6,
    "srft": 1e-6,
    "hpt": 5e-6,  # exp_scripts/train.sh
}

RESPONSE_TOKENS = 64  # the task's response limit (the paper: 8192)
PAPER_RESPONSE_TOKENS = 8192

# Settings shared by every method (nested like TrainConfig).
COMMON: dict[str, Any] = {
    "save_every": 0,
    "keep_checkpoints": 1,
    "data": {
        "questions_per_step": 16,
        "max_prompt_tokens": 96,
        "max_response_tokens": RESPONSE_TOKENS,
    },
    "rollout": {"n": 8, "temperature": 1.0, "top_p": 1.0, "batch_size": 128},
    "optim": {
        "schedule": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.01,
        "grad_clip": 1.0,
        "skip_grad_norm_above": 80.0,
        "micro_batch_size": 64,
    },
    # the curves during training: greedy on a small subset; OOD answers need up to 81 tokens
    "eval": {"k": 1, "temperature": 0.0, "max_new_tokens": 96},
    "logging": {"plots": False},
}

RL_ALGO = {"entropy_coef": 0.001, "kl_coef": 0.0}  # every RL method of the paper's scripts


def _lr(method: str) -> float:
    """The study's learning rate of a method: :data:`STUDY_LR` for every one (the rule)."""
    if method not in PAPER_LR:
        raise ConfigError(f"no paper learning rate recorded for {method!r}")
    return STUDY_LR


@dataclass(frozen=True)
class Method:
    """One row of the study: its label in the table and its recipe (TrainConfig keys)."""

    name: str
    label: str
    recipe: dict[str, Any]
    note: str = ""


def _method(name: str, label: str, note: str, **recipe: Any) -> Method:
    return Method(name=name, label=label, recipe=recipe, note=note)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        _method(
            "sft",
            "SFT",
            "demonstrations only, mean token NLL",
            algorithm="sft",
            optim={"lr": _lr("sft")},
        ),
        _method(
            "grpo",
            "GRPO",
            "8 rollouts, (R - mean)/std, clip 0.2",
            algorithm="grpo",
            algo={**RL_ALGO, "clip_low": 0.2, "clip_high": 0.2},
            optim={"lr": _lr("grpo")},
        ),
        _method(
            "sft_grpo",
            "SFT->GRPO",
            "half the steps SFT, then half GRPO",
            algorithm="grpo",
            stages=[
                {"name": "sft", "algorithm": "sft", "algo": {}, "optim": {"lr": _lr("sft")}},
                {
                    "name": "grpo",
                    "algorithm": "grpo",
                    "algo": {**RL_ALGO, "clip_low": 0.2, "clip_high": 0.2},
                    "optim": {"lr": _lr("grpo")},
                },
            ],
        ),
        _method(
            "luffy",
            "LUFFY",
            "7 rollouts + the demonstration in one group, f(p) = p/(p+0.1)",
            algorithm="luffy",
            rollout={"n": 7},
            algo={**RL_ALGO, "shaping_gamma": 0.1},
            optim={"lr": _lr("luffy")},
        ),
        _method(
            "srft",
            "SRFT",
            "8 rollouts + the demonstration; entropy-weighted SFT and RL",
            algorithm="srft",
            algo={**RL_ALGO, "shaping_gamma": 0.1},
            optim={"lr": _lr("srft")},
        ),
        _method(
            "hpt",
            "HPT",
            "SFT on a question when 0 of 8 rollouts are right, else on-policy RL",
            algorithm="hpt",
            algo={
                **RL_ALGO,
                "gate_threshold": 0.0,
                "sft_coef": 1.0,
                "aggregation": "token-sum-norm",
                "norm_length": RESPONSE_TOKENS,  # the paper's 8192 = its response limit
            },
            optim={"lr": _lr("hpt")},
        ),
    )
}


def _merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge of two nested dicts (``extra`` wins)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def method_recipe(name: str) -> dict[str, Any]:
    """The full recipe of a method: :data:`COMMON` with the method's keys merged in."""
    if name not in METHODS:
        raise ConfigError(f"unknown study method {name!r}; choose from {', '.join(METHODS)}")
    return _merge(COMMON, METHODS[name].recipe)


def recipe_yaml(name: str) -> str:
    """A method's recipe as the YAML of ``configs/study/<name>.yaml`` (with the rule as a header)."""
    import yaml

    method = METHODS[name]
    header = [
        f"# hpt demo: {method.label} ({method.note}).",
        "# Rule, the same for every method (src/hpt/demo/study.py): one lr,",
        f"# {STUDY_LR:g}; 16 questions a step; 8 rollouts (LUFFY 7 + the demonstration); responses",
        f"# <= {RESPONSE_TOKENS} tokens; one optimiser step a training step; entropy bonus 0.001 for RL.",
        "# `hpt demo` sets name, seed, max_steps, output_dir, model/data paths and eval subsets.",
    ]
    body = yaml.safe_dump(method_recipe(name), sort_keys=False)
    return "\n".join(header) + "\n" + body


def write_recipes(directory: str | Path) -> list[Path]:
    """Write every method's recipe YAML to ``directory``; return the paths."""
    from hpt.utils import atomic_write_text

    directory = Path(directory)
    return [atomic_write_text(directory / f"{n}.yaml", recipe_yaml(n)) for n in METHODS]


# --------------------------------------------------------------------------------------------
# The study's size
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StudySettings:
    """How big the study is: steps, seeds and the evaluation."""

    steps: int  # optimiser steps of every method (SFT->GRPO: half each stage)
    seeds: tuple[int, ...]
    eval_questions: int  # questions of each split in the final evaluation (the first N)
    k: int  # samples a question in the final evaluation
    temperature: float  # final evaluation sampling (the paper's: 0.6, top-p 0.95)
    top_p: float
    eval_every: int  # greedy held-out accuracy during training every N steps
    curve_questions: int  # questions of each split in the evaluations during training
    eval_seed: int = 1234


FULL = StudySettings(
    steps=24, seeds=(0, 1, 2), eval_questions=48, k=16, temperature=0.6, top_p=0.95,
    eval_every=6, curve_questions=24,
)  # fmt: skip
QUICK = StudySettings(
    steps=10, seeds=(0,), eval_questions=24, k=16, temperature=0.6, top_p=0.95,
    eval_every=5, curve_questions=16,
)  # fmt: skip


def _has_gate(method: str) -> bool:
    """Whether a method's algorithm routes questions by performance (not a fixed route)."""
    from hpt.algorithms import get_algorithm
    from hpt.gate import FIXED_ROUTES

    recipe = METHODS[method].recipe
    return get_algorithm(recipe["algorithm"]).routes not in FIXED_ROUTES


def run_name(method: str, seed: int) -> str:
    return f"{method}-s{seed}"


def run_overrides(
    method: str, seed: int, settings: StudySettings, output: Path, paths: Mapping[str, str]
) -> list[str]:
    """The ``--set`` overrides that place a method's recipe in the study."""
    overrides = [
        f"name={run_name(method, seed)}",
        f"seed={seed}",
        f"max_steps={settings.steps}",
        f"output_dir={output}",
        "overwrite=true",
        f"model.path={paths['base']}",
        f"data.train={paths['train']}",
        f"eval.sets={{test: {paths['test']}, ood: {paths['ood']}}}",
        f"eval.every={settings.eval_every}",
        f"eval.limit={settings.curve_questions}",
    ]
    if METHODS[method].recipe.get("stages"):
        first = settings.steps // 2
        overrides += ["stages.0.max_steps=" + str(first)]
        overrides += ["stages.1.max_steps=" + str(settings.steps - first)]
    return overrides


# --------------------------------------------------------------------------------------------
# Aggregation, tables and plots (pure: from result records)
# --------------------------------------------------------------------------------------------

# column label -> (record key, scale): accuracy in percent, tokens in thousands
COLUMNS: dict[str, tuple[str, float]] = {
    "ID acc": ("id_acc", 100.0),
    "OOD acc": ("ood_acc", 100.0),
    "ID pass@1": ("id_pass@1", 100.0),
    "ID pass@16": ("id_pass@16", 100.0),
    "OOD pass@1": ("ood_pass@1", 100.0),
    "OOD pass@16": ("ood_pass@16", 100.0),
    "gen. tokens (k)": ("tokens_generated", 1e-3),
    "demo tokens (k)": ("tokens_demonstration", 1e-3),
    "train s": ("train_seconds", 1.0),
}


def flat_record(
    method: str, seed: int, evals: Mapping[str, Mapping[str, Any]], extra: Mapping[str, Any]
) -> dict[str, Any]:
    """One (method, seed) result: ``<set>_acc`` (avg@k), ``<set>_pass@K`` and ``extra``.

    Args:
        evals: set name (``id``, ``ood``) -> the output of ``evaluate_questions`` (``avg@k`` and
            ``pass@k`` as ``{K: value}``); ``samples`` are not kept.
        extra: tokens, seconds and the like, copied as they are.
    """
    record: dict[str, Any] = {"method": method, "seed": seed}
    for name, out in evals.items():
        record[f"{name}_acc"] = float(out["avg@k"])
        record[f"{name}_maj"] = float(out.get("maj@k", float("nan")))
        for k, value in (out.get("pass@k") or {}).items():
            record[f"{name}_pass@{int(k)}"] = float(value)
    record.update(extra)
    return record


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value; NaNs ignored)."""
    kept = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not kept:
        return float("nan"), float("nan")
    return statistics.fmean(kept), statistics.stdev(kept) if len(kept) > 1 else 0.0


def aggregate(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method (in first-seen order): ``seeds`` and ``{key: [mean, std]}`` of every number."""
    by_method: dict[str, list[Mapping[str, Any]]] = {}
    for record in records:
        by_method.setdefault(str(record["method"]), []).append(record)
    summary: dict[str, dict[str, Any]] = {}
    for method, rows in by_method.items():
        keys = [k for k in rows[0] if k not in ("method", "seed")]
        numbers = {
            k: list(mean_std([r.get(k, float("nan")) for r in rows]))
            for k in keys
            if all(isinstance(r.get(k), (int, float)) for r in rows)
        }
        summary[method] = {"seeds": [r["seed"] for r in rows], **numbers}
    return summary


def _cell(stats: Any, scale: float, digits: int) -> str:
    if not stats:
        return "-"
    mean, std = stats
    if mean is None or math.isnan(mean):
        return "-"
    if std is None or math.isnan(std) or std == 0:
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def table_rows(
    summary: Mapping[str, Mapping[str, Any]], labels: Mapping[str, str] | None = None
) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the results table: methods as rows, ``mean ± std`` cells."""
    labels = labels or {}
    header = ["method", "seeds", *COLUMNS]
    rows = []
    for method, stats in summary.items():
        cells = [labels.get(method, method), str(len(stats.get("seeds", [])) or "-")]
        for key, scale in COLUMNS.values():
            cells.append(_cell(stats.get(key), scale, 0 if scale < 1 else 1))
        rows.append(cells)
    return header, rows


def markdown_table(
    summary: Mapping[str, Mapping[str, Any]], labels: Mapping[str, str] | None = None
) -> str:
    """The results as a markdown table (the paper's layout: methods as rows)."""
    header, rows = table_rows(summary, labels)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def rich_table(
    summary: Mapping[str, Mapping[str, Any]],
    labels: Mapping[str, str] | None = None,
    title: str = "hpt demo",
) -> Any:
    """The results as a ``rich.table.Table``."""
    from rich.table import Table

    header, rows = table_rows(summary, labels)
    table = Table(title=title)
    for index, name in enumerate(header):
        table.add_column(name, justify="left" if index == 0 else "right", style=None)
    for row in rows:
        table.add_row(*row)
    return table


def mean_curve(
    histories: Sequence[Sequence[Mapping[str, Any]]], key: str
) -> tuple[list[float], list[float]]:
    """(steps, mean over runs) of ``key`` at the steps where every run that has it logged it."""
    per_step: dict[float, list[float]] = {}
    for records in histories:
        for record in records:
            value = record.get(key)
            if isinstance(value, (int, float)) and not math.isnan(float(value)):
                per_step.setdefault(float(record["step"]), []).append(float(value))
    steps = sorted(per_step)
    return steps, [statistics.fmean(per_step[s]) for s in steps]


def with_endpoints(
    records: Sequence[Mapping[str, Any]], summary: Mapping[str, Any] | None, prefix: str = "eval/"
) -> list[dict[str, Any]]:
    """A run's metrics plus ``eval_before`` at step 0 and ``eval_after`` at the last step."""
    out = [dict(r) for r in records]
    if summary:
        before = {f"{prefix}{k}": v for k, v in (summary.get("eval_before") or {}).items()}
        after = {f"{prefix}{k}": v for k, v in (summary.get("eval_after") or {}).items()}
        out.insert(0, {"step": 0, **before})
        out.append({"step": summary.get("steps", records[-1]["step"] if records else 0), **after})
    return out


def plot_curves(
    panels: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]],
    path: str | Path,
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    xlog: bool = False,
    ylim: tuple[float, float] | None = None,
) -> Path:
    """One figure, one panel per key of ``panels`` (panel title -> {line label: (x, y)})."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.9), squeeze=False)
    for ax, (panel, lines) in zip(axes[0], panels.items()):
        for label, (x, y) in lines.items():
            if len(x):
                ax.plot(list(x), list(y), marker="o", markersize=3, label=label)
        if xlog:
            ax.set_xscale("log", base=2)
        if ylim:
            ax.set_ylim(*ylim)
        ax.set_title(panel)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


PLOT_FILES = {
    "accuracy": "accuracy_vs_step.png",
    "routes": "hpt_routes.png",
    "entropy": "entropy_vs_step.png",
    "pass_at_k": "pass_at_k.png",
}


def draw_plots(
    histories: Mapping[str, Sequence[Sequence[Mapping[str, Any]]]],
    summary: Mapping[str, Mapping[str, Any]],
    directory: str | Path,
    labels: Mapping[str, str] | None = None,
    k: int = 16,
) -> list[Path]:
    """The study's plots from run histories (method -> per-seed metrics with endpoints) and the summary.

    Writes accuracy vs step (test and ood, greedy, mean over seeds), HPT's fraction of questions
    routed to SFT / RL vs step, entropy vs step, and pass@k vs k (mean over seeds).
    """
    labels = labels or {}
    directory = Path(directory)
    name = lambda m: labels.get(m, m)  # noqa: E731
    written = []
    accuracy = {
        f"held-out {split} (greedy)": {
            name(m): mean_curve(h, f"eval/{split}") for m, h in histories.items()
        }
        for split in ("test", "ood")
    }
    written.append(
        plot_curves(
            accuracy,
            directory / PLOT_FILES["accuracy"],
            xlabel="optimiser step",
            ylabel="accuracy",
            title="Held-out accuracy during training (mean over seeds)",
            ylim=(-0.02, 1.02),
        )
    )
    gated = [m for m in histories if _has_gate(m)]  # HPT's performance feedback
    if gated:
        routes = {
            f"{METHODS[m].label}'s gate": {
                f"route {r}": mean_curve(histories[m], f"route_{r}") for r in ("sft", "rl")
            }
            for m in gated
        }
        written.append(
            plot_curves(
                routes,
                directory / PLOT_FILES["routes"],
                xlabel="optimiser step",
                ylabel="fraction of questions",
                title="HPT: questions routed to SFT (0 of 8 right) vs RL",
                ylim=(-0.02, 1.02),
            )
        )
    entropy = {
        "mean token entropy": {name(m): mean_curve(h, "entropy") for m, h in histories.items()}
    }
    written.append(
        plot_curves(
            entropy,
            directory / PLOT_FILES["entropy"],
            xlabel="optimiser step",
            ylabel="entropy (nats)",
            title="Entropy of the trained tokens (mean over seeds)",
        )
    )
    passk = {}
    for split, title in (("id", "in-distribution (test)"), ("ood", "out-of-distribution")):
        lines = {}
        for method, stats in summary.items():
            ks = sorted(
                int(key.split("@")[1])
                for key in stats
                if key.startswith(f"{split}_pass@") and int(key.split("@")[1]) <= k
            )
            lines[name(method)] = (ks, [stats[f"{split}_pass@{j}"][0] for j in ks])
        passk[title] = lines
    written.append(
        plot_curves(
            passk,
            directory / PLOT_FILES["pass_at_k"],
            xlabel="k",
            ylabel="pass@k",
            title="pass@k (temperature, top-p of the final evaluation; mean over seeds)",
            xlog=True,
            ylim=(-0.02, 1.02),
        )
    )
    return written


# --------------------------------------------------------------------------------------------
# Running: base, training, final evaluation
# --------------------------------------------------------------------------------------------

RESULT_FILE = "study.json"  # per run: its final evaluation (present = done, skipped on resume)
EVAL_MAX_NEW_TOKENS = 96  # the OOD demonstrations need up to 81 tokens (5-digit additions)


def prepare_base(log: Callable[[str], None] = print) -> dict[str, str]:
    """Build (once, cached) the embedded default's base and task data; return their paths.

    Every seed starts from this one base (the default config's, seed 0); the seed of a study
    run changes sampling, data order and dropout, not the starting model.
    """
    from hpt.demo.default import resolve
    from hpt.train.config import load_config

    config = resolve(load_config(None, []), log=log)
    return {
        "base": str(config.model.path),
        "train": str(config.data.train),
        "test": str(config.eval.sets["test"]),
        "ood": str(config.eval.sets["ood"]),
    }


def eval_questions(paths: Mapping[str, str], n: int) -> dict[str, list[Any]]:
    """The fixed final-evaluation subsets: the first ``n`` of ``test`` (as ``id``) and ``ood``."""
    from hpt.data import load_questions

    return {
        "id": load_questions(paths["test"], limit=n),
        "ood": load_questions(paths["ood"], limit=n),
    }


def evaluate_model(
    model_dir: str | Path, questions: Mapping[str, Sequence[Any]], settings: StudySettings
) -> dict[str, dict[str, Any]]:
    """avg@k, maj@k and pass@k (k = 1..settings.k) of a saved model on each question set."""
    from hpt.data import PromptBuilder
    from hpt.eval.evaluate import sample_and_score
    from hpt.eval.metrics import avg_at_k, maj_at_k, pass_at_k_mean, pass_ks
    from hpt.rollout import HFEngine, SamplingParams
    from hpt.train.config import ModelConfig
    from hpt.train.setup import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(ModelConfig(path=str(model_dir)))
    model.eval()
    engine = HFEngine(model, tokenizer, batch_size=512)
    builder = PromptBuilder(tokenizer)
    sampling = SamplingParams(
        temperature=settings.temperature,
        top_p=settings.top_p,
        max_new_tokens=EVAL_MAX_NEW_TOKENS,
        seed=settings.eval_seed,
    )
    results = {}
    for name, subset in questions.items():
        records = sample_and_score(
            subset,
            builder=builder,
            engine=engine,
            sampling=sampling,
            k=settings.k,
            benchmark=name,
            batch_questions=max(1, 512 // settings.k),
        )
        groups: dict[str, list[Mapping[str, Any]]] = {}
        for record in records:
            groups.setdefault(str(record["question_id"]), []).append(record)
        scores = [[float(r["verdict"]) for r in g] for g in groups.values()]
        answers = [[r.get("extracted") for r in g] for g in groups.values()]
        results[name] = {
            "avg@k": avg_at_k(scores),
            "maj@k": maj_at_k(answers, scores),
            "pass@k": {j: pass_at_k_mean(scores, j) for j in pass_ks(settings.k)},
        }
    return results


def run_tokens_and_seconds(run_dir: Path) -> dict[str, float]:
    """Tokens consumed and seconds spent by a finished run (from summary.json and metrics.jsonl)."""
    from hpt.train.logger import read_metrics

    summary = json.loads((run_dir / "summary.json").read_text())
    totals = summary.get("totals", {})
    records = read_metrics(run_dir)
    return {
        "steps": float(summary.get("steps", len(records))),
        "tokens_generated": float(totals.get("tokens/generated", 0.0)),
        "tokens_demonstration": float(totals.get("tokens/demonstration", 0.0)),
        "train_seconds": float(sum(r.get("time/step", 0.0) for r in records)),
        "run_seconds": float(summary.get("seconds", 0.0)),
    }


def train_run(
    method: str,
    seed: int,
    settings: StudySettings,
    output: Path,
    paths: Mapping[str, str],
    progress: bool,
) -> Path:
    """Train one (method, seed) from its recipe; return the run folder."""
    from hpt.train.config import load_config
    from hpt.train.recipe import train

    recipe_file = output / "configs" / f"{method}.yaml"
    overrides = run_overrides(method, seed, settings, output, paths)
    overrides.append(f"logging.progress={str(progress).lower()}")
    config = load_config(recipe_file, overrides)
    summary = train(config)
    return Path(summary["run_dir"])


def study_runs(settings: StudySettings, methods: Sequence[str]) -> list[tuple[str, int]]:
    """The (method, seed) pairs of the study, seed-major so a partial study covers every method."""
    return [(m, s) for s in settings.seeds for m in methods]


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def run_study(
    settings: StudySettings,
    output: str | Path,
    methods: Sequence[str] | None = None,
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run (or resume) the whole study and write results.json, results.md and the plots."""
    output = Path(output)
    methods = list(methods or METHODS)
    for method in methods:
        method_recipe(method)  # unknown names fail before anything is built
    started = time.time()
    write_recipes(output / "configs")
    paths = prepare_base(log=log)
    questions = eval_questions(paths, settings.eval_questions)
    base_file = output / "base" / RESULT_FILE
    if base_file.exists():
        base = json.loads(base_file.read_text())
    else:
        log("evaluating the base model")
        t0 = time.perf_counter()
        evals = evaluate_model(paths["base"], questions, settings)
        base = flat_record("base", -1, evals, {"eval_seconds": time.perf_counter() - t0})
        _write_json(base_file, base)
    plan = study_runs(settings, methods)
    records: list[dict[str, Any]] = []
    spent: list[float] = []
    for index, (method, seed) in enumerate(plan, 1):
        run_dir = output / run_name(method, seed)
        done_file = run_dir / RESULT_FILE
        if done_file.exists():
            records.append(json.loads(done_file.read_text()))
            log(f"[{index}/{len(plan)}] {METHODS[method].label} seed {seed}: done before, skipped")
            continue
        left = len(plan) - index + 1
        eta = f", eta {_clock(statistics.fmean(spent) * left)}" if spent else ""
        log(
            f"[{index}/{len(plan)}] {METHODS[method].label} seed {seed}: {settings.steps} steps "
            f"(elapsed {_clock(time.time() - started)}{eta})"
        )
        t0 = time.perf_counter()
        if (
            not (run_dir / "final" / "config.json").exists()
            or not (run_dir / "summary.json").exists()
        ):
            train_run(method, seed, settings, output, paths, progress)
        t1 = time.perf_counter()
        evals = evaluate_model(run_dir / "final", questions, settings)
        extra = {**run_tokens_and_seconds(run_dir), "eval_seconds": time.perf_counter() - t1}
        record = flat_record(method, seed, evals, extra)
        _write_json(done_file, record)
        records.append(record)
        spent.append(time.perf_counter() - t0)
        log(
            f"    ID acc {record['id_acc']:.3f}  OOD acc {record['ood_acc']:.3f}  "
            f"pass@{settings.k} {record.get(f'id_pass@{settings.k}', float('nan')):.3f} / "
            f"{record.get(f'ood_pass@{settings.k}', float('nan')):.3f}  "
            f"({_clock(spent[-1])})"
        )
    return write_results(output, settings, methods, base, records, time.time() - started)


def _write_json(path: Path, obj: Any) -> None:
    from hpt.utils import atomic_write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, obj)


def labels() -> dict[str, str]:
    """Method name -> its label in tables and plots (``base`` included)."""
    return {"base": "base", **{name: m.label for name, m in METHODS.items()}}


def settings_block(settings: StudySettings) -> str:
    """The study's settings and fairness rule as markdown (the header of results.md)."""
    lines = [
        f"Every method: {settings.steps} optimiser steps of 16 questions from one base, seeds "
        f"{', '.join(map(str, settings.seeds))}; AdamW lr {STUDY_LR:g} for every method "
        "(constant); 8 rollouts (LUFFY 7 + the demonstration), responses <= "
        f"{RESPONSE_TOKENS} tokens; each method's paper recipe otherwise (configs/study/).",
        f"Evaluation: first {settings.eval_questions} questions of `test` (ID, 1-3 digits) and "
        f"`ood` (4-5 digits), k = {settings.k} samples at temperature {settings.temperature:g}, "
        f"top-p {settings.top_p:g}, <= {EVAL_MAX_NEW_TOKENS} tokens; acc = avg@{settings.k} "
        f"(= pass@1), in %. Tokens in thousands; train s = summed step times.",
    ]
    return "\n".join(lines) + "\n"


def write_results(
    output: Path,
    settings: StudySettings,
    methods: Sequence[str],
    base: Mapping[str, Any],
    records: Sequence[Mapping[str, Any]],
    seconds: float,
) -> dict[str, Any]:
    """results.json, results.md and the plots of a finished study; returns the results."""
    from hpt.train.logger import read_metrics
    from hpt.utils import atomic_write_text

    summary = aggregate([base, *records])
    summary["base"]["seeds"] = []
    results = {
        "settings": asdict(settings),
        "rule": {
            "lr": STUDY_LR,
            "paper_lr": PAPER_LR,
            "recipes": {m: method_recipe(m) for m in methods},
        },
        "base": dict(base),
        "runs": list(records),
        "summary": summary,
        "seconds": seconds,
    }
    _write_json(output / "results.json", results)
    text = "# hpt demo: the comparison study\n\n" + settings_block(settings) + "\n"
    text += markdown_table(summary, labels())
    plots = output / "plots"
    text += "\nPlots: " + ", ".join(f"`plots/{f}`" for f in PLOT_FILES.values()) + "\n"
    atomic_write_text(output / "results.md", text)
    histories: dict[str, list[list[dict[str, Any]]]] = {}
    for record in records:
        run_dir = output / run_name(str(record["method"]), int(record["seed"]))
        if (run_dir / "metrics.jsonl").exists():
            summary_file = run_dir / "summary.json"
            run_summary = json.loads(summary_file.read_text()) if summary_file.exists() else None
            history = with_endpoints(read_metrics(run_dir), run_summary)
            histories.setdefault(str(record["method"]), []).append(history)
    draw_plots(histories, summary, plots, labels(), k=settings.k)
    return results


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hpt demo",
        description="The comparison study: SFT, GRPO, SFT->GRPO, LUFFY, SRFT and HPT from one "
        "tiny base on the embedded addition task (3 seeds; --quick: one seed, fewer steps).",
    )
    parser.add_argument("--quick", action="store_true", help="one seed, fewer steps, smaller eval")
    parser.add_argument("--output", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument(
        "--methods", default=None, help=f"comma-separated subset of {','.join(METHODS)}"
    )
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps of every method")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds, e.g. 0,1,2")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: the tiny model gains nothing from more, and on a "
        "busy machine several threads spin and run many times slower)",
    )
    return parser


def main(argv: list[str]) -> int:
    """``hpt demo [--quick] [--output DIR]``: run the study and print its table."""
    from dataclasses import replace

    args = _parser().parse_args(argv)
    if args.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {args.threads}")
    import torch

    torch.set_num_threads(args.threads)
    settings = QUICK if args.quick else FULL
    if args.steps is not None:
        if args.steps < 2:
            raise ConfigError(f"--steps must be >= 2, got {args.steps}")
        settings = replace(settings, steps=args.steps, eval_every=max(1, args.steps // 6))
    if args.seeds:
        try:
            seeds = tuple(int(s) for s in args.seeds.split(","))
        except ValueError:
            raise ConfigError(
                f"--seeds must be integers separated by commas, got {args.seeds!r}"
            ) from None
        settings = replace(settings, seeds=seeds)
    methods = args.methods.split(",") if args.methods else None
    results = run_study(settings, args.output, methods, progress=not args.no_progress)
    from rich.console import Console

    Console().print(rich_table(results["summary"], labels(), title=f"hpt demo ({args.output})"))
    print(
        f"wrote {Path(args.output) / 'results.md'}, results.json and plots/ "
        f"in {_clock(results['seconds'])}"
    )
    return 0
