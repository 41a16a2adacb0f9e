"""Small helpers shared by the layers: progress bars, atomic file writes, JSON conversion, the
distinct prompts of a batch.

``import hpt.utils`` is light: rich, numpy and torch are imported inside the functions that need
them.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# --------------------------------------------------------------------------------------------
# Progress bars
# --------------------------------------------------------------------------------------------


def progress_enabled(enabled: bool = True) -> bool:
    """Whether a progress bar should be drawn: asked for, and stderr is a terminal.

    The environment variable ``HPT_PROGRESS=0`` turns every bar off; ``HPT_PROGRESS=1`` forces
    them on even without a terminal (useful under some job schedulers).
    """
    forced = os.environ.get("HPT_PROGRESS", "").strip().lower()
    if not enabled or forced in ("0", "false", "no", "off"):
        return False
    if forced in ("1", "true", "yes", "on"):
        return True
    stream = sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


def progress_bar(*extra_columns: Any, enabled: bool = True, transient: bool = True) -> Any:
    """rich's own :class:`rich.progress.Progress`, drawn on stderr, with this project's columns.

    Columns: description, bar, ``completed/total``, the ``extra_columns``, elapsed time and ETA.
    The display is disabled (``disable=True``: nothing drawn, every call still valid) when
    ``enabled`` is False or :func:`progress_enabled` says no, so library code can always use it::

        with progress_bar("reward {task.fields[reward]}", enabled=show) as bar:
            task = bar.add_task("train", total=steps, reward="-")
            bar.update(task, advance=1, reward="0.5")
            bar.console.print("a line above the bar")

    ``bar.console`` prints plain text (no markup, highlighting or wrapping) to stderr, drawn or not.

    Args:
        *extra_columns: rich ``ProgressColumn`` objects, or ``TextColumn`` templates such as
            ``"reward {task.fields[reward]}"`` (give the fields' first values to ``add_task``).
        enabled: False turns the display off.
        transient: Remove the bar from the terminal when the ``with`` block ends.

    Returns:
        A ``rich.progress.Progress``; use it as a context manager.
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *(TextColumn(c) if isinstance(c, str) else c for c in extra_columns),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    ]
    console = Console(stderr=True, markup=False, highlight=False, emoji=False, soft_wrap=True)
    return Progress(
        *columns, console=console, transient=transient, disable=not progress_enabled(enabled)
    )


# --------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------


def fsync_dir(path: str | Path) -> None:
    """Flush a directory entry to disk (so a rename inside it survives a crash); best effort."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that a reader sees the old file or the new one, never a part.

    The bytes go to a temporary file in the same directory, are flushed and fsynced, and the
    temporary file replaces ``path`` with ``os.replace`` (atomic on POSIX and Windows).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode(encoding))


def fsync_tree(path: str | Path) -> None:
    """fsync every file under ``path`` and every directory entry (best effort)."""
    root = Path(path)
    for directory, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(directory, name), "rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(directory)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a directory in a temporary sibling and move it into place only when the block succeeds.

    The block writes into the yielded temporary directory (a hidden name in the same parent,
    so a half-written one is never mistaken for ``path``). On success its files are fsynced and it
    is renamed to ``path``, replacing an existing directory of that name (which is moved aside
    first, then deleted). On an exception the temporary directory is removed and nothing changes.

    Yields:
        The temporary directory to write into.
    """
    import shutil
    import uuid

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(path, old)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def to_jsonable(value: Any) -> Any:
    """Turn tensors, numpy values, paths, tuples and dataclasses into plain JSON values.

    Non-finite floats (nan, inf) become ``None`` so that the output is strict JSON.
    """
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_jsonable(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "__dataclass_fields__"):
        import dataclasses

        return to_jsonable(dataclasses.asdict(value))
    if hasattr(value, "tolist"):  # torch tensors, numpy arrays and scalars
        return to_jsonable(value.tolist())
    if hasattr(value, "item"):
        return to_jsonable(value.item())
    return str(value)


def atomic_write_json(path: str | Path, obj: Any, *, indent: int | None = 2) -> Path:
    """Write ``obj`` as strict JSON to ``path`` atomically (values pass through :func:`to_jsonable`)."""
    text = json.dumps(to_jsonable(obj), indent=indent, allow_nan=False, ensure_ascii=False)
    return atomic_write_text(path, text + "\n")


# --------------------------------------------------------------------------------------------
# Token sequences
# --------------------------------------------------------------------------------------------


def distinct_rows(prompts: Sequence[Sequence[int]]) -> tuple[list[int], list[int]]:
    """``(first, copy_of)``: the first row of each distinct prompt (a token sequence), and for
    every row the index (into ``first``) of its prompt. Both the rollout engine's prefill and
    the trainer's shared-prompt passes run each distinct prompt once."""
    seen: dict[tuple[int, ...], int] = {}
    first: list[int] = []
    copy_of = []
    for row, prompt in enumerate(prompts):
        key = tuple(prompt)
        if key not in seen:
            seen[key] = len(first)
            first.append(row)
        copy_of.append(seen[key])
    return first, copy_of
