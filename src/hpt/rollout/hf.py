"""The default rollout engine: a lean prefill-then-decode loop over Hugging Face causal LMs.

Prompts are sorted by length and generated in left-padded batches by :class:`~hpt.rollout.decode.Decoder`:
a static KV cache, temperature / top-k / top-p as tensor operations, the log-probability of each
sampled token under the exact distribution it was drawn from (from the same forward pass), and
finished rows leaving the batch. Models whose forward does not take ``input_ids``,
``attention_mask``, ``position_ids`` and a cache fall back to ``model.generate`` with our own
logits processors (same semantics, slower). The sampling seed forks the RNG, so the same seed gives
the same rollouts whatever the global RNG state, and leaves that state untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from hpt.errors import ConfigError, ModelError
from hpt.rollout.base import Rollout, SamplingParams
from hpt.rollout.decode import (
    Decoded,
    Decoder,
    forward_signature,
    left_pad_tensors,
    synced_ranks,
)
from hpt.utils import progress_bar


class SampledLogprobRecorder(LogitsProcessor):
    """Records ``log pi_sample(token)`` of each generated token; must be the last processor.

    ``generate`` calls the processors once a step with the ids so far and the scores of the next
    token. At step t the recorder keeps ``log_softmax(scores)`` [B, V]; at step t + 1 the ids end
    with the token sampled at step t, whose log-prob it gathers. :meth:`finish` gathers the last.
    """

    def __init__(self) -> None:
        self.previous: torch.Tensor | None = None  # [B, V] log-probs of the last step
        self.logprobs: list[torch.Tensor] = []  # one [B] tensor per generated token

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self._gather(input_ids[:, -1])
        self.previous = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def _gather(self, tokens: torch.Tensor) -> None:
        if self.previous is not None:
            self.logprobs.append(self.previous.gather(1, tokens[:, None]).squeeze(1))

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """The log-probs of all generated tokens, [B, steps] (float32, on the model's device)."""
        self._gather(sequences[:, -1])
        self.previous = None
        if not self.logprobs:
            return sequences.new_zeros((sequences.shape[0], 0), dtype=torch.float32)
        return torch.stack(self.logprobs, dim=1)


def sampling_processors(sampling: SamplingParams) -> list[LogitsProcessor]:
    """The warpers that turn logits into the sampling distribution (empty when greedy)."""
    if sampling.greedy:
        return []
    processors: list[LogitsProcessor] = []
    if sampling.temperature != 1.0:
        processors.append(TemperatureLogitsWarper(sampling.temperature))
    if sampling.top_k > 0:
        processors.append(TopKLogitsWarper(top_k=sampling.top_k))
    if sampling.top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p=sampling.top_p))
    return processors


