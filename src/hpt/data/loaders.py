"""Load questions from JSON, JSONL and parquet files, folders, benchmark names and Hugging Face ids.

Three row schemas are understood without configuration:

- the verl / LUFFY schema of the paper's training data (arXiv 2509.04419, section 3; PAPER.md):
  ``prompt`` = chat messages, ``target`` = ``[{"role": "assistant", "content": trace}]``,
  ``reward_model.ground_truth``, ``data_source``, ``extra_info.index``;
- the flat ``{prompt, answer[, source, id]}`` schema of the evaluation sets;
- common alternatives: ``question`` / ``problem`` for the prompt, ``solution`` / ``response`` for
  the demonstration, ``ground_truth`` for the answer, ``unique_id`` for the id.

Any other schema is read through ``fields``: our field name -> a dotted path in the row, e.g.
``{"prompt": "question", "answer": "meta.final"}``. Every problem raises a one-line
:class:`~hpt.errors.DataError` naming the file, the row (1-based line for JSONL, 0-based index
for JSON arrays and parquet) and the field.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from itertools import chain, islice
from pathlib import Path
from typing import Any

from hpt.data.question import Question
from hpt.errors import ConfigError, DataError

QUESTION_FIELDS = ("id", "prompt", "answer", "demonstration", "source", "meta")
REQUIRED_FIELDS = ("prompt", "answer")

# our field -> paths tried in order; the first one present in the first row is used for all rows
DEFAULT_PATHS: dict[str, tuple[str, ...]] = {
    "prompt": ("prompt", "question", "problem"),
    "answer": ("reward_model.ground_truth", "answer", "ground_truth"),
    "demonstration": ("target", "demonstration", "solution", "response"),
    "source": ("data_source", "source"),
    "id": ("extra_info.index", "id", "unique_id"),
}

# file stems that name a split rather than a data set ("AIME24/test.json" is AIME24)
SPLIT_NAMES = frozenset({"train", "test", "validation", "valid", "val", "dev", "eval"})

_MISSING = object()

Row = tuple[str, Any]  # (place in the file, e.g. "line 3", the decoded row)


# --------------------------------------------------------------------------------------------
# public entry points


def benchmark_dir() -> Path:
    """The folder of evaluation sets: ``$HPT_BENCHMARK_DIR``, else ``../shared/benchmarks``.

    The default is relative to the project's root (the folder holding ``src/``); the path is
    returned whether or not it exists.
    """
    env = os.environ.get("HPT_BENCHMARK_DIR")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[3].parent / "shared" / "benchmarks"


def load_questions(
    source: str | os.PathLike[str],
    *,
    fields: dict[str, str] | None = None,
    split: str | None = None,
    limit: int | None = None,
) -> list[Question]:
    """Read questions from a file, a folder, a benchmark name or a Hugging Face dataset id.

    Args:
        source: A ``.json`` file (an array, or an object holding one array), a ``.jsonl`` file,
            a ``.parquet`` file, a folder holding one of them (or the shards of one split), the
            name of a folder of :func:`benchmark_dir` (``"AIME24"``, case-insensitive), or a
            Hugging Face dataset id loaded with ``datasets.load_dataset``.
        fields: Our field name (one of ``id, prompt, answer, demonstration, source, meta``) ->
            a dotted path in the row. Fields not given are found by :data:`DEFAULT_PATHS`.
        split: The split to read: a Hugging Face split, the file of a folder whose name starts
            with it (``train.parquet``, ``train-00000-of-00002.parquet``), or the array of a JSON
            object with that key. Ignored for a single file otherwise.
        limit: Read only the first ``limit`` rows.

    Returns:
        The questions, in file order.

    Raises:
        DataError: A missing or unreadable source, or a row that does not fit (one line naming
            the file, the row and the field).
        ConfigError: A bad ``fields`` mapping or ``limit``.
    """
    _check_fields(fields)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit must be a positive integer or None, got {limit!r}")
    label, name, rows = _open_source(str(source), split, limit)
    questions = list(_to_questions(rows, label, name, fields or {}))
    if not questions:
        raise DataError(f"{label}: no rows")
    return questions


# --------------------------------------------------------------------------------------------
# sources: which rows to read


def _open_source(
    source: str, split: str | None, limit: int | None
) -> tuple[str, str, Iterable[Row]]:
    """(label for messages, data set name, rows) of a path, benchmark name or dataset id."""
    path = Path(source).expanduser()
    if path.exists():
        return _open_path(path, split, limit)
    bench = _benchmark_folder(source)
    if bench is not None:
        return _open_path(bench, split, limit)
    if _looks_like_hub_id(source):
        return _open_hub(source, split, limit)
    raise DataError(f"{source}: no such file or folder")


def _open_path(path: Path, split: str | None, limit: int | None) -> tuple[str, str, Iterable[Row]]:
    if path.is_dir():
        files = _data_files(path, split)
        name = path.name
    else:
        if path.suffix.lower() not in READERS:
            raise DataError(f"{path}: unknown file type {path.suffix!r}; use {_suffix_list()}")
        files = [path]
        name = path.parent.name if _split_token(path) in SPLIT_NAMES else path.stem
    rows = chain.from_iterable(READERS[f.suffix.lower()](f, split) for f in files)
    label = str(files[0]) if len(files) == 1 else f"{path} ({len(files)} files)"
    return label, name, islice(rows, limit)


def _data_files(directory: Path, split: str | None) -> list[Path]:
    """The data file(s) of a folder: one file, or the shards of one split."""

    def listing(folder: Path) -> list[Path]:
        return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in READERS)

    files = listing(directory)
    if not files and (directory / "data").is_dir():  # a Hugging Face snapshot folder
        files = listing(directory / "data")
    if not files:
        raise DataError(f"{directory}: folder holds no {_suffix_list()} file")
    if split is not None:
        chosen = [p for p in files if _split_token(p) == split or p.stem == split]
        if not chosen:
            names = ", ".join(p.name for p in files)
            raise DataError(f"{directory}: no file for split {split!r} (files: {names})")
        return chosen
    if len({_split_token(p) for p in files}) == 1 and len({p.suffix for p in files}) == 1:
        return files  # one file, or the shards of one split
    names = ", ".join(p.name for p in files)
    raise DataError(
        f"{directory}: folder holds several data files ({names}); choose one with split"
    )


def _split_token(path: Path) -> str:
    """``train-00000-of-00002.parquet`` -> ``train``; ``test.json`` -> ``test``."""
    return re.split(r"[-_.]", path.stem, maxsplit=1)[0]


def _benchmark_folder(name: str) -> Path | None:
    """The folder of :func:`benchmark_dir` called ``name`` (case-insensitive), if any."""
    if not name or "/" in name or os.sep in name or name.startswith("."):
        return None
    root = benchmark_dir()
    if not root.is_dir():
        return None
    for folder in root.iterdir():
        if folder.is_dir() and folder.name.lower() == name.lower():
            return folder
    return None


def _looks_like_hub_id(source: str) -> bool:
    """``org/name`` or ``name``: no data-file suffix, no path syntax."""
    if Path(source).suffix.lower() in READERS:
        return False
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", source) is not None


def _open_hub(
    dataset_id: str, split: str | None, limit: int | None
) -> tuple[str, str, Iterable[Row]]:
    """Rows of a Hugging Face dataset (needs network unless it is in the local cache)."""
    try:
        import datasets
    except ImportError as error:  # pragma: no cover - datasets is a dependency
        raise DataError(f"{dataset_id}: loading a Hugging Face dataset needs `datasets`") from error
    try:
        loaded = datasets.load_dataset(dataset_id, split=split)
    except Exception as error:  # any failure of the hub client is the user's input or network
        hint = "; HF_HUB_OFFLINE is set: give a local file or folder" if _offline() else ""
        raise DataError(
            f"{dataset_id}: cannot load Hugging Face dataset ({_one_line(error)}){hint}"
        ) from error
    if isinstance(loaded, datasets.DatasetDict):
        names = list(loaded)
        if "train" in loaded:
            split = "train"
        elif len(names) == 1:
            split = names[0]
        else:
            raise DataError(
                f"{dataset_id}: several splits ({', '.join(names)}); choose one with split"
            )
        loaded = loaded[split]
    if limit is not None:
        loaded = loaded.select(range(min(limit, len(loaded))))
    rows = ((f"row index {i}", row) for i, row in enumerate(loaded))
    return f"{dataset_id} [{split}]", dataset_id.rsplit("/", 1)[-1], rows


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _one_line(error: BaseException) -> str:
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return text[:300]


# --------------------------------------------------------------------------------------------
# readers: suffix -> function(path, split) yielding (place, row)


def _read_text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text (byte {error.start})") from error
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.strerror})") from error
    if not text.strip():
        raise DataError(f"{path}: empty file")
    return text


def _read_json(path: Path, split: str | None) -> Iterator[Row]:
    """A JSON array of rows, or an object holding one array (or the array named ``split``)."""
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as error:
        raise DataError(
            f"{path}: line {error.lineno} column {error.colno}: invalid JSON ({error.msg})"
        ) from error
    prefix = "index "
    if isinstance(data, dict):
        arrays = [key for key, value in data.items() if isinstance(value, list)]
        if split is not None and split in arrays:
            key = split
        elif len(arrays) == 1:
            key = arrays[0]
        elif not arrays:
            raise DataError(f"{path}: JSON object holds no array of rows")
        else:
            raise DataError(
                f"{path}: JSON object holds several arrays ({', '.join(arrays)}); choose one with split"
            )
        data, prefix = data[key], f"{key} index "
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of rows, got {type(data).__name__}")
    return ((f"{prefix}{i}", row) for i, row in enumerate(data))


def _read_jsonl(path: Path, split: str | None) -> Iterator[Row]:
    """One JSON object a line; blank lines are skipped; places are 1-based line numbers."""
    _read_text(path)  # fails early and clearly on an empty or unreadable file
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(
                    f"{path}: line {number}: invalid JSON ({error.msg} at column {error.colno})"
                ) from error
            yield f"line {number}", row


def _read_parquet(path: Path, split: str | None) -> Iterator[Row]:
    """Rows of a parquet file, read in record batches with pyarrow."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{path}: not a readable parquet file ({_one_line(error)})") from error
    index = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            yield f"row index {index}", row
            index += 1


