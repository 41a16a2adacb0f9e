"""Shared-prompt passes in one decoder call: the prompts and the responses as one sequence.

A shared-prompt pass (``optim.share_prompts``) runs each distinct prompt of a micro-batch once
and every response on top of it. Done with a KV cache, that is two decoder calls: the prompts,
then the responses, and every layer's operations run twice. Here both go through the decoder as
one sequence, ``[prompt 0 | ... | prompt G-1 | response 0 | ... | response N-1]`` (each prompt
padded to the same width, each response to the same length), with their own positions, and the
model's attention is swapped, for that call only, for :func:`shared_prompt_attention`, which
splits the sequence again inside each layer: prompts attend causally within themselves, each
response to its prompt's keys and values and causally to its own. Everything else of a layer
(norms, projections, rotary, MLP) runs once, on all the tokens. On a CPU the responses'
padding is left out of the sequence (:attr:`Layout.real`): attention lays the response tokens out
on the padded rows x steps grid again and takes them back from it, and nothing else of a layer
sees the padding (SmolLM2-135M, 8 responses of 40-128 tokens, 27% padding, forward and backward:
3.03-3.20 s against 3.69-3.77 s, 2 CPU cores).

Measured on 2 CPU cores (tiny model, 8 rows of one 27-token prompt and 64 response tokens, forward
and backward): 57-58 ms a pass against 64-70 ms for the two calls (and 67-69 ms for every row
whole).

It applies to models whose attention layers compute queries, keys and values (rotary applied)
and hand them to transformers' attention interface (``ALL_ATTENTION_FUNCTIONS``): the Llama,
Qwen2, Qwen3 and Mistral families, without sliding windows (:func:`applies`). Elsewhere the
pass keeps its two calls.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from hpt.rollout.decode import base_model
from hpt.train.batch import SharedPrompts, real_positions

IMPLEMENTATION = "hpt_shared_prompts"  # the name it is registered under in transformers
LAYOUT_KEYWORD = "hpt_shared_layout"  # the decoder-call keyword that carries the layout
MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")


@dataclass(frozen=True)
class Layout:
    """Where the prompts and the responses lie in the one sequence of a shared-prompt pass.

    The first ``groups x width`` tokens are the prompts (right padded to ``width``), the next
    the responses: ``rows x steps`` right padded to ``steps``, or, where ``real`` is given, only
    those positions of that grid (the response tokens, no padding: the layers' projections and
    MLPs then skip the padding, and attention lays the tokens out on the grid again).
    ``prompt_of_row`` [rows]: each response's prompt; ``response_mask`` [rows, 1, steps, width +
    steps] (bool): the keys each response query sees, its prompt's real tokens and its own tokens
    up to itself.
    """

    groups: int
    width: int
    rows: int
    steps: int
    prompt_of_row: torch.Tensor
    response_mask: torch.Tensor
    real: torch.Tensor | None = None  # flat indices into the rows x steps grid; None: all of it

    def to_grid(self, responses: torch.Tensor) -> torch.Tensor:
        """``responses`` [R, ...] of the sequence on the full grid [rows x steps, ...] (zeros at
        the padding)."""
        if self.real is None:
            return responses
        grid = responses.new_zeros((self.rows * self.steps, *responses.shape[1:]))
        return grid.index_copy(0, self.real, responses)


def applies(model: Any) -> bool:
    """Whether ``model``'s attention layers all go through transformers' attention interface
    with full (not windowed) causal attention (:data:`MODEL_TYPES`), each reading the model's
    own config (the one :func:`swapped_attention` changes)."""
    base = base_model(model)
    config = getattr(base, "config", None)
    if config is None or getattr(config, "model_type", None) not in MODEL_TYPES:
        return False
    if not hasattr(config, "_attn_implementation"):
        return False
    windowed = getattr(config, "use_sliding_window", None)
    if windowed or (windowed is None and getattr(config, "sliding_window", None)):
        return False
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()):
        return False
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    # an attention layer with a config of its own would not see the swap, and would attend
    # across the rows of the one sequence
    return bool(layers) and all(
        getattr(getattr(layer, "self_attn", None), "config", None) is config for layer in layers
    )


def drops_padding(model: Any, device: torch.device) -> bool:
    """Whether a shared-prompt pass of ``model`` on ``device`` leaves the responses' padding out
    of its sequence: one decoder call (:func:`applies`) on a CPU (:attr:`Layout.real`)."""
    return device.type == "cpu" and applies(model)


def one_sequence(shared: SharedPrompts, steps: int) -> tuple[torch.Tensor, torch.Tensor, Layout]:
    """``(input_ids [1, S], position_ids [1, S], layout)`` of the pass over ``shared``'s prompts
    and the first ``steps`` tokens of each response (the last token predicts nothing)."""
    groups, width = shared.prompt_ids.shape
    rows = shared.prompt_of_row.shape[0]
    device = shared.prompt_ids.device
    responses = shared.response_ids[:, :steps].reshape(-1)
    own = torch.arange(steps, device=device)
    response_positions = (shared.prompt_lengths[:, None] + own).reshape(-1)  # after its prompt
    real = real_positions(shared.response_mask[:, :steps])  # None: the whole grid
    if real is not None:  # the padding left out of the sequence
        responses, response_positions = responses[real], response_positions[real]
    input_ids = torch.cat([shared.prompt_ids.reshape(-1), responses])[None]
    prompt_positions = torch.arange(width, device=device).repeat(groups)
    position_ids = torch.cat([prompt_positions, response_positions])[None]
    lengths = shared.prompt_lengths  # [rows]: the real tokens of each row's prompt
    sees_prompt = torch.arange(width, device=device) < lengths[:, None]  # [rows, width]
    causal = own[None, :] <= own[:, None]  # [steps (query), steps (key)]
    mask = torch.cat(
        [sees_prompt[:, None, :].expand(rows, steps, width), causal.expand(rows, steps, steps)],
        dim=2,
    )
    layout = Layout(groups, width, rows, steps, shared.prompt_of_row, mask[:, None], real)
    return input_ids, position_ids, layout


def shared_prompt_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-interface signature over one shared-prompt sequence.

    ``query`` [1, heads, S, d], ``key``/``value`` [1, kv_heads, S, d] (rotary applied); the
    layout comes in ``kwargs[LAYOUT_KEYWORD]``. Returns [1, S, heads, d] and no weights.
    """
    layout: Layout | None = kwargs.get(LAYOUT_KEYWORD)
    if layout is None or sliding_window is not None:
        raise RuntimeError(
            f"{IMPLEMENTATION} attention needs a shared-prompt layout and full attention"
        )
    heads, kv_heads, dim = query.shape[1], key.shape[1], query.shape[3]
    split = layout.groups * layout.width
    gqa = heads != kv_heads

    def parts(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[1, h, G*W + N*T, d] -> prompts [G, h, W, d], responses [N, h, T, d] (``split``,
        whose backward is one ``cat``: slices would each zero-fill a full-size gradient)."""
        prompt, response = x[0].split([split, x.shape[2] - split], dim=1)
        prompt = prompt.unflatten(1, (layout.groups, layout.width)).transpose(0, 1)
        response = layout.to_grid(response.transpose(0, 1)).transpose(0, 1)  # [h, rows*steps, d]
        return prompt, response.unflatten(1, (layout.rows, layout.steps)).transpose(0, 1)

    dtype = query.dtype
    upcast = float32_attention(query)
    if upcast:
        query, key, value = query.float(), key.float(), value.float()
    (p_query, r_query), (p_key, r_key), (p_value, r_value) = parts(query), parts(key), parts(value)
    rows = layout.prompt_of_row
    with torch.autocast(query.device.type, enabled=False) if upcast else nullcontext():
        p_out = F.scaled_dot_product_attention(
            p_query,
            p_key,
            p_value,
            dropout_p=dropout,
            is_causal=True,
            scale=scaling,
            enable_gqa=gqa,
        )
        r_out = F.scaled_dot_product_attention(
            r_query,
            # index_select, not p_key[rows]: the backward of indexing (index_put_ with
            # accumulate) took 400 us a call on a CPU at the tiny model's shapes, this one 33 us
            torch.cat([p_key.index_select(0, rows), r_key], dim=2),
            torch.cat([p_value.index_select(0, rows), r_value], dim=2),
            attn_mask=layout.response_mask,
            dropout_p=dropout,
            scale=scaling,
            enable_gqa=gqa,
        )
    r_out = r_out.transpose(1, 2).reshape(-1, heads, dim)
    if layout.real is not None:  # back to the sequence's response tokens
        r_out = r_out.index_select(0, layout.real)
    out = torch.cat([p_out.transpose(1, 2).reshape(split, heads, dim), r_out])
    return out[None].to(dtype), None


def float32_attention(query: torch.Tensor) -> bool:
    """Whether a training pass's attention over ``query`` runs in float32 where it would run in
    bf16 or fp16 (reduced-precision weights, or autocast, which casts attention's inputs): on a
    CPU, where PyTorch's flash-attention kernel has a slow reduced-precision backward (the tiny
    model's shapes, 8 rows x 64 response tokens on a 30-token prompt, forward and backward:
    3.2-3.4 ms in bf16 against 1.3-1.4 ms cast to float32)."""
    if query.device.type != "cpu":
        return False
    return query.dtype in (torch.bfloat16, torch.float16) or torch.is_autocast_enabled("cpu")


FLOAT32_SDPA = "hpt_float32_sdpa"  # transformers' SDPA attention run in float32


def float32_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    **kwargs: Any,
) -> tuple[torch.Tensor, Any]:
    """transformers' ``sdpa`` attention, with its inputs cast to float32 and autocast off where
    :func:`float32_attention` says so (bf16 or fp16 weights, or autocast, on a CPU); the output
    in the queries' dtype. Elsewhere transformers' ``sdpa`` itself."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not float32_attention(query):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    dtype = query.dtype
    with torch.autocast(query.device.type, enabled=False):
        out, weights = sdpa_attention_forward(
            module, query.float(), key.float(), value.float(), attention_mask, **kwargs
        )
    return out.to(dtype), weights


_registered = False


def _register() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(IMPLEMENTATION, shared_prompt_attention)
        AttentionInterface.register(FLOAT32_SDPA, float32_sdpa_attention)
        # the masks sdpa gets (padding, packed sequences, a prompt cache's padding): without an
        # entry here transformers builds none, and attention would be causal over the whole row
        AttentionMaskInterface.register(FLOAT32_SDPA, sdpa_mask)
        _registered = True


@contextmanager
def swapped_attention(model: Any, implementation: str = IMPLEMENTATION) -> Iterator[None]:
    """``model``'s attention is ``implementation`` (:func:`shared_prompt_attention`, or
    :data:`FLOAT32_SDPA`) meanwhile (its config's ``_attn_implementation``, which each attention
    layer reads at every call)."""
    _register()
    base = base_model(model)
    config = base.config
    before = config._attn_implementation
    config._attn_implementation = implementation
    try:
        yield
    finally:
        config._attn_implementation = before


def float32_sdpa(model: Any, device: torch.device) -> Any:
    """For a pass that attends through transformers' own ``sdpa`` (padded rows, or a shared pass
    in two decoder calls) on a CPU: :data:`FLOAT32_SDPA` meanwhile, which runs the attention in
    float32 by the same rule as the shared pass's own (:func:`float32_attention`), else nothing."""
    base = base_model(model)
    implementation = getattr(getattr(base, "config", None), "_attn_implementation", None)
    if device.type != "cpu" or implementation != "sdpa":
        return nullcontext()
    return swapped_attention(model, FLOAT32_SDPA)
