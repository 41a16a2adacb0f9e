"""A run's logs: ``metrics.jsonl`` (a line a step), TensorBoard, a progress bar, ``summary.json``.

The logger writes what the recipe measures and invents nothing: :func:`RunLogger.log` warns once
when a step lacks one of :data:`STEP_KEYS`, the keys every run promises (ARCHITECTURE.md).
"""

from __future__ import annotations

import json
import math
import warnings
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from hpt.utils import atomic_write_json, atomic_write_text, progress_bar, to_jsonable

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
TENSORBOARD_DIR = "tensorboard"

# The keys every step's line carries (the contract of runs/<name>/metrics.jsonl).
STEP_KEYS = (
    "step",
    "loss",
    "reward_mean",
    "route_sft",
    "route_rl",
    "entropy",
    "grad_norm",
    "lr",
    "tokens_per_s",
)

_BAR_COLUMNS = (
    "reward {task.fields[reward]}",
    "sft {task.fields[sft]} rl {task.fields[rl]}",
    "{task.fields[speed]} tok/s",
)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of a ``metrics.jsonl`` file (a run folder or the file), in file order.

    A last line cut short by a crash is ignored; any other malformed line raises DataError.
    """
    from hpt.errors import DataError

    path = Path(path)
    file = path / METRICS_FILE if path.is_dir() else path
    if not file.is_file():
        raise DataError(f"no {METRICS_FILE} in {path}")
    lines = file.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break  # a line being written when the run stopped
            raise DataError(f"{file}:{number}: not a JSON object") from None
        if not isinstance(record, dict):
            raise DataError(f"{file}:{number}: not a JSON object")
        records.append(record)
    return records


def _format(value: Any, spec: str = ".3f") -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return format(value, spec)
    return "-"


class RunLogger:
    """Writes a run's metrics and summary; shows its progress.

    Args:
        run_dir: The run folder (created if needed).
        config: The run's config; its TensorBoard text (when enabled). The caller writes
            ``config.yaml`` (``hpt.train.config.save_config``).
        tensorboard: Also write TensorBoard scalars to ``<run_dir>/tensorboard`` when the
            ``tensorboard`` package is installed (a warning, not an error, when it is not).
        progress: Show a progress bar (only on a terminal).
        total_steps: Steps of the whole run, for the bar and its ETA.
        resume_step: Continue an interrupted run: lines of ``metrics.jsonl`` with a step above
            this are dropped (they came after the checkpoint) and new lines are appended. None or
            0 starts a new file.
        enabled: False makes every method a no-op (ranks other than 0 of a distributed run).
    """

    def __init__(
        self,
        run_dir: str | Path,
        config: Any = None,
        *,
        tensorboard: bool = False,
        progress: bool = True,
        total_steps: int | None = None,
        resume_step: int | None = None,
        enabled: bool = True,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.metrics_path = self.run_dir / METRICS_FILE
        self._warned_missing = False
        self._writer: Any = None
        self._bar: Any = None  # a rich Progress
        self._task: Any = None
        self._stack = ExitStack()
        self._file: Any = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._start_metrics_file(resume_step)
        self._file = open(self.metrics_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if tensorboard:
            self._writer = self._open_tensorboard(config)
        self._bar = self._stack.enter_context(
            progress_bar(*_BAR_COLUMNS, enabled=progress, transient=False)
        )
        self._task = self._bar.add_task(
            "train",
            total=total_steps,
            completed=resume_step or 0,
            reward="-",
            sft="-",
            rl="-",
            speed="-",
        )

    # -- setup ---------------------------------------------------------------------------------

    def _start_metrics_file(self, resume_step: int | None) -> None:
        """Keep the lines up to ``resume_step`` (a resumed run) or start an empty file."""
        if not resume_step or not self.metrics_path.exists():
            atomic_write_text(self.metrics_path, "")
            return
        kept = [
            json.dumps(record, allow_nan=False)
            for record in read_metrics(self.metrics_path)
            if not isinstance(record.get("step"), (int, float)) or record["step"] <= resume_step
        ]
        atomic_write_text(self.metrics_path, "".join(line + "\n" for line in kept))

    def _open_tensorboard(self, config: Any) -> Any:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            warnings.warn(
                "logging.tensorboard is on but tensorboard is not installed "
                "(pip install tensorboard); writing metrics.jsonl only",
                stacklevel=3,
            )
            return None
        writer = SummaryWriter(log_dir=str(self.run_dir / TENSORBOARD_DIR))
        if config is not None:
            try:
                from hpt.train.config import dump_config

                writer.add_text("config", "```yaml\n" + dump_config(config) + "```", 0)
            except (TypeError, AttributeError):  # a config that is not a TrainConfig
                writer.add_text("config", str(config), 0)
        return writer

    # -- logging -------------------------------------------------------------------------------

    def log(self, step: int, metrics: dict[str, Any], *, check: bool = True) -> dict[str, Any]:
        """Append one line ``{"step": step, **metrics}`` to metrics.jsonl (flushed) and update the bar.

        Tensors and numpy numbers become floats; nan and inf become null. With ``check``, warns
        once per run if a key of :data:`STEP_KEYS` is missing.

        Returns:
            The record as written.
        """
        record = to_jsonable(
            {"step": int(step), **{k: v for k, v in metrics.items() if k != "step"}}
        )
        if not self.enabled:
            return record
        if check and not self._warned_missing:
            missing = [key for key in STEP_KEYS if key not in record]
            if missing:
                self._warned_missing = True
                warnings.warn(
                    f"step {step}: metrics lack {', '.join(missing)} (promised in metrics.jsonl); "
                    "warning once",
                    stacklevel=2,
                )
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        if self._writer is not None:
            for key, value in record.items():
                if (
                    key != "step"
                    and isinstance(value, (int, float))
                    and not isinstance(value, bool)
                ):
                    self._writer.add_scalar(key, value, int(step))
        self._bar.update(
            self._task,
            completed=int(step),
            reward=_format(record.get("reward_mean")),
            sft=_format(record.get("route_sft"), ".2f"),
            rl=_format(record.get("route_rl"), ".2f"),
            speed=_format(record.get("perf/tokens_per_s", record.get("tokens_per_s")), ".0f"),
        )
        return record

    def log_eval(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        """Append an evaluation line: keys are prefixed with ``eval/`` (plots read them)."""
        prefixed = {k if k.startswith("eval/") else f"eval/{k}": v for k, v in metrics.items()}
        return self.log(step, prefixed, check=False)

    def message(self, text: str) -> None:
        """Print a line above the progress bar (stderr)."""
        if not self.enabled:
            return
        self._bar.console.print(text)

    def write_summary(self, summary: dict[str, Any]) -> Path:
        """Write ``summary.json`` atomically (strict JSON; nan and inf become null)."""
        path = self.run_dir / SUMMARY_FILE
        if self.enabled:
            atomic_write_json(path, summary)
        return path

    def close(self) -> None:
        """Stop the progress bar, close metrics.jsonl and the TensorBoard writer."""
        self._stack.close()
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
