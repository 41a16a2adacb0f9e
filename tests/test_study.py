"""Tests of ``hpt demo`` (hpt.demo.study): recipes from YAML, the lr grid and its choice, the
evaluation's columns, tables and diff lines, plots, resume and workers; the slow test runs a tiny
``hpt demo`` end to end."""

from __future__ import annotations

import json
import math
import re
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from multiprocessing import get_context
from pathlib import Path

import pytest

from hpt.demo import study
from hpt.errors import ConfigError
from hpt.eval.report import to_markdown, to_rich

METHODS = list(study.LABELS)
SETTINGS = study.StudySettings(
    steps=2, seeds=(0, 1), lrs=(3e-5, 1e-4), test_questions=4, ood_questions=2,
    val_questions=2, k=2, eval_every=1, curve_questions=2,
)  # fmt: skip


def _samples(name: str, verdicts: list[list[float]]) -> list[dict]:
    """Sample records as hpt.eval.evaluate.sample_and_score writes them (what scores reads)."""
    return [
        {"benchmark": name, "question_id": f"{name}-{q}", "sample": j, "verdict": float(v),
         "extracted": str(v), "response_tokens": 5, "finish_reason": "stop"}
        for q, row in enumerate(verdicts)
        for j, v in enumerate(row)
    ]  # fmt: skip


# ------------------------------------------------------------------ recipes


@pytest.mark.parametrize("name", METHODS)
def test_every_recipe_loads_from_yaml_as_a_valid_config(name):
    """configs/study/<name>.yaml is a full, valid config with the shared settings of the rule."""
    from hpt.algorithms import get_algorithm

    path = study.recipe_path(name)
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert "LR_GRID" in " ".join(header) and "val" in " ".join(header)
    assert "3e-5, 1e-4" in " ".join(header) and "one lr," not in " ".join(header)
    config = study.load_recipe(name)
    stages = config.resolved_stages()
    assert [s.algorithm for s in stages] == (["sft", "grpo"] if name == "sft_grpo" else [name])
    for stage in stages:
        algorithm = get_algorithm(stage.algorithm, **stage.algo)
        assert algorithm.name == stage.algorithm
        assert stage.data.questions_per_step == 16 and stage.data.max_response_tokens == 64
        assert stage.rollout.n == (7 if name == "luffy" else 8)
        assert stage.rollout.temperature == 1.0
        optim = stage.optim
        assert (optim.schedule, optim.weight_decay, optim.grad_clip) == ("constant", 0.01, 1.0)
        assert (optim.skip_grad_norm_above, optim.micro_batch_size) == (80.0, 64)
        assert optim.lr == study.QUICK_LR
        assert optim.mini_batch_questions == 16  # one optimiser step a training step
        rl = stage.algorithm != "sft"
        assert stage.algo.get("entropy_coef", 0.0) == (0.001 if rl else 0.0)
    if name == "hpt":
        algo = config.algo
        assert (algo["aggregation"], algo["norm_length"], algo["gate_threshold"]) == (
            "token-sum-norm", 64, 0.0,
        )  # fmt: skip


def test_the_methods_are_the_yaml_files():
    assert sorted(METHODS) == sorted(p.stem for p in study.RECIPE_DIR.glob("*.yaml"))
    assert not hasattr(study, "METHODS") and not hasattr(study, "COMMON")


@pytest.mark.parametrize("name", ["sft_grpo", "hpt"])
def test_the_grid_lr_reaches_optim_lr_and_every_stage(name):
    recipe = study.load_recipe(name)
    config = study.load_recipe(name, study.lr_overrides(recipe, 1e-4))
    assert config.optim.lr == 1e-4
    assert len(config.stages) == (2 if name == "sft_grpo" else 0)
    assert all(stage.optim["lr"] == 1e-4 for stage in config.stages)
    assert all(stage.optim.lr == 1e-4 for stage in config.resolved_stages())