ROLLOUT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def rollout_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """The torch dtype named by ``dtype`` (None for None or ``"auto"``: the model's own)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    if dtype not in ROLLOUT_DTYPES:
        raise ConfigError(f"rollout dtype {dtype!r}: choose auto, {', '.join(ROLLOUT_DTYPES)}")
    return ROLLOUT_DTYPES[dtype]


def truncate_at_stop(tokens: Sequence[int], stop_ids: set[int]) -> tuple[list[int], str]:
    """Cut a generated sequence after its first stop token (kept); ``(ids, finish_reason)``."""
    for position, token in enumerate(tokens):
        if token in stop_ids:
            return list(tokens[: position + 1]), "stop"
    return list(tokens), "length"


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Indices grouped into batches of similar length (longest first), to waste little padding."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def max_over_ranks(value: int, device: torch.device) -> int:
    """The largest ``value`` over all ranks of the default process group."""
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


@contextmanager
def generation_mode(model: Any, generation_config: GenerationConfig | None) -> Iterator[None]:
    """Eval mode (and our generation config, if given) for the duration; the model's own after.

    Swapping ``model.generation_config`` keeps a checkpoint's defaults (a repetition penalty, a
    top-p) from being merged into ours by ``generate``.
    """
    was_training = model.training
    saved_config = getattr(model, "generation_config", None)
    model.eval()
    if generation_config is not None:
        model.generation_config = generation_config
    try:
        yield
    finally:
        if generation_config is not None:
            model.generation_config = saved_config
        model.train(was_training)


@contextmanager
def seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed torch's RNG inside a fork, so the global RNG state is the same after as before."""
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class HFEngine:
    """Sample rollouts from a Hugging Face causal LM: batched, left-padded, static KV cache.

    Args:
        model: a causal LM (``PreTrainedModel``, a PEFT wrapper of one, or an FSDP2-sharded one).
        tokenizer: its tokenizer; gives the EOS (stop) and pad ids and decodes responses.
        batch_size: the most sequences (prompts times samples) generated together.
        progress: show a progress bar over the rows.
        stop_token_ids: extra token ids that end a response, besides ``tokenizer.eos_token_id``.
        compile: ``torch.compile`` the one-token decode step (see benchmarks/README.md for when
            it pays).
        min_new_tokens: stop tokens get probability 0 before this many response tokens (0: off);
            the benchmarks use it to force full-length responses.
        fused: decode one token a step with the fused Llama-layout step
            (:mod:`hpt.rollout.fused`) where the model has that layout; False: the model's forward.
        dtype: the fused step's weight dtype (``"bfloat16"``, ``"float16"``, ``"float32"``;
            None or ``"auto"``: the model's own). A lower one samples from a bf16 copy of the
            weights (faster; the log-probs are then not the trainer's, see :meth:`exact_logprobs`).
        cuda_graphs: on a CUDA device, replay the fused step from a CUDA graph (one launch a token;
            :mod:`hpt.rollout.graphs`; opt-in until a GPU run of the current code confirms it);
            False: the eager fused step.
        pack_weights: on a CPU in float32, the fused step packs the weights for each batch of at
            least 16 new tokens with MKL's packed GEMM (faster matmuls; a copy as large as the
            weights while the batch decodes); False: plain matmuls, no copy.

    Example:
        >>> engine = HFEngine(model, tokenizer)
        >>> rollouts = engine.generate([ids_a, ids_b], n=4, sampling=SamplingParams(seed=0))
        >>> [r.prompt_index for r in rollouts]
        [0, 0, 0, 0, 1, 1, 1, 1]
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        batch_size: int = 64,
        progress: bool = False,
        stop_token_ids: Iterable[int] = (),
        compile: bool = False,
        min_new_tokens: int = 0,
        fused: bool = True,
        dtype: str | torch.dtype | None = None,
        cuda_graphs: bool = False,
        pack_weights: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"rollout batch_size must be >= 1, got {batch_size}")
        if min_new_tokens < 0:
            raise ConfigError(f"rollout min_new_tokens must be >= 0, got {min_new_tokens}")
        stop = [tokenizer.eos_token_id, *stop_token_ids]
        if stop[0] is None:
            raise ModelError(f"tokenizer {type(tokenizer).__name__} has no eos_token_id to stop on")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.progress = progress
        self.min_new_tokens = min_new_tokens
        self.stop_token_ids = list(dict.fromkeys(int(t) for t in stop))
        pad = tokenizer.pad_token_id
        self.pad_token_id = int(self.stop_token_ids[0] if pad is None else pad)
        fused_dtype = rollout_dtype(dtype)
        signature = forward_signature(model)
        # None: the model's forward cannot be driven step by step; model.generate does it instead
        self.decoder = (
            None
            if signature is None
            else Decoder(
                model,
                signature,
                self.stop_token_ids,
                self.pad_token_id,
                compile=compile,
                fused=fused,
                fused_dtype=fused_dtype,
                cuda_graphs=cuda_graphs,
                pack_weights=pack_weights,
            )
        )
        self.cuda_graphs = cuda_graphs
        own = next(model.parameters()).dtype
        if fused_dtype not in (None, own) and (self.decoder is None or self.decoder.fused is None):
            raise ConfigError(
                f"rollout dtype {dtype}: only the fused decode step samples in another dtype than "
                f"the model's ({own}); this model decodes through its forward (fused decoding "
                "needs a Llama/Qwen2/Mistral-layout model without LoRA or FSDP2, and fused on)"
            )

    def cuda_graphs_unused(self) -> str | None:
        """Why ``cuda_graphs``, asked for, replays no CUDA graph on this engine (None: it will, or
        it was not asked for); the recipe logs it as a warning, since the key alone changes nothing
        there."""
        if not self.cuda_graphs:
            return None
        if self.decoder is None or self.decoder.graphed is None:
            return (
                "this model decodes through its forward, not the fused step a graph replays "
                "(fused decoding needs a Llama/Qwen2/Mistral-layout model without LoRA or FSDP2, "
                "rollout.fused on and rollout.compile off)"
            )
        device = next(self.model.parameters()).device
        if device.type != "cuda":
            return f"the model is on {device.type}; CUDA graphs replay on CUDA devices only"
        return None

    def exact_logprobs(self, sampling: SamplingParams) -> bool:
        """Whether the returned log-probs are the trainer's ``log softmax(logits / T)`` of the same
        weights: true unless top-k, top-p or ``min_new_tokens`` reshape the sampling distribution,
        or the fused step samples from a copy of the weights in another dtype (the trainer can
        then take them as pi_old instead of recomputing them)."""
        fused = self.decoder.fused if self.decoder is not None else None
        return (
            sampling.top_k == 0
            and sampling.top_p >= 1.0
            and not self.min_new_tokens
            and (fused is None or fused.exact)
        )

    def generate(
        self,
        prompts: list[list[int]],
        n: int,
        sampling: SamplingParams,
        *,
        on_finished: Callable[[list[tuple[int, Rollout]]], None] | None = None,
    ) -> list[Rollout]:
        """Sample ``n`` responses for each prompt.

        Args:
            prompts: token ids of each prompt, unpadded.
            n: responses per prompt. Greedy decoding generates each prompt once and repeats it.
            sampling: temperature, top-p, top-k, max_new_tokens and seed.
            on_finished: called with ``(index, rollout)`` pairs (``index`` into the returned list)
                as rollouts finish, while others are still generating (rows that stop early leave
                the batch together; the rest when their batch ends); each rollout once. The
                trainer scores them meanwhile (:class:`hpt.rewards.StreamingScorer`).

        Returns:
            ``len(prompts) * n`` rollouts, prompt-major (those of prompt ``i`` are
            ``[i * n, (i + 1) * n)``), each truncated after its first stop token.
        """
        if n < 1:
            raise ConfigError(f"rollouts per prompt n must be >= 1, got {n}")
        if any(len(p) == 0 for p in prompts):
            empty = next(i for i, p in enumerate(prompts) if len(p) == 0)
            raise ConfigError(f"rollout prompt {empty} is empty")
        copies = 1 if sampling.greedy else n
        jobs = [index for index in range(len(prompts)) for _ in range(copies)]  # prompt of each row
        results: list[list[Rollout] | None] = [None] * len(jobs)  # the rollouts of each row
        batches = list(length_sorted_batches([len(prompts[i]) for i in jobs], self.batch_size))
        device = next(self.model.parameters()).device
        synced = self.decoder is not None and synced_ranks(self.model)
        if synced:  # forward is collective: every rank runs as many batches (some empty)
            batches += [[]] * (max_over_ranks(len(batches), device) - len(batches))
        repeats = n // copies  # returned rollouts per generated row

        def finish(rows: list[int], outputs: list[tuple[list[int], list[float]]]) -> int:
            """Record finished rows (indices into ``jobs``); hand them on; their token count."""
            ready = []
            for row, (generated, logprobs) in zip(rows, outputs):
                results[row] = self._rollouts(prompts, jobs[row], generated, logprobs, repeats)
                ready += [(row * repeats + k, r) for k, r in enumerate(results[row])]
            if on_finished is not None and ready:
                on_finished(ready)
            return sum(len(generated) for generated, _ in outputs)

        with (
            generation_mode(
                self.model, self._generation_config(sampling) if self.decoder is None else None
            ),
            seeded(sampling.seed, device),
            progress_bar("{task.fields[tokens]} tokens", enabled=self.progress) as bar,
        ):
            task = bar.add_task("generating", total=len(jobs), tokens=0)
            tokens = 0
            for batch in batches:
                batch_prompts = [prompts[jobs[row]] for row in batch]
                if self.decoder is None:
                    outputs = self._generate_batch(batch_prompts, sampling, device)
                    tokens += finish(batch, outputs)
                else:

                    def finished(
                        local: list[int], decoded: Decoded, batch: list[int] = batch
                    ) -> None:
                        nonlocal tokens
                        tokens += finish([batch[i] for i in local], self._outputs(decoded))

                    self.decoder.decode(
                        batch_prompts,
                        sampling,
                        device,
                        min_new_tokens=self.min_new_tokens,
                        synced=synced,
                        on_finished=finished,
                    )
                bar.update(task, advance=len(batch), tokens=tokens)
        return [rollout for rollouts in results for rollout in rollouts or ()]

    @staticmethod
    def _outputs(decoded: Decoded) -> list[tuple[list[int], list[float]]]:
        """``(response_ids, logprobs)`` of each decoded row, up to its stop token."""
        lengths = decoded.lengths.tolist()
        tokens, logprobs = decoded.tokens.tolist(), decoded.logprobs.tolist()
        return [(t[:k], lp[:k]) for t, lp, k in zip(tokens, logprobs, lengths)]

    def _generation_config(self, sampling: SamplingParams) -> GenerationConfig:
        """A generation config with every knob neutral except ours (sampling is done by processors)."""
        # neutral warpers while sampling (ours run as processors); none at all when greedy
        warpers = {} if sampling.greedy else dict(temperature=1.0, top_k=0, top_p=1.0)
        return GenerationConfig(
            do_sample=not sampling.greedy,
            **warpers,
            max_new_tokens=sampling.max_new_tokens,
            eos_token_id=self.stop_token_ids,
            pad_token_id=self.pad_token_id,
            bos_token_id=None,
            use_cache=True,
            num_beams=1,
            repetition_penalty=1.0,
            return_dict_in_generate=True,
        )

    @torch.no_grad()
    def _generate_batch(
        self, batch_prompts: list[list[int]], sampling: SamplingParams, device: torch.device
    ) -> list[tuple[list[int], list[float]]]:
        """Generate one left-padded batch: ``(response_ids, logprobs)`` per row, untruncated."""
        input_ids, attention_mask = left_pad_tensors(batch_prompts, self.pad_token_id)
        recorder = SampledLogprobRecorder()
        processors = LogitsProcessorList([*sampling_processors(sampling), recorder])
        if self.min_new_tokens:
            processors.insert(
                0,
                MinNewTokensLengthLogitsProcessor(
                    input_ids.shape[1], self.min_new_tokens, self.stop_token_ids
                ),
            )
        output = self.model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            logits_processor=processors,
        )
        sequences = output.sequences
        logprobs = recorder.finish(sequences).cpu().tolist()
        responses = sequences[:, input_ids.shape[1] :].cpu().tolist()
        return list(zip(responses, logprobs))

    def _rollouts(
        self,
        prompts: list[list[int]],
        prompt_index: int,
        generated: list[int],
        logprobs: list[float],
        repeats: int,
    ) -> list[Rollout]:
        """The ``repeats`` rollouts of one generated row: truncated at its stop, decoded."""
        response_ids, finish_reason = truncate_at_stop(generated, set(self.stop_token_ids))
        text = self.tokenizer.decode(response_ids, skip_special_tokens=True)
        return [
            Rollout(
                prompt_index=prompt_index,
                prompt_ids=list(prompts[prompt_index]),
                response_ids=list(response_ids),
                text=text,
                finish_reason=finish_reason,
                logprobs=list(logprobs[: len(response_ids)]),
            )
            for _ in range(repeats)
        ]
