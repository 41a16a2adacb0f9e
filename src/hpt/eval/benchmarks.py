"""The benchmark registry and the resolution of ``--benchmarks`` arguments to data sources.

The paper (arXiv 2509.04419, section 4) reports six in-distribution math sets (AIME24, AIME25,
AMC23, MATH-500, Minerva, OlympiadBench) and two out-of-distribution multiple-choice sets
(ARC-c, GPQA-diamond). Each is a :class:`Benchmark` row; a benchmark is looked up in a local
benchmark directory laid out like ``shared/benchmarks/`` (one folder per set), else loaded from
its Hugging Face dataset id. Any other JSON / JSONL / parquet file or folder becomes a custom
benchmark with the reward and field mapping the user gives.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from hpt.errors import ConfigError, DataError

__all__ = [
    "Benchmark",
    "BENCHMARKS",
    "DATA_SUFFIXES",
    "ENV_BENCHMARK_DIR",
    "PAPER_COLUMNS",
    "get_benchmark",
    "resolve_benchmarks",
]

ENV_BENCHMARK_DIR = "HPT_BENCHMARK_DIR"
DATA_SUFFIXES = (".json", ".jsonl", ".parquet")


@dataclass(frozen=True)
class Benchmark:
    """One evaluation set and how to score it.

    Attributes:
        name: registry key (``aime24``) or, for a custom set, the file or folder stem.
        column: the column label in the paper's table (``AIME24``, ``AMC``, ``Olympiad``).
        reward: reward name for ``hpt.rewards`` (``math``, ``choice`` or ``module:function``).
        kind: ``id`` (in-distribution math average), ``ood`` (out-of-distribution average) or
            ``custom`` (in no average).
        folder: the folder name inside a benchmark directory (``MATH-500``).
        hf_id: Hugging Face dataset id used when no local copy is found (``None``: none public
            in a shape ``load_questions`` reads).
        hf_split: split of ``hf_id``.
        hf_fields: field mapping for ``hf_id`` rows (our name -> dotted path).
        source: the resolved file / folder / dataset id to load (set by resolution).
        fields: field mapping for ``source`` (set by resolution).
    """

    name: str
    column: str
    reward: str = "math"
    kind: str = "custom"
    folder: str | None = None
    hf_id: str | None = None
    hf_split: str | None = "test"
    hf_fields: Mapping[str, str] = field(default_factory=dict)
    source: str | None = None
    fields: Mapping[str, str] | None = None

    @property
    def is_choice(self) -> bool:
        """Whether answers are option letters (the prompt asks for the letter)."""
        return self.reward == "choice"


def _math(name: str, column: str, folder: str, hf_id: str, split: str, **fields: str) -> Benchmark:
    return Benchmark(name, column, "math", "id", folder, hf_id, split, fields)


# The paper's suite, in the column order of its main table.
BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        _math("aime24", "AIME24", "AIME24", "HuggingFaceH4/aime_2024", "train", prompt="problem"),
        _math("aime25", "AIME25", "AIME25", "math-ai/aime25", "test", prompt="problem"),
        _math("amc23", "AMC", "AMC23", "math-ai/amc23", "test", prompt="question"),
        _math(
            "math500",
            "MATH-500",
            "MATH-500",
            "HuggingFaceH4/MATH-500",
            "test",
            prompt="problem",
            id="unique_id",
        ),
        _math("minerva", "Minerva", "Minerva", "math-ai/minervamath", "test", prompt="question"),
        _math(
            "olympiadbench",
            "Olympiad",
            "Olympiad-Bench",
            "math-ai/olympiadbench",
            "test",
            prompt="question",
        ),
        # No public copy with the options lettered inside the question: local files only.
        Benchmark("arc_c", "ARC-c", "choice", "ood", "ARC-c"),
        Benchmark("gpqa", "GPQA", "choice", "ood", "GPQA"),
    )
}

# The paper's table layout: (column label, benchmark name or an average's key).
PAPER_COLUMNS: tuple[tuple[str, str], ...] = (
    *((b.column, b.name) for b in BENCHMARKS.values() if b.kind == "id"),
    ("avg", "@id"),
    *((b.column, b.name) for b in BENCHMARKS.values() if b.kind == "ood"),
    ("OOD avg", "@ood"),
)

_ALIASES = {
    "amc": "amc23",
    "math-500": "math500",
    "math_500": "math500",
    "olympiad": "olympiadbench",
    "olympiad-bench": "olympiadbench",
    "arc-c": "arc_c",
    "arc": "arc_c",
    "gpqa-diamond": "gpqa",
    "gpqa_diamond": "gpqa",
    "minervamath": "minerva",
    "aime2024": "aime24",
    "aime2025": "aime25",
}


def get_benchmark(name: str) -> Benchmark:
    """The registry row of ``name`` (case-insensitive, a few aliases such as ``amc``, ``arc-c``).

    Raises:
        ConfigError: for an unknown name, listing the known ones.
    """
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in BENCHMARKS:
        by_folder = {b.folder.lower(): b for b in BENCHMARKS.values() if b.folder}
        if key in by_folder:
            return by_folder[key]
        raise ConfigError(
            f"unknown benchmark {name!r}: not a file or folder either; known: {', '.join(BENCHMARKS)}"
        )
    return BENCHMARKS[key]


def _data_file(folder: Path) -> Path | None:
    """The single test data file of a benchmark folder (``test.*`` preferred), or ``None``."""
    for suffix in DATA_SUFFIXES:
        if (folder / f"test{suffix}").is_file():
            return folder / f"test{suffix}"
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in DATA_SUFFIXES)
    return files[0] if len(files) == 1 else None


def _known_folder(path: Path) -> Benchmark | None:
    """The registry row whose folder name is ``path``'s name (``.../MATH-500``), if any."""
    for benchmark in BENCHMARKS.values():
        if benchmark.folder and benchmark.folder.lower() == path.name.lower():
            return benchmark
    return None


