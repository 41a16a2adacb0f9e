"""``hpt demo``: the comparison study on the embedded task, small enough for two CPU cores.

From one partially competent base (the embedded default's tiny Qwen2, cached), SFT, GRPO,
SFT->GRPO, LUFFY, SRFT and HPT train on the task's ``train`` split for the same number of
optimiser steps, each by its recipe: ``configs/study/<method>.yaml``, the only place it lives.

The rule, the same for every method (the field's standard): one small lr grid, :data:`LR_GRID`.
Phase 1: every method trains at every lr of the grid with seed 0 and is scored on the ``val``
split; its best lr by val avg@k is kept (ties: the smaller). Phase 2: the other seeds train at
that lr (seed 0 is phase 1's run); every seed's final model is evaluated on ``test`` and ``ood``.
``--quick``: one seed, no grid (lr 3e-5 for every method).

The evaluation, one sampling for the whole study (temperature 1, top-p 1, ``k`` samples a
question, <= 96 new tokens): ``ID easy`` = avg@k on the level 1-2 test questions (where RL's
sharpening of sampled accuracy shows), ``ID hard`` = avg@k on level 3 (what SFT must teach),
``ID`` = all test questions evaluated, ``OOD`` = the ood split (4-5 digits); pass@k curves.

Writes ``<output>/`` (default ``runs/demo``): a folder per run (method, lr, seed) with its
``val.json`` / ``final.json`` once evaluated (a job whose file exists is not run again),
``results.json``, ``results.md`` (methods as rows, mean ± std over seeds) and ``plots/*.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from hpt.errors import ConfigError
from hpt.utils import atomic_write_json, atomic_write_text

RECIPE_DIR = Path(__file__).resolve().parents[3] / "configs" / "study"
# the table's order and labels; any other configs/study/<name>.yaml is labelled by its name
LABELS = {"sft": "SFT", "grpo": "GRPO", "sft_grpo": "SFT->GRPO", "luffy": "LUFFY", "srft": "SRFT"}
LABELS["hpt"] = "HPT"
LR_GRID = (3e-5, 1e-4)
QUICK_LR = 3e-5
EVAL_SAMPLING = {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 96}  # OOD needs <= 81


@dataclass(frozen=True)
class StudySettings:
    """How big the study is (the recipes say how each method trains)."""

    steps: int  # optimiser steps of every method (a staged recipe splits them evenly)
    seeds: tuple[int, ...]
    lrs: tuple[float, ...]  # the grid; a single lr: no grid, no val evaluation
    test_questions: int  # final evaluation on the first N of `test`, of `ood`
    ood_questions: int
    val_questions: int  # phase 1: the first N of `val`
    k: int  # samples a question
    eval_every: int  # curves during training (greedy) every N steps on the first N of each set
    curve_questions: int
    eval_seed: int = 1234


FULL = StudySettings(
    steps=40, seeds=(0, 1, 2), lrs=LR_GRID, test_questions=96, ood_questions=48,
    val_questions=96, k=8, eval_every=10, curve_questions=24,
)  # fmt: skip
QUICK = StudySettings(
    steps=16, seeds=(0,), lrs=(QUICK_LR,), test_questions=48, ood_questions=24,
    val_questions=48, k=4, eval_every=8, curve_questions=16,
)  # fmt: skip


def label(method: str) -> str:
    return LABELS.get(method, method)


def _number(value: Any) -> float:
    return math.nan if value is None else float(value)


# ------------------------------------------------------------------ recipes and runs


def recipe_path(method: str) -> Path:
    if not RECIPE_DIR.is_dir():
        raise ConfigError(
            f"hpt demo reads its recipes from {RECIPE_DIR}, which this install lacks: "
            "run it from a clone of the repository (pip install -e .)"
        )
    path = RECIPE_DIR / f"{method}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in RECIPE_DIR.glob("*.yaml")))
        raise ConfigError(f"unknown study method {method!r}; choose from {known}")
    return path


def load_recipe(method: str, overrides: Sequence[str] = ()) -> Any:
    """A method's recipe as a validated TrainConfig (``hpt.train.config.load_config``)."""
    from hpt.train.config import load_config

    return load_config(recipe_path(method), list(overrides))


