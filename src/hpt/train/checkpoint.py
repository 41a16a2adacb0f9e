"""Checkpoints: everything a run needs to continue exactly where it stopped, written atomically.

``runs/<name>/checkpoints/step-<N>/`` holds

- the model as a Hugging Face folder (``config.json`` + ``*.safetensors``; the tokenizer too when
  given), so ``hpt eval --model runs/<name>/checkpoints/step-<N>`` works on it;
- ``value_head.safetensors`` (PPO's critic head, when there is one);
- ``optimizer.pt`` and ``scheduler.pt`` (their ``state_dict``);
- ``rng.pt``: the Python ``random``, numpy, torch CPU and CUDA generator states;
- ``state.json``: the step and the caller's ``extra_state`` (data order, stage, ...), written last.

A checkpoint is built in a hidden temporary sibling, fsynced and renamed into place, so a crash
never leaves a partial ``step-<N>`` that :func:`latest_checkpoint` would pick. Only the newest
``keep`` checkpoints are kept.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from hpt.errors import ConfigError, ModelError
from hpt.utils import atomic_dir, atomic_write_json

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "state.json"
VALUE_HEAD_FILE = "value_head.safetensors"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    """``<run_dir>/checkpoints/step-<step>``."""
    return Path(run_dir) / CHECKPOINTS_DIR / f"step-{int(step)}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The complete checkpoints of a run (those with a ``state.json``), oldest step first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _STEP_DIR.match(entry.name)
        if match and entry.is_dir() and (entry / STATE_FILE).is_file():
            found.append((int(match.group(1)), entry))
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None when it has none."""
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


# --------------------------------------------------------------------------------------------
# Random number generators
# --------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """The states of Python's ``random``, numpy's global generator, torch CPU and every CUDA device.

    Stored as tensors, lists and numbers only, so ``torch.load(..., weights_only=True)`` reads it.
    """
    import numpy as np

    version, internal, gauss_next = random.getstate()
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the generators saved by :func:`rng_state` (CUDA only when saved and available)."""
    import numpy as np

    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss_next"]))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["name"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


def _save_weights(model: torch.nn.Module, directory: Path) -> None:
    """A Hugging Face model as its own folder; any other module as ``model.safetensors``."""
    if hasattr(model, "save_pretrained"):
        from transformers.utils import logging as hf_logging

        was_enabled = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # no tqdm bar under the run's progress bar
        try:
            model.save_pretrained(directory)
        finally:
            if was_enabled:
                hf_logging.enable_progress_bar()
    else:
        from safetensors.torch import save_model

        save_model(model, str(directory / "model.safetensors"))  # handles shared (tied) tensors


