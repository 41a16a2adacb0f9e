"""Result tables in the paper's layout, and ``hpt report DIR...`` to merge several runs.

The paper's main table (arXiv 2509.04419, table 1) has one row per method and the columns
``AIME24 AIME25 AMC MATH-500 Minerva Olympiad avg ARC-c GPQA OOD avg`` (accuracy in percent,
avg@k). ``hpt eval`` writes its one-row table as ``results.md``; ``hpt report`` reads several
``results.json`` and prints them as rows of one table.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hpt.errors import ConfigError, DataError
from hpt.eval.benchmarks import PAPER_COLUMNS
from hpt.eval.metrics import kind_averages, metric_value

__all__ = ["load_results", "table", "markdown_table", "rich_table", "print_table", "main"]

RESULTS_FILE = "results.json"


def load_results(path: str | Path) -> dict[str, Any]:
    """Read one ``results.json`` (or the folder holding it) written by ``hpt eval``.

    The run's row name is its ``name`` field, else the folder's name.

    Raises:
        DataError: a missing or malformed file.
    """
    path = Path(path)
    file = path / RESULTS_FILE if path.is_dir() else path
    if not file.is_file():
        raise DataError(f"{file}: no such results file (run `hpt eval --output {path}` first)")
    try:
        results = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise DataError(f"{file}: not a readable results.json ({error})") from error
    if not isinstance(results, dict) or not isinstance(results.get("benchmarks"), dict):
        raise DataError(f"{file}: not an hpt eval results file (no 'benchmarks' object)")
    results.setdefault("name", file.parent.name)
    return results


def table(
    runs: Sequence[Mapping[str, Any]], metric: str = "avg@k"
) -> tuple[list[str], list[list[float | None]], list[str]]:
    """The cells of the paper's table for several runs.

    Args:
        runs: results dicts (``{"name", "benchmarks": {name: summary}}``).
        metric: ``avg@k`` (the paper's), ``maj@k``, ``pass@k`` or ``pass@K``.

    Returns:
        ``(columns, rows, names)``: column labels (the paper's, then any custom benchmark), one
        row of fractions (``None`` where not measured) per run, and the row names.
    """
    custom: list[str] = []
    known = {key for _, key in PAPER_COLUMNS}
    for run in runs:
        custom += [b for b in run["benchmarks"] if b not in known and b not in custom]
    columns = [*PAPER_COLUMNS, *((name, name) for name in custom)]
    rows = []
    for run in runs:
        per_benchmark = run["benchmarks"]
        averages = kind_averages(per_benchmark, metric)
        row: list[float | None] = []
        for _, key in columns:
            if key.startswith("@"):
                row.append(averages.get(key[1:], {}).get("value"))
            else:
                summary = per_benchmark.get(key)
                row.append(None if summary is None else metric_value(summary, metric))
        rows.append(row)
    return [label for label, _ in columns], rows, [str(run.get("name", "")) for run in runs]


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def markdown_table(runs: Sequence[Mapping[str, Any]], metric: str = "avg@k") -> str:
    """The table as GitHub markdown, accuracies in percent with one decimal."""
    columns, rows, names = table(runs, metric)
    lines = [
        f"| method | {' | '.join(columns)} |",
        "|---" * (len(columns) + 1) + "|",
        *(f"| {name} | {' | '.join(_cell(v) for v in row)} |" for name, row in zip(names, rows)),
    ]
    return "\n".join(lines) + "\n"


def rich_table(runs: Sequence[Mapping[str, Any]], metric: str = "avg@k", title: str | None = None):
    """The table as a ``rich.table.Table`` (percent, one decimal; averages in bold)."""
    from rich.table import Table

    columns, rows, names = table(runs, metric)
    out = Table(title=title or f"accuracy (%, {metric})")
    out.add_column("method", style="bold")
    for label in columns:
        bold = "avg" in label
        out.add_column(label, justify="right", style="bold" if bold else None)
    for name, row in zip(names, rows):
        out.add_row(name, *(_cell(v) for v in row))
    return out


def print_table(
    runs: Sequence[Mapping[str, Any]], metric: str = "avg@k", title: str | None = None
) -> None:
    """Print :func:`rich_table` on the terminal."""
    from rich.console import Console

    Console(width=None if sys.stdout.isatty() else 160).print(rich_table(runs, metric, title))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hpt report",
        description="Merge `hpt eval` results into one table in the paper's layout, methods as rows.",
    )
    parser.add_argument(
        "runs", nargs="+", metavar="DIR", help="eval output folders or results.json files"
    )
    parser.add_argument(
        "--names", nargs="+", help="row names, one per DIR (default: each run's name)"
    )
    parser.add_argument(
        "--metric", default="avg@k", help="avg@k (default), maj@k, pass@k or pass@K"
    )
    parser.add_argument("--output", "-o", type=Path, help="also write the table as markdown here")
    return parser


def main(argv: list[str]) -> int:
    """``hpt report DIR... [--names ...] [--metric avg@k] [--output report.md]``."""
    args = _parser().parse_args(argv)
    if args.names and len(args.names) != len(args.runs):
        raise ConfigError(f"--names: {len(args.names)} names for {len(args.runs)} runs")
    runs = [load_results(path) for path in args.runs]
    for run, name in zip(runs, args.names or []):
        run["name"] = name
    try:
        text = markdown_table(runs, args.metric)
    except ValueError as error:
        raise ConfigError(f"--metric: {error}") from error
    print_table(runs, args.metric)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
    return 0
