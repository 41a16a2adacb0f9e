"""A fused one-token decode step for Llama-family decoders (Llama, Qwen2, Mistral layouts).

A Hugging Face forward of one token per row runs every module's Python and builds a 4-D mask, per
layer. :class:`FusedStep` computes the same function with the model's own weight tensors (no copy
in the model's dtype), its own rotary embedding module, queries and keys rotated in one pass, and
``scaled_dot_product_attention`` over the filled part of the static cache with a kv head's query
heads as its query rows (grouped-query attention without copying keys) and the mask as one
additive bias for all layers. Prefill, compaction and the cache itself stay
:class:`~hpt.rollout.decode.Decoder`'s. Where the step casts the weights (``dtype`` below the
model's), q/k/v and gate/up are cast into one concatenated copy each (the same bytes written), so
a layer runs two matmuls fewer; in the model's own dtype they stay separate: concatenating them
would copy the weights every batch (0.3-1.4 s for a 360M-parameter model on a CPU, more than 8
decoded tokens of 4 rows took, for no gain: 0.37-0.42 s either way for 128 x 64 tiny tokens).
Counted with a dispatch mode (tiny model, 4 layers), a token issued 176 non-view operations in
float32 and 201 with a bf16 copy before these changes, 146 and 151 after; 128 x 64 tokens took
0.39-0.41 s against 0.42-0.43 s in float32 and 0.38 s against 0.40-0.44 s with a bf16 copy (2 CPU
cores, back to back). Fewer kernels a token matter most on a GPU, where a CUDA graph replays them
(:mod:`hpt.rollout.graphs`).

On a CPU in float32 the step's matmuls read weights packed for the batch's row count: MKL's packed
GEMM (``cblas_sgemm_pack``, which PyTorch exposes as ``torch.ops.mkl._mkl_reorder_linear_weight``
and ``_mkl_linear`` for Inductor's frozen CPU graphs) lays each weight out once per batch instead
of at every call of every token. Measured on 2 CPU cores, alternating in one process: SmolLM2-135M,
16 rows x 128 tokens, 7.1-8.1 s against 8.7-9.6 s (packing all weights 0.09-0.15 s a batch), the
same tokens; its 30 layers' matmuls alone 17-28% faster at 4 to 128 rows; the tiny model (weights
in cache) unchanged. The packed copies are dropped when the batch is done (:meth:`FusedStep.
unpack`). When rows leave the batch with at least 16 tokens to go, the weights are packed again
for the rows left (:meth:`FusedStep.repack`; a packed weight computes only for its row count, and
any other falls back to the plain matmul). SmolLM2-135M at free length (16 rows, responses of
75-96 tokens on average, the longest 128): 6.9-7.2 s a batch against 7.7-8.1 s without
repacking; with compaction off entirely, 7.5-8.0 s.

Only architectures whose decoder layer is exactly pre-norm RMSNorm -> rotary self-attention
(q/k/v with or without bias) -> residual -> RMSNorm -> SiLU-gated MLP -> residual are fused
(:func:`fusable` checks the model type and the config); the rest, PEFT-wrapped models (whose
adapters change the projections) and FSDP2-sharded ones decode through the model's forward.
Tests check that the tokens are the model's own (greedy) and the log-probs agree to 1e-5.
Measured on 2 CPU cores: 128 rows x 64 tokens of the tiny demo model 0.41-0.44 s against
0.47-0.57 s through the model's forward; SmolLM2-135M at 16 rows gains little in float32
(decoding is bound by reading the weights), and 1.6x with a bf16 copy of them (``dtype``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

# model types whose decoder layers have the Llama layout (see the module docstring)
FUSED_MODEL_TYPES = ("llama", "qwen2", "mistral")


def fusable(model: Any) -> bool:
    """Whether ``model`` is a plain (unwrapped, unsharded) Llama-layout causal LM."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) not in FUSED_MODEL_TYPES:
        return False
    if hasattr(model, "get_base_model") or hasattr(model, "peft_config"):
        return False  # LoRA adapters change the projections
    # sliding-window attention (Qwen2's use_sliding_window, Mistral's window, per-layer types)
    windowed = getattr(config, "use_sliding_window", None)
    if windowed or (windowed is None and getattr(config, "sliding_window", None)):
        return False
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()):
        return False
    if getattr(config, "hidden_act", "silu") != "silu" or getattr(config, "pretraining_tp", 1) > 1:
        return False
    decoder = getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    if layers is None or not hasattr(decoder, "rotary_emb") or not hasattr(decoder, "norm"):
        return False
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - old torch
        FSDPModule = ()  # noqa: N806
    if any(isinstance(m, FSDPModule) for m in model.modules()):
        return False
    for layer in layers:
        attention, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attention is None or mlp is None:
            return False
        if any(hasattr(attention, n) for n in ("q_norm", "k_norm")):
            return False  # Qwen3-style per-head norms: not this layout
        projections = [
            getattr(attention, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")
        ]
        projections += [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        # plain Linear layers only: LoRA-injected or quantised ones compute something else
        if any(type(p) is not torch.nn.Linear for p in projections):
            return False
    return True


Projection = tuple[torch.Tensor, torch.Tensor | None]  # (weight, bias) of a linear layer


@dataclass
class _Layer:
    """One decoder layer's tensors: (weight, bias) per projection, norm weights and epsilons."""

    norm_in: torch.Tensor
    eps_in: float
    q: Projection | None  # None where qkv holds the three
    k: Projection | None
    v: Projection | None
    o: Projection
    norm_post: torch.Tensor
    eps_post: float
    gate: Projection | None  # None where gate_up holds the two
    up: Projection | None
    down: Projection
    qkv: Projection | None = None  # q, k and v concatenated (in a cast copy: no extra copy)
    gate_up: Projection | None = None  # gate and up concatenated


def _rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype
) -> torch.Tensor:
    """Transformers' Llama RMSNorm: normalised in float32, scaled in ``dtype`` (``F.rms_norm``: one
    fused kernel on a GPU, the same operations as transformers' on a CPU)."""
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x`` [B, heads, d] (rotate-half convention, as transformers')."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def mkl_packing() -> bool:
    """Whether this PyTorch has MKL's packed float32 GEMM (x86 builds with MKL)."""
    if not torch.backends.mkl.is_available():
        return False
    try:
        return all(hasattr(torch.ops.mkl, n) for n in ("_mkl_linear", "_mkl_reorder_linear_weight"))
    except (AttributeError, RuntimeError):  # pragma: no cover - a build without the namespace
        return False


class FusedStep:
    """``step(token [B, 1], mask [B, L], position [B, 1], cache) -> logits [B, vocab]``.

    Args:
        model: a Llama-layout causal LM (:func:`fusable`).
        dtype: the dtype of the projections' weights and inputs (None: the model's own). A
            lower one than the model's (``torch.bfloat16`` for a float32 model) keeps a copy of
            the weights in it: half the bytes a step reads, and bf16 matrix units where the CPU
            or GPU has them. The residual stream, the norms, attention and the KV cache stay in
            the model's dtype; tokens are then sampled from a slightly different distribution
            than the trainer's (as rollouts from a bf16 vLLM are), so their log-probs are not
            taken as pi_old.
        pack: on a CPU in float32, let :meth:`refresh` pack the weights for a batch's row count
            with MKL's packed GEMM where PyTorch has it (:func:`mkl_packing`); False: plain
            matmuls, and no packed copy (as large as the weights) while a batch decodes.

    The weights are read from ``model`` when :meth:`refresh` is called (once per decoded batch):
    in the model's dtype the step holds the model's own tensors (the optimiser's in-place updates
    show through), in another it casts them into buffers it keeps (allocated once); ``cache`` is
    the decoder's static cache, whose layers take ``update(keys, values)`` and return the filled
    keys and values [B, kv_heads, L, d].
    """

    def __init__(self, model: Any, dtype: torch.dtype | None = None, pack: bool = True) -> None:
        self.model = model
        config = model.config
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.scale = self.head_dim**-0.5
        self.dtype = dtype or next(model.parameters()).dtype
        self.layers: list[_Layer] = []
        self.head_weight: torch.Tensor | None = None
        self.head_bias: torch.Tensor | None = None
        self.norm_weight: torch.Tensor | None = None
        # the ids of the parameters cast (and concatenated) into a copy -> that copy
        self._buffers: dict[tuple[int, ...], torch.Tensor] = {}
        self.join = True  # q/k/v and gate/up in one cast copy each, where the step casts
        # MKL-packed copies of the weights for a batch of `_packed_rows` rows (CPU float32 only)
        self.pack = pack and mkl_packing()
        self._packed: dict[int, torch.Tensor] = {}
        self._packed_rows = 0

    @property
    def exact(self) -> bool:
        """Whether the step computes in the model's own dtype (its log-probs are the trainer's)."""
        return self.dtype == next(self.model.parameters()).dtype

    def _cast(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """``t`` itself in the step's dtype, else its copy in a buffer kept for the next batch."""
        if t is None:
            return None
        if t.dtype == self.dtype:
            return t.detach()
        return self._cast_concatenated([t])

    def _cast_concatenated(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """``tensors`` concatenated along their first dimension, cast into a buffer kept for the
        next batch (the same bytes written as casting each alone)."""
        key = tuple(id(t) for t in tensors)  # the parameters' ids (detach() makes new objects)
        first = tensors[0]
        shape = (sum(t.shape[0] for t in tensors), *first.shape[1:])
        buffer = self._buffers.get(key)
        if buffer is None or buffer.shape != shape or buffer.device != first.device:
            buffer = torch.empty(shape, dtype=self.dtype, device=first.device)
            self._buffers[key] = buffer
        start = 0
        for t in tensors:
            buffer[start : start + t.shape[0]].copy_(t.detach())
            start += t.shape[0]
        return buffer

    @torch.no_grad()
    def refresh(self, rows: int = 0) -> None:
        """Read the current weights for the next batch (cast into the kept buffers if needed).

        Where the step casts (another dtype than the model's), q/k/v and gate/up are cast into one
        concatenated copy each, so a layer runs two matmuls fewer; in the model's own dtype the step
        keeps the model's tensors (concatenating them would copy them every batch). ``rows`` > 0:
        the batch's row count, for which float32 weights on a CPU are packed (:meth:`unpack`
        drops the copies); 0: no packing."""
        cast = self._cast
        concatenate = self.join and not self.exact

        def linear(module: torch.nn.Linear) -> Projection:
            return cast(module.weight), cast(module.bias)

        def joined(*modules: torch.nn.Linear) -> Projection | None:
            """One projection computing ``modules``' outputs side by side (None: not joined)."""
            biases = [m.bias for m in modules]
            if not concatenate or len({b is None for b in biases}) > 1:  # some biased, some not
                return None
            bias = None if biases[0] is None else self._cast_concatenated(biases)
            return self._cast_concatenated([m.weight for m in modules]), bias

        layers = []
        for layer in self.model.model.layers:
            attention, mlp = layer.self_attn, layer.mlp
            qkv = joined(attention.q_proj, attention.k_proj, attention.v_proj)
            gate_up = joined(mlp.gate_proj, mlp.up_proj)
            layers.append(
                _Layer(
                    norm_in=cast(layer.input_layernorm.weight),
                    eps_in=_eps(layer.input_layernorm),
                    q=None if qkv else linear(attention.q_proj),
                    k=None if qkv else linear(attention.k_proj),
                    v=None if qkv else linear(attention.v_proj),
                    o=linear(attention.o_proj),
                    norm_post=cast(layer.post_attention_layernorm.weight),
                    eps_post=_eps(layer.post_attention_layernorm),
                    gate=None if gate_up else linear(mlp.gate_proj),
                    up=None if gate_up else linear(mlp.up_proj),
                    down=linear(mlp.down_proj),
                    qkv=qkv,
                    gate_up=gate_up,
                )
            )
        self.layers = layers
        head = self.model.get_output_embeddings()
        self.head_weight, self.head_bias = cast(head.weight), cast(getattr(head, "bias", None))
        self.norm_weight = cast(self.model.model.norm.weight)
        self.unpack()
        if rows > 0 and self.pack:
            self._pack(rows)

    def _pack(self, rows: int) -> None:
        """MKL-packed copies of every projection and the head, for ``rows`` rows (CPU float32)."""
        projections: list[Projection | None] = [(self.head_weight, None)]
        for layer in self.layers:
            projections += [layer.q, layer.k, layer.v, layer.o, layer.gate, layer.up, layer.down]
            projections += [layer.qkv, layer.gate_up]
        weights = [p[0] for p in projections if p is not None]
        if any(w.device.type != "cpu" or w.dtype != torch.float32 for w in weights):
            return
        try:
            for w in weights:
                self._packed[id(w)] = torch.ops.mkl._mkl_reorder_linear_weight(w, rows)
        except RuntimeError:  # an MKL build that refuses: plain matmuls, as without MKL
            self.pack = False
            self._packed.clear()
            return
        self._packed_rows = rows

    def repack(self, rows: int) -> None:
        """Pack the weights again for ``rows`` rows, where they are packed for another count
        (rows left the batch: MKL's packed GEMM computes only for the row count it was packed
        for, and :meth:`_linear` falls back to plain matmuls for any other); nothing where the
        batch was not packed."""
        if self._packed_rows and rows > 0 and rows != self._packed_rows:
            self.unpack()  # the old copies go first: never two packed copies at once
            self._pack(rows)

    def unpack(self) -> None:
        """Drop the packed weight copies (the decoder calls it when a batch is done, so that the
        update's memory peak does not hold them)."""
        self._packed.clear()
        self._packed_rows = 0

    def _linear(self, x: torch.Tensor, projection: Projection) -> torch.Tensor:
        """``x W^T + b``, through the weight's packed copy when there is one for ``x``'s rows."""
        packed = self._packed.get(id(projection[0])) if x.shape[0] == self._packed_rows else None
        if packed is None:
            return F.linear(x, projection[0], projection[1])
        return torch.ops.mkl._mkl_linear(x, packed, projection[0], projection[1], x.shape[0])

    def release(self) -> None:
        """Drop the step's weight references and its cast copies (:meth:`refresh` makes new ones).

        The decoder calls it when a batch is done on a GPU: there the caching allocator hands the
        copies' memory (a bf16 copy of a 360M-parameter model: 0.7 GB) to the update's activations,
        and allocating them again for the next batch costs nothing. On a CPU they are kept: glibc
        would return such blocks to the kernel and fault them in again every batch.
        """
        self._buffers.clear()
        self.unpack()
        self.layers = []
        self.head_weight = self.head_bias = self.norm_weight = None

    @torch.no_grad()
    def __call__(
        self,
        token: torch.Tensor,
        mask: torch.Tensor,
        position: torch.Tensor,
        cache: Any,
        slot: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The logits [B, vocab] of one token a row.

        ``slot`` None: the cache layers' ``update`` appends the keys and values and returns the
        filled positions, which ``mask`` [B, filled + 1] covers. ``slot`` a one-element tensor: the
        keys and values are written at that position of the preallocated cache, and attention reads
        all of it under ``mask`` [B, max_len] (zeros past the filled positions): every shape and
        address is the same from one token to the next, as a CUDA graph's replay needs
        (:mod:`hpt.rollout.graphs`).
        """
        decoder, dtype = self.model.model, self.dtype
        x = decoder.embed_tokens(token[:, 0])  # [B, D], the residual stream in the model's dtype
        rows = x.shape[0]
        cos, sin = decoder.rotary_emb(x[:, None], position)  # [B, 1, d]
        hidden_q = self.heads * self.head_dim
        hidden_qk = hidden_q + self.kv_heads * self.head_dim
        group = self.heads // self.kv_heads
        # the mask as an additive bias, built once for all layers: [B, 1, 1, L]
        bias = torch.zeros(mask.shape, dtype=x.dtype, device=x.device)
        bias = bias.masked_fill_(mask == 0, float("-inf"))[:, None, None, :]
        for layer, storage in zip(self.layers, cache.layers):
            h = _rms_norm(x, layer.norm_in, layer.eps_in, dtype)
            if layer.qkv is not None:  # one matmul for q, k and v
                qkv = self._linear(h, layer.qkv).to(x.dtype)
                qk, v = qkv[:, :hidden_qk], qkv[:, hidden_qk:]
            else:
                q, k = self._linear(h, layer.q), self._linear(h, layer.k)
                qk = torch.cat((q, k), dim=-1).to(x.dtype)
                v = self._linear(h, layer.v).to(x.dtype)
            # queries and keys rotated together: [B, heads + kv_heads, d]
            qk = _rotate(qk.reshape(rows, self.heads + self.kv_heads, self.head_dim), cos, sin)
            q, k = qk[:, : self.heads], qk[:, self.heads :]
            v = v.reshape(rows, self.kv_heads, self.head_dim)
            if slot is None:
                keys, values = storage.update(k[:, :, None], v[:, :, None])  # [B, kv, L, d]
            else:
                storage.keys.index_copy_(2, slot, k[:, :, None])
                storage.values.index_copy_(2, slot, v[:, :, None])
                keys, values = storage.keys, storage.values
            # a kv head's query heads as its query rows: grouped-query attention, keys not copied
            q = q.reshape(rows, self.kv_heads, group, self.head_dim)
            attended = F.scaled_dot_product_attention(q, keys, values, bias, scale=self.scale)
            attended = attended.reshape(rows, hidden_q).to(dtype)
            x = x + self._linear(attended, layer.o)
            h = _rms_norm(x, layer.norm_post, layer.eps_post, dtype)
            if layer.gate_up is not None:  # one matmul for gate and up
                gate, up = self._linear(h, layer.gate_up).chunk(2, dim=-1)
            else:
                gate, up = self._linear(h, layer.gate), self._linear(h, layer.up)
            x = x + self._linear(F.silu(gate) * up, layer.down)
        x = _rms_norm(x, self.norm_weight, _eps(decoder.norm), dtype)
        return self._linear(x, (self.head_weight, self.head_bias))


def _eps(norm: Any) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