def lr_overrides(recipe: Any, lr: float) -> list[str]:
    """``--set`` overrides putting ``lr`` in ``optim.lr`` and in every stage's ``optim.lr``."""
    return [f"optim.lr={lr!r}", *(f"stages.{i}.optim.lr={lr!r}" for i in range(len(recipe.stages)))]


@dataclass(frozen=True)
class Job:
    """Train a run (unless its final model exists), then evaluate it on ``split``."""

    method: str  # "base": the base model, evaluated untrained
    lr: float | None
    seed: int
    split: str  # "val" (phase 1) or "final" (test and ood)

    @property
    def name(self) -> str:
        return "base" if self.method == "base" else f"{self.method}-lr{self.lr:g}-s{self.seed}"


@dataclass(frozen=True)
class Study:
    """What a worker needs to run a job (picklable)."""

    settings: StudySettings
    output: Path
    paths: dict[str, str]  # base, train, val, test, ood
    progress: bool = True
    quiet: bool = False  # a run's output goes to <run>/log.txt (parallel workers)

    def result_file(self, job: Job) -> Path:
        return self.output / job.name / f"{job.split}.json"


def run_overrides(recipe: Any, job: Job, study: Study) -> list[str]:
    """The ``--set`` overrides that place a method's recipe in the study."""
    s, p, n = study.settings, study.paths, len(recipe.stages)
    return [
        f"name={job.name}", f"seed={job.seed}", f"max_steps={s.steps}", "overwrite=true",
        f"output_dir={study.output}", f"model.path={p['base']}", f"data.train={p['train']}",
        f"eval.sets={{test: {p['test']}, ood: {p['ood']}}}", f"eval.every={s.eval_every}",
        f"eval.limit={s.curve_questions}", f"logging.progress={str(study.progress).lower()}",
        *lr_overrides(recipe, job.lr),
        *(f"stages.{i}.max_steps={s.steps // n + (i < s.steps % n)}" for i in range(n)),
    ]  # fmt: skip


def prepare_base(log: Callable[[str], None] = print) -> dict[str, str]:
    """Build (once, cached) the embedded default's base and task data; return their paths."""
    from hpt.demo.default import demo_dir, resolve
    from hpt.train.config import load_config

    config = resolve(load_config(None, []), log=log)
    data = demo_dir(config) / "data"
    paths = {"base": str(config.model.path), "train": str(config.data.train)}
    return {**paths, **{split: str(data / f"{split}.jsonl") for split in ("val", "test", "ood")}}


def train_run(job: Job, study: Study) -> Path:
    """Train one (method, lr, seed) from its recipe; return the run folder."""
    from hpt.train.recipe import train

    overrides = run_overrides(load_recipe(job.method), job, study)
    return Path(train(load_recipe(job.method, overrides))["run_dir"])


def run_costs(run_dir: Path) -> dict[str, float]:
    """Steps, tokens and summed step seconds of a finished run."""
    from hpt.train.logger import read_metrics

    summary, records = json.loads((run_dir / "summary.json").read_text()), read_metrics(run_dir)
    totals = summary.get("totals", {})
    return {
        "steps": float(summary.get("steps", len(records))),
        "tokens_generated": float(totals.get("tokens/generated", 0.0)),
        "tokens_demonstration": float(totals.get("tokens/demonstration", 0.0)),
        "train_seconds": float(sum(r.get("time/step", 0.0) for r in records)),
    }


# ------------------------------------------------------------------ evaluation