def _from_path(path: Path, reward: str | None, fields: Mapping[str, str] | None) -> list[Benchmark]:
    """Benchmarks from a file, a benchmark folder, or a directory of benchmark folders."""
    if path.is_file():
        if path.suffix not in DATA_SUFFIXES:
            raise DataError(f"{path}: not a benchmark file (expected {', '.join(DATA_SUFFIXES)})")
        known = _known_folder(path.parent) if path.stem == "test" else None
        return [
            _custom_or_known(
                known, path.parent.name if path.stem == "test" else path.stem, path, reward, fields
            )
        ]
    known = _known_folder(path)
    data = _data_file(path)
    if known is not None and data is not None:
        return [replace(known, source=str(data))]
    found = [
        replace(b, source=str(path / b.folder / data.name))
        for b in BENCHMARKS.values()
        if b.folder
        and (path / b.folder).is_dir()
        and (data := _data_file(path / b.folder)) is not None
    ]
    if found:
        return found
    if data is not None:
        return [_custom_or_known(None, path.name, data, reward, fields)]
    raise DataError(
        f"{path}: no benchmark data in this folder (expected test.json/.jsonl/.parquet, "
        f"or folders named {', '.join(b.folder for b in BENCHMARKS.values() if b.folder)})"
    )


def _custom_or_known(
    known: Benchmark | None,
    name: str,
    data: Path,
    reward: str | None,
    fields: Mapping[str, str] | None,
) -> Benchmark:
    if known is not None:
        return replace(known, source=str(data))
    return Benchmark(
        name, name, reward or "math", "custom", source=str(data), fields=dict(fields or {}) or None
    )


def _looks_like_path(spec: str) -> bool:
    return os.sep in spec or spec.startswith(".") or Path(spec).suffix in DATA_SUFFIXES


def resolve_benchmarks(
    specs: Sequence[str],
    *,
    benchmark_dir: str | Path | None = None,
    reward: str | None = None,
    fields: Mapping[str, str] | None = None,
) -> list[Benchmark]:
    """Turn ``--benchmarks`` arguments into benchmarks with a ``source`` to load.

    Each spec is a registry name (``aime24``, ``math500``, ...), a data file, a benchmark folder
    holding ``test.json`` / ``.jsonl`` / ``.parquet``, or a directory laid out like
    ``shared/benchmarks/`` (then every registered benchmark found in it). A name resolves to its
    folder in ``benchmark_dir`` (default: env ``HPT_BENCHMARK_DIR``) when present there, else to
    its Hugging Face dataset id.

    Args:
        specs: the ``--benchmarks`` arguments.
        benchmark_dir: where named benchmarks live locally.
        reward: reward for custom files (default ``math``); registered benchmarks (recognised
            by name or by their folder name) keep their own.
        fields: field mapping for custom files (our name -> dotted path in a row).

    Returns:
        Benchmarks in the order given, without duplicate names.

    Raises:
        ConfigError: an unknown name. DataError: a path that holds no benchmark data.
    """
    if not specs:
        raise ConfigError(
            "no benchmarks given: pass names (aime24, math500, ...), files or a folder"
        )
    root = benchmark_dir or os.environ.get(ENV_BENCHMARK_DIR) or None
    resolved: dict[str, Benchmark] = {}
    for spec in specs:
        path = Path(spec).expanduser()
        if path.exists():
            found = _from_path(path, reward, fields)
        elif _looks_like_path(spec):
            raise DataError(f"{spec}: no such benchmark file or folder")
        else:
            found = [_from_name(spec, root)]
        for benchmark in found:
            resolved.setdefault(benchmark.name, benchmark)
    return list(resolved.values())


def _from_name(spec: str, root: str | Path | None) -> Benchmark:
    benchmark = get_benchmark(spec)
    if root is not None and benchmark.folder:
        folder = Path(root).expanduser() / benchmark.folder
        data = _data_file(folder) if folder.is_dir() else None
        if data is not None:
            return replace(benchmark, source=str(data))
    if benchmark.hf_id is None:
        where = f"in {root}" if root else f"(no --benchmark-dir or ${ENV_BENCHMARK_DIR} set)"
        raise DataError(
            f"benchmark {benchmark.name!r}: no local copy {where} and no Hugging Face fallback; "
            f"pass its folder {benchmark.folder!r} or a file"
        )
    return replace(benchmark, source=benchmark.hf_id, fields=dict(benchmark.hf_fields) or None)
