"""``hpt demo``: the comparison study on the embedded task, small enough for two CPU cores.

From one partially competent base (the embedded default's tiny Qwen2, SFT-pretrained on the easy
additions and cached), train SFT, GRPO, SFT->GRPO, LUFFY, SRFT and HPT on the task's ``train``
split, the same number of optimiser steps each. A method's recipe lives only in
``configs/study/<method>.yaml`` (a full ``hpt train`` config); this module adds the run's name,
seed, steps, paths and learning rate.

The rule, the same for every method (the field's standard): one small learning-rate grid,
:data:`LR_GRID`. Phase 1: each method trains at each lr of the grid with seed 0 and is scored on
the task's ``val`` split (avg@k); its lr is the best one (ties: the smaller lr). Phase 2: the other
seeds train at that lr (seed 0 is phase 1's run), and the final model of every seed is evaluated
on ``test`` and ``ood``. ``--quick``: one seed and no grid (lr 3e-5 for every method).

The evaluation, one sampling setting for the whole study (temperature 1, top-p 1, ``k`` samples a
question, <= 96 new tokens), on the first questions of ``test`` and ``ood``: ``ID easy`` = avg@k
on the level 1-2 test questions (where RL's sharpening of sampled accuracy shows), ``ID hard`` =
avg@k on the level-3 ones (what SFT must teach), ``ID`` = all test questions, ``OOD`` = the ood
split (4-5 digits), and pass@k curves of ID and OOD.

Writes ``<output>/`` (default ``runs/demo``): a run folder per (method, lr, seed) holding its
``val.json`` / ``final.json`` once evaluated (a job whose file exists is not run again),
``results.json``, ``results.md`` (methods as rows, mean ± std over seeds) and ``plots/*.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from hpt.errors import ConfigError

RECIPE_DIR = Path(__file__).resolve().parents[3] / "configs" / "study"
LABELS = {"sft": "SFT", "grpo": "GRPO", "sft_grpo": "SFT->GRPO", "luffy": "LUFFY", "srft": "SRFT"}
LABELS["hpt"] = "HPT"  # the table's order; any other configs/study/*.yaml is labelled by its name
LR_GRID = (3e-5, 1e-4)
QUICK_LR = 3e-5
EVAL_SAMPLING = {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 96}  # OOD needs <= 81 tokens


@dataclass(frozen=True)
class StudySettings:
    """How big the study is (the recipes say how each method trains)."""

    steps: int  # optimiser steps of every method (a staged recipe splits them evenly)
    seeds: tuple[int, ...]
    lrs: tuple[float, ...]  # the grid; a single lr: no grid, no val evaluation
    test_questions: int  # final evaluation: the first N of `test` and of `ood`
    ood_questions: int
    val_questions: int  # phase 1: the first N of `val`
    k: int  # samples a question
    eval_every: int  # held-out curves during training (greedy), every N steps,
    curve_questions: int  # on the first N of `test` and `ood`
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


# ------------------------------------------------------------------ recipes and runs


def recipe_path(method: str) -> Path:
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
    """``--set`` overrides putting ``lr`` in ``optim.lr`` and every stage's ``optim.lr``."""
    stages = [f"stages.{i}.optim.lr={lr!r}" for i in range(len(recipe.stages))]
    return [f"optim.lr={lr!r}", *stages]


def run_name(method: str, lr: float, seed: int) -> str:
    return f"{method}-lr{lr:g}-s{seed}"


@dataclass(frozen=True)
class Job:
    """Train a run (unless its final model exists), then evaluate it on ``split``."""

    method: str  # "base": the base model, evaluated untrained
    lr: float | None
    seed: int
    split: str  # "val" (phase 1) or "final" (test and ood)

    @property
    def name(self) -> str:
        return "base" if self.method == "base" else run_name(self.method, self.lr, self.seed)


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
    settings, paths, steps = study.settings, study.paths, study.settings.steps
    n = len(recipe.stages)
    return [
        f"name={job.name}",
        f"seed={job.seed}",
        f"max_steps={steps}",
        f"output_dir={study.output}",
        "overwrite=true",
        f"model.path={paths['base']}",
        f"data.train={paths['train']}",
        f"eval.sets={{test: {paths['test']}, ood: {paths['ood']}}}",
        f"eval.every={settings.eval_every}",
        f"eval.limit={settings.curve_questions}",
        f"logging.progress={str(study.progress).lower()}",
        *lr_overrides(recipe, job.lr),
        *(f"stages.{i}.max_steps={steps // n + (i < steps % n)}" for i in range(n)),
    ]


