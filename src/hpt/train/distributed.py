"""torch.distributed, when initialised: rank, world size, reductions and model wrapping.

Everything here degrades to the single-process case when no process group exists, so the
recipe is the same code on a laptop and under ``torchrun`` (gloo on CPU, NCCL on GPUs).
Two strategies (``distributed.strategy``): ``ddp`` replicates the policy on every rank and
all-reduces gradients; ``fsdp2`` shards every decoder layer, then the root, with
``torch.distributed.fsdp.fully_shard`` (parameters, gradients and optimiser state are split
over ranks; each layer is gathered only while it computes).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as torch_dist

from hpt.errors import ConfigError

STRATEGIES = ("ddp", "fsdp2")

# whether init_from_env created the process group (an in-process vLLM engine creates a 1-rank group
# of its own, which is vLLM's to destroy)
_owned = False


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
    global _owned
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    torch_dist.init_process_group(backend=backend)
    _owned = True
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True


def shutdown() -> None:
    """Destroy the process group this module created (without it, rank 0 aborts at exit under
    gloo); a group created by someone else (vLLM's, in process) is left to its owner."""
    global _owned
    if _owned and initialized():
        torch_dist.barrier()
        torch_dist.destroy_process_group()
    _owned = False


def _device() -> torch.device:
    """Where collectives' tensors live: the GPU under NCCL, the CPU under gloo."""
    if torch_dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(value: float) -> float:
    if not initialized():
        return float(value)
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=_device())
    torch_dist.all_reduce(tensor)
    return float(tensor.item())


def same_count(module: torch.nn.Module, count: int) -> int:
    """The largest ``count`` over ranks when ``module`` is FSDP2-sharded (else ``count``).

    Every forward of a sharded module gathers parameters collectively, so all ranks must run the
    same number of micro-batches; a rank with fewer rows runs extra passes that it discards.
    """
    if not initialized() or not is_sharded(module):
        return count
    tensor = torch.tensor([count], dtype=torch.long, device=_device())
    torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.MAX)
    return int(tensor.item())


def all_reduce_counts(counts: Any) -> Any:
    """Sum an estimator ``Counts`` over ranks (identity in one process)."""
    if not initialized():
        return counts
    tensor = counts.to_tensor().double().to(_device())
    torch_dist.all_reduce(tensor)
    return type(counts).from_tensor(tensor.cpu())


def check_world(config: Any) -> None:
    """The strategy needs a process group, and the world size must divide the step's questions."""
    strategy, world = config.distributed.strategy, world_size()
    if strategy not in STRATEGIES:
        raise ConfigError(f"distributed.strategy {strategy!r}: choose {', '.join(STRATEGIES)}")
    if strategy == "fsdp2" and not initialized():
        raise ConfigError(
            "distributed.strategy fsdp2 shards the model over processes: launch with torchrun, "
            "e.g. torchrun --nproc_per_node=2 -m hpt.cli train ... (one process: use ddp)"
        )
    if strategy == "fsdp2" and config.lora.r > 0:
        raise ConfigError("lora with distributed.strategy fsdp2 is not supported: use ddp")
    for key, value in (
        ("data.questions_per_step", config.data.questions_per_step),
        ("optim.mini_batch_questions", config.optim.mini_batch_questions),
    ):
        if value % world:
            raise ConfigError(
                f"{key}={value} is not divisible by the world size {world}: every rank must "
                f"get the same number of questions (choose a multiple of {world})"
            )


def wrap(
    module: torch.nn.Module, strategy: str = "ddp", mixed_precision: str = "auto"
) -> torch.nn.Module:
    """``module`` ready for data-parallel training (unchanged in one process).

    ddp: a DistributedDataParallel wrapper (train through the returned module). fsdp2: the
    module is sharded in place (build the optimiser after this) and returned.
    """
    if not initialized():
        return module
    if strategy == "fsdp2":
        return shard(module, mixed_precision)
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, find_unused_parameters=True)


def shard(policy: torch.nn.Module, mixed_precision: str = "auto") -> torch.nn.Module:
    """FSDP2: ``fully_shard`` each decoder layer (the model's ``_no_split_modules``), then the root."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    bf16 = mixed_precision == "bf16" or (
        mixed_precision == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    )
    options: dict[str, Any] = {}
    if bf16:  # bf16 compute, fp32 master weights and gradient reduction
        options["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )
    model = getattr(policy, "model", policy)
    layer_names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in layer_names]
    if not layers:
        raise ConfigError(
            f"distributed.strategy fsdp2: cannot find the decoder layers of "
            f"{type(model).__name__} (it declares no _no_split_modules)"
        )
    for layer in layers:
        fully_shard(layer, **options)
    fully_shard(policy, **options)
    # FSDP2 makes the first module to run forward its root; generation runs the inner model (see
    # `gathered`), so settle the root now (torch has no public call for this)
    policy._get_fsdp_state()._lazy_init()
    return policy


def is_sharded(module: torch.nn.Module) -> bool:
    """Whether ``module`` was sharded by :func:`shard` (FSDP2)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


@contextlib.contextmanager
def gathered(module: torch.nn.Module) -> Iterator[None]:
    """Hold FSDP2's full parameters on every rank, so any submodule's forward (generation,
    evaluation) runs with no collective at all; a no-op for unsharded modules."""
    from torch.distributed.fsdp import FSDPModule

    sharded = [m for m in module.modules() if isinstance(m, FSDPModule)]
    if not sharded:
        yield
        return
    for m in sharded:
        m.set_reshard_after_forward(False)
        m.unshard()
    try:
        yield
    finally:
        for m in sharded:
            m.reshard()
            m.set_reshard_after_forward(True)


def full_model(policy: torch.nn.Module) -> torch.nn.Module:
    """A plain (unsharded) copy of a sharded policy's model, the same on every rank.

    FSDP2 shards in place; a later stage, the final evaluation and the final save need the whole
    model, so the stage ends by gathering it (as verl gathers full weights for its rollout).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import AutoModelForCausalLM

    model = policy.model
    state = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True))
    state = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    device = (
        torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    )
    dtype = next(iter(state.values())).dtype
    with torch.device(device or "cpu"):
        fresh = AutoModelForCausalLM.from_config(model.config, dtype=dtype)
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    tied = {k for k in missing if "lm_head" in k or "embed" in k}
    if unexpected or set(missing) - tied:
        raise RuntimeError(
            f"gathering the sharded model: missing {missing}, unexpected {unexpected}"
        )
    fresh.tie_weights()
    fresh.generation_config = model.generation_config
    return fresh


def full_norm(value: Any) -> float:
    """A gradient norm as a float (FSDP2 returns a DTensor)."""
    if hasattr(value, "full_tensor"):
        value = value.full_tensor()
    return float(value)


@contextlib.contextmanager
def no_sync_unless_last(module: torch.nn.Module, last: bool) -> Iterator[None]:
    """Skip the gradient reduction on every micro-batch but the last of a mini-batch."""
    if hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        module.set_requires_gradient_sync(last)
        yield
    elif last or not hasattr(module, "no_sync"):
        yield
    else:
        with module.no_sync():
            yield
