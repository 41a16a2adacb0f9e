"""Run logging (metrics.jsonl, TensorBoard, progress, summary), plots and the file/progress utils."""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from hpt.errors import DataError
from hpt.train.logger import STEP_KEYS, RunLogger, read_metrics
from hpt.train.plots import plot_run
from hpt.utils import (
    atomic_dir,
    atomic_write_json,
    atomic_write_text,
    progress_bar,
    to_jsonable,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def step_metrics(step: int, **extra) -> dict:
    base = {
        "loss": 1.0 / step,
        "reward_mean": step / 10,
        "route_sft": 0.25,
        "route_rl": 0.75,
        "entropy": 0.5,
        "grad_norm": 1.0,
        "lr": 1e-6,
        "tokens_per_s": 100.0,
    }
    return {**base, **extra}


def lines(path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


# -- metrics.jsonl ---------------------------------------------------------------------------------


def test_each_step_is_one_flushed_strict_json_line(tmp_path):
    with RunLogger(tmp_path, progress=False, total_steps=3) as logger:
        logger.log(1, step_metrics(1, tensor=torch.tensor(2.5), numpy=np.float32(0.5)))
        first = lines(tmp_path)  # readable while the run goes on
        logger.log(2, step_metrics(2, grad_norm=float("inf"), loss=float("nan")))
    assert len(first) == 1 and first[0]["step"] == 1
    assert first[0]["tensor"] == 2.5 and first[0]["numpy"] == 0.5
    records = lines(tmp_path)
    assert [r["step"] for r in records] == [1, 2]
    assert set(STEP_KEYS) <= set(records[0])
    assert records[1]["grad_norm"] is None and records[1]["loss"] is None  # strict JSON, no NaN
    assert list(records[0])[0] == "step"


def test_missing_promised_keys_warn_once(tmp_path):
    with RunLogger(tmp_path, progress=False) as logger:
        with pytest.warns(UserWarning, match="route_sft, route_rl"):
            logger.log(1, {k: v for k, v in step_metrics(1).items() if not k.startswith("route")})
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            logger.log(2, {"loss": 1.0})  # still missing keys: no second warning
            logger.log_eval(2, {"accuracy": 0.5})  # eval lines are not checked
    assert lines(tmp_path)[-1] == {"step": 2, "eval/accuracy": 0.5}


def test_a_new_run_starts_a_new_file(tmp_path):
    with RunLogger(tmp_path, progress=False) as logger:
        logger.log(1, step_metrics(1))
    with RunLogger(tmp_path, progress=False) as logger:
        logger.log(1, step_metrics(1, loss=9.0))
    assert [r["loss"] for r in lines(tmp_path)] == [9.0]


def test_resume_drops_lines_after_the_checkpoint_and_appends(tmp_path):
    with RunLogger(tmp_path, progress=False) as logger:
        for step in range(1, 6):
            logger.log(step, step_metrics(step))
        logger.log_eval(4, {"accuracy": 0.1})
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 6, "loss"')  # a line cut short by the crash
    with RunLogger(tmp_path, progress=False, resume_step=3) as logger:
        logger.log(4, step_metrics(4, loss=42.0))
    records = lines(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["loss"] == 42.0


def test_read_metrics_names_a_bad_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(DataError, match="metrics.jsonl:2"):
        read_metrics(tmp_path)


def test_summary_is_written_atomically_as_strict_json(tmp_path):
    with RunLogger(tmp_path, progress=False) as logger:
        path = logger.write_summary({"eval_before": {"x": 0.1}, "bad": float("nan"), "steps": 3})
    assert json.loads(path.read_text()) == {"eval_before": {"x": 0.1}, "bad": None, "steps": 3}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_disabled_logger_writes_nothing(tmp_path):
    logger = RunLogger(tmp_path / "run", enabled=False)
    logger.log(1, step_metrics(1))
    logger.write_summary({"a": 1})
    logger.message("hello")
    logger.close()
    assert not (tmp_path / "run").exists()


# -- TensorBoard and progress ------------------------------------------------------------------------


def test_tensorboard_events_are_written(tmp_path):
    pytest.importorskip("tensorboard")
    with RunLogger(tmp_path, {"name": "x"}, tensorboard=True, progress=False) as logger:
        logger.log(1, step_metrics(1))
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_missing_tensorboard_is_a_warning_not_an_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with pytest.warns(UserWarning, match="tensorboard is not installed"):
        logger = RunLogger(tmp_path, tensorboard=True, progress=False)
    logger.log(1, step_metrics(1))
    logger.close()
    assert not (tmp_path / "tensorboard").exists()
    assert len(lines(tmp_path)) == 1


def test_progress_bar_shows_step_reward_and_routes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HPT_PROGRESS", "1")  # force the bar without a terminal
    with RunLogger(tmp_path, total_steps=4, resume_step=1) as logger:
        for step in (2, 3, 4):
            logger.log(step, step_metrics(step, route_sft=0.125, route_rl=0.875))
        logger.message("stage 1 done")
    err = capsys.readouterr().err
    assert "4/4" in err and "reward 0.400" in err and "sft 0.12 rl 0.88" in err
    assert "100 tok/s" in err  # the step's throughput (tokens_per_s without perf/tokens_per_s)
    assert "stage 1 done" in err
    with RunLogger(tmp_path / "global", total_steps=1) as logger:  # over all ranks, where logged
        logger.log(1, step_metrics(1, **{"perf/tokens_per_s": 250.0}))
    assert "250 tok/s" in capsys.readouterr().err


def test_progress_is_off_without_a_terminal_or_when_asked(monkeypatch, capsys):
    monkeypatch.delenv("HPT_PROGRESS", raising=False)
    with progress_bar("n {task.fields[n]}") as bar:  # pytest's stderr is not a terminal
        task = bar.add_task("work", total=3, n=0)
        bar.update(task, advance=1, n=1)
        assert bar.disable
        assert bar.tasks[0].completed == 1  # the task still counts while nothing is drawn
    monkeypatch.setenv("HPT_PROGRESS", "1")
    with progress_bar(enabled=False) as bar:
        bar.add_task("work", total=3)
        assert bar.disable
    assert capsys.readouterr().err == ""


def test_progress_bar_is_drawn_with_its_columns_when_forced(monkeypatch, capsys):
    monkeypatch.setenv("HPT_PROGRESS", "1")
    with progress_bar("tokens {task.fields[tokens]}", transient=False) as bar:
        task = bar.add_task("work", total=4, completed=1, tokens=0)
        bar.update(task, advance=2, tokens=17)
        bar.console.print("[bold]plain[/bold] " + "x" * 100)  # no markup, no wrapping
        assert not bar.disable
    err = capsys.readouterr().err
    assert "work" in err and "3/4" in err and "tokens 17" in err
    assert "[bold]plain[/bold] " + "x" * 100 in err


# -- plots ----------------------------------------------------------------------------------------


def write_run(run_dir, *, with_entropy: bool = True) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for step in range(1, 21):
        metrics = step_metrics(step)
        if not with_entropy:
            metrics.pop("entropy")
        records.append({"step": step, **metrics})
        if step % 5 == 0:
            records.append({"step": step, "eval/test": step / 40, "eval/test/pass@8": 0.9})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = {"eval_before": {"test": 0.05}, "eval_after": {"test": 0.6}, "steps": 20}
    (run_dir / "summary.json").write_text(json.dumps(summary))


def test_plots_are_drawn_from_a_synthetic_run(tmp_path):
    write_run(tmp_path)
    written = plot_run(tmp_path)
    names = [p.name for p in written]
    assert names == ["reward.png", "routes.png", "entropy.png", "accuracy.png", "loss.png"]
    for path in written:
        assert path.parent == tmp_path / "plots"
        assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 2000


def test_speed_plots_draw_each_stage_and_the_throughput(tmp_path, monkeypatch):
    """time.png: one line per ``time/<stage>`` and the whole step last; throughput.png: the
    step's tokens a second. Drawn only where a run logged them."""
    import hpt.eval.plots

    records = [
        {
            "step": step,
            **step_metrics(step),
            "time/generate": 0.4,
            "time/update": 0.8,
            "time/score": 0.01,
            "time/step": 1.3,
            "perf/tokens_per_s": 9000.0 + step,
        }
        for step in range(1, 6)
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    drawn = {}
    real = hpt.eval.plots.draw_panels

    def recording(path, panels, **kwargs):
        drawn[Path(path).name] = panels
        return real(path, panels, **kwargs)

    monkeypatch.setattr(hpt.eval.plots, "draw_panels", recording)
    names = [p.name for p in plot_run(tmp_path)]
    assert names[-2:] == ["time.png", "throughput.png"]
    (stages,) = drawn["time.png"].values()
    assert list(stages) == ["generate", "score", "update", "step"]
    assert stages["update"] == ([1.0, 2.0, 3.0, 4.0, 5.0], [0.8] * 5)
    (throughput,) = drawn["throughput.png"].values()
    assert throughput["tokens_per_s"][1] == [9001.0, 9002.0, 9003.0, 9004.0, 9005.0]
    assert (tmp_path / "plots" / "time.png").read_bytes()[:8] == PNG_MAGIC


def test_plots_skip_series_that_were_never_logged(tmp_path):
    write_run(tmp_path, with_entropy=False)
    names = [p.name for p in plot_run(tmp_path, tmp_path / "elsewhere")]
    assert "entropy.png" not in names and "reward.png" in names
    assert (tmp_path / "elsewhere" / "reward.png").exists()


def test_accuracy_series_include_summary_before_and_after(tmp_path):
    from hpt.train.plots import _summary_records, series

    write_run(tmp_path)
    records = read_metrics(tmp_path)
    steps, values = series(records + _summary_records(tmp_path, records), "eval/test")
    assert steps == [0, 5, 10, 15, 20, 20] and (values[0], values[-1]) == (0.05, 0.6)


def test_hpt_plot_command_and_its_errors(tmp_path, capsys):
    from hpt.cli import main

    write_run(tmp_path / "run")
    assert main(["plot", str(tmp_path / "run")]) == 0
    assert "reward.png" in capsys.readouterr().out
    assert main(["plot", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "run folder not found" in err and err.count("\n") == 1
    (tmp_path / "empty").mkdir()
    assert main(["plot", str(tmp_path / "empty")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


# -- utils ---------------------------------------------------------------------------------------------


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    target = tmp_path / "a.json"
    atomic_write_json(target, {"v": 1})

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        atomic_write_text(target, "new")
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temporary file left


def test_atomic_dir_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
        assert not target.exists()
    with atomic_dir(target) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b"]  # replaced whole
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_to_jsonable_handles_the_usual_values(tmp_path):
    value = {"t": torch.tensor([1.0, float("inf")]), "p": tmp_path, "n": np.int64(3), "s": (1, 2)}
    assert to_jsonable(value) == {"t": [1.0, None], "p": str(tmp_path), "n": 3, "s": [1, 2]}