def prepare_base(log: Callable[[str], None] = print) -> dict[str, str]:
    """Build (once, cached) the embedded default's base and task data; return their paths."""
    from hpt.demo.default import demo_dir, resolve
    from hpt.train.config import load_config

    config = resolve(load_config(None, []), log=log)
    data = demo_dir(config) / "data"
    return {
        "base": str(config.model.path),
        "train": str(config.data.train),
        **{split: str(data / f"{split}.jsonl") for split in ("val", "test", "ood")},
    }


def train_run(job: Job, study: Study) -> Path:
    """Train one (method, lr, seed) from its recipe; return the run folder."""
    from hpt.train.recipe import train

    overrides = run_overrides(load_recipe(job.method), job, study)
    return Path(train(load_recipe(job.method, overrides))["run_dir"])


def run_costs(run_dir: Path) -> dict[str, float]:
    """Tokens and seconds of a finished run (summary.json and metrics.jsonl)."""
    from hpt.train.logger import read_metrics

    summary = json.loads((run_dir / "summary.json").read_text())
    totals, records = summary.get("totals", {}), read_metrics(run_dir)
    return {
        "steps": float(summary.get("steps", len(records))),
        "tokens_generated": float(totals.get("tokens/generated", 0.0)),
        "tokens_demonstration": float(totals.get("tokens/demonstration", 0.0)),
        "train_seconds": float(sum(r.get("time/step", 0.0) for r in records)),
    }


# ------------------------------------------------------------------ evaluation


def question_level(question: Any) -> int:
    level = question.meta.get("level")
    return int(level if level is not None else str(question.source).rsplit("-", 1)[-1])


