"""torch.distributed, when initialised: rank, world size, reductions and model wrapping.

Everything here degrades to the single-process case when no process group exists, so the
recipe is the same code on a laptop and under ``torchrun`` (DDP over gloo on CPU, NCCL on GPUs).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as torch_dist


def initialized() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def rank() -> int:
    return torch_dist.get_rank() if initialized() else 0


def world_size() -> int:
    return torch_dist.get_world_size() if initialized() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env() -> bool:
    """Join the process group that ``torchrun`` describes in the environment; False if none."""
    if initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return initialized()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    torch_dist.init_process_group(backend=backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True


def shutdown() -> None:
    """Destroy the process group (without it, rank 0 aborts at exit under gloo)."""
    if initialized():
        torch_dist.barrier()
        torch_dist.destroy_process_group()


def all_reduce_sum(value: float) -> float:
    if not initialized():
        return float(value)
    tensor = torch.tensor([float(value)], dtype=torch.float64)
    torch_dist.all_reduce(tensor)
    return float(tensor.item())


def all_reduce_counts(counts: Any) -> Any:
    """Sum an estimator ``Counts`` over ranks (identity in one process)."""
    if not initialized():
        return counts
    tensor = counts.to_tensor().double()
    torch_dist.all_reduce(tensor)
    return type(counts).from_tensor(tensor)


def wrap(module: torch.nn.Module) -> torch.nn.Module:
    """DistributedDataParallel over ``module`` when a process group exists."""
    if not initialized():
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, find_unused_parameters=True)


@contextlib.contextmanager
def no_sync_unless_last(module: torch.nn.Module, last: bool) -> Iterator[None]:
    """Skip DDP's gradient all-reduce on every micro-batch but the last of a mini-batch."""
    if last or not hasattr(module, "no_sync"):
        yield
    else:
        with module.no_sync():
            yield
