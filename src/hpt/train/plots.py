"""Plots of a run, drawn from its ``metrics.jsonl``: ``hpt plot RUN_DIR``.

Each plot is a row of :data:`PLOTS` (file name, title, y label, which keys to draw); a plot whose
keys never occur is skipped. Held-out accuracy is read from the ``eval/<set>`` keys logged during
training plus, when ``summary.json`` exists, ``eval_before`` (at step 0) and ``eval_after`` (at the
last step).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpt.errors import DataError
from hpt.train.logger import METRICS_FILE, SUMMARY_FILE, read_metrics

PLOTS_DIR = "plots"


def _exact(*keys: str) -> Callable[[list[str]], list[str]]:
    return lambda available: [key for key in keys if key in available]


def _time_keys(available: list[str]) -> list[str]:
    """``time/<stage>`` (seconds of each stage of a step), the whole step (``time/step``) last."""
    stages = sorted(k for k in available if k.startswith("time/") and k != "time/step")
    return stages + (["time/step"] if "time/step" in available else [])


def _accuracy_keys(available: list[str]) -> list[str]:
    """``eval/<set>`` (avg@k accuracy of a set), not ``eval/<set>/pass@k`` and the like."""
    return sorted(k for k in available if k.startswith("eval/") and k.count("/") == 1)


@dataclass(frozen=True)
class PlotSpec:
    """One figure: the keys it draws against the step."""

    file: str
    title: str
    ylabel: str
    keys: Callable[[list[str]], list[str]]
    ylim: tuple[float, float] | None = None


PLOTS: tuple[PlotSpec, ...] = (
    PlotSpec("reward.png", "Mean reward of the rollouts", "reward", _exact("reward_mean")),
    PlotSpec(
        "routes.png",
        "Questions routed to each loss (HPT's gate)",
        "fraction of questions",
        _exact("route_sft", "route_rl", "route_off_policy"),
        ylim=(-0.02, 1.02),
    ),
    PlotSpec("entropy.png", "Mean token entropy", "entropy (nats)", _exact("entropy")),
    PlotSpec("accuracy.png", "Held-out accuracy", "accuracy (avg@k)", _accuracy_keys),
    PlotSpec("loss.png", "Training loss", "loss", _exact("loss")),
    PlotSpec("time.png", "Seconds per step, by stage", "seconds", _time_keys),
    PlotSpec(
        "throughput.png",
        "Tokens a second (generated and trained, per device)",
        "tokens / s",
        _exact("perf/tokens_per_s"),
    ),
)


def series(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of ``key``, sorted by step, over the records with a numeric value for it."""
    points = []
    for record in records:
        step, value = record.get("step"), record.get(key)
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if numeric and isinstance(step, (int, float)):
            points.append((float(step), float(value)))
    points.sort(key=lambda point: point[0])  # stable: equal steps keep their file order
    return [step for step, _ in points], [value for _, value in points]


def _summary_records(run_dir: Path, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``eval_before`` / ``eval_after`` of summary.json as ``eval/<set>`` records at the ends."""
    file = run_dir / SUMMARY_FILE
    if not file.is_file():
        return []
    try:
        summary = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return []
    last = summary.get("steps")
    if not isinstance(last, (int, float)):
        steps = [r["step"] for r in records if isinstance(r.get("step"), (int, float))]
        last = max(steps, default=0)
    extra = []
    for name, step in (("eval_before", 0), ("eval_after", last)):
        results = summary.get(name)
        if isinstance(results, dict):
            extra.append({"step": step, **{f"eval/{k}": v for k, v in results.items()}})
    return extra


def _draw(spec: PlotSpec, records: list[dict[str, Any]], keys: list[str], path: Path) -> None:
    from hpt.eval.plots import draw_panels

    lines = {key.split("/", 1)[-1]: series(records, key) for key in keys}
    legend = len(keys) > 1 or spec.keys in (_accuracy_keys, _time_keys)
    draw_panels(path, {spec.title: lines}, ylabel=spec.ylabel, ylim=spec.ylim, legend=legend)


def plot_run(run_dir: str | Path, output_dir: str | Path | None = None) -> list[Path]:
    """Draw the run's PNG plots (reward, routes, entropy, held-out accuracy, loss, seconds per
    stage and tokens a second vs step).

    Args:
        run_dir: The run folder (holding ``metrics.jsonl``).
        output_dir: Where to write; default ``<run_dir>/plots``.

    Returns:
        The files written (plots without data are skipped).

    Raises:
        DataError: no run folder or no ``metrics.jsonl``, or a malformed line.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"run folder not found: {run_dir}")
    if not (run_dir / METRICS_FILE).is_file():
        raise DataError(f"no {METRICS_FILE} in {run_dir}: not a run folder")
    records = read_metrics(run_dir)
    records = records + _summary_records(run_dir, records)
    available = sorted({key for record in records for key in record})
    out = Path(output_dir) if output_dir is not None else run_dir / PLOTS_DIR
    written = []
    for spec in PLOTS:
        keys = [key for key in spec.keys(available) if series(records, key)[0]]
        if not keys:
            continue
        out.mkdir(parents=True, exist_ok=True)
        path = out / spec.file
        _draw(spec, records, keys, path)
        written.append(path)
    return written


def main(argv: list[str]) -> int:
    """``hpt plot RUN_DIR [--output DIR]``: redraw a run's plots."""
    parser = argparse.ArgumentParser(prog="hpt plot", description="Redraw a run's plots.")
    parser.add_argument("run_dir", help="the run folder, e.g. runs/demo")
    parser.add_argument("--output", default=None, help="where to write (default RUN_DIR/plots)")
    args = parser.parse_args(argv)
    written = plot_run(args.run_dir, args.output)
    if not written:
        print(f"nothing to plot in {args.run_dir}/{METRICS_FILE}")
    for path in written:
        print(path)
    return 0