def _load_weights(model: torch.nn.Module, directory: Path) -> None:
    """Load every ``model*.safetensors`` file of ``directory`` into ``model`` in place.

    Parameters are copied into the existing tensors, so an optimizer built on ``model`` stays
    valid. Keys missing from the files are allowed only for tensors tied to a loaded one (the
    output head tied to the embedding).
    """
    from safetensors.torch import load_file

    if hasattr(model, "peft_config"):  # LoRA: the checkpoint holds the adapters only
        _load_adapter(model, directory)
        return
    files = sorted(directory.glob("model*.safetensors"))
    if not files:
        raise ModelError(f"checkpoint {directory} holds no model*.safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatches raise even with strict=False
        detail = " ".join(str(error).split())
        raise ModelError(f"checkpoint {directory} does not fit the model: {detail[:200]}") from None
    if unexpected:
        raise ModelError(
            f"checkpoint {directory} does not fit the model: unexpected keys {sorted(unexpected)[:5]}"
        )
    params = model.state_dict(keep_vars=True)
    loaded = {params[key].data_ptr() for key in state if key in params}
    untied = [key for key in missing if params[key].data_ptr() not in loaded]
    if untied:
        raise ModelError(
            f"checkpoint {directory} does not fit the model: missing keys {sorted(untied)[:5]}"
        )


def _load_adapter(model: torch.nn.Module, directory: Path) -> None:
    """Copy the LoRA adapters saved by ``PeftModel.save_pretrained`` into ``model`` in place."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    file = directory / "adapter_model.safetensors"
    if not file.is_file():
        raise ModelError(
            f"checkpoint {directory} holds no LoRA adapter (adapter_model.safetensors)"
        )
    result = set_peft_model_state_dict(model, load_file(str(file)))
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise ModelError(
            f"checkpoint {directory} does not fit the adapters: unexpected keys {unexpected[:5]}"
        )


def save_final(
    directory: str | Path, model: torch.nn.Module, tokenizer: Any, *, merge: bool
) -> None:
    """The trained model as a Hugging Face folder, written atomically.

    A LoRA model writes its peft adapter (``adapter_config.json`` + ``adapter_model.safetensors``,
    loadable by ``AutoModelForCausalLM.from_pretrained`` with peft installed) and, with
    ``merge``, the merged model in ``merged/``.
    """
    lora = hasattr(model, "peft_config")
    with atomic_dir(directory) as tmp:
        _save_weights(model, tmp)
        tokenizer.save_pretrained(tmp)
        if lora and merge:
            merged = model.merge_and_unload()  # in place (no second copy): training is over
            _save_weights(merged, tmp / "merged")
            tokenizer.save_pretrained(tmp / "merged")


# --------------------------------------------------------------------------------------------
# Save and load
# --------------------------------------------------------------------------------------------


def _remove_stale(root: Path) -> None:
    """Delete temporary folders left by a crash during an earlier save (single writer assumed)."""
    for entry in root.glob(".step-*"):
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)


def prune_checkpoints(run_dir: str | Path, keep: int | None) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints (None: keep all); returns the deleted ones."""
    if keep is None:
        return []
    if keep < 1:
        raise ConfigError(f"keep_checkpoints must be >= 1 or null, got {keep}")
    old = list_checkpoints(run_dir)[:-keep]
    for path in old:
        shutil.rmtree(path, ignore_errors=True)
    return old


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    extra_state: dict[str, Any] | None = None,
    *,
    keep: int | None = None,
    value_head: torch.nn.Module | None = None,
    tokenizer: Any = None,
) -> Path:
    """Write ``<run_dir>/checkpoints/step-<step>/`` atomically and keep the newest ``keep``.

    Args:
        run_dir: The run folder.
        step: The number of finished steps (the checkpoint's name).
        model: The policy (a Hugging Face model or any ``nn.Module``).
        optimizer: Its optimizer (``state_dict`` saved to ``optimizer.pt``).
        scheduler: The learning-rate scheduler (``scheduler.pt``).
        extra_state: JSON-serialisable state to restore with the weights (data order, stage, ...);
            saved in ``state.json`` next to ``step``.
        keep: Keep only the newest ``keep`` checkpoints (None: keep all).
        value_head: PPO's value head, saved as ``value_head.safetensors``.
        tokenizer: Saved beside the weights so the folder is a complete model.

    Returns:
        The checkpoint's folder.

    Raises:
        ValueError: ``extra_state["step"]`` disagrees with ``step``.
    """
    extra = dict(extra_state or {})
    if int(extra.get("step", step)) != int(step):
        raise ValueError(f"extra_state['step']={extra['step']} disagrees with step={step}")
    target = checkpoint_path(run_dir, step)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(target.parent)
    with atomic_dir(target) as tmp:
        _save_weights(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if value_head is not None:
            from safetensors.torch import save_file

            tensors = {k: v.detach().contiguous().cpu() for k, v in value_head.state_dict().items()}
            save_file(tensors, str(tmp / VALUE_HEAD_FILE))
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        if scheduler is not None:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        atomic_write_json(tmp / STATE_FILE, {**extra, "step": int(step)})  # last: marks it complete
    prune_checkpoints(run_dir, keep)
    return target


def read_state(path: str | Path) -> dict[str, Any]:
    """The ``state.json`` of a checkpoint folder (step and extra state)."""
    file = Path(path) / STATE_FILE
    if not file.is_file():
        raise ConfigError(f"not a checkpoint: {path} (no {STATE_FILE})")
    return json.loads(file.read_text(encoding="utf-8"))


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    *,
    value_head: torch.nn.Module | None = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Restore a checkpoint written by :func:`save_checkpoint` into existing objects.

    Weights are copied into ``model`` in place; optimizer and scheduler states are loaded when
    given; the random generators are restored (unless ``restore_rng`` is False) so that sampling
    continues as if the run had not stopped.

    Returns:
        The saved ``extra_state``, with ``step``.

    Raises:
        ConfigError: ``path`` is not a checkpoint.
        ModelError: the weights do not fit ``model``, or a value head is asked for but not saved.
    """
    path = Path(path)
    state = read_state(path)
    _load_weights(model, path)
    if value_head is not None:
        from safetensors.torch import load_file

        file = path / VALUE_HEAD_FILE
        if not file.is_file():
            raise ModelError(f"checkpoint {path} has no value head ({VALUE_HEAD_FILE})")
        value_head.load_state_dict(load_file(str(file)))
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    if scheduler is not None and (path / "scheduler.pt").is_file():
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    if restore_rng:
        set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    return state


# --------------------------------------------------------------------------------------------
# Sharded (FSDP2) checkpoints
# --------------------------------------------------------------------------------------------


def save_sharded_checkpoint(
    run_dir: str | Path,
    step: int,
    policy: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any = None,
    extra_state: dict[str, Any] | None = None,
    *,
    keep: int | None = None,
    tokenizer: Any = None,
) -> Path:
    """``step-<step>/`` of an FSDP2 run: every rank writes its own shards (all ranks call it).

    The model and optimiser go through ``torch.distributed.checkpoint`` (``dcp/``), each rank's
    random generators to ``rng-<rank>.pt``; rank 0 writes the scheduler, the tokenizer and
    ``state.json`` (with the world size), then renames the folder into place. Resuming needs the
    same number of processes.
    """
    import torch.distributed as torch_dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from hpt.utils import fsync_dir, fsync_tree

    rank, world = torch_dist.get_rank(), torch_dist.get_world_size()
    target = checkpoint_path(run_dir, step)
    tmp = target.parent / f".{target.name}.tmp-sharded"
    if rank == 0:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(target.parent)
        tmp.mkdir()
    torch_dist.barrier()
    model_state, optim_state = get_state_dict(policy, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp / "dcp"))
    torch.save(rng_state(), tmp / f"rng-{rank}.pt")
    torch_dist.barrier()
    if rank == 0:
        if scheduler is not None:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        state = {**(extra_state or {}), "step": int(step), "sharded": True, "world_size": world}
        atomic_write_json(tmp / STATE_FILE, state)  # last: marks it complete
        fsync_tree(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.replace(target)
        fsync_dir(target.parent)
        prune_checkpoints(run_dir, keep)
    torch_dist.barrier()
    return target


def load_sharded_checkpoint(
    path: str | Path,
    policy: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any = None,
) -> dict[str, Any]:
    """Restore :func:`save_sharded_checkpoint` into a sharded policy and its optimiser."""
    import torch.distributed as torch_dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(path)
    state = read_state(path)
    world = torch_dist.get_world_size()
    if not state.get("sharded"):
        raise ConfigError(
            f"checkpoint {path} is not sharded: resume it with distributed.strategy ddp"
        )
    if int(state.get("world_size", world)) != world:
        raise ConfigError(
            f"checkpoint {path} was written by {state['world_size']} processes; resume it with "
            f"the same number (this run has {world})"
        )
    model_state, optim_state = get_state_dict(policy, optimizer)
    loaded = {"model": model_state, "optimizer": optim_state}
    dcp.load(loaded, checkpoint_id=str(path / "dcp"))
    set_state_dict(
        policy, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"]
    )
    if scheduler is not None and (path / "scheduler.pt").is_file():
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    set_rng_state(torch.load(path / f"rng-{torch_dist.get_rank()}.pt", weights_only=True))
    return state