@pytest.mark.parametrize("name", METHODS)
def test_run_overrides_place_a_recipe_in_the_study(name, tmp_path):
    paths = {key: str(tmp_path / f"{key}.jsonl") for key in ("base", "train", "val", "test", "ood")}
    job = study.Job(name, 1e-4, 3, "final")
    overrides = study.run_overrides(
        study.load_recipe(name), job, study.Study(SETTINGS, tmp_path, paths)
    )
    config = study.load_recipe(name, overrides)
    assert config.seed == 3 and config.name == f"{name}-lr0.0001-s3" == job.name
    assert config.run_dir == tmp_path / job.name
    assert config.model.path == paths["base"] and config.data.train == paths["train"]
    assert config.eval.sets == {"test": paths["test"], "ood": paths["ood"]}
    assert (config.eval.every, config.eval.limit) == (1, 2)
    stages = config.resolved_stages()
    assert sum(stage.max_steps for stage in stages) == SETTINGS.steps
    assert all(stage.optim.lr == 1e-4 for stage in stages)


def test_unknown_method_and_bad_options_are_config_errors(capsys):
    from hpt.cli import main

    with pytest.raises(ConfigError, match="unknown study method 'nope'; choose from .*hpt"):
        study.load_recipe("nope")
    bad = {
        ("--methods", "sft,nope"): "unknown study method 'nope'",
        ("--lrs", "abc"): "--lrs must be numbers",
        ("--lrs", "3e-5,"): "--lrs must be numbers",
        ("--lrs", "0,1e-4"): "--lrs must be positive",
        ("--seeds", "0,x"): "--seeds must be numbers",
        ("--jobs", "0"): "--jobs must be >= 1",
        ("--threads", "0"): "--threads must be >= 1",
        ("--steps", "1"): "--steps must be >= 2",
    }
    for argv, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            study.main(list(argv))
    assert main(["demo", "--lrs", "fast"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["hpt demo: error: --lrs must be numbers separated by commas, got 'fast'"]


# ------------------------------------------------------------------ evaluation and the choice


def test_choose_lr_best_val_score_and_ties_to_the_smaller():
    assert study.choose_lr({3e-5: 0.50, 1e-4: 0.625}) == 1e-4
    assert study.choose_lr({3e-5: 0.70, 1e-4: 0.625}) == 3e-5
    assert study.choose_lr({1e-4: 0.5, 3e-5: 0.5}) == 3e-5  # a tie, whatever the order
    assert study.choose_lr({3e-5: 0.5, 1e-4: 0.5, 1e-3: 0.5}) == 3e-5
    assert study.choose_lr({3e-5: None, 1e-4: 0.1}) == 1e-4  # a missing score loses
    assert study.choose_lr({3e-5: math.nan, 1e-4: 0.0}) == 1e-4


def test_split_by_level_routes_test_questions_into_easy_and_hard():
    from hpt.data import Question

    def question(i, meta, source):
        return Question(id=str(i), prompt="p", answer="1", source=source, meta=meta)

    questions = [
        question(0, {"level": 1}, "x"),
        question(1, {"level": 3}, "arith-1"),  # meta wins over the source
        question(2, {}, "arith-2"),
        question(3, {}, "arith-3"),
        question(4, {"level": 2}, "arith-2"),
    ]
    easy, hard = study.split_by_level(questions)
    assert [q.id for q in easy] == ["0", "2", "4"] and [q.id for q in hard] == ["1", "3"]


def test_scores_of_the_columns_from_sample_records():
    samples = {
        "id_easy": _samples("id_easy", [[1, 1], [1, 0]]),
        "id_hard": _samples("id_hard", [[0, 0], [0, 1]]),
        "ood": _samples("ood", [[0, 0]]),
    }
    out = study.scores(samples, k=2)
    assert out["id_easy"] == 0.75 and out["id_hard"] == 0.25 and out["id"] == 0.5
    assert out["id_pass@1"] == 0.5 and out["id_pass@2"] == 0.75
    assert out["ood"] == 0.0 and out["ood_pass@2"] == 0.0
    assert "id_easy_pass@2" not in out
    assert study.scores({"val": _samples("val", [[1, 0], [1, 1]])}, k=2) == {"val": 0.75}
    partial = study.scores({"id_easy": _samples("id_easy", [[1, 1]]), "ood": []}, k=2)
    assert partial["id"] == 1.0 and "id_hard" not in partial and math.isnan(partial["ood"])


# ------------------------------------------------------------------ aggregation, tables, diffs


def _record(method, seed, easy, hard, ood, lr=3e-5, **extra):
    record = {"method": method, "seed": seed, "lr": lr, "id_easy": easy, "id_hard": hard}
    record.update(id=(easy + hard) / 2, ood=ood, **{"id_pass@2": easy, "ood_pass@2": ood})
    return {**record, "tokens_generated": 1000.0 * (seed + 1), "run": f"{method}-s{seed}", **extra}


def _summary():
    records = [
        _record("base", 0, 0.8, 0.1, 0.0, lr=None),
        _record("sft", 0, 0.7, 0.4, 0.0, train_seconds=2.0),
        _record("sft", 1, 0.7, 0.2, 0.0, train_seconds=4.0),
        _record("hpt", 0, 0.9, 0.3, 0.1, lr=1e-4),
        _record("hpt", 1, 0.8, 0.2, 0.0, lr=1e-4),
    ]
    summary = study.aggregate(records)
    summary["base"]["seeds"] = []
    return summary


def test_aggregate_mean_and_sample_std():
    summary = _summary()
    assert list(summary) == ["base", "sft", "hpt"] and summary["hpt"]["seeds"] == [0, 1]
    mean, std = summary["hpt"]["id_easy"]
    assert mean == pytest.approx(0.85) and std == pytest.approx(math.sqrt(0.005))
    assert summary["sft"]["id_easy"] == [pytest.approx(0.7), 0.0]
    assert summary["base"]["id_easy"] == [0.8, 0.0] and "lr" not in summary["base"]
    assert "run" not in summary["hpt"] and "method" not in summary["hpt"]
    assert study.mean_std([1.0, None, float("nan"), 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    assert all(math.isnan(x) for x in study.mean_std([None]))


def test_results_table_and_lr_grid_column():
    grid = {"sft": {3e-5: 0.5, 1e-4: 0.45}, "hpt": {3e-5: 0.5, 1e-4: 0.625}}
    header, rows = study.table_rows(_summary(), k=2, grid=grid)
    assert header[:6] == ["method", "seeds", "ID easy", "ID hard", "ID", "OOD"]
    assert header[6:9] == ["ID pass@2", "OOD pass@2", "lr"]
    assert header[-1] == "val avg@k (3e-05 / 0.0001)"
    cells = {row[0]: dict(zip(header, row)) for row in rows}
    assert list(cells) == ["base", "SFT", "HPT"]
    hpt, sft, base = cells["HPT"], cells["SFT"], cells["base"]
    assert hpt["seeds"] == "2" and hpt["ID easy"] == "85.0 ± 7.1" and hpt["OOD"] == "5.0 ± 7.1"
    assert hpt["lr"] == "0.0001" and sft["lr"] == "3e-05" and base["lr"] == "-"
    assert hpt["val avg@k (3e-05 / 0.0001)"] == "50.0 / 62.5" and base[header[-1]] == "- / -"
    assert sft["ID hard"] == "30.0 ± 14.1" and sft["train s"] == "3 ± 1"
    assert base["seeds"] == "-" and base["ID easy"] == "80.0" and hpt["train s"] == "-"
    assert hpt["gen. tokens (k)"] == "2 ± 1"
    text = to_markdown(header, rows)
    lines = text.strip().splitlines()
    assert len(lines) == 5 and lines[1] == "|" + "---|" * len(header)
    assert lines[4].startswith("| HPT | 2 | 85.0 ± 7.1 | 25.0 ± 7.1 |")
    table = to_rich(header, rows, title="t")
    assert table.row_count == 3 and [c.header for c in table.columns] == header
    assert study.table_rows(_summary(), k=2)[0][-1] == "train s"  # no grid: no val column


def test_diff_lines_hpt_minus_each_baseline():
    lines = study.diff_lines(_summary())
    assert lines == [
        "HPT - base: ID easy +5.0 ± 7.1, ID hard +15.0 ± 7.1, ID +10.0 ± 7.1, OOD +5.0 ± 7.1",
        "HPT - SFT: ID easy +15.0 ± 7.1, ID hard -5.0 ± 15.8, ID +5.0 ± 10.0, OOD +5.0 ± 7.1",
    ]
    assert study.diff_lines({"sft": _summary()["sft"]}) == []  # no HPT: nothing to compare


# ------------------------------------------------------------------ curves and plots


def _history(offset: float, with_routes: bool) -> list[dict]:
    rows = []
    for step in range(1, 7):
        row = {"step": step, "entropy": 0.5 - 0.01 * step + offset}
        if with_routes:
            row.update(route_sft=0.6 - 0.1 * step + offset, route_rl=0.4 + 0.1 * step - offset)
        if step % 3 == 0:
            row.update({"eval/test": 0.1 * step + offset, "eval/ood": offset})
        rows.append(row)
    return rows


def test_mean_curve_and_endpoints():
    steps, values = study.mean_curve([_history(0.0, False), _history(0.2, False)], "eval/test")
    assert steps == [3.0, 6.0] and values == [pytest.approx(0.4), pytest.approx(0.7)]
    summary = {"eval_before": {"test": 0.2}, "eval_after": {"test": 0.9}, "steps": 6}
    out = study.with_endpoints(_history(0.0, False), summary)
    assert out[0] == {"step": 0, "eval/test": 0.2} and out[-1] == {"step": 6, "eval/test": 0.9}


def test_draw_plots_writes_every_png(tmp_path):
    histories = {"sft": [_history(0.0, False)], "hpt": [_history(0.0, True), _history(0.1, True)]}
    written = study.draw_plots(histories, _summary(), tmp_path, gated=["hpt"])
    assert sorted(p.name for p in written) == sorted(study.PLOT_FILES)
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    written = study.draw_plots({"sft": histories["sft"]}, _summary(), tmp_path / "b", gated=[])
    assert "hpt_routes.png" not in {p.name for p in written} and len(written) == 3


def test_has_gate_only_for_performance_routing():
    assert [m for m in METHODS if study.has_gate(study.load_recipe(m))] == ["hpt"]


# ------------------------------------------------------------------ running: resume and workers


def _fake_run(tmp_path, monkeypatch):
    """Replace the base, training and evaluation by fakes that record their calls."""
    calls = {"trained": [], "evaluated": []}
    paths = {key: str(tmp_path / key) for key in ("base", "train", "val", "test", "ood")}
    monkeypatch.setattr(study, "prepare_base", lambda log=print: paths)

    def fake_train(job, where):
        calls["trained"].append((job.method, job.lr, job.seed))
        run_dir = where.output / job.name
        (run_dir / "final").mkdir(parents=True)
        (run_dir / "final" / "config.json").write_text("{}")
        rows = [
            {"step": s, "entropy": 0.4, "time/step": 1.5, "route_sft": 0.25, "route_rl": 0.75}
            for s in (1, 2)
        ]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        totals = {"tokens/generated": 20.0, "tokens/demonstration": 8.0}
        summary = {"steps": 2, "totals": totals, "eval_before": {"test": 0.5}}
        (run_dir / "summary.json").write_text(json.dumps(summary))
        return run_dir

    def fake_eval(model_dir, where, split):
        calls["evaluated"].append((Path(model_dir).parent.name, split))
        if split == "val":  # sft: 50% at either lr; hpt: 50% at either lr (a tie)
            return {"val": _samples("val", [[1, 0], [1, 0]])}
        return {
            "id_easy": _samples("id_easy", [[1, 1], [1, 0]]),
            "id_hard": _samples("id_hard", [[0, 0], [0, 1]]),
            "ood": _samples("ood", [[0, 0]]),
        }

    monkeypatch.setattr(study, "train_run", fake_train)
    monkeypatch.setattr(study, "evaluate_model", fake_eval)
    return calls


def test_the_study_runs_the_grid_then_the_seeds_and_resumes(tmp_path, monkeypatch):
    """Phase 1 at every lr, the choice, phase 2 reusing seed 0; a job whose result file exists is
    skipped (not trained, not evaluated); a second call runs nothing; the files are written."""
    calls = _fake_run(tmp_path, monkeypatch)
    done = tmp_path / "sft-lr0.0001-s0" / "val.json"  # finished before: sft is best at 1e-4
    done.parent.mkdir()
    done.write_text(json.dumps({"method": "sft", "lr": 1e-4, "seed": 0, "val": 0.9}))
    lines = []
    results = study.run_study(SETTINGS, tmp_path, ["sft", "hpt"], jobs=1, log=lines.append)
    assert calls["trained"] == [
        ("sft", 3e-5, 0), ("hpt", 3e-5, 0), ("hpt", 1e-4, 0),  # phase 1 (sft 1e-4 was done)
        ("sft", 1e-4, 0), ("sft", 1e-4, 1), ("hpt", 3e-5, 1),  # phase 2 (hpt seed 0 reused)
    ]  # fmt: skip
    assert calls["evaluated"] == [
        ("sft-lr3e-05-s0", "val"), ("hpt-lr3e-05-s0", "val"), ("hpt-lr0.0001-s0", "val"),
        (Path(tmp_path / "base").parent.name, "final"), ("sft-lr0.0001-s0", "final"),
        ("hpt-lr3e-05-s0", "final"), ("sft-lr0.0001-s1", "final"), ("hpt-lr3e-05-s1", "final"),
    ]  # fmt: skip
    assert any("done before, skipped: sft-lr0.0001-s0 (val)" in line for line in lines)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rule"]["chosen_lr"] == {"sft": 1e-4, "hpt": 3e-5}  # hpt: a tie, the smaller
    assert saved["rule"]["val_avg@k"] == {
        "sft": {"3e-05": 0.5, "0.0001": 0.9}, "hpt": {"3e-05": 0.5, "0.0001": 0.5},
    }  # fmt: skip
    assert [(r["method"], r["seed"], r["lr"]) for r in saved["runs"]] == [
        ("sft", 0, 1e-4), ("hpt", 0, 3e-5), ("sft", 1, 1e-4), ("hpt", 1, 3e-5),
    ]  # fmt: skip
    hpt = next(r for r in saved["runs"] if r["method"] == "hpt")
    assert hpt["id_easy"] == 0.75 and hpt["train_seconds"] == 3.0 and hpt["tokens_generated"] == 20
    assert saved["base"]["method"] == "base" and "train_seconds" not in saved["base"]
    assert list(saved["summary"]) == ["base", "sft", "hpt"]
    text = (tmp_path / "results.md").read_text()
    assert "Rule: one lr grid (3e-05, 0.0001) for every method" in text
    assert "| HPT | 2 | 75.0 | 25.0 | 50.0 | 0.0 | 75.0 | 0.0 | 3e-05 |" in text
    assert "val avg@k (3e-05 / 0.0001)" in text and "| 50.0 / 50.0 |" in text
    assert "- HPT - SFT: ID easy +0.0 ± 0.0" in text
    assert "`plots/hpt_routes.png`" in text
    for name in study.PLOT_FILES:
        assert (tmp_path / "plots" / name).exists()
    assert results["table"][0][0] == "method"
    before = {key: list(value) for key, value in calls.items()}
    study.run_study(SETTINGS, tmp_path, ["sft", "hpt"], jobs=1, log=lambda _: None)
    assert calls == before  # everything done: nothing trained or evaluated again


def test_quick_settings_have_no_grid(tmp_path, monkeypatch):
    calls = _fake_run(tmp_path, monkeypatch)
    quick = study.StudySettings(**{**SETTINGS.__dict__, "seeds": (0,), "lrs": (study.QUICK_LR,)})
    study.run_study(quick, tmp_path, ["grpo"], jobs=1, log=lambda _: None)
    assert calls["trained"] == [("grpo", 3e-5, 0)]
    assert all(split == "final" for _, split in calls["evaluated"])
    text = (tmp_path / "results.md").read_text()
    assert (
        "No lr grid (--quick, or one --lrs): lr 3e-05 for every method" in text
        and "val avg@k" not in text
    )
    assert "hpt_routes" not in text  # no gated method


def test_a_worker_writes_the_runs_output_to_its_log(tmp_path, monkeypatch):
    _fake_run(tmp_path, monkeypatch)
    train = study.train_run
    monkeypatch.setattr(study, "train_run", lambda job, s: (print("training now"), train(job, s)))
    where = study.Study(SETTINGS, tmp_path, study.prepare_base(), progress=False, quiet=True)
    record = study.run_job(study.Job("sft", 3e-5, 0, "val"), where)
    assert record["val"] == 0.5 and record["run"] == "sft-lr3e-05-s0"
    assert "training now" in (tmp_path / "sft-lr3e-05-s0" / "log.txt").read_text()
    assert json.loads((tmp_path / "sft-lr3e-05-s0" / "val.json").read_text()) == record


def _worker(job: study.Job, where: study.Study) -> dict:
    """A picklable stand-in for run_job (runs in a spawned worker)."""
    import torch

    record = {"method": job.method, "seed": job.seed, "threads": torch.get_num_threads()}
    study.atomic_write_json(where.result_file(job), record)
    return record


def test_jobs_run_in_spawned_workers_with_one_thread_each(tmp_path):
    where = study.Study(SETTINGS, tmp_path, {}, progress=False, quiet=True)
    jobs = [study.Job("sft", 3e-5, seed, "final") for seed in range(3)]
    study.atomic_write_json(where.result_file(jobs[1]), {"method": "sft", "seed": 1, "done": 1})
    spawn = {"mp_context": get_context("spawn"), "initializer": study._set_threads}
    with ProcessPoolExecutor(2, initargs=(1,), **spawn) as pool:
        records = study.run_jobs(jobs, where, pool, log=lambda _: None, worker=_worker)
    assert [r["seed"] for r in records] == [0, 1, 2] and records[1]["done"] == 1
    assert records[0]["threads"] == records[2]["threads"] == 1


# ------------------------------------------------------------------ the real thing


@pytest.mark.slow
def test_tiny_demo_end_to_end(tmp_path, capsys):
    """``hpt demo --quick --steps 2 --methods sft,hpt --lrs 3e-5,1e-4``: the grid on val, the
    choice, the final evaluation, the files and the printed table."""
    from hpt.cli import main

    started = time.perf_counter()
    argv = ["demo", "--quick", "--steps", "2", "--methods", "sft,hpt", "--lrs", "3e-5,1e-4"]
    assert main([*argv, "--jobs", "1", "--output", str(tmp_path), "--no-progress"]) == 0
    seconds = time.perf_counter() - started
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["rule"]["chosen_lr"]) == {"sft", "hpt"}
    assert set(results["rule"]["chosen_lr"].values()) <= {3e-5, 1e-4}
    assert {r["method"] for r in results["runs"]} == {"sft", "hpt"}
    for record in [results["base"], *results["runs"]]:
        for key in ("id_easy", "id_hard", "id", "ood"):
            assert 0.0 <= record[key] <= 1.0
        assert record["id"] <= record["id_pass@4"] <= 1.0 and record["ood"] <= record["ood_pass@4"]
    for record in results["runs"]:
        assert record["steps"] == 2 and (record["tokens_generated"] > 0) == (
            record["method"] != "sft"
        )
        assert (tmp_path / record["run"] / "val.json").exists()
    text = (tmp_path / "results.md").read_text()
    assert "| SFT |" in text and "| HPT |" in text and "HPT - SFT: ID easy" in text
    for name in study.PLOT_FILES:
        assert (tmp_path / "plots" / name).stat().st_size > 5000
    out = capsys.readouterr().out
    assert "HPT" in out and "results.md" in out
    assert seconds < 8 * 60, f"took {seconds:.0f} s"


def test_missing_recipe_folder_is_one_clear_error(monkeypatch, tmp_path):
    from hpt.demo import study
    from hpt.errors import ConfigError

    monkeypatch.setattr(study, "RECIPE_DIR", tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="lacks: run it from a clone"):
        study.recipe_path("hpt")


# ------------------------------------------------------------------ one table writer


def _screen_cells(text: str) -> list[list[str]]:
    """The cells of every header and body line of rich tables printed in ``text``."""
    lines = [line for line in text.splitlines() if line[:1] in ("│", "┃")]
    return [[cell.strip() for cell in re.split("[│┃]", line)[1:-1]] for line in lines]


def test_hpt_demo_and_hpt_eval_print_and_write_tables_with_one_writer(
    tmp_path, monkeypatch, capsys
):
    """The study's table (results.md, the terminal) and hpt eval's (results.md, the terminal)
    are the same rows rendered by hpt.eval.report: markdown for the file, rich on stdout."""
    from hpt.eval.benchmarks import BENCHMARKS
    from hpt.eval.evaluate import _print, _write_outputs
    from hpt.eval.report import results_rows

    _fake_run(tmp_path, monkeypatch)
    monkeypatch.setattr(study, "QUICK", replace(study.QUICK, k=2))  # the fakes draw 2 samples
    argv = ["--quick", "--methods", "sft,hpt", "--seeds", "0,1", "--jobs", "1", "--no-progress"]
    assert study.main([*argv, "--output", str(tmp_path / "demo")]) == 0
    printed = capsys.readouterr().out
    header, rows = json.loads((tmp_path / "demo" / "results.json").read_text())["table"]
    assert header[:3] == ["method", "seeds", "ID easy"] and [r[0] for r in rows] == [
        "base", "SFT", "HPT",
    ]  # fmt: skip
    assert rows[2][:6] == ["HPT", "2", "75.0", "25.0", "50.0", "0.0"]
    assert _screen_cells(printed) == [header, *rows]  # the terminal shows the same rows
    study_md = (tmp_path / "demo" / "results.md").read_text()
    assert to_markdown(header, rows) in study_md
    assert "| HPT | 2 | 75.0 | 25.0 | 50.0 | 0.0 | 75.0 | 0.0 | 3e-05 |" in study_md

    summary = {"kind": BENCHMARKS["aime24"].kind, "questions": 2, "k": 2, "avg@k": 0.75,
               "maj@k": 0.5, "pass@k": {"1": 0.75, "2": 1.0}, "response_tokens": 5.0,
               "no_boxed": 0.0, "truncated": 0.25, "timeouts": 0}  # fmt: skip
    results = {"name": "tiny", "benchmarks": {"aime24": summary}}
    _write_outputs(tmp_path / "eval", results)
    _print(results)
    eval_header, eval_rows = results_rows([results])
    assert eval_header[:2] == ["method", "AIME24"] and eval_rows[0][:3] == ["tiny", "75.0", "-"]
    eval_md = (tmp_path / "eval" / "results.md").read_text()
    assert eval_md == to_markdown(eval_header, eval_rows)
    detail = ["aime24", "2", "2", "75.0", "50.0", "100.0 (@2)", "5", "0%", "25%", "0"]
    assert _screen_cells(capsys.readouterr().out) == [
        ["benchmark", "questions", "k", "avg@k", "maj@k", "pass@k", "tokens", "no box",
         "truncated", "timeouts"], detail, eval_header, *eval_rows,
    ]  # fmt: skip
    for text in (study_md, eval_md):  # one markdown format: | a | b |, then |---|---|
        lines = [line for line in text.splitlines() if line.startswith("|")]
        assert lines[0].startswith("| method | ") and set(lines[1]) == {"|", "-"}
        assert lines[1] == "|" + "---|" * (lines[0].count("|") - 1)