def split_by_level(questions: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    """Test questions as (ID easy: levels 1-2, ID hard: level 3 and above)."""
    easy = [q for q in questions if question_level(q) <= 2]
    return easy, [q for q in questions if question_level(q) > 2]


def eval_sets(paths: Mapping[str, str], settings: StudySettings, split: str) -> dict[str, list]:
    """The questions of a job's evaluation: ``val``, or ``id_easy``, ``id_hard`` and ``ood``."""
    from hpt.data import load_questions

    if split == "val":
        return {"val": load_questions(paths["val"], limit=settings.val_questions)}
    easy, hard = split_by_level(load_questions(paths["test"], limit=settings.test_questions))
    ood = load_questions(paths["ood"], limit=settings.ood_questions)
    return {"id_easy": easy, "id_hard": hard, "ood": ood}


def evaluate_model(
    model_dir: str | Path, sets: Mapping[str, Sequence[Any]], settings: StudySettings
) -> dict[str, list[dict[str, Any]]]:
    """``k`` samples a question of a saved model on each set; the sample records of each."""
    from hpt.data import PromptBuilder
    from hpt.eval.evaluate import sample_and_score
    from hpt.rollout import HFEngine, SamplingParams
    from hpt.train.config import ModelConfig
    from hpt.train.setup import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(ModelConfig(path=str(model_dir)))
    engine = HFEngine(model.eval(), tokenizer, batch_size=512)
    sampling = SamplingParams(**EVAL_SAMPLING, seed=settings.eval_seed)
    return {
        name: sample_and_score(
            questions,
            builder=PromptBuilder(tokenizer),
            engine=engine,
            sampling=sampling,
            k=settings.k,
            benchmark=name,
            batch_questions=max(1, 512 // settings.k),
        )  # fmt: skip
        for name, questions in sets.items()
        if questions
    }


def scores(samples: Mapping[str, Sequence[Mapping[str, Any]]], k: int) -> dict[str, float]:
    """A run's numbers from its sample records: avg@k of each set, of ``id`` (easy and hard
    together), and pass@K of ``id`` and ``ood`` (``hpt.eval.metrics.summarize``)."""
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


def _number(value: Any) -> float:
    return math.nan if value is None else float(value)


def choose_lr(val: Mapping[float, float | None]) -> float:
    """The lr with the best val score; ties go to the smaller lr (a missing score loses)."""
    score = {lr: _number(v) for lr, v in val.items()}
    return max(sorted(score), key=lambda lr: -math.inf if math.isnan(score[lr]) else score[lr])


# ------------------------------------------------------------------ running jobs


def run_job(job: Job, study: Study) -> dict[str, Any]:
    """Run a job, write its result file and return its record (read back if the file exists)."""
    done = study.result_file(job)
    if done.exists():
        return json.loads(done.read_text())
    run_dir = study.output / job.name
    run_dir.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"method": job.method, "lr": job.lr, "seed": job.seed}
    with contextlib.ExitStack() as stack:
        if study.quiet:
            log = stack.enter_context(open(run_dir / "log.txt", "a", encoding="utf-8"))
            stack.enter_context(contextlib.redirect_stdout(log))
            stack.enter_context(contextlib.redirect_stderr(log))
        model_dir = Path(study.paths["base"])
        if job.method != "base":
            model_dir = run_dir / "final"
            if not (model_dir / "config.json").exists() or not (run_dir / "summary.json").exists():
                train_run(job, study)
            record.update(run_costs(run_dir))
        started = time.perf_counter()
        sets = eval_sets(study.paths, study.settings, job.split)
        record.update(scores(evaluate_model(model_dir, sets, study.settings), study.settings.k))
        record["eval_seconds"] = time.perf_counter() - started
    write_json(done, record)
    return record


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def describe(job: Job, record: Mapping[str, Any]) -> str:
    lr = "" if job.lr is None else f" lr {job.lr:g} seed {job.seed}"
    keys = ("val",) if job.split == "val" else ("id_easy", "id_hard", "ood")
    found = ", ".join(f"{key} {100 * _number(record.get(key)):.1f}" for key in keys)
    return f"{label(job.method)}{lr}: {found}"


def run_jobs(
    jobs: Sequence[Job],
    study: Study,
    pool: Any = None,
    log: Callable[[str], None] = print,
    worker: Callable[[Job, Study], dict[str, Any]] = run_job,
) -> list[dict[str, Any]]:
    """Run ``jobs`` (in ``pool`` when given), skipping those whose result file exists."""
    from concurrent.futures import as_completed

    records: dict[Job, dict[str, Any]] = {}
    for job in jobs:
        if study.result_file(job).exists():
            records[job] = json.loads(study.result_file(job).read_text())
            log(f"{job.name} ({job.split}): done before, skipped")
    todo, started = [job for job in jobs if job not in records], time.time()

    def finished(job: Job, record: dict[str, Any]) -> None:
        records[job] = record
        log(
            f"[{len(records)}/{len(jobs)}] {describe(job, record)} ({_clock(time.time() - started)})"
        )

    if pool is None:
        for job in todo:
            finished(job, worker(job, study))
    else:
        futures = {pool.submit(worker, job, study): job for job in todo}
        try:
            for future in as_completed(futures):
                finished(futures[future], future.result())
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return [records[job] for job in jobs]


def run_study(
    settings: StudySettings,
    output: str | Path,
    methods: Sequence[str] | None = None,
    *,
    jobs: int = 2,
    threads: int = 1,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run (or resume) the study; write results.json, results.md and the plots; return the results."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    started, output = time.time(), Path(output)
    recipes = {m: load_recipe(m) for m in methods or LABELS}  # bad names fail before any work
    paths = prepare_base(log=log)
    study = Study(settings, output, paths, progress=progress and jobs == 1, quiet=jobs > 1)
    if jobs == 1:
        _set_threads(threads)
    spawn = dict(mp_context=get_context("spawn"), initializer=_set_threads, initargs=(threads,))
    with ProcessPoolExecutor(jobs, **spawn) if jobs > 1 else contextlib.nullcontext() as pool:
        grid: dict[str, dict[float, float]] = {}
        if len(settings.lrs) > 1:
            log(f"phase 1: every method at lr {', '.join(f'{lr:g}' for lr in settings.lrs)}")
            phase1 = [Job(m, lr, 0, "val") for m in recipes for lr in settings.lrs]
            for job, record in zip(phase1, run_jobs(phase1, study, pool, log)):
                grid.setdefault(job.method, {})[job.lr] = record["val"]
        chosen = {m: choose_lr(grid[m]) if m in grid else settings.lrs[0] for m in recipes}
        log(f"phase 2: seeds {', '.join(map(str, settings.seeds))} at the chosen lr; test, ood")
        phase2 = [Job("base", None, 0, "final")]
        phase2 += [Job(m, chosen[m], s, "final") for s in settings.seeds for m in recipes]
        records = run_jobs(phase2, study, pool, log)
    return write_results(study, recipes, grid, chosen, records, time.time() - started)


def write_json(path: Path, obj: Any) -> None:
    from hpt.utils import atomic_write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, obj)


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
        keys = dict.fromkeys(k for r in rows for k in r if k not in ("method", "seed"))
        summary[method] = {"seeds": [r["seed"] for r in rows]}
        for key in keys:
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
    mean, std = (list(stats) + [None, None])[:2] if stats else (None, None)
    mean, std = _number(mean), _number(std)
    if math.isnan(mean):
        return "-"
    if math.isnan(std) or std == 0:
        return f"{mean * scale:{fmt}}"
    return f"{mean * scale:{fmt}} ± {std * scale:{fmt}}"


def table_rows(summary: Mapping[str, Mapping[str, Any]], k: int) -> tuple[list[str], list[list]]:
    """Header and rows of the results table: methods as rows, ``mean ± std`` over seeds."""
    spec = columns(k)
    rows = [
        [label(m), str(len(s.get("seeds", [])) or "-")]
        + [_cell(s.get(key), scale, fmt) for key, scale, fmt in spec.values()]
        for m, s in summary.items()
    ]
    return ["method", "seeds", *spec], rows


def grid_rows(grid: Mapping[str, Mapping[float, Any]], chosen: Mapping[str, float]):
    """Header and rows of the lr grid: val avg@k (%) at each lr and the chosen lr."""
    lrs = sorted({lr for scores in grid.values() for lr in scores})
    rows = [
        [label(m), *(_cell([scores.get(lr), 0]) for lr in lrs), f"{chosen[m]:g}"]
        for m, scores in grid.items()
    ]
    return ["method", *(f"val avg@k, lr {lr:g}" for lr in lrs), "chosen lr"], rows


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def rich_table(header: Sequence[str], rows: Sequence[Sequence[str]], title: str = "") -> Any:
    from rich.table import Table

    table = Table(title=title or None)
    for index, name in enumerate(header):
        table.add_column(name, justify="left" if index == 0 else "right")
    for row in rows:
        table.add_row(*row)
    return table


DIFF_KEYS = {"ID easy": "id_easy", "ID hard": "id_hard", "ID": "id", "OOD": "ood"}


def diff_lines(summary: Mapping[str, Mapping[str, Any]], ours: str = "hpt") -> list[str]:
    """``HPT - <method>: ID easy +x.x ± y.y, ...``: difference of the means in points, ± the
    spread of seeds of the difference (sqrt of the sum of both variances), whatever the sign."""
    if ours not in summary:
        return []
    lines = []
    for method, stats in summary.items():
        if method == ours:
            continue
        parts = []
        for name, key in DIFF_KEYS.items():
            (m1, s1), (m2, s2) = (
                (summary[ours].get(key) or [None] * 2),
                (stats.get(key) or [None] * 2),
            )
            diff, spread = (
                100 * (_number(m1) - _number(m2)),
                100 * math.hypot(_number(s1), _number(s2)),
            )
            parts.append(f"{name} -" if math.isnan(diff) else f"{name} {diff:+.1f} ± {spread:.1f}")
        lines.append(f"{label(ours)} - {label(method)}: " + ", ".join(parts))
    return lines


def settings_block(settings: StudySettings) -> str:
    """The rule and the evaluation as markdown (the head of results.md)."""
    grid = ", ".join(f"{lr:g}" for lr in settings.lrs)
    if len(settings.lrs) > 1:
        rule = (
            f"Rule: the same lr grid ({grid}) for every method; each trains at each lr with seed "
            f"0 and is scored on the first {settings.val_questions} `val` questions (avg@"
            f"{settings.k}); the best val lr is kept (ties: the smaller), seeds "
            f"{', '.join(map(str, settings.seeds))} train at it."
        )
    else:
        rule = f"No lr grid (--quick): lr {grid} for every method, not chosen on `val`."
    sampling = ", ".join(f"{key} {value:g}" for key, value in EVAL_SAMPLING.items())
    return (
        f"{rule} Every method: {settings.steps} optimiser steps from one base, its recipe in "
        "configs/study/.\n"
        f"Evaluation: k = {settings.k} samples a question ({sampling}) on the first "
        f"{settings.test_questions} `test` questions (ID easy: levels 1-2, ID hard: level 3, "
        f"ID: all) and the first {settings.ood_questions} `ood` ones (4-5 digits); avg@k and "
        "pass@k in %, mean ± std over seeds; tokens in thousands; train s = summed step times.\n"
    )


def write_results(study, recipes, grid, chosen, records, seconds) -> dict[str, Any]:
    """results.json, results.md and the plots of a finished study; returns the results."""
    from hpt.train.logger import read_metrics
    from hpt.utils import atomic_write_text

    output, k = study.output, study.settings.k
    summary = aggregate(records)
    summary["base"]["seeds"] = []
    results = {
        "settings": asdict(study.settings),
        "rule": {
            "lr_grid": list(study.settings.lrs),
            "val_avg@k": {
                m: {f"{lr:g}": v for lr, v in scores.items()} for m, scores in grid.items()
            },
            "chosen_lr": chosen,
            "recipes": {m: str(recipe_path(m)) for m in recipes},
        },
        "base": records[0],
        "runs": records[1:],
        "summary": summary,
        "diffs": diff_lines(summary),
        "seconds": seconds,
    }
    write_json(output / "results.json", results)
    text = "# hpt demo: the comparison study\n\n" + settings_block(study.settings) + "\n"
    if grid:
        text += markdown_table(*grid_rows(grid, chosen)) + "\n"
    text += markdown_table(*table_rows(summary, k)) + "\n"
    text += "".join(f"- {line}\n" for line in results["diffs"])
    text += "\nPlots: " + ", ".join(f"`plots/{f}`" for f in PLOT_FILES.values()) + "\n"
    atomic_write_text(output / "results.md", text)
    histories: dict[str, list[list[dict[str, Any]]]] = {}
    for record in records[1:]:
        run_dir = output / run_name(record["method"], record["lr"], record["seed"])
        if (run_dir / "metrics.jsonl").exists():
            file = run_dir / "summary.json"
            run_summary = json.loads(file.read_text()) if file.exists() else None
            history = with_endpoints(read_metrics(run_dir), run_summary)
            histories.setdefault(record["method"], []).append(history)
    draw_plots(histories, summary, output / "plots", [m for m, r in recipes.items() if has_gate(r)])
    return results


# ------------------------------------------------------------------ plots


def has_gate(recipe: Any) -> bool:
    """Whether a recipe routes questions by the model's performance (HPT's gate)."""
    from hpt.algorithms import get_algorithm
    from hpt.gate import FIXED_ROUTES

    stages = recipe.resolved_stages()
    return any(get_algorithm(s.algorithm).routes not in FIXED_ROUTES for s in stages)


def mean_curve(histories: Sequence[Sequence[Mapping[str, Any]]], key: str):
    """(steps, mean over runs) of ``key`` at the steps where any run logged it."""
    per_step: dict[float, list[float]] = {}
    for records in histories:
        for record in records:
            value = record.get(key)
            if isinstance(value, (int, float)) and not math.isnan(float(value)):
                per_step.setdefault(float(record["step"]), []).append(float(value))
    steps = sorted(per_step)
    return steps, [statistics.fmean(per_step[s]) for s in steps]


def with_endpoints(records, summary, prefix: str = "eval/") -> list[dict[str, Any]]:
    """A run's metrics plus ``eval_before`` at step 0 and ``eval_after`` at the last step."""
    out = [dict(r) for r in records]
    if summary:
        before = {f"{prefix}{k}": v for k, v in (summary.get("eval_before") or {}).items()}
        after = {f"{prefix}{k}": v for k, v in (summary.get("eval_after") or {}).items()}
        out.insert(0, {"step": 0, **before})
        out.append({"step": summary.get("steps", records[-1]["step"] if records else 0), **after})
    return out


def plot_curves(panels, path, *, xlabel, ylabel, title, xlog=False, ylim=None) -> Path:
    """One figure, one panel per key of ``panels`` (panel title -> {line label: (x, y)})."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.9), squeeze=False)
    for ax, (panel, lines) in zip(axes[0], panels.items()):
        for name, (x, y) in lines.items():
            if len(x):
                ax.plot(list(x), list(y), marker="o", markersize=3, label=name)
        if xlog:
            ax.set_xscale("log", base=2)
        if ylim:
            ax.set_ylim(*ylim)
        ax.set(title=panel, xlabel=xlabel, ylabel=ylabel)
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


def draw_plots(histories, summary, directory, gated: Sequence[str] = ()) -> list[Path]:
    """Held-out accuracy, the gate's routes and entropy against step (mean over seeds, from
    method -> per-seed metrics), and pass@k against k (from the summary)."""
    directory, unit = Path(directory), (-0.02, 1.02)
    step = {"xlabel": "optimiser step"}
    accuracy = {
        f"held-out {s} (greedy)": {
            label(m): mean_curve(h, f"eval/{s}") for m, h in histories.items()
        }
        for s in ("test", "ood")
    }
    title = "Held-out accuracy during training (mean over seeds)"
    written = [
        plot_curves(
            accuracy,
            directory / PLOT_FILES["accuracy"],
            **step,
            ylabel="accuracy",
            title=title,
            ylim=unit,
        )
    ]
    routes = {
        f"{label(m)}'s gate": {
            f"route {r}": mean_curve(histories[m], f"route_{r}") for r in ("sft", "rl")
        }
        for m in gated
        if m in histories
    }
    if routes:
        title = "Questions routed to SFT (no rollout right) vs RL"
        written.append(
            plot_curves(
                routes,
                directory / PLOT_FILES["routes"],
                **step,
                ylabel="fraction of questions",
                title=title,
                ylim=unit,
            )
        )
    entropy = {
        "mean token entropy": {label(m): mean_curve(h, "entropy") for m, h in histories.items()}
    }
    title = "Entropy of the trained tokens (mean over seeds)"
    written.append(
        plot_curves(
            entropy, directory / PLOT_FILES["entropy"], **step, ylabel="entropy (nats)", title=title
        )
    )
    passk = {}
    for split, panel in (("id", "in-distribution (test)"), ("ood", "out-of-distribution")):
        passk[panel] = {}
        for method, stats in summary.items():
            ks = sorted(int(key.split("@")[1]) for key in stats if key.startswith(f"{split}_pass@"))
            passk[panel][label(method)] = (ks, [stats[f"{split}_pass@{j}"][0] for j in ks])
    title = "pass@k (the study's sampling; mean over seeds)"
    written.append(
        plot_curves(
            passk,
            directory / PLOT_FILES["pass_at_k"],
            xlabel="k",
            ylabel="pass@k",
            title=title,
            xlog=True,
            ylim=unit,
        )
    )
    return written


# ------------------------------------------------------------------ the command


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hpt demo",
        description="The comparison study: SFT, GRPO, SFT->GRPO, LUFFY, SRFT and HPT from one tiny "
        "base on the embedded addition task; lr chosen on val from one grid for all, 3 seeds "
        "(--quick: one seed, no grid, fewer steps).",
    )
    add = parser.add_argument
    add("--quick", action="store_true", help="one seed, no lr grid, fewer steps, smaller eval")
    add("--output", default="runs/demo", help="output folder (default runs/demo)")
    add("--methods", default=None, help="comma-separated names of configs/study/*.yaml")
    add("--steps", type=int, default=None, help="optimiser steps of every method")
    add("--seeds", default=None, help="comma-separated seeds, e.g. 0,1,2")
    add("--lrs", default=None, help="the lr grid, e.g. 3e-5,1e-4 (one value: no grid)")
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
    settings = QUICK if args.quick else FULL
    for flag, value, least in (("--threads", args.threads, 1), ("--jobs", args.jobs, 1)):
        if value < least:
            raise ConfigError(f"{flag} must be >= {least}, got {value}")
    if args.steps is not None:
        if args.steps < 2:
            raise ConfigError(f"--steps must be >= 2, got {args.steps}")
        settings = replace(settings, steps=args.steps, eval_every=max(1, args.steps // 4))
    if args.seeds:
        settings = replace(settings, seeds=_numbers(args.seeds, int, "--seeds"))
    if args.lrs:
        lrs = _numbers(args.lrs, float, "--lrs")
        if not all(lr > 0 and math.isfinite(lr) for lr in lrs):
            raise ConfigError(f"--lrs must be positive, got {args.lrs!r}")
        settings = replace(settings, lrs=tuple(sorted(set(lrs))))
    methods = args.methods.split(",") if args.methods else None
    for method in methods or []:
        recipe_path(method)
    results = run_study(
        settings, args.output, methods, jobs=args.jobs, threads=args.threads,
        progress=not args.no_progress,
    )  # fmt: skip
    from rich.console import Console

    console = Console()
    console.print(
        rich_table(*table_rows(results["summary"], settings.k), f"hpt demo ({args.output})")
    )
    for line in results["diffs"]:
        console.print(line)
    print(
        f"wrote {Path(args.output) / 'results.md'}, results.json and plots/ in {_clock(results['seconds'])}"
    )
    return 0
