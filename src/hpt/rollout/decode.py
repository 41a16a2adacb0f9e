"""A lean decode loop for Hugging Face causal LMs: prefill, then one token a step.

``model.generate`` is general and slow for rollouts: it runs a chain of logits-processor objects,
keeps finished rows in the batch until the longest one ends, and grows its KV cache step by step.
:func:`decode` does only what sampling rollouts needs:

- one prefill forward over the left-padded prompts (position ids from the attention mask, logits
  of the last position only), into a preallocated :class:`transformers.StaticCache` sized for the
  prompt width plus ``max_new_tokens``;
- then one forward a step on the last sampled token of each live row;
- temperature, top-k and top-p as direct tensor operations on the ``[rows, vocab]`` logits
  (:func:`sampling_logprobs`), whose log-softmax gives both the token (a multinomial draw) and
  its log-probability under the distribution it was sampled from, in the same pass;
- rows that have produced a stop token leave the batch: the cache, the attention mask and the
  positions are compacted (``Cache.reorder_cache``) once enough of them have finished, so
  finished rows stop costing compute.

Only the root module's forward is called (``input_ids``, ``attention_mask``, ``position_ids`` and
the cache), so the loop works for PEFT-wrapped models and for FSDP2-sharded ones; with FSDP2 over
several ranks every rank keeps calling forward until all ranks are done (the parameter
all-gathers are collective), as ``generate(synced_gpus=True)`` does.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import StaticCache
from transformers.cache_utils import StaticLayer

from hpt.rollout.base import SamplingParams
from hpt.utils import distinct_rows

# compact the batch when at least this fraction of its rows has finished
COMPACT_FRACTION = 0.25
# the fused step packs its CPU float32 weights for batches of at least this many new tokens:
# packing SmolLM2-135M's weights takes 0.09-0.15 s, and saves about 12 ms a token at 16 rows
PACK_MIN_TOKENS = 16


@dataclass(frozen=True)
class ForwardSignature:
    """How a model's forward takes the cache, and what else it accepts."""

    cache_name: str  # "cache" (transformers >= 5.x) or "past_key_values"
    logits_to_keep: bool  # forward(logits_to_keep=1): the lm_head on the last position only


def base_model(model: Any) -> Any:
    """The transformers model under a PEFT wrapper (``model`` itself without one)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def forward_signature(model: Any) -> ForwardSignature | None:
    """The decode-relevant parameters of ``model``'s forward, or None if it cannot decode this way.

    PEFT wrappers forward ``**kwargs`` to the base model, so the base model's signature is read.
    """
    base = base_model(model)
    config = getattr(base, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return None
    try:
        parameters = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return None
    if not {"input_ids", "attention_mask", "position_ids"} <= set(parameters):
        return None
    cache_name = next((n for n in ("cache", "past_key_values") if n in parameters), None)
    if cache_name is None:
        return None
    return ForwardSignature(cache_name, "logits_to_keep" in parameters)


def sampling_logprobs(logits: torch.Tensor, sampling: SamplingParams) -> torch.Tensor:
    """Log-probabilities of the distribution tokens are drawn from: ``log softmax`` after the warpers.

    Temperature divides the logits; top-k keeps the ``k`` largest (ties at the k-th kept); top-p
    keeps the smallest set of most likely tokens whose probability reaches ``top_p`` (the most
    likely token always), as transformers' ``TopKLogitsWarper`` / ``TopPLogitsWarper`` do.
    Greedy decoding uses the model's own distribution.

    Args:
        logits: ``(rows, vocab)`` next-token logits (any float dtype).
        sampling: temperature, top-k and top-p.

    Returns:
        ``(rows, vocab)`` float32 log-probabilities; removed tokens get ``-inf``.
    """
    scores = logits.float()
    if sampling.greedy:
        return torch.log_softmax(scores, dim=-1)
    if sampling.temperature != 1.0:
        scores = scores / sampling.temperature
    if 0 < sampling.top_k < scores.shape[-1]:
        kth = torch.topk(scores, sampling.top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling.top_p < 1.0:
        ascending, order = torch.sort(scores, dim=-1)
        cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= 1.0 - sampling.top_p
        drop[:, -1] = False  # the most likely token always stays
        scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return torch.log_softmax(scores, dim=-1)


def draw(logprobs: torch.Tensor, greedy: bool) -> torch.Tensor:
    """One token per row from ``(rows, vocab)`` log-probs: the argmax, or a draw from the softmax.

    The draw inverts the cumulative distribution at one uniform number a row (in float64, so no
    token of probability 0 is ever drawn): a single ``rand`` and a ``searchsorted`` instead of
    ``torch.multinomial``, which on the CPU draws an exponential variate per vocabulary entry.
    """
    if greedy:
        return logprobs.argmax(dim=-1)
    # one float64 buffer, exponentiated and summed in place: the same numbers as
    # exp().cumsum(), without two more [rows, vocab] temporaries a step (measured on 2 CPU cores,
    # 16 rows: vocab 49k 1.0-1.7 ms against 1.8-2.7 ms a token, vocab 152k 3.1 against 5.7 ms)
    cdf = logprobs.to(torch.float64, copy=True)  # never the caller's tensor
    cdf.exp_()
    cdf.cumsum_(dim=-1)
    u = torch.rand((cdf.shape[0], 1), dtype=torch.float64, device=cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=cdf.shape[-1] - 1)


def synced_ranks(model: Any) -> bool:
    """Whether forward is collective across ranks (FSDP2-sharded parameters, several ranks)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - old torch
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def any_rank(flag: bool, device: torch.device) -> bool:
    """``flag`` OR-ed over all ranks."""
    import torch.distributed as dist

    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