READERS: dict[str, Callable[[Path, str | None], Iterator[Row]]] = {
    ".json": _read_json,
    ".jsonl": _read_jsonl,
    ".ndjson": _read_jsonl,
    ".parquet": _read_parquet,
}


def _suffix_list() -> str:
    return "/".join(READERS)


# --------------------------------------------------------------------------------------------
# schema: rows -> questions


def _check_fields(fields: dict[str, str] | None) -> None:
    if fields is None:
        return
    if not isinstance(fields, dict):
        raise ConfigError(
            f"fields must be a mapping of field name -> path, got {type(fields).__name__}"
        )
    for key, path in fields.items():
        if key not in QUESTION_FIELDS:
            raise ConfigError(
                f"fields: unknown field {key!r}; choose from {', '.join(QUESTION_FIELDS)}"
            )
        if not isinstance(path, str) or not path.strip():
            raise ConfigError(f"fields: {key!r} must map to a dotted path string, got {path!r}")


def get_path(row: Any, path: str) -> Any:
    """The value at a dotted path (``"reward_model.ground_truth"``), or ``_MISSING``."""
    value = row
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return _MISSING
    return value


def _resolve_paths(row: dict, fields: dict[str, str], where: str) -> dict[str, str | None]:
    """Our field -> the path used for every row: the given one, else the first default present."""
    paths: dict[str, str | None] = {}
    for name in QUESTION_FIELDS:
        if name in fields:
            paths[name] = fields[name]
            continue
        found = [p for p in DEFAULT_PATHS.get(name, ()) if get_path(row, p) is not _MISSING]
        paths[name] = found[0] if found else None
        if paths[name] is None and name in REQUIRED_FIELDS:
            tried = ", ".join(DEFAULT_PATHS[name])
            keys = ", ".join(map(str, row)) or "nothing"
            raise DataError(
                f"{where}: no {name!r} field (looked for {tried}; the row has {keys}); "
                f"map it with fields={{'{name}': 'path.in.row'}}"
            )
    return paths


