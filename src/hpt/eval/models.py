"""Loading the model to evaluate: a local Hugging Face folder, a GGUF file, or a hub id."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hpt.errors import ConfigError, ModelError

__all__ = ["DTYPES", "model_source", "load_model", "model_label", "model_key", "torch_dtype"]

DTYPES = ("auto", "float32", "bfloat16", "float16")


def torch_dtype(name: str) -> Any:
    import torch

    table = {
        "auto": "auto",
        "float32": torch.float32,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
    }
    if name not in table:
        raise ConfigError(f"--dtype {name!r}: choose from {', '.join(DTYPES)}")
    return table[name]


def _looks_local(spec: str) -> bool:
    """A filesystem path rather than a hub id ``org/name``."""
    return (
        spec.startswith(("/", ".", "~"))
        or spec.count("/") > 1
        or "\\" in spec
        or spec.endswith(".gguf")
    )


def model_source(model: str | Path, gguf_file: str | None = None) -> tuple[str, str | None]:
    """Where ``from_pretrained`` loads from: ``(folder or hub id, GGUF file name or None)``.

    A ``.gguf`` file path becomes its folder and file name. Checks local paths only (a hub id
    is checked when loading).

    Raises:
        ModelError: a local path or GGUF file that does not exist.
    """
    spec = str(model)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        path, gguf_file = path.parent, path.name
    if path.exists():
        if gguf_file is not None and not (path / gguf_file).is_file():
            raise ModelError(f"{path / gguf_file}: no such GGUF file")
        return str(path), gguf_file
    if _looks_local(spec):
        raise ModelError(f"{spec}: no such model folder or file")
    return spec, gguf_file


def load_model(
    model: str | Path,
    *,
    dtype: str = "auto",
    gguf_file: str | None = None,
    device: str | None = None,
    progress: bool = True,
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` from a local HF folder, a GGUF file or a hub id.

    Args:
        model: a folder, a ``.gguf`` file, or a Hugging Face hub id.
        dtype: ``auto``, ``float32``, ``bfloat16`` or ``float16``.
        gguf_file: the GGUF file's name inside the folder ``model`` (transformers dequantises it).
        device: ``cuda`` / ``cpu`` / ...; default cuda when available.
        progress: show transformers' loading bars.

    Raises:
        ModelError: a missing path, or a hub id that cannot be fetched (one line).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    spec = str(model)
    where, gguf_file = model_source(spec, gguf_file)
    kwargs: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
    dtype_value = torch_dtype(dtype)
    bars_were_on = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        loaded = AutoModelForCausalLM.from_pretrained(where, dtype=dtype_value, **kwargs)
    except (OSError, ValueError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        hub = (
            ""
            if Path(where).exists()
            else " (not a local folder; the Hugging Face hub is needed and unreachable?)"
        )
        raise ModelError(f"cannot load model {spec!r}{hub}: {first}") from error
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return loaded.to(device).eval(), tokenizer


def model_label(model: Any, gguf_file: str | None = None) -> str:
    """A run's default row name: the GGUF file's stem, the model folder's name, or the config's."""
    if gguf_file:
        return Path(gguf_file).stem
    if isinstance(model, (str, Path)):
        path = Path(str(model).rstrip("/"))
        return path.stem if path.suffix == ".gguf" else (path.name or str(model))
    config = getattr(model, "config", None)
    name = str(getattr(config, "_name_or_path", "") or type(model).__name__)
    return name.rstrip("/").split("/")[-1]


def model_key(model: str | Path) -> str:
    """The model as recorded in run.json: an absolute path when local, else the hub id."""
    path = Path(str(model)).expanduser()
    return str(path.resolve()) if path.exists() else str(model)