@dataclass
class Decoded:
    """The generated tokens of a batch, untruncated (a stop token ends a row; what follows is junk).

    Attributes:
        tokens: ``(rows, steps)`` sampled token ids (on the CPU).
        logprobs: ``(rows, steps)`` their log-probs under the sampling distribution.
        lengths: ``(rows,)`` tokens up to and including each row's first stop token, or ``steps``.
    """

    tokens: torch.Tensor
    logprobs: torch.Tensor
    lengths: torch.Tensor


class Decoder:
    """Prefill-then-decode over left-padded batches with a static KV cache.

    Args:
        model: a causal LM whose forward accepts ``input_ids``, ``attention_mask``,
            ``position_ids`` and a cache (see :func:`forward_signature`).
        signature: what :func:`forward_signature` found for ``model``.
        stop_token_ids: the ids that end a response.
        pad_token_id: the id left-padding prompts.
        compile: ``torch.compile`` the one-token decode step.
        fused: decode single tokens with :class:`~hpt.rollout.fused.FusedStep` where the model
            has the Llama layout (:func:`~hpt.rollout.fused.fusable`); the model's forward
            otherwise, and always for the prefill.
        fused_dtype: the fused step's weight dtype (None: the model's; see
            :class:`~hpt.rollout.fused.FusedStep`).
        cuda_graphs: on a CUDA device, replay the fused step from a CUDA graph
            (:class:`~hpt.rollout.graphs.GraphedStep`; opt-in until a GPU run of the current
            code confirms it); the eager fused step elsewhere.
        pack_weights: on a CPU in float32, the fused step packs the weights for each batch of at
            least :data:`PACK_MIN_TOKENS` new tokens (:class:`~hpt.rollout.fused.FusedStep`);
            False: never.
    """

    def __init__(
        self,
        model: Any,
        signature: ForwardSignature,
        stop_token_ids: Sequence[int],
        pad_token_id: int,
        *,
        compile: bool = False,
        fused: bool = True,
        fused_dtype: torch.dtype | None = None,
        cuda_graphs: bool = False,
        pack_weights: bool = True,
    ) -> None:
        from hpt.rollout.fused import FusedStep, fusable
        from hpt.rollout.graphs import GraphedStep

        self.model = model
        self.signature = signature
        self.stop_token_ids = list(stop_token_ids)
        self.pad_token_id = pad_token_id
        self.fused = (
            FusedStep(model, fused_dtype, pack=pack_weights)
            if fused and not compile and fusable(model)
            else None
        )
        self.graphed = GraphedStep(self.fused) if self.fused is not None and cuda_graphs else None
        self.step: Callable[..., torch.Tensor] = self._forward_last
        if compile:
            self.step = torch.compile(self._forward_last, dynamic=True)

    def _forward_last(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache,
    ) -> torch.Tensor:
        """Forward ``input_ids`` ``(rows, width)``; the logits of the last position ``(rows, vocab)``."""
        extra = {"logits_to_keep": 1} if self.signature.logits_to_keep else {}
        output = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{self.signature.cache_name: cache},
            **extra,
        )
        return output.logits[:, -1]

    def new_cache(self, max_len: int) -> tuple[Any, bool]:
        """A KV cache of ``max_len`` positions, preallocated on first use; and whether it is a prefix one.

        transformers' ``StaticCache``, whose plain full-attention layers are replaced by
        :class:`PrefixStaticLayer` (attention reads the filled positions only); hybrid caches
        (sliding-window, linear-attention layers) stay as transformers builds them.
        """
        cache = StaticCache(config=self.model.config, max_cache_len=max_len)
        prefix = all(type(layer) is StaticLayer for layer in cache.layers)
        if prefix:
            cache.layers = [PrefixStaticLayer(max_len) for _ in cache.layers]
        return cache, prefix

    @torch.no_grad()
    def decode(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingParams,
        device: torch.device,
        *,
        min_new_tokens: int = 0,
        synced: bool = False,
        on_finished: Callable[[list[int], Decoded], None] | None = None,
    ) -> Decoded:
        """Generate up to ``sampling.max_new_tokens`` tokens for each prompt (one batch).

        Args:
            prompts: token ids of each row's prompt, unpadded (may be empty only when ``synced``
                and the rank has no work: a one-token dummy row is then decoded).
            sampling: temperature, top-k, top-p and the length limit (the seed is the caller's).
            device: where the model's parameters are.
            min_new_tokens: stop tokens are suppressed (probability 0) before this many tokens.
            synced: keep calling forward until every rank is done (FSDP2 over several ranks).
            on_finished: called with finished rows (their indices into ``prompts``, and their
                :class:`Decoded`) as they leave the batch, before the rest are done, and once
                at the end with the rows not reported yet; every row is reported once.

        Returns:
            The tokens and log-probs of every row, as :class:`Decoded`.
        """
        rows = len(prompts)
        steps = sampling.max_new_tokens
        live_prompts = [list(p) for p in prompts] if rows else [[self.pad_token_id]]
        input_ids, prompt_mask = left_pad_tensors(live_prompts, self.pad_token_id)
        batch, width = input_ids.shape
        mask = torch.zeros((batch, width + steps), dtype=torch.long)
        mask[:, :width] = prompt_mask
        positions = (prompt_mask.cumsum(dim=1) - 1).clamp(min=0)
        input_ids, mask, positions = input_ids.to(device), mask.to(device), positions.to(device)
        stop_ids = torch.tensor(self.stop_token_ids, device=device)

        tokens = torch.full((batch, steps), self.pad_token_id, dtype=torch.long, device=device)
        logprobs = torch.zeros((batch, steps), dtype=torch.float32, device=device)
        lengths = torch.full((batch,), steps, dtype=torch.long, device=device)
        index = torch.arange(batch, device=device)  # original row of each live row
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        reported = torch.zeros(batch, dtype=torch.bool)  # rows handed to on_finished
        if not rows:
            done[:] = True

        def report(finished: torch.Tensor) -> None:
            """Hand the finished original rows ``finished`` (not reported before) to on_finished."""
            if on_finished is None:
                return
            finished = finished.cpu()
            finished = finished[(finished < rows) & ~reported[finished]]
            if finished.numel() == 0:
                return
            reported[finished] = True
            at = finished.to(tokens.device)
            on_finished(
                finished.tolist(),
                Decoded(tokens[at].cpu(), logprobs[at].cpu(), lengths[at].cpu()),
            )

        cache, prefix = self.new_cache(width + steps)
        step = self.step
        if self.fused is not None and prefix and not synced:
            # this batch's weights (training changed them since the last), packed for its rows
            self.fused.refresh(batch if steps >= PACK_MIN_TOKENS else 0)
            step = self.fused
            if self.graphed is not None and (device.type == "cuda" or self.graphed.eager):
                step = self.graphed  # the same step, replayed from a CUDA graph
        # the n copies of a prompt are prefilled once; the cache and logits are then copied out
        first, copy_of = distinct_rows(live_prompts)
        seen = mask[:, :width] if prefix else mask
        if len(first) < batch:
            rows_in, of = torch.tensor(first, device=device), torch.tensor(copy_of, device=device)
            logits = self._forward_last(
                input_ids[rows_in], seen[rows_in], positions[rows_in], cache
            )
            cache.reorder_cache(of)  # [distinct, ...] -> [batch, ...]
            logits = logits[of]
        else:
            logits = self._forward_last(input_ids, seen, positions, cache)
        last_position = positions[:, -1:]
        for t in range(steps):
            if t < min_new_tokens:
                logits = logits.index_fill(1, stop_ids, float("-inf"))
            step_logprobs = sampling_logprobs(logits, sampling)
            token = draw(step_logprobs, sampling.greedy)
            tokens[index, t] = token
            logprobs[index, t] = step_logprobs.gather(1, token[:, None]).squeeze(1)
            stopped = torch.isin(token, stop_ids) & ~done
            lengths[index] = torch.where(stopped, t + 1, lengths[index])  # no host sync
            done = done | stopped
            if t + 1 == steps:
                break
            live = int((~done).sum())
            if synced:
                if not any_rank(live > 0, device):
                    break
            elif live == 0:
                break
            if done.numel() - live >= max(1.0, COMPACT_FRACTION * done.numel()) and (
                live > 0 or done.numel() > 1
            ):
                report(index[done])  # scored while the others decode
                keep = (~done).nonzero().squeeze(1)
                if keep.numel() == 0:  # synced: forward is collective, keep one (finished) row
                    keep = keep.new_zeros(1)
                cache.reorder_cache(keep)
                token, mask, last_position = token[keep], mask[keep], last_position[keep]
                index, done = index[keep], done[keep]
                if step is self.fused and steps - t - 1 >= PACK_MIN_TOKENS:
                    self.fused.repack(keep.numel())  # packed weights for the rows left
            mask[:, width + t] = 1
            last_position = last_position + 1
            seen = mask[:, : width + t + 1] if prefix else mask
            logits = step(token[:, None], seen, last_position, cache)
        report(torch.arange(batch))
        if self.graphed is not None:
            self.graphed.release()  # the graph holds this batch's cache
        if self.fused is not None and device.type == "cuda":
            self.fused.release()  # its weight copies' memory goes to the update (FusedStep.release)
        elif self.fused is not None:
            self.fused.unpack()  # the cast copies are kept for the next batch, the packed ones not
        return Decoded(tokens[:rows].cpu(), logprobs[:rows].cpu(), lengths[:rows].cpu())


class PrefixStaticLayer(StaticLayer):
    """A ``StaticLayer`` whose attention sees only the filled prefix of its preallocated tensors.

    Keys and values are written in place into ``(rows, heads, max_len, head_dim)`` tensors
    allocated once; ``update`` returns views of the first ``filled`` positions, so a decode step
    reads ``filled`` positions rather than ``max_len``, and its attention mask is as long.
    """

    def __init__(self, max_cache_len: int) -> None:
        super().__init__(max_cache_len)
        self.filled = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, end = self.filled, self.filled + key_states.shape[-2]
        self.keys[:, :, start:end] = key_states
        self.values[:, :, start:end] = value_states
        self.filled = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_seq_length(self) -> int:
        return self.filled

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.filled + query_length, 0

    def reset(self) -> None:
        super().reset()
        self.filled = 0


def left_pad_tensors(
    prompts: Sequence[Sequence[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts into ``(input_ids (rows, width), attention_mask (rows, width))``."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            attention_mask[row, width - len(prompt) :] = 1
    return input_ids, attention_mask