def _to_questions(
    rows: Iterable[Row], label: str, name: str, fields: dict[str, str]
) -> Iterator[Question]:
    paths: dict[str, str | None] | None = None
    required = frozenset(REQUIRED_FIELDS) | frozenset(fields)
    for position, (place, row) in enumerate(rows):
        where = f"{label}: {place}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object, got {type(row).__name__}")
        if paths is None:
            paths = _resolve_paths(row, fields, where)
        yield _to_question(
            row, paths, required, where, default_id=f"{name}-{position}", default_source=name
        )


def _to_question(
    row: dict,
    paths: dict[str, str | None],
    required: frozenset[str],
    where: str,
    *,
    default_id: str,
    default_source: str,
) -> Question:
    """One row -> a Question; a field in ``required`` (prompt, answer, any mapped one) must exist."""
    values: dict[str, Any] = {}
    for name, path in paths.items():
        value = _MISSING if path is None else get_path(row, path)
        if value is _MISSING and name in required:
            raise DataError(f"{where}: field {name!r} ({path}): missing")
        try:
            values[name] = CONVERTERS[name](None if value is _MISSING else value)
        except _FieldError as error:
            raise DataError(f"{where}: field {name!r} ({path}): {error}") from None
    used = {p for p in paths.values() if p is not None and "." not in p}
    meta = {k: v for k, v in row.items() if k not in used}
    meta.update(values.pop("meta") or {})
    return Question(
        id=values["id"] if values["id"] is not None else default_id,
        prompt=values["prompt"],
        answer=values["answer"],
        demonstration=values["demonstration"],
        source=values["source"] or default_source,
        meta=meta,
    )


