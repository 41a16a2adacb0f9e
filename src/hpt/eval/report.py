"""Result tables: the one table writer of hpt, the paper's layout, and ``hpt report DIR...``.

A table is a header and rows of strings; :func:`to_markdown` (files) and :func:`to_rich` /
:func:`print_rows` (the terminal) render the same rows, for ``hpt eval``, ``hpt report`` and
``hpt demo`` (``hpt.demo.study``) alike: the first column names the row, the others are
right-aligned numbers formatted by :func:`cell`.

The paper's main table (arXiv 2509.04419, table 1) has one row per method and the columns
``AIME24 AIME25 AMC MATH-500 Minerva Olympiad avg ARC-c GPQA OOD avg`` (accuracy in percent,
avg@k). ``hpt eval`` writes its one-row table as ``results.md``; ``hpt report`` reads several
``results.json`` and prints them as rows of one table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hpt.errors import ConfigError, DataError
from hpt.eval.benchmarks import PAPER_COLUMNS
from hpt.eval.metrics import kind_averages, metric_value

__all__ = [
    "cell",
    "to_markdown",
    "to_rich",
    "print_rows",
    "load_results",
    "table",
    "results_rows",
    "benchmark_rows",
    "markdown_table",
    "rich_table",
    "print_table",
    "main",
]

RESULTS_FILE = "results.json"
TERMINAL_WIDTH = 160  # when stdout is not a terminal (a log file, a pipe)


# -- the writer: one header and rows of strings, rendered as markdown or by rich ---------------


def cell(
    mean: float | None, std: float | None = None, scale: float = 100.0, fmt: str = ".1f"
) -> str:
    """A number as a table cell: ``mean * scale`` in ``fmt``, `` ± std * scale`` when the spread
    is known and nonzero, ``-`` when the mean is missing (None or NaN)."""
    if mean is None or math.isnan(mean):
        return "-"
    spread = "" if std is None or math.isnan(std) or std == 0 else f" ± {std * scale:{fmt}}"
    return f"{mean * scale:{fmt}}{spread}"


def to_markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """The rows as a GitHub markdown table (``| a | b |``, then ``|---|---|``, then the rows)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def to_rich(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    title: str | None = None,
    *,
    bold: Sequence[str] = (),
) -> Any:
    """The rows as a ``rich.table.Table``: the first column (the row's name) bold and left, the
    others right-aligned; the columns named in ``bold`` bold too (the paper's averages)."""
    from rich.table import Table

    out = Table(title=title or None)
    for index, name in enumerate(header):
        strong = index == 0 or name in bold
        out.add_column(
            name, justify="left" if index == 0 else "right", style="bold" if strong else None
        )
    for row in rows:
        out.add_row(*row)
    return out


def print_rows(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    title: str | None = None,
    *,
    bold: Sequence[str] = (),
    console: Any = None,
) -> None:
    """Print :func:`to_rich`'s table on stdout (160 columns wide when stdout is no terminal)."""
    from rich.console import Console

    console = console or Console(width=None if sys.stdout.isatty() else TERMINAL_WIDTH)
    console.print(to_rich(header, rows, title, bold=bold))


# -- the paper's layout ------------------------------------------------------------------------


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
        ``(columns, rows, names)``: column labels (the paper's, then any custom benchmark; only
        the custom ones when no run has a benchmark of the paper's), one row of fractions
        (``None`` where not measured) per run, and the row names.
    """
    custom: list[str] = []
    known = {key for _, key in PAPER_COLUMNS}
    for run in runs:
        custom += [b for b in run["benchmarks"] if b not in known and b not in custom]
    papers = any(b in known for run in runs for b in run["benchmarks"])
    columns = [*(PAPER_COLUMNS if papers else []), *((name, name) for name in custom)]
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


def results_rows(
    runs: Sequence[Mapping[str, Any]], metric: str = "avg@k"
) -> tuple[list[str], list[list[str]]]:
    """:func:`table` as a header and rows of strings (percent, one decimal), methods as rows."""
    columns, rows, names = table(runs, metric)
    return ["method", *columns], [[name, *map(cell, row)] for name, row in zip(names, rows)]


def benchmark_rows(results: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """One ``hpt eval`` run's detail, benchmarks as rows: questions, k, avg@k, maj@k, the top
    pass@k, mean response tokens, and the fractions without a box, truncated, timed out."""
    header = ["benchmark", "questions", "k", "avg@k", "maj@k", "pass@k", "tokens", "no box"]
    header += ["truncated", "timeouts"]
    rows = []
    for name, s in results["benchmarks"].items():
        top = max(s["pass@k"], key=int, default=None)
        rows.append(
            [
                name,
                str(s["questions"]),
                str(s["k"]),
                cell(s["avg@k"]),
                cell(s["maj@k"]),
                "-" if top is None else f"{cell(s['pass@k'][top])} (@{top})",
                f"{s['response_tokens']:.0f}",
                f"{100 * s['no_boxed']:.0f}%",
                f"{100 * s['truncated']:.0f}%",
                str(s["timeouts"]),
            ]
        )
    return header, rows


def _averages(header: Sequence[str]) -> list[str]:
    return [name for name in header if "avg" in name]


def markdown_table(runs: Sequence[Mapping[str, Any]], metric: str = "avg@k") -> str:
    """The table as GitHub markdown, accuracies in percent with one decimal."""
    return to_markdown(*results_rows(runs, metric))


def rich_table(runs: Sequence[Mapping[str, Any]], metric: str = "avg@k", title: str | None = None):
    """The table as a ``rich.table.Table`` (percent, one decimal; averages in bold)."""
    header, rows = results_rows(runs, metric)
    return to_rich(header, rows, title or f"accuracy (%, {metric})", bold=_averages(header))


def print_table(
    runs: Sequence[Mapping[str, Any]], metric: str = "avg@k", title: str | None = None
) -> None:
    """Print :func:`rich_table` on the terminal."""
    header, rows = results_rows(runs, metric)
    print_rows(header, rows, title or f"accuracy (%, {metric})", bold=_averages(header))


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
