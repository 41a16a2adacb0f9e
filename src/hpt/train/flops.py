"""FLOP counts of a training step and model FLOP utilisation (``perf/mfu``).

The counting follows verl's ``FlopsCounter`` for dense decoder-only models (Qwen2, Llama,
SmolLM2, Mistral, ...), with one deliberate difference noted below:

* **Dense part** -- :func:`flops_per_token` is ``2 x`` the matmul weights one token touches:
  per layer the q, k, v, o projections (grouped-query attention: k and v have
  ``num_key_value_heads * head_dim`` outputs) and the MLP gate, up and down projections
  (``intermediate_size``), plus the output head ``vocab_size x hidden_size``.  Biases, norms,
  rotary embeddings, activations and softmax are not counted.  The embedding *lookup* is not a
  matmul and is not counted (verl adds ``vocab_size x hidden_size`` for it as well; we do not), and
  tied embeddings change nothing since the head's matmul runs either way.
* **Attention scores** -- :func:`attention_flops` counts, per layer and per head, ``Q K^T`` and
  ``softmax(.) V`` over the *full* ``s x s`` square, i.e. ``4 * s^2 * head_dim`` forward FLOPs:
  ``4 * sum(s^2) * head_dim * num_attention_heads * num_hidden_layers``.  This is verl's
  convention (``12 * ...`` for forward + backward); a causal kernel does about half of it.
* **A step** -- :func:`step_flops`: trained sequences cost forward + backward = ``3 x`` forward;
  generated sequences cost one forward token per token with causal attention over the growing
  prefix (token ``t`` attends to ``t`` positions, ``s (s + 1) / 2`` scores per sequence, as with a KV
  cache); forward-only passes (old / reference log-probs) cost one forward.

:func:`peak_flops` gives a device's peak FLOP/s (a table of dense tensor-core numbers for known
CUDA GPUs, a measured matmul rate otherwise, ``HPT_PEAK_FLOPS`` overriding both), and
:func:`mfu` divides achieved FLOP/s by it.
"""

from __future__ import annotations

import functools
import os
import re
import time
from collections.abc import Sequence
from typing import Any

import torch

PEAK_FLOPS_ENV = "HPT_PEAK_FLOPS"

# Dense (no structured sparsity) peak throughput in TFLOP/s from the vendors' data sheets, keyed
# by the compute type: "bf16"/"fp16" tensor cores with fp32 accumulation (what PyTorch uses),
# "tf32" tensor cores, "fp32" plain CUDA cores.  A missing key means "not known / not supported":
# the caller measures instead.  Patterns are matched, in order, against the upper-cased name
# that ``torch.cuda.get_device_name`` returns ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB",
# "Tesla V100-SXM2-32GB", "NVIDIA GeForce RTX 4090"); more specific variants come first, and
# the word boundaries keep "A10" off "A10G", "L40" off "L40S", "H20" off "H200", "H200" off "GH200".
_H100_SXM = {"bf16": 989.5, "fp16": 989.5, "tf32": 494.7, "fp32": 66.9}
_H100_NVL = {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}
_H100_PCIE = {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2}
_A100 = {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}