# --------------------------------------------------------------------------------------------
# converters: raw value -> field value, raising _FieldError with the problem


class _FieldError(Exception):
    """A field value that does not fit; the caller adds the file, row and field."""


def _messages(value: list, *, what: str) -> list[dict[str, str]]:
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise _FieldError(
                f"{what} {i} is {type(message).__name__}, expected an object with role and content"
            )
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            raise _FieldError(f"{what} {i} needs string 'role' and 'content'")
        messages.append({"role": role, "content": content})
    return messages


def _convert_prompt(value: Any) -> str | list[dict[str, str]]:
    if value is None:
        raise _FieldError("missing")
    if isinstance(value, str):
        if not value.strip():
            raise _FieldError("empty prompt")
        return value
    if isinstance(value, list):
        messages = _messages(value, what="message")
        if not any(m["role"] == "user" and m["content"].strip() for m in messages):
            raise _FieldError("empty prompt (no user message with content)")
        return messages
    raise _FieldError(f"expected text or a list of chat messages, got {type(value).__name__}")


def _convert_answer(value: Any) -> str:
    if value is None:
        raise _FieldError("missing")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _FieldError(f"expected text or a number, got {type(value).__name__}")
    text = str(value)
    if not text.strip():
        raise _FieldError("empty answer")
    return text


def _convert_demonstration(value: Any) -> str | None:
    """Text, or verl's ``target``: chat messages whose last assistant message is the trace."""
    if value is None:
        return None
    if isinstance(value, str):
        return value if value.strip() else None
    if isinstance(value, list):
        replies = [
            m["content"] for m in _messages(value, what="message") if m["role"] == "assistant"
        ]
        if value and not replies:
            raise _FieldError("chat messages hold no assistant message")
        return replies[-1] if replies and replies[-1].strip() else None
    raise _FieldError(f"expected text or chat messages, got {type(value).__name__}")


def _convert_scalar_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _FieldError(f"expected text or an integer, got {type(value).__name__}")
    return str(value)


def _convert_meta(value: Any) -> dict | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _FieldError(f"expected an object, got {type(value).__name__}")
    return dict(value)


CONVERTERS: dict[str, Callable[[Any], Any]] = {
    "id": _convert_scalar_text,
    "prompt": _convert_prompt,
    "answer": _convert_answer,
    "demonstration": _convert_demonstration,
    "source": _convert_scalar_text,
    "meta": _convert_meta,
}
