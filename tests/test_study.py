"""Tests of ``hpt demo`` (hpt.demo.study): recipes and their fairness rule, aggregation, tables,
plots, resume; the slow test runs ``hpt demo --quick`` end to end within its 8-minute budget."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

from hpt.demo import study
from hpt.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _record(method: str, seed: int, id_acc: float, ood_acc: float, **extra: float) -> dict:
    evals = {
        "id": {"avg@k": id_acc, "maj@k": id_acc, "pass@k": {1: id_acc, 2: id_acc + 0.1, 16: 0.9}},
        "ood": {"avg@k": ood_acc, "maj@k": ood_acc, "pass@k": {1: ood_acc, 16: 0.5}},
    }
    defaults = {"tokens_generated": 1000.0 * (seed + 1), "tokens_demonstration": 0.0}
    return study.flat_record(method, seed, evals, {**defaults, **extra})


# ------------------------------------------------------------------ recipes and the fairness rule


def test_recipe_files_match_the_embedded_recipes():
    """configs/study/*.yaml are exactly what the study runs (no drift between the two)."""
    for name in study.METHODS:
        path = REPO / "configs" / "study" / f"{name}.yaml"
        assert path.read_text() == study.recipe_yaml(name), f"{path} is stale: regenerate it"


def test_one_rule_for_every_method():
    """One lr; the same batch, rollouts (LUFFY 7 + demo), lengths and schedule for every method."""
    shared = {
        key: study.method_recipe("sft")[key] for key in ("data", "save_every", "keep_checkpoints")
    }
    for name in study.METHODS:
        recipe = study.method_recipe(name)
        for key, value in shared.items():
            assert recipe[key] == value, (name, key)
        assert recipe["optim"]["schedule"] == "constant"
        assert recipe["rollout"]["n"] == (7 if name == "luffy" else 8)
        stages = recipe.get("stages") or [recipe]
        for stage in stages:
            lr = stage["optim"]["lr"]
            assert lr == study.STUDY_LR
            rl = stage["algorithm"] != "sft"
            assert (stage.get("algo") or {}).get("entropy_coef", 0.0) == (0.001 if rl else 0.0)
    assert study.method_recipe("hpt")["algo"]["norm_length"] == study.RESPONSE_TOKENS


@pytest.mark.parametrize("name", list(study.METHODS))
def test_every_recipe_loads_as_a_config(name, tmp_path):
    """Each recipe plus the study's overrides is a valid TrainConfig; SFT->GRPO halves the steps."""
    from hpt.train.config import load_config

    study.write_recipes(tmp_path / "configs")
    paths = {key: str(tmp_path / f"{key}.jsonl") for key in ("base", "train", "test", "ood")}
    settings = study.QUICK
    overrides = study.run_overrides(name, 3, settings, tmp_path, paths)
    config = load_config(tmp_path / "configs" / f"{name}.yaml", overrides)
    assert config.seed == 3 and config.name == f"{name}-s3"
    assert config.eval.sets == {"test": paths["test"], "ood": paths["ood"]}
    stages = config.resolved_stages()
    assert sum(stage.max_steps for stage in stages) == settings.steps
    assert [stage.algorithm for stage in stages] == (
        ["sft", "grpo"] if name == "sft_grpo" else [name]
    )
    for stage in stages:  # one optimiser step a training step, for every method
        assert stage.optim.mini_batch_questions == stage.data.questions_per_step == 16


def test_unknown_method_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown study method 'nope'"):
        study.method_recipe("nope")
    with pytest.raises(ConfigError, match="--threads"):
        study.main(["--threads", "0"])


# ------------------------------------------------------------------ aggregation and tables


def test_aggregate_mean_and_sample_std():
    records = [
        _record("hpt", 0, 0.5, 0.1, train_seconds=10.0),
        _record("hpt", 1, 0.7, 0.3, train_seconds=14.0),
        _record("sft", 0, 0.4, 0.0, train_seconds=2.0),
    ]
    summary = study.aggregate(records)
    assert list(summary) == ["hpt", "sft"]
    assert summary["hpt"]["seeds"] == [0, 1]
    mean, std = summary["hpt"]["id_acc"]
    assert mean == pytest.approx(0.6) and std == pytest.approx(math.sqrt(0.02))
    assert summary["hpt"]["ood_pass@16"] == [pytest.approx(0.5), 0.0]
    assert summary["hpt"]["tokens_generated"][0] == pytest.approx(1500.0)
    assert summary["sft"]["id_acc"] == [pytest.approx(0.4), 0.0]  # one seed: std 0
    assert "method" not in summary["hpt"] and "seed" not in summary["hpt"]


def test_mean_std_ignores_nan():
    assert study.mean_std([1.0, float("nan"), 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    mean, std = study.mean_std([float("nan")])
    assert math.isnan(mean) and math.isnan(std)


def test_markdown_table_methods_as_rows_with_mean_pm_std():
    summary = study.aggregate(
        [_record("grpo", 0, 0.25, 0.0), _record("grpo", 1, 0.35, 0.1), _record("hpt", 0, 0.5, 0.2)]
    )
    text = study.markdown_table(summary, {"grpo": "GRPO", "hpt": "HPT"})
    lines = text.strip().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:4] == ["method", "seeds", "ID acc", "OOD acc"]
    assert "ID pass@16" in header and "gen. tokens (k)" in header
    grpo = [c.strip() for c in lines[2].strip("|").split("|")]
    assert grpo[0] == "GRPO" and grpo[1] == "2"
    assert grpo[2] == "30.0 ± 7.1"  # percent: mean 30, sample std 7.07
    hpt = [c.strip() for c in lines[3].strip("|").split("|")]
    assert hpt[2] == "50.0" and hpt[header.index("ID pass@16")] == "90.0"
    assert hpt[header.index("train s")] == "-"  # missing values are dashes, not zeros
    assert len(lines) == 4


def test_rich_table_has_a_row_per_method():
    summary = study.aggregate([_record("sft", 0, 0.4, 0.0), _record("hpt", 0, 0.5, 0.1)])
    table = study.rich_table(summary, study.labels())
    assert table.row_count == 2
    assert [c.header for c in table.columns][:3] == ["method", "seeds", "ID acc"]


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


def test_mean_curve_averages_seeds_per_step():
    steps, values = study.mean_curve([_history(0.0, False), _history(0.2, False)], "eval/test")
    assert steps == [3.0, 6.0]
    assert values == [pytest.approx(0.4), pytest.approx(0.7)]


def test_with_endpoints_adds_before_and_after():
    summary = {"eval_before": {"test": 0.2}, "eval_after": {"test": 0.9}, "steps": 6}
    out = study.with_endpoints(_history(0.0, False), summary)
    assert out[0] == {"step": 0, "eval/test": 0.2}
    assert out[-1] == {"step": 6, "eval/test": 0.9}


def test_draw_plots_writes_every_png(tmp_path):
    histories = {
        "sft": [_history(0.0, False)],
        "hpt": [_history(0.0, True), _history(0.1, True)],
    }
    summary = study.aggregate([_record("sft", 0, 0.4, 0.0), _record("hpt", 0, 0.5, 0.1)])
    written = study.draw_plots(histories, summary, tmp_path, study.labels())
    assert sorted(p.name for p in written) == sorted(study.PLOT_FILES.values())
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    # without HPT there is no gate to draw
    written = study.draw_plots({"sft": histories["sft"]}, summary, tmp_path / "b")
    assert study.PLOT_FILES["routes"] not in {p.name for p in written}


# ------------------------------------------------------------------ resume


def test_finished_runs_are_not_trained_again(tmp_path, monkeypatch):
    """A (method, seed) with study.json is skipped; the others train and evaluate; files written."""
    settings = study.StudySettings(
        steps=2, seeds=(0,), eval_questions=2, k=2, temperature=0.6, top_p=0.95,
        eval_every=1, curve_questions=2,
    )  # fmt: skip
    done = _record("sft", 0, 0.4, 0.0)
    (tmp_path / "sft-s0").mkdir()
    (tmp_path / "sft-s0" / study.RESULT_FILE).write_text(json.dumps(done))
    trained = []

    def fake_train(method, seed, settings, output, paths, progress):
        trained.append((method, seed))
        run_dir = output / study.run_name(method, seed)
        (run_dir / "final").mkdir(parents=True)
        (run_dir / "final" / "config.json").write_text("{}")
        rows = [
            {"step": s, "entropy": 0.4, "time/step": 1.5, "tokens/generated": 10.0} for s in (1, 2)
        ]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        summary = {"steps": 2, "seconds": 4.0, "totals": {"tokens/generated": 20.0}}
        (run_dir / "summary.json").write_text(json.dumps(summary))
        return run_dir

    def fake_eval(model_dir, questions, settings):
        return {
            s: {"avg@k": 0.25, "maj@k": 0.25, "pass@k": {1: 0.25, 2: 0.5}} for s in ("id", "ood")
        }

    monkeypatch.setattr(study, "prepare_base", lambda log=print: {"base": "base"})
    monkeypatch.setattr(study, "eval_questions", lambda paths, n: {})
    monkeypatch.setattr(study, "train_run", fake_train)
    monkeypatch.setattr(study, "evaluate_model", fake_eval)
    results = study.run_study(settings, tmp_path, ["sft", "hpt"], log=lambda _: None)
    assert trained == [("hpt", 0)]
    runs = {r["method"]: r for r in results["runs"]}
    assert runs["sft"]["id_acc"] == 0.4  # read back, not recomputed
    assert runs["hpt"]["tokens_generated"] == 20.0 and runs["hpt"]["train_seconds"] == 3.0
    assert list(results["summary"]) == ["base", "sft", "hpt"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rule"]["lr"] == study.STUDY_LR and len(saved["runs"]) == 2
    assert "| HPT |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "plots" / study.PLOT_FILES["pass_at_k"]).exists()
    # a second call trains nothing
    study.run_study(settings, tmp_path, ["sft", "hpt"], log=lambda _: None)
    assert trained == [("hpt", 0)]


# ------------------------------------------------------------------ the real thing


@pytest.mark.slow
def test_quick_demo_end_to_end_within_budget(tmp_path, capsys):
    """``hpt demo --quick`` trains every method, evaluates, writes the files, in under 8 minutes."""
    from hpt.cli import main

    started = time.perf_counter()
    assert main(["demo", "--quick", "--output", str(tmp_path), "--no-progress"]) == 0
    seconds = time.perf_counter() - started
    results = json.loads((tmp_path / "results.json").read_text())
    assert {r["method"] for r in results["runs"]} == set(study.METHODS)
    for record in results["runs"]:
        assert 0.0 <= record["id_acc"] <= record["id_pass@16"] <= 1.0
        assert 0.0 <= record["ood_acc"] <= record["ood_pass@16"] <= 1.0
        uses_rollouts = record["method"] != "sft"
        assert (record["tokens_generated"] > 0) == uses_rollouts
        assert record["steps"] == study.QUICK.steps
    sft = next(r for r in results["runs"] if r["method"] == "sft")
    assert sft["tokens_demonstration"] > 0
    table = (tmp_path / "results.md").read_text()
    for method in study.METHODS.values():
        assert f"| {method.label} |" in table
    for name in study.PLOT_FILES.values():
        assert (tmp_path / "plots" / name).stat().st_size > 5000
    out = capsys.readouterr().out
    assert "HPT" in out and "results.md" in out
    assert seconds < 8 * 60, f"hpt demo --quick took {seconds:.0f} s"