_GPU_TABLE: tuple[tuple[str, dict[str, float]], ...] = (
    (r"\bB200\b", {"bf16": 2250.0, "fp16": 2250.0, "tf32": 1100.0}),
    (r"\bGH200\b", _H100_SXM),
    (r"\bH200\b.*\bNVL\b", _H100_NVL),
    (r"\bH200\b", _H100_SXM),
    (r"\bH100\b.*\bNVL\b", _H100_NVL),
    (r"\bH100\b.*\bPCIE\b", _H100_PCIE),
    (r"\bH100\b", _H100_SXM),
    (r"\bH800\b.*\bPCIE\b", _H100_PCIE),
    (r"\bH800\b", _H100_SXM),
    (r"\bH20\b", {"bf16": 148.0, "fp16": 148.0, "tf32": 74.0, "fp32": 44.0}),
    (r"\bA100\b", _A100),
    (r"\bA800\b", _A100),
    (r"\bA30\b", {"bf16": 165.0, "fp16": 165.0, "tf32": 82.0, "fp32": 10.3}),
    (r"\bA10\b", {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    (r"\bL40S\b", {"bf16": 362.05, "fp16": 362.05, "tf32": 183.0, "fp32": 91.6}),
    (r"\bL40\b", {"bf16": 181.05, "fp16": 181.05, "tf32": 90.5, "fp32": 90.5}),
    (r"\bL20\b", {"bf16": 119.5, "fp16": 119.5, "tf32": 59.8, "fp32": 59.8}),
    (r"\bL4\b", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    (r"\bRTX\s*4090\b", {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6}),
    (r"\bRTX\s*3090\b", {"bf16": 71.0, "fp16": 71.0, "tf32": 35.6, "fp32": 35.6}),
    (r"\bRTX\s*A6000\b", {"bf16": 154.8, "fp16": 154.8, "tf32": 77.4, "fp32": 38.7}),
    (r"\bV100\b.*\bPCIE\b", {"fp16": 112.0, "fp32": 14.0}),
    (r"\bV100\b", {"fp16": 125.0, "fp32": 15.7}),
    (r"\bT4\b", {"fp16": 65.0, "fp32": 8.1}),
)

_DTYPE_KEYS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


# --------------------------------------------------------------------------- model shape


def _text_config(config: Any) -> Any:
    """The language-model part of ``config`` (multimodal configs nest it in ``text_config``)."""
    if getattr(config, "hidden_size", None) is None:
        inner = getattr(config, "text_config", None)
        if inner is not None:
            return inner
    return config


def _field(config: Any, name: str) -> int:
    value = getattr(config, name, None)
    if value is None:
        raise ValueError(
            f"model config ({type(config).__name__}) lacks the field {name!r} needed to count FLOPs"
        )
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(
            f"model config ({type(config).__name__}) field {name!r} must be a positive integer, "
            f"got {value!r}"
        )
    return value


def _shape(config: Any) -> dict[str, int]:
    """hidden, layers, heads, kv_heads, head_dim, intermediate, vocab read from an HF config."""
    config = _text_config(config)
    hidden = _field(config, "hidden_size")
    layers = _field(config, "num_hidden_layers")
    heads = _field(config, "num_attention_heads")
    intermediate = _field(config, "intermediate_size")
    vocab = _field(config, "vocab_size")
    kv_heads = (
        _field(config, "num_key_value_heads") if _has(config, "num_key_value_heads") else heads
    )
    if _has(config, "head_dim"):
        head_dim = _field(config, "head_dim")
    else:
        if hidden % heads:
            raise ValueError(
                f"model config ({type(config).__name__}) has no 'head_dim' and hidden_size "
                f"{hidden} is not divisible by num_attention_heads {heads}"
            )
        head_dim = hidden // heads
    return {
        "hidden": hidden,
        "layers": layers,
        "heads": heads,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "intermediate": intermediate,
        "vocab": vocab,
    }


def _has(config: Any, name: str) -> bool:
    return getattr(config, name, None) is not None


def _lengths(name: str, seqlens: Sequence[int]) -> list[int]:
    out = []
    for s in seqlens:
        try:
            ok = not isinstance(s, bool) and int(s) == s and s >= 0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"{name}: sequence lengths must be non-negative integers, got {s!r}")
        out.append(int(s))
    return out


# --------------------------------------------------------------------------- FLOP counts


def flops_per_token(config: Any) -> float:
    """Dense forward FLOPs of one token: ``2 x`` the matmul weights it touches.

    Per layer ``hidden x (heads * head_dim)`` for q and for o, ``hidden x (kv_heads * head_dim)``
    for k and for v, ``3 x hidden x intermediate`` for the MLP; plus the output head
    ``vocab x hidden``.  The embedding lookup is not counted.
    """
    d = _shape(config)
    h = d["hidden"]
    q_out = d["heads"] * d["head_dim"]
    kv_out = d["kv_heads"] * d["head_dim"]
    attn = h * q_out + 2 * h * kv_out + q_out * h
    mlp = 3 * h * d["intermediate"]
    params = d["layers"] * (attn + mlp) + d["vocab"] * h
    return float(2 * params)


def _attention_unit(config: Any) -> int:
    """Forward FLOPs of one (query, key) pair summed over heads and layers: QK^T and AV."""
    d = _shape(config)
    return 4 * d["head_dim"] * d["heads"] * d["layers"]


def attention_flops(config: Any, seqlens: Sequence[int]) -> float:
    """Forward attention-score FLOPs of sequences of these lengths, full ``s x s`` (verl's count).

    ``4 * sum(s^2) * head_dim * num_attention_heads * num_hidden_layers`` -- ``2 s^2 head_dim`` for
    ``Q K^T`` and as much for multiplying by ``V``, per head and layer, with no causal halving.
    """
    lengths = _lengths("attention_flops", seqlens)
    return float(_attention_unit(config) * sum(s * s for s in lengths))


def _generation_attention_flops(config: Any, seqlens: Sequence[int]) -> float:
    """Causal attention of token-by-token generation: token t (1-based) attends to t positions."""
    lengths = _lengths("step_flops(generated)", seqlens)
    return float(_attention_unit(config) * sum(s * (s + 1) // 2 for s in lengths))


def step_flops(
    config: Any,
    *,
    trained: Sequence[int],
    generated: Sequence[int] = (),
    forward_only: Sequence[int] = (),
) -> float:
    """FLOPs of one training step.

    ``trained``: lengths (prompt + response) of sequences trained on, forward + backward =
    ``3 x`` (dense + :func:`attention_flops`).  ``generated``: lengths of generated sequences
    (pass prompt + response: prefill and decode each count as one forward token), with causal
    attention over the growing prefix.  ``forward_only``: lengths of forward-only passes (old /
    reference log-probs), dense + :func:`attention_flops`.
    """
    per_token = flops_per_token(config)
    trained = _lengths("step_flops(trained)", trained)
    generated = _lengths("step_flops(generated)", generated)
    forward_only = _lengths("step_flops(forward_only)", forward_only)
    train = 3.0 * (per_token * sum(trained) + attention_flops(config, trained))
    gen = per_token * sum(generated) + _generation_attention_flops(config, generated)
    fwd = per_token * sum(forward_only) + attention_flops(config, forward_only)
    return train + gen + fwd


# --------------------------------------------------------------------------- device peak


def _tf32_enabled() -> bool:
    try:
        if torch.get_float32_matmul_precision() != "highest":
            return True
        return bool(torch.backends.cuda.matmul.allow_tf32)
    except Exception:  # pragma: no cover - very old / unusual torch builds
        return False


def gpu_peak_flops(
    name: str, dtype: torch.dtype = torch.bfloat16, *, tf32: bool = False
) -> float | None:
    """Data-sheet dense peak FLOP/s of the CUDA GPU called ``name`` for ``dtype``, or None.

    ``name`` is what ``torch.cuda.get_device_name`` returns.  For ``torch.float32`` the TF32
    tensor-core number is used when ``tf32`` is True (and the GPU has TF32), the plain fp32 one
    otherwise.  None when the GPU or the dtype is not in the table.
    """
    key = _DTYPE_KEYS.get(dtype)
    if key is None:
        return None
    upper = name.upper()
    for pattern, peaks in _GPU_TABLE:
        if re.search(pattern, upper):
            if key == "fp32" and tf32 and "tf32" in peaks:
                key = "tf32"
            value = peaks.get(key)
            return None if value is None else value * 1e12
    return None


def _synchronize(device: torch.device) -> None:
    if device.type == "cpu":
        return
    module = getattr(torch, device.type, None)
    sync = getattr(module, "synchronize", None)
    if sync is None:
        raise ValueError(
            f"cannot time matmuls on device type {device.type!r}; set {PEAK_FLOPS_ENV} (FLOP/s)"
        )
    sync()


@functools.cache
def measured_matmul_flops(device: str, dtype: torch.dtype = torch.float32) -> float:
    """Best measured square-matmul FLOP/s on ``device`` for ``dtype`` (cached per process).

    CPU: 1024 and 2048 square matmuls after a warm-up, within a ~0.8 s budget.  Accelerators:
    4096 and 8192 square matmuls, ten back to back per timing.  Inputs are constant-filled, so
    the global RNG streams are left untouched.
    """
    dev = torch.device(device)
    if dev.type == "cpu":
        sizes, reps = (1024, 1024, 2048, 2048), 1
    else:
        sizes, reps = (4096, 8192, 8192, 8192), 10
    budget = 0.8
    with torch.no_grad():
        warm = torch.full((sizes[0], sizes[0]), 1.0 / sizes[0], device=dev, dtype=dtype)
        _ = warm @ warm
        _synchronize(dev)
        best = 0.0
        start = time.perf_counter()
        for n in sizes:
            work = 2.0 * n**3 * reps
            if best > 0 and (time.perf_counter() - start) + work / best > budget:
                break
            a = torch.full((n, n), 1.0 / n, device=dev, dtype=dtype)
            b = torch.full((n, n), 1.0 / n, device=dev, dtype=dtype)
            _synchronize(dev)
            t0 = time.perf_counter()
            for _ in range(reps):
                _ = a @ b
            _synchronize(dev)
            elapsed = time.perf_counter() - t0
            if elapsed > 0:
                best = max(best, work / elapsed)
    if best <= 0:  # pragma: no cover - a timer that never advances
        raise ValueError(f"could not measure a matmul rate on {device}; set {PEAK_FLOPS_ENV}")
    return best


def _env_peak() -> float | None:
    raw = os.environ.get(PEAK_FLOPS_ENV)
    if raw is None or not raw.strip():
        return None
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{PEAK_FLOPS_ENV} must be a positive number of FLOP/s, got {raw!r}")
    return value


def peak_flops(device: torch.device | str, dtype: torch.dtype = torch.float32) -> float:
    """Peak FLOP/s of one device for matmuls in ``dtype``.

    ``HPT_PEAK_FLOPS`` (a float, FLOP/s per device) overrides everything.  CUDA: the data-sheet
    dense number of :func:`gpu_peak_flops` for the device's name (fp32 -> TF32 when PyTorch lets
    fp32 matmuls use TF32), measured with :func:`measured_matmul_flops` when the GPU or dtype is
    not in the table.  CPU: the measured fp32 matmul rate (the larger of it and the ``dtype`` rate
    when ``dtype`` is not fp32, so a fast bf16 unit cannot push MFU over 1).  Other devices:
    measured in ``dtype``.
    """
    env = _env_peak()
    if env is not None:
        return env
    dev = torch.device(device)
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        name = torch.cuda.get_device_name(index)
        table = gpu_peak_flops(name, dtype, tf32=_tf32_enabled())
        if table is not None:
            return table
        return measured_matmul_flops(f"cuda:{index}", dtype)
    if dev.type == "cpu":
        rate = measured_matmul_flops("cpu", torch.float32)
        if dtype != torch.float32:
            rate = max(rate, measured_matmul_flops("cpu", dtype))
        return rate
    return measured_matmul_flops(str(dev), dtype)


def mfu(
    flops: float,
    seconds: float,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    world_size: int = 1,
) -> float:
    """Model FLOP utilisation: ``flops / (seconds * peak_flops(device, dtype) * world_size)``.

    ``flops`` is the work of all ``world_size`` devices together (e.g. :func:`step_flops` of the
    global batch) done in ``seconds`` of wall time.
    """
    if not seconds > 0:
        raise ValueError(f"mfu: seconds must be positive, got {seconds!r}")
    if flops < 0:
        raise ValueError(f"mfu: flops must be non-negative, got {flops!r}")
    if isinstance(world_size, bool) or int(world_size) != world_size or world_size < 1:
        raise ValueError(f"mfu: world_size must be a positive integer, got {world_size!r}")
    return float(flops) / (float(seconds) * peak_flops(device, dtype) * int(world_size))