def split_by_level(questions: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    """Test questions as (ID easy: levels 1-2, ID hard: level 3 and above); the level is
    ``meta["level"]``, else the ``N`` of ``source = "arith-N"``."""
    levels = [int(q.meta.get("level") or str(q.source).rsplit("-", 1)[-1]) for q in questions]
    easy = [q for q, level in zip(questions, levels) if level <= 2]
    return easy, [q for q, level in zip(questions, levels) if level > 2]


def evaluate_model(model_dir: Any, study: Study, split: str) -> dict[str, list[dict]]:
    """``k`` samples a question of a saved model on the job's sets (``val``, or ``id_easy``,
    ``id_hard`` and ``ood``): set name -> sample records (``hpt.eval``'s)."""
    from hpt.data import PromptBuilder, load_questions
    from hpt.eval.evaluate import sample_and_score
    from hpt.rollout import HFEngine, SamplingParams
    from hpt.train.config import ModelConfig
    from hpt.train.setup import load_model_and_tokenizer

    s, paths = study.settings, study.paths
    if split == "val":
        sets = {"val": load_questions(paths["val"], limit=s.val_questions)}
    else:
        easy, hard = split_by_level(load_questions(paths["test"], limit=s.test_questions))
        sets = {"id_easy": easy, "id_hard": hard}
        sets["ood"] = load_questions(paths["ood"], limit=s.ood_questions)
    model, tokenizer = load_model_and_tokenizer(ModelConfig(path=str(model_dir)))
    engine = HFEngine(model.eval(), tokenizer, batch_size=512)
    sampling = SamplingParams(**EVAL_SAMPLING, seed=s.eval_seed)
    builder, per_call = PromptBuilder(tokenizer), max(1, 512 // s.k)
    return {
        name: sample_and_score(questions, builder=builder, engine=engine, sampling=sampling,
                               k=s.k, benchmark=name, batch_questions=per_call)
        for name, questions in sets.items() if questions
    }  # fmt: skip


def scores(samples: Mapping[str, Sequence[Mapping[str, Any]]], k: int) -> dict[str, float]:
    """avg@k of each set and of ``id`` (easy and hard together), pass@K of ``id`` and ``ood``,
    from sample records (``hpt.eval.metrics.summarize``)."""
    from hpt.eval.metrics import summarize

    sets = dict(samples)
    if "id_easy" in sets or "id_hard" in sets:
        sets["id"] = [*sets.get("id_easy", []), *sets.get("id_hard", [])]
    out: dict[str, float] = {}
    for name, records in sets.items():
        summary = summarize(records, k)
        out[name] = summary["avg@k"] if records else math.nan
        if name in ("id", "ood"):
            out.update({f"{name}_pass@{j}": value for j, value in summary["pass@k"].items()})
    return out


def choose_lr(val: Mapping[float, float | None]) -> float:
    """The lr with the best val score; ties go to the smaller lr (a missing score loses)."""
    score = {lr: _number(v) for lr, v in val.items()}
    return max(sorted(score), key=lambda lr: -math.inf if math.isnan(score[lr]) else score[lr])


# ------------------------------------------------------------------ running jobs


def run_job(job: Job, study: Study) -> dict[str, Any]:
    """Run a job, write its result file and return its record (read back if the file exists)."""
    done, run_dir = study.result_file(job), study.output / job.name
    if done.exists():
        return json.loads(done.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"method": job.method, "lr": job.lr, "seed": job.seed}
    with contextlib.ExitStack() as stack:
        if study.quiet:  # a worker: the terminal is kept for the study's own lines
            log = stack.enter_context(open(run_dir / "log.txt", "a", encoding="utf-8"))
            stack.enter_context(contextlib.redirect_stdout(log))
            stack.enter_context(contextlib.redirect_stderr(log))
        model = Path(study.paths["base"]) if job.method == "base" else run_dir / "final"
        if job.method != "base":
            if not (model / "config.json").exists() or not (run_dir / "summary.json").exists():
                train_run(job, study)
            record.update(run_costs(run_dir))
        started = time.perf_counter()
        record.update(scores(evaluate_model(model, study, job.split), study.settings.k))
        record.update(run=job.name, eval_seconds=time.perf_counter() - started)
    atomic_write_json(done, record)
    return record


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def run_jobs(jobs: Sequence[Job], study: Study, pool: Any = None, log: Callable = print,
             worker: Callable[[Job, Study], dict] = run_job) -> list[dict[str, Any]]:  # fmt: skip
    """Run ``jobs`` (with ``pool.map`` when given), skipping those whose result file exists."""
    files = {job: study.result_file(job) for job in jobs}
    records = {job: json.loads(file.read_text()) for job, file in files.items() if file.exists()}
    if records:
        log(f"done before, skipped: {', '.join(f'{j.name} ({j.split})' for j in records)}")
    todo, started = [job for job in jobs if job not in records], time.time()
    results = (pool.map if pool else map)(worker, todo, itertools.repeat(study))
    for job, record in zip(todo, results):
        records[job] = record
        keys = ("val",) if job.split == "val" else ("id_easy", "id_hard", "ood")
        found = ", ".join(f"{key} {100 * _number(record.get(key)):.1f}" for key in keys)
        log(f"[{len(records)}/{len(jobs)}] {job.name}: {found} ({time.time() - started:.0f} s)")
    return [records[job] for job in jobs]


def run_study(settings: StudySettings, output: str | Path, methods: Sequence[str] | None = None,
              *, jobs: int = 2, threads: int = 1, progress: bool = True,
              log: Callable[[str], None] = print) -> dict[str, Any]:  # fmt: skip
    """Run (or resume) the study: recipes -> base -> phase 1 grid -> choose -> phase 2 seeds ->
    evaluate -> results.json, results.md and the plots. Returns the results."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    started, output = time.time(), Path(output)
    recipes = {m: load_recipe(m) for m in methods or LABELS}  # bad names fail before any work
    _set_threads(threads)
    study = Study(settings, output, prepare_base(log=log), progress and jobs == 1, jobs > 1)
    spawn = {"mp_context": get_context("spawn"), "initializer": _set_threads}
    pool = ProcessPoolExecutor(jobs, initargs=(threads,), **spawn) if jobs > 1 else None
    with pool or contextlib.nullcontext():
        grid: dict[str, dict[float, float]] = {}
        if len(settings.lrs) > 1:
            log(f"phase 1: every method at lr {', '.join(f'{lr:g}' for lr in settings.lrs)}")
            phase1 = [Job(m, lr, 0, "val") for m in recipes for lr in settings.lrs]
            for job, record in zip(phase1, run_jobs(phase1, study, pool, log)):
                grid.setdefault(job.method, {})[job.lr] = record["val"]
        chosen = {m: choose_lr(grid[m]) if m in grid else settings.lrs[0] for m in recipes}
        log(f"phase 2: seeds {', '.join(map(str, settings.seeds))} at the chosen lr; test, ood")
        phase2 = [Job("base", None, 0, "final")]
        phase2 += [Job(m, chosen[m], seed, "final") for seed in settings.seeds for m in recipes]
        records = run_jobs(phase2, study, pool, log)
    return write_results(study, recipes, grid, chosen, records, time.time() - started)


# ------------------------------------------------------------------ aggregation and tables


def mean_std(values: Sequence[float | None]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value; None and NaN ignored)."""
    kept = [v for v in map(_number, values) if not math.isnan(v)]
    if not kept:
        return math.nan, math.nan
    return statistics.fmean(kept), statistics.stdev(kept) if len(kept) > 1 else 0.0


def aggregate(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method (first-seen order): ``seeds`` and ``[mean, std]`` of every number."""
    by_method: dict[str, list[Mapping[str, Any]]] = {}
    for record in records:
        by_method.setdefault(str(record["method"]), []).append(record)
    summary: dict[str, dict[str, Any]] = {}
    for method, rows in by_method.items():
        summary[method] = {"seeds": [r["seed"] for r in rows]}
        for key in dict.fromkeys(k for r in rows for k in r if k not in ("method", "seed")):
            values = [r.get(key) for r in rows]
            if any(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                summary[method][key] = list(mean_std(values))
    return summary


def columns(k: int) -> dict[str, tuple[str, float, str]]:
    """Column label -> (record key, scale, format): accuracies in %, tokens in thousands."""
    acc = {"ID easy": "id_easy", "ID hard": "id_hard", "ID": "id", "OOD": "ood"}
    acc |= {f"ID pass@{k}": f"id_pass@{k}", f"OOD pass@{k}": f"ood_pass@{k}"}
    return {
        **{name: (key, 100.0, ".1f") for name, key in acc.items()},
        "lr": ("lr", 1.0, "g"),
        "gen. tokens (k)": ("tokens_generated", 1e-3, ".0f"),
        "demo tokens (k)": ("tokens_demonstration", 1e-3, ".0f"),
        "train s": ("train_seconds", 1.0, ".0f"),
    }


def _cell(stats: Any, scale: float = 100.0, fmt: str = ".1f") -> str:
    """``[mean, std]`` (None or NaN: missing) as a cell of the table (``hpt.eval.report.cell``)."""
    from hpt.eval.report import cell

    mean, std = map(_number, stats) if stats else (math.nan, math.nan)
    return cell(mean, std, scale, fmt)


def table_rows(summary: Mapping, k: int, grid: Mapping | None = None) -> tuple[list, list]:
    """Header and rows of the results table: methods as rows, ``mean ± std`` over seeds; with
    the lr grid, a column of each method's val avg@k at each lr (the chosen lr is ``lr``).
    ``hpt.eval.report`` writes them (``to_markdown``, ``print_rows``), as it does ``hpt eval``'s."""
    spec, grid = columns(k), grid or {}
    lrs = sorted({lr for scores in grid.values() for lr in scores})
    header = ["method", "seeds", *spec]
    if lrs:
        header.append(f"val avg@k ({' / '.join(f'{lr:g}' for lr in lrs)})")
    rows = []
    for method, stats in summary.items():
        row = [label(method), str(len(stats["seeds"]) or "-")]
        row += [_cell(stats.get(key), scale, fmt) for key, scale, fmt in spec.values()]
        if lrs:
            row.append(" / ".join(_cell([grid.get(method, {}).get(lr), 0]) for lr in lrs))
        rows.append(row)
    return header, rows


def diff_lines(summary: Mapping[str, Mapping[str, Any]], ours: str = "hpt") -> list[str]:
    """``HPT - <method>: ID easy +x.x ± y.y, ...``: the difference of the means in points, ± the
    seeds' spread of a difference (the root of the sum of both variances), whatever the sign."""
    keys = {"ID easy": "id_easy", "ID hard": "id_hard", "ID": "id", "OOD": "ood"}
    lines = []
    for method in (m for m in summary if m != ours and ours in summary):
        parts = []
        for name, key in keys.items():
            (m1, s1), (m2, s2) = (summary[x].get(key) or [None, None] for x in (ours, method))
            diff = 100 * (_number(m1) - _number(m2))
            spread = 100 * math.hypot(_number(s1), _number(s2))
            parts.append(f"{name} -" if math.isnan(diff) else f"{name} {diff:+.1f} ± {spread:.1f}")
        lines.append(f"{label(ours)} - {label(method)}: " + ", ".join(parts))
    return lines


def settings_block(s: StudySettings) -> str:
    """The rule and the evaluation, in words (the head of results.md)."""
    lrs, seeds = ", ".join(f"{lr:g}" for lr in s.lrs), ", ".join(map(str, s.seeds))
    rule = f"No lr grid (--quick, or one --lrs): lr {lrs} for every method, not chosen on `val`"
    if len(s.lrs) > 1:
        rule = (
            f"Rule: one lr grid ({lrs}) for every method, each lr trained with seed 0 and scored "
            f"on the first {s.val_questions} `val` questions (avg@{s.k}); the best is kept (ties: "
            "the smaller), column `lr`"
        )
    return (
        f"{rule}. Seeds {seeds}; {s.steps} optimiser steps from one base; recipes in "
        f"configs/study/.\n\nEvaluation: k = {s.k} samples a question at temperature 1, top-p 1, "
        f"<= 96 new tokens, on the first {s.test_questions} `test` questions (ID easy: levels "
        f"1-2, ID hard: level 3, ID: all) and the first {s.ood_questions} `ood` ones (4-5 "
        "digits): avg@k and pass@k in %, mean ± std over seeds; tokens in thousands; train s: "
        "summed step times.\n"
    )


def write_results(study: Study, recipes: Mapping, grid: Mapping, chosen: Mapping,
                  records: Sequence[dict], seconds: float) -> dict[str, Any]:  # fmt: skip
    """results.json, results.md and the plots of a finished study (records: base first)."""
    from hpt.eval.report import to_markdown
    from hpt.train.logger import read_metrics

    summary = aggregate(records)
    summary["base"]["seeds"] = []
    val = {m: {f"{lr:g}": v for lr, v in scores.items()} for m, scores in grid.items()}
    results = {
        "settings": asdict(study.settings),
        "rule": {"lr_grid": study.settings.lrs, "val_avg@k": val, "chosen_lr": chosen},
        "recipes": {m: str(recipe_path(m)) for m in recipes},
        "base": records[0],
        "runs": records[1:],
        "summary": summary,
        "diffs": diff_lines(summary),
        "seconds": seconds,
    }
    results["table"] = table_rows(summary, study.settings.k, grid)
    atomic_write_json(study.output / "results.json", results)
    histories: dict[str, list[list[dict[str, Any]]]] = {}
    for record in records[1:]:
        run_dir = study.output / record["run"]
        if (run_dir / "summary.json").exists():
            run_summary = json.loads((run_dir / "summary.json").read_text())
            history = with_endpoints(read_metrics(run_dir), run_summary)
            histories.setdefault(record["method"], []).append(history)
    gated = [m for m, recipe in recipes.items() if has_gate(recipe)]
    plots = draw_plots(histories, summary, study.output / "plots", gated)
    text = "# hpt demo: the comparison study\n\n" + settings_block(study.settings) + "\n"
    text += to_markdown(*results["table"]) + "\n"
    if results["diffs"]:
        text += "HPT minus each row, in points (± the root of both rows' seed variances):\n\n"
        text += "".join(f"- {line}\n" for line in results["diffs"])
    text += "\nPlots: " + ", ".join(f"`plots/{path.name}`" for path in plots) + "\n"
    atomic_write_text(study.output / "results.md", text)
    return results


# ------------------------------------------------------------------ plots


def has_gate(recipe: Any) -> bool:
    """Whether a recipe routes questions by the model's performance (HPT's gate)."""
    from hpt.algorithms import get_algorithm
    from hpt.gate import FIXED_ROUTES

    stages = recipe.resolved_stages()
    return any(get_algorithm(s.algorithm).routes not in FIXED_ROUTES for s in stages)


def mean_curve(histories: Sequence[Sequence[Mapping[str, Any]]], key: str) -> tuple[list, list]:
    """(steps, mean over runs) of ``key`` at the steps where any run logged it."""
    per_step: dict[float, list[float]] = {}
    for record in itertools.chain.from_iterable(histories):
        value = record.get(key)
        if isinstance(value, (int, float)) and not math.isnan(float(value)):
            per_step.setdefault(float(record["step"]), []).append(float(value))
    steps = sorted(per_step)
    return steps, [statistics.fmean(per_step[s]) for s in steps]


def with_endpoints(records: Sequence[Mapping], summary: Mapping) -> list[dict[str, Any]]:
    """A run's metrics plus ``eval_before`` at step 0 and ``eval_after`` at the last step."""
    before = {f"eval/{k}": v for k, v in (summary.get("eval_before") or {}).items()}
    after = {f"eval/{k}": v for k, v in (summary.get("eval_after") or {}).items()}
    last = summary.get("steps", records[-1]["step"] if records else 0)
    return [{"step": 0, **before}, *map(dict, records), {"step": last, **after}]


# file -> (y label, title); a figure without panels is not drawn
PLOT_FILES = {
    "accuracy_vs_step.png": ("accuracy", "Held-out accuracy during training (greedy)"),
    "hpt_routes.png": ("fraction of questions", "Questions routed to SFT (none right) vs RL"),
    "entropy_vs_step.png": ("entropy (nats)", "Entropy of the trained tokens"),
    "pass_at_k.png": ("pass@k", "pass@k (the study's sampling)"),
}


def draw_plots(histories: Mapping, summary: Mapping, directory: Any, gated: Sequence = ()) -> list:
    """Accuracy, the gate's routes and entropy against step (from method -> per-seed metrics),
    pass@k against k (from the summary); every line a mean over seeds. Returns the files."""
    from hpt.eval.plots import draw_panels, pass_at_k_curve

    def curves(key: str, methods: Sequence = tuple(histories)) -> dict:
        return {label(m): mean_curve(histories[m], key) for m in methods}

    def passk(split: str) -> dict:  # method -> (k, mean pass@k over seeds)
        at = f"{split}_pass@"
        means = {m: {key[len(at) :]: v[0] for key, v in stats.items() if key.startswith(at)}
                 for m, stats in summary.items()}  # fmt: skip
        return {label(m): pass_at_k_curve(values) for m, values in means.items()}

    routes = {f"route {r}": f"route_{r}" for r in ("sft", "rl")}
    figures = {
        "accuracy_vs_step.png": {f"held-out {s}": curves(f"eval/{s}") for s in ("test", "ood")},
        "hpt_routes.png": {
            f"{label(m)}'s gate": {name: curves(key, [m])[label(m)] for name, key in routes.items()}
            for m in gated
            if m in histories
        },
        "entropy_vs_step.png": {"mean token entropy": curves("entropy")},
        "pass_at_k.png": {
            "in-distribution (test)": passk("id"),
            "out-of-distribution (ood)": passk("ood"),
        },
    }
    written = []
    for file, panels in figures.items():
        if not panels:
            continue
        ylabel, title = PLOT_FILES[file]
        passk_file = "pass" in file
        written.append(
            draw_panels(Path(directory) / file, panels, ylabel=ylabel, title=f"{title}; mean over seeds",
                        xlabel="k" if passk_file else "optimiser step", log2_x=passk_file,
                        ylim=None if "entropy" in file else (-0.02, 1.02), panel_size=(5.2, 3.9))
        )  # fmt: skip
    return written


# ------------------------------------------------------------------ the command


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hpt demo",
        description="The comparison study: SFT, GRPO, SFT->GRPO, LUFFY, SRFT and HPT from one tiny "
        "base on the embedded task; one lr grid for all, chosen on val; 3 seeds.",
    )
    add = parser.add_argument
    add("--quick", action="store_true", help="one seed, no lr grid, fewer steps, smaller eval")
    add("--output", default="runs/demo", help="output folder (default runs/demo)")
    add("--methods", help="comma-separated names of configs/study/*.yaml (default: all six)")
    add("--steps", type=int, help="optimiser steps of every method")
    add("--seeds", help="comma-separated seeds, e.g. 0,1,2")
    add("--lrs", help="the lr grid (default 3e-5,1e-4; one value: no grid)")
    add("--jobs", type=int, default=2, help="worker processes for independent runs (default 2)")
    add("--threads", type=int, default=1, help="torch CPU threads a worker (default 1)")
    add("--no-progress", action="store_true", help="no progress bars")
    return parser


def _numbers(text: str, kind: type, flag: str) -> tuple:
    try:
        return tuple(kind(item) for item in text.split(","))
    except ValueError:
        raise ConfigError(f"{flag} must be numbers separated by commas, got {text!r}") from None


def main(argv: list[str]) -> int:
    """``hpt demo [--quick] [--output DIR] ...``: run the study and print its table."""
    args = _parser().parse_args(argv)
    for flag, least in (("threads", 1), ("jobs", 1), ("steps", 2)):
        if getattr(args, flag) is not None and getattr(args, flag) < least:
            raise ConfigError(f"--{flag} must be >= {least}, got {getattr(args, flag)}")
    settings = QUICK if args.quick else FULL
    if args.steps is not None:
        settings = replace(settings, steps=args.steps, eval_every=max(1, args.steps // 4))
    if args.seeds:
        settings = replace(settings, seeds=_numbers(args.seeds, int, "--seeds"))
    if args.lrs:
        lrs = _numbers(args.lrs, float, "--lrs")
        if not all(0 < lr < math.inf for lr in lrs):
            raise ConfigError(f"--lrs must be positive numbers, got {args.lrs!r}")
        settings = replace(settings, lrs=tuple(sorted(set(lrs))))
    methods = args.methods.split(",") if args.methods else None
    for method in methods or ():
        recipe_path(method)
    results = run_study(settings, args.output, methods, jobs=args.jobs, threads=args.threads,
                        progress=not args.no_progress)  # fmt: skip
    from hpt.eval.report import print_rows

    print_rows(*results["table"], title=f"hpt demo ({args.output})")
    for line in results["diffs"]:
        print(line)
    print(f"wrote {args.output}/results.md, results.json, plots/ in {results['seconds']:.0f} s")
    return 0
