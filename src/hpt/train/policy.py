"""The policy as the loss sees it: a causal LM (+ an optional value head) -> per-token quantities.

Wrapping the Hugging Face model in one module whose ``forward`` returns token log-probs, entropy
and values lets DistributedDataParallel (or FSDP) wrap the whole computation, and lets the output
head run in chunks (``hpt.estimator.likelihood``) so that the [tokens x vocabulary] logits of a
batch never exist at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

from hpt.estimator.likelihood import token_logprobs_and_entropy
from hpt.rollout.decode import forward_signature
from hpt.train import batch, prompt_attention


def autocast_dtype(
    setting: bool | str, model: nn.Module, strategy: str = "ddp"
) -> torch.dtype | None:
    """The dtype the training passes autocast to (``optim.autocast``), None for none.

    ``auto``: bfloat16 where it is the usual mixed precision, float32 weights on a GPU that has
    bf16 under DDP (or one process); none on CPU, for weights already in half precision, and
    under FSDP2 (whose own mixed-precision policy casts the weights).
    """
    if setting is False or strategy == "fsdp2":
        return None
    if setting is True or setting == "bfloat16":
        return torch.bfloat16
    parameter = next(model.parameters())
    on_gpu = parameter.device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.bfloat16 if on_gpu and parameter.dtype == torch.float32 else None


class Policy(nn.Module):
    """``forward(input_ids, attention_mask, response_index, labels) -> (logprobs, entropy, values)``.

    Shapes: inputs [N, L]; ``response_index``/``labels`` [N, T]; outputs [N, T] (``values`` is None
    without a value head). The hidden state at ``response_index[i, t]`` predicts ``labels[i, t]``.
    Packed (padding-free) rows: inputs [1, S] with ``position_ids`` [1, S] restarting at 0 in each
    row (:meth:`hpt.train.batch.Batch.pack`); ``response_index`` then points into the S tokens.
    Log-probs and entropy are those of ``softmax(logits / temperature)``: the trainer passes the
    rollouts' sampling temperature, so the ratio pi_theta / pi_old compares the sampling policy.
    ``share_prompts`` (forward): run each distinct prompt of the rows once when that saves at
    least this many prompt tokens (``True``: whenever a prompt repeats; 0: never); on a CPU,
    where the pass is one decoder call, also rows whose prompts are all their own when leaving
    the responses' padding out drops at least :data:`~hpt.train.batch.UNPAD_AT` of the tokens.
    ``response_mask`` (forward, [N, T] bool): the positions that count; on a CPU the output head
    runs on those only (padding skips its ``[tokens x vocab]`` work) and the others get log-prob
    and entropy 0. None: every position.
    ``autocast``: a dtype (bfloat16) every pass runs under ``torch.autocast`` in (mixed
    precision: matmuls in it, the weights, their gradients and the optimiser stay as they are;
    log-probs, entropy and values come out float32); None: the weights' own dtype.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        value_head: bool = False,
        chunk_size: int = 4096,
        temperature: float = 1.0,
        adapter_disabled: bool = False,
        compile: bool = False,
        autocast: torch.dtype | None = None,
    ):
        super().__init__()
        self.autocast = autocast
        # torch.compile the decoder layers' forwards, for this module's passes only (the rollout
        # engine calls the same layers eagerly): optim.compile
        self.compile = compile
        self._compiled: dict[int, Any] = {}
        # LoRA: the reference policy is the same model with its adapters switched off
        self.adapter_disabled = adapter_disabled
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        # log-probs and entropy of softmax(logits / T), the distribution the rollouts were sampled
        # from (as verl and TRL); T = 0 (greedy rollouts) has no such distribution: T = 1 is used
        self.temperature = temperature if temperature > 0 else 1.0
        self.model = model
        hidden = model.config.hidden_size
        self.value_head = nn.Linear(hidden, 1) if value_head else None
        if self.value_head is not None:
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
        self.chunk_size = chunk_size

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        response_index: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        share_prompts: int = 0,
        response_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        with self._precision(input_ids.device):
            return self._forward(
                input_ids,
                attention_mask,
                response_index,
                labels,
                position_ids,
                share_prompts,
                response_mask,
            )

    def _forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        response_index: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor | None,
        share_prompts: int,
        response_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        decoder = self.model.get_decoder()
        shared = None
        if share_prompts and position_ids is None and not self._recomputes(decoder):
            # a pass that leaves the responses' padding out pays even where no prompt repeats
            unpads = labels.shape[1] > 1
            unpads = unpads and prompt_attention.drops_padding(self.model, input_ids.device)
            shared = batch.share_prompts(
                input_ids,
                attention_mask,
                response_index,
                int(share_prompts),
                unpad_at=batch.UNPAD_AT if unpads else None,
            )
        if shared is not None:
            # sdpa in float32 for a pass of two calls (one call swaps in its own attention)
            with (
                self._adapters(),
                self._compiled_layers(decoder),
                self._float32_sdpa(decoder, input_ids.device),
            ):
                hidden = self._shared_prompt_hidden(decoder, shared, labels.shape[1])
            return self._head(hidden, labels, response_mask)
        if position_ids is None:
            inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        else:  # packed: no 2-D mask, so transformers builds the block-diagonal one from positions
            inputs = {"input_ids": input_ids, "position_ids": position_ids}
        inputs["use_cache"] = False  # a cache would also turn off the packed-sequence detection
        with (
            self._adapters(),
            self._compiled_layers(decoder),
            self._float32_sdpa(decoder, input_ids.device),
        ):
            hidden = decoder(**inputs).last_hidden_state
        if position_ids is None:
            index = response_index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
            hidden = hidden.gather(1, index)  # [N, T, H]
        else:
            hidden = hidden[0][response_index]  # [N, T, H] from the one packed sequence
        return self._head(hidden, labels, response_mask)

    @staticmethod
    def _recomputes(decoder: nn.Module) -> bool:
        """Whether backward recomputes the layers (gradient checkpointing in training): then a
        pass runs every row whole, since the recomputation has neither the shared pass's prompt
        cache nor its swapped attention."""
        return torch.is_grad_enabled() and bool(
            decoder.training and getattr(decoder, "gradient_checkpointing", False)
        )

    def _float32_sdpa(self, decoder: nn.Module, device: torch.device) -> Any:
        """transformers' sdpa attention in float32 on a CPU under autocast or with bf16/fp16
        weights (:func:`hpt.train.prompt_attention.float32_sdpa`), except where backward
        recomputes the layers: the recomputation runs after the swap is undone, and must match
        the forward."""
        if self._recomputes(decoder):
            return nullcontext()
        return prompt_attention.float32_sdpa(self.model, device)

    def _precision(self, device: torch.device) -> Any:
        """``torch.autocast`` to ``autocast`` for the whole pass; a no-op without one."""
        if self.autocast is None:
            return nullcontext()
        return torch.autocast(device.type, dtype=self.autocast)

    def _adapters(self) -> Any:
        """LoRA adapters off for the reference policy; a no-op otherwise."""
        return self.model.disable_adapter() if self.adapter_disabled else nullcontext()

    @contextmanager
    def _compiled_layers(self, decoder: nn.Module) -> Iterator[None]:
        """With ``compile``: the decoder layers run ``torch.compile``-d forwards meanwhile.

        Each layer's forward is compiled once (``dynamic=True``: batch and sequence lengths
        vary) and set as the layer's own ``forward`` for the duration, so that the rollout
        engine's prefill outside it stays eager; backward runs the compiled graphs' backward.
        """
        layers = list(getattr(decoder, "layers", ())) if self.compile else []
        # a forward set on the instance (accelerate's hooks do that) is compiled and put back
        own = [layer.__dict__.get("forward") for layer in layers]
        for layer in layers:
            if id(layer) not in self._compiled:
                self._compiled[id(layer)] = torch.compile(layer.forward, dynamic=True)
            layer.forward = self._compiled[id(layer)]
        try:
            yield
        finally:
            for layer, forward in zip(layers, own):
                if forward is None:
                    del layer.forward  # the class's forward again
                else:
                    layer.forward = forward

    def _shared_prompt_hidden(
        self, decoder: nn.Module, shared: batch.SharedPrompts, width: int
    ) -> torch.Tensor:
        """[N, width, H] hidden states predicting each response token, each prompt run once.

        One decoder call where :func:`hpt.train.prompt_attention.applies` (the prompts and the
        responses as one sequence). Elsewhere two: the distinct prompts go through the decoder
        with a cache; its keys and values are copied
        to every row of the prompt (an ``index_select``, so gradients flow back to the one
        prompt pass), and the responses run on top of them with their own positions. The hidden
        state of a prompt's last token predicts response token 0; that of response token t - 1
        predicts token t.
        """
        if width > 1 and prompt_attention.applies(self.model):
            return self._one_call_shared_prompt_hidden(decoder, shared, width - 1)
        signature = forward_signature(decoder)
        cache_name = signature.cache_name if signature is not None else "past_key_values"
        out = decoder(
            input_ids=shared.prompt_ids, attention_mask=shared.prompt_mask, use_cache=True
        )
        rows = shared.prompt_of_row
        prompt_hidden = out.last_hidden_state
        # [N, 1, H]; index_select, whose backward (index_add_) is fast on a CPU, unlike indexing's
        at = rows * prompt_hidden.shape[1] + shared.prompt_lengths - 1
        last = prompt_hidden.flatten(0, 1).index_select(0, at)[:, None]
        if width == 1:
            return last
        cache = out["cache"] if "cache" in out else out["past_key_values"]
        cache.reorder_cache(rows)  # [G, ...] -> [N, ...]
        steps = width - 1  # the last response token predicts nothing
        mask = torch.cat([shared.prompt_mask[rows], shared.response_mask[:, :steps]], dim=1)
        positions = shared.prompt_lengths[:, None] + torch.arange(steps, device=rows.device)
        rest = decoder(
            input_ids=shared.response_ids[:, :steps],
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{cache_name: cache},
        ).last_hidden_state
        return torch.cat([last, rest], dim=1)

    def _one_call_shared_prompt_hidden(
        self, decoder: nn.Module, shared: batch.SharedPrompts, steps: int
    ) -> torch.Tensor:
        """:meth:`_shared_prompt_hidden` in one decoder call, the prompts and the responses as
        one sequence (:mod:`hpt.train.prompt_attention`)."""
        input_ids, position_ids, layout = prompt_attention.one_sequence(shared, steps)
        with prompt_attention.swapped_attention(self.model):
            hidden = decoder(
                input_ids=input_ids,
                position_ids=position_ids,
                use_cache=False,
                **{prompt_attention.LAYOUT_KEYWORD: layout},
            ).last_hidden_state[0]
        split = layout.groups * layout.width
        prompts, responses = hidden.split([split, hidden.shape[0] - split])
        responses = layout.to_grid(responses)  # [rows * steps, H], zeros at the padding
        last = prompts.index_select(
            0, shared.prompt_of_row * layout.width + shared.prompt_lengths - 1
        )
        return torch.cat([last[:, None], responses.unflatten(0, (layout.rows, steps))], dim=1)

    def _head(
        self, hidden: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Log-probs, entropy and values of the [N, T, H] hidden states predicting ``labels``;
        the head's log-probs and entropy at ``mask``'s positions only (0 elsewhere)."""
        head = self.model.get_output_embeddings()
        where = batch.real_positions(mask)
        if where is not None:  # padding: the head on the real tokens only
            picked, entropy_picked = token_logprobs_and_entropy(
                hidden.reshape(-1, hidden.shape[-1])[where][None],
                head.weight,
                labels.reshape(-1)[where][None],
                chunk_size=self.chunk_size,
                temperature=self.temperature,
            )
            real = mask.reshape(-1)[where].to(picked.dtype)  # 0 at the padding it rounded in
            zeros = picked.new_zeros(labels.numel())
            logprobs = zeros.index_put((where,), picked[0] * real).reshape(labels.shape)
            entropy = zeros.index_put((where,), entropy_picked[0] * real).reshape(labels.shape)
        else:
            logprobs, entropy = token_logprobs_and_entropy(
                hidden,
                head.weight,
                labels,
                chunk_size=self.chunk_size,
                temperature=self.temperature,
            )
        values = (
            self.value_head(hidden.float()).squeeze(-1).float()
            if self.value_head is not None
            else None
        )
        # fresh tensors, not views: FSDP2 hooks a module's outputs for backward, and an in-place
        # op on a returned view would drop that hook
        return logprobs.clone(), entropy.clone(), values
