"""One training step in three phases: collect (generate, score, route, assemble), prepare
(advantages, old / reference log-probs, values) and update (mini-batches of questions,
micro-batches of rows, the unified loss normalised over the whole mini-batch).

Every algorithm of ``hpt.algorithms`` runs through these functions: they read the algorithm's
data (its terms, its gate, what it needs) and never its name.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from hpt.algorithms import Algorithm, outcome_advantages
from hpt.errors import ConfigError
from hpt.estimator.advantage import ADVANTAGES, gae
from hpt.estimator.likelihood import reusing_head_buffers
from hpt.estimator.unified import KIND_ID, batch_counts, rows_without_gradient, unified_loss
from hpt.gate import assignments
from hpt.train import distributed as dist
from hpt.train.batch import Batch, Row, micro_batches, token_micro_batches
from hpt.train.config import TrainConfig
from hpt.train.policy import Policy
from hpt.train.setup import TrainData


@dataclass
class StepData:
    """What one step's generation, scoring and routing produced (this rank's share)."""

    rows: list[Row]
    metrics: dict[str, float]
    generated: list[int]  # prompt + response length of every rollout generated (for FLOPs)


# ----------------------------------------------------------------------------------------------
# 1. generate + score + route + assemble


def collect_rows(
    questions: list[int],
    data: TrainData,
    algorithm: Algorithm,
    engine: Any,
    config: TrainConfig,
    seed: int,
) -> StepData:
    """Generate, score and route this step's questions; return their tagged rows."""
    from hpt.rewards import StreamingScorer
    from hpt.rollout import SamplingParams

    n = config.rollout.n
    metrics: dict[str, float] = {}
    correct = torch.zeros(len(questions), dtype=torch.long)
    rollouts: list[Any] = []
    rewards: list[float] = []
    if algorithm.needs_rollouts:
        sampling = SamplingParams(
            temperature=config.rollout.temperature,
            top_p=config.rollout.top_p,
            top_k=config.rollout.top_k,
            max_new_tokens=config.rollout.max_new_tokens,
            seed=seed,
        )
        # rollouts are scored as they finish, while the engine decodes the others
        scorer = StreamingScorer(
            [data.questions[q].answer for q in questions for _ in range(n)],
            config.data.reward,
            timeout=config.data.reward_timeout,
        )
        started = time.perf_counter()
        rollouts = scorer.generate(engine, [data.prompt_ids[q] for q in questions], n, sampling)
        metrics["time/generate"] = time.perf_counter() - started
        started = time.perf_counter()
        result = scorer.result([r.text for r in rollouts])
        metrics["time/score"] = time.perf_counter() - started  # what scoring added after generation
        metrics["perf/score_overlapped_s"] = max(0.0, scorer.busy_s - metrics["time/score"])
        rewards = list(result.scores)
        correct = torch.tensor(
            [sum(rewards[i * n + j] > 0.5 for j in range(n)) for i in range(len(questions))],
            dtype=torch.long,
        )
        metrics["reward_mean"] = sum(rewards) / max(len(rewards), 1)
        metrics["reward_timeouts"] = float(result.timeouts)
        metrics["reward_errors"] = float(result.errors)
        lengths = [len(r.response_ids) for r in rollouts]
        metrics["response_length"] = sum(lengths) / max(len(lengths), 1)
        metrics["clipped_responses"] = sum(r.finish_reason == "length" for r in rollouts) / max(
            len(rollouts), 1
        )
        metrics["tokens/generated"] = float(sum(lengths))

    plan = assignments(algorithm, correct, n)
    rows: list[Row] = []
    demo_tokens = 0
    for i, (q, assigned) in enumerate(zip(questions, plan)):
        demo = data.demo_ids.get(q)
        demo_kind, rollout_weight = assigned.demo_kind, assigned.rollout_weight
        if demo_kind is not None and demo is None:
            # no usable demonstration (none given, or dropped as over-long): its rollouts train instead
            demo_kind, rollout_weight = None, 1.0
            metrics["routes/no_demonstration"] = metrics.get("routes/no_demonstration", 0) + 1
        if rollout_weight > 0 and rollouts:
            for j in range(n):
                rollout = rollouts[i * n + j]
                reward = rewards[i * n + j]
                rows.append(
                    Row(
                        rollout.prompt_ids,
                        rollout.response_ids,
                        "rollout",
                        i,
                        reward,
                        rollout_weight,
                        rollout.logprobs,
                    )
                )
        if demo_kind is not None:
            demo_tokens += len(demo)
            rows.append(Row(data.prompt_ids[q], demo, demo_kind, i, 1.0, assigned.demo_weight))
    routes = [assigned.route for assigned in plan]
    total = dist.all_reduce_sum(len(routes))  # the routes of the whole step, over all ranks
    for name in ("sft", "rl", "off_policy"):
        metrics[f"route_{name}"] = dist.all_reduce_sum(sum(r == name for r in routes)) / max(
            total, 1
        )
    metrics["tokens/demonstration"] = float(demo_tokens)
    generated = [len(r.prompt_ids) + len(r.response_ids) for r in rollouts]
    return StepData(rows=rows, metrics=metrics, generated=generated)


# ----------------------------------------------------------------------------------------------
# 2. advantages and the quantities of the sampling policy


def old_logprobs_from_engine(
    config: TrainConfig, engine: Any, algorithm: Algorithm, autocast: torch.dtype | None = None
) -> bool:
    """Whether pi_old comes from the rollout engine's log-probs (``rollout.old_logprobs``).

    They can: only rollout rows have them, so every term that divides by pi_old must train
    rollouts. ``auto`` takes them where they are the trainer's own numbers (an engine reporting
    exact log-probs for these sampling settings, under DDP, training passes without
    ``autocast``); ``engine`` takes them regardless.
    """
    from hpt.errors import ConfigError
    from hpt.rollout import SamplingParams

    choice = config.rollout.old_logprobs
    kinds = algorithm.old_logprob_kinds
    possible = kinds <= {"rollout"}
    if choice == "engine" and not possible:
        raise ConfigError(
            f"rollout.old_logprobs=engine: {algorithm.name} divides {sorted(kinds - {'rollout'})} "
            "rows by pi_old, which the engine does not sample; use recompute or auto"
        )
    if choice != "auto":
        return choice == "engine"
    sampling = SamplingParams(
        temperature=config.rollout.temperature,
        top_p=config.rollout.top_p,
        top_k=config.rollout.top_k,
    )
    exact = getattr(engine, "exact_logprobs", None)
    return (
        possible
        and exact is not None
        and bool(exact(sampling))
        and config.distributed.strategy == "ddp"
        and autocast is None
    )


@torch.no_grad()
@reusing_head_buffers()  # its no-grad passes too (old and reference log-probs)
def prepare(
    batch: Batch,
    policy: Policy,
    reference: Policy | None,
    algorithm: Algorithm,
    config: TrainConfig,
    need_old: bool,
    old_from_engine: bool = False,
) -> dict[str, float]:
    """Fill ``batch.extras``: advantages, and old log-probs / reference log-probs / values where needed.

    ``old_from_engine``: pi_old of rollout tokens is the engine's sampling log-probs (no forward
    pass for it; demonstration rows, whose terms do not divide by pi_old, get zeros). Each
    forward-only pass covers only the rows that need it (:func:`rows_the_update_runs`; for pi_old
    alone, only rows of kinds whose terms divide by it); the rest get zeros, which nothing reads.
    ``batch.extras["forward_passes"]`` counts the passes that covered each row (for the step's
    FLOPs). Returns metrics (``rollout/logprob_gap`` when old log-probs were computed,
    ``passes/forward``: the models run forward).
    """
    metrics: dict[str, float] = {}
    if algorithm.needs_values:  # token-level GAE, filled in below once the values are known
        group_advantages = torch.zeros(len(batch))
    else:
        group_advantages = outcome_advantages(
            algorithm, batch.rewards, batch.group, kinds=batch.kinds
        )
    batch.extras["advantages"] = group_advantages.float()
    batch.extras["forward_passes"] = torch.zeros(len(batch))
    sampled = batch.extras.get("sample_logprobs")
    if need_old and old_from_engine and sampled is not None:
        batch.extras["old_logprobs"] = sampled.clone()
        need_old = False  # nothing left to compute for pi_old
    run_policy = need_old or algorithm.needs_values
    metrics["passes/forward"] = float(run_policy) + float(reference is not None)
    if not metrics["passes/forward"]:
        return metrics
    shape = tuple(batch.labels.shape)
    old, ref, values_t = torch.zeros(shape), torch.zeros(shape), torch.zeros(shape)
    ran = rows_the_update_runs(batch, algorithm, config)  # zeros stay where the update skips
    if run_policy:
        policy_rows = ran
        if not algorithm.needs_values:  # the pass is for pi_old alone: the kinds divided by it
            kinds = [KIND_ID[k] for k in algorithm.old_logprob_kinds]
            policy_rows = ran[torch.isin(batch.kinds[ran], torch.tensor(kinds, dtype=torch.long))]
        for part, micro, share in forward_passes(batch, policy_rows, policy, config):
            logprobs, _, value = forward(policy, micro, share)
            old[part] = _pad(logprobs, shape[1]).cpu()
            if value is not None:
                values_t[part] = _pad(value, shape[1]).cpu()
    if reference is not None:
        for part, micro, share in forward_passes(batch, ran, reference, config):
            ref[part] = _pad(forward(reference, micro, share)[0], shape[1]).cpu()
    if need_old:
        batch.extras["old_logprobs"] = old
        gap = _sampling_gap(batch, policy_rows)
        if gap is not None:
            metrics["rollout/logprob_gap"] = gap
    if reference is not None:
        batch.extras["ref_logprobs"] = ref
    if algorithm.needs_values:
        advantages, returns = gae(
            values_t, batch.rewards, batch.response_mask, algorithm.gae_gamma, algorithm.gae_lambda
        )
        # token-level advantages for rows whose term uses GAE; outcome advantages elsewhere
        uses_gae = _kinds_with_token_advantages(algorithm)
        is_gae_row = torch.isin(batch.kinds, torch.tensor(uses_gae, dtype=torch.long))
        expanded = group_advantages[:, None].expand_as(advantages).clone()
        expanded[is_gae_row] = advantages[is_gae_row]
        batch.extras["advantages"] = expanded
        batch.extras["old_values"] = values_t
        batch.extras["returns"] = returns
    return metrics


def forward_passes(
    batch: Batch, rows: torch.Tensor, model: Policy, config: TrainConfig
) -> Iterator[tuple[torch.Tensor, Batch, int]]:
    """Forward-only passes of ``model`` over ``rows`` (pi_old, values, reference log-probs): each
    pass's rows, its micro-batch on the model's device and its prompt sharing
    (:func:`shares_prompts`), counted in ``batch.extras["forward_passes"]``. Where ``model`` is
    FSDP2-sharded and another rank has more passes, this rank runs extra ones on rows of its own
    (forward is collective there) and yields nothing for them."""
    device = next(model.parameters()).device
    packed = packs(config, model)
    share = shares_prompts(config, model, packed)
    unpadded = unpads(config, model, share)
    parts = plan_passes(batch, rows, config, packed, share, unpadded, forward_only=True)
    keep_step = parts[-1] if parts else torch.arange(min(len(batch), 1))
    for k in range(dist.same_count(model, len(parts))):
        part = parts[k] if k < len(parts) else keep_step
        micro = micro_batch(batch, part, packed).to(device)
        if k >= len(parts):
            forward(model, micro, share)  # only to keep step with the ranks that have more
            continue
        batch.extras["forward_passes"][part] += 1
        yield part, micro, share


def _sampling_gap(batch: Batch, rows: torch.Tensor) -> float | None:
    """``rollout/logprob_gap``: mean |log pi_old - log pi_engine| over the rollout tokens of
    ``rows`` (those whose pi_old was computed).

    The trainer's and the rollout engine's log-probs of the same tokens should agree (same weights,
    same temperature); a gap measures the engine's numerical mismatch (as verl's rollout correction).
    """
    sampled = batch.extras.get("sample_logprobs")
    computed = torch.zeros(len(batch), dtype=torch.bool)
    computed[rows] = True
    mask = batch.response_mask & ((batch.kinds == KIND_ID["rollout"]) & computed)[:, None]
    if sampled is None or not mask.any():
        return None
    return float((batch.extras["old_logprobs"] - sampled).abs()[mask].mean())


def _kinds_with_token_advantages(algorithm: Algorithm) -> list[int]:
    """Kinds whose term's advantage is token-level (GAE, from the value head)."""
    return sorted(
        {KIND_ID[t.kind] for t in algorithm.terms if ADVANTAGES.trait(t.advantage, "token_level")}
    )


def _pad(t: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(t.float(), (0, width - t.shape[1]))


# ----------------------------------------------------------------------------------------------
# forward passes: which rows go together, padded or packed


# attention implementations with a varlen kernel: a packed sequence costs what its rows cost alone
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3", "kernels-community/flash-attn")


def packs(config: TrainConfig, policy: torch.nn.Module | None = None) -> bool:
    """Whether passes are packed: ``optim.packing``, or for ``auto`` whether ``policy``'s model
    attends with a varlen kernel (SDPA and eager attention would run one block-diagonal mask over
    the whole packed sequence: more work than the padded rows, measured in benchmarks/README.md)."""
    setting = config.optim.packing
    if setting != "auto":
        return bool(setting)
    module = getattr(policy, "module", policy)  # DDP wraps the policy
    model = getattr(module, "model", None)
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return implementation in VARLEN_ATTENTION


# auto shares a pass's prompts when that saves at least this many prompt tokens, where the pass
# runs as two decoder calls (the prompts' KV cache, then the responses): the second call reads
# every weight and accumulates every weight gradient once more. Measured on 2 CPU cores: a
# 360M-parameter model, passes of 2 questions x 2 rows (60 tokens saved): update 3.63 s shared
# against 2.53 s not; the tiny model, 8 rows of one 27-token prompt (189 saved): 0.90-1.00 s
# shared against 1.02-1.13 s.
AUTO_SHARE_MIN_SAVED = 128
# ... and wherever a prompt repeats where the pass is one decoder call (hpt.train.prompt_attention):
# the same 360M-parameter passes of 2 x 2 rows (30-token prompts, 8 response tokens) forward and
# backward in 1.0-1.4 s shared against 1.4-2.0 s not (two calls: 1.6-1.9 s); the tiny model's 8
# rows of a 27-token prompt 57-58 ms against 64-70 ms (two calls) and 67-69 ms (not shared).
AUTO_SHARE_MIN_SAVED_ONE_CALL = 1
# ... on the CPU only. A GPU at these sizes waits on the host launching kernels, not on FLOPs, and
# the second decoder call launches them all again: counted on the CPU (tiny model, bf16, 8 rows
# a pass), a shared pass's model forward + backward issued 2350 ATen ops against 1030 unshared,
# and the update of 16 x 8 x 64 tokens 37.6k ops shared against 21.8k (TRL's: 23.4k); on an
# H200, hpt's update with prompts shared took about twice TRL's. In one call (float32) a pass
# issues 1380 ATen ops against 986 unshared, views included; not yet measured on a GPU
# (benchmarks/gpu_check.sh runs a case with optim.share_prompts=true for it).
AUTO_SHARE_DEVICES = ("cpu",)


def shares_prompts(config: TrainConfig, policy: torch.nn.Module | None, packed: bool) -> int:
    """When padded passes run each distinct prompt once (``optim.share_prompts``): the prompt
    tokens a pass must save for it (0: never; 1: wherever a prompt repeats).

    ``auto``: for padded passes on the CPU (:data:`AUTO_SHARE_DEVICES`) without gradient
    checkpointing (whose recomputation has neither the prompt's KV cache nor the swapped
    attention), under DDP (or one process), or under FSDP2 where a shared pass is one decoder
    call (FSDP2 runs every layer's forward once a pass; two calls would run it twice).
    :data:`AUTO_SHARE_MIN_SAVED_ONE_CALL` where a shared pass is one decoder call
    (:func:`hpt.train.prompt_attention.applies`), :data:`AUTO_SHARE_MIN_SAVED` where it is two.
    """
    from hpt.rollout.decode import forward_signature
    from hpt.train import prompt_attention

    setting = config.optim.share_prompts
    if packed or setting is False:
        return 0
    if setting is True:
        return 1
    module = getattr(policy, "module", policy)  # DDP wraps the policy
    model = getattr(module, "model", None)
    applies = (
        model is not None
        and next(module.parameters()).device.type in AUTO_SHARE_DEVICES
        and not config.model.gradient_checkpointing
        and forward_signature(model) is not None
    )
    one_call = applies and prompt_attention.applies(model)
    if not applies or (config.distributed.strategy == "fsdp2" and not one_call):
        return 0
    return AUTO_SHARE_MIN_SAVED_ONE_CALL if one_call else AUTO_SHARE_MIN_SAVED


def check_shared_prompts(config: TrainConfig, model: Any) -> None:
    """``optim.share_prompts: true`` under FSDP2 needs the one-call shared pass (FSDP2 runs each
    layer's forward once a pass): one line naming the key otherwise (checked once the model is
    loaded, before anything is trained)."""
    from hpt.train import prompt_attention

    strategy = config.distributed.strategy
    if config.optim.share_prompts is True and strategy == "fsdp2":
        if not prompt_attention.applies(model):
            kind = getattr(getattr(model, "config", None), "model_type", "this model")
            raise ConfigError(
                f"optim.share_prompts=true: under fsdp2 shared prompts need one decoder call a "
                f"pass, which {kind} models do not support (families: "
                f"{', '.join(prompt_attention.MODEL_TYPES)}, without sliding windows); use auto "
                "or false"
            )


# forward-only passes (pi_old, the reference, values, rows without gradient) keep no activations
# for backward: one layer's at a time and one logits chunk, so a pass of 4x the training rows stays
# below a training pass's memory; measured on the tiny model, old + reference log-probs over 128
# rows took 631 ms at 32 rows a pass against 763 ms at 8 (626 at 64, 622 at 128)
FORWARD_MULTIPLE = 4


def plan_passes(
    batch: Batch,
    rows: torch.Tensor,
    config: TrainConfig,
    packed: bool,
    share: int = 0,
    unpadded: bool = False,
    forward_only: bool = False,
) -> list[torch.Tensor]:
    """The row indices (into ``batch``) of each forward pass over ``rows``.

    ``optim.micro_batch_tokens`` > 0: passes of at most that many tokens (dynamic batch size;
    a pass costs its tokens when ``packed``; else rows x its longest row, or, when passes share
    every repeated prompt (``share`` 1, :func:`shares_prompts`), its questions' prompts once
    plus rows x its longest response, or plus its responses' tokens where passes leave their
    padding out (``unpadded``, :func:`unpads`)); else ``optim.micro_batch_size`` rows a pass, in
    order. ``forward_only`` (passes without backward): ``optim.forward_micro_batch_tokens`` and
    ``optim.forward_micro_batch_size`` instead, or :data:`FORWARD_MULTIPLE` times the training
    settings where they are unset.
    """
    optim = config.optim
    tokens, size = optim.micro_batch_tokens, optim.micro_batch_size
    if forward_only:  # no activations kept for backward: FORWARD_MULTIPLE times as much, unset
        tokens = (
            tokens * FORWARD_MULTIPLE
            if optim.forward_micro_batch_tokens is None
            else optim.forward_micro_batch_tokens
        )
        size = optim.forward_micro_batch_size or size * FORWARD_MULTIPLE
    if tokens:
        lengths = batch.lengths()[rows]
        # a question's rows share its prompt (the first response_index + 1 tokens of each row)
        prompts = (batch.group[rows], batch.response_index[rows, 0] + 1) if share == 1 else None
        planned = token_micro_batches(
            lengths, tokens, packed, prompts, unpadded and prompts is not None
        )
        return [rows[g] for g in planned]
    return [rows[part] for part in micro_batches(len(rows), size)]


def unpads(config: TrainConfig, policy: torch.nn.Module | None, share: int) -> bool:
    """Whether passes that split rows into prompts and responses (``share`` > 0) leave the
    responses' padding out: one decoder call on a CPU, as :class:`~hpt.train.policy.Policy`
    decides (so :func:`plan_passes` counts the tokens that actually run)."""
    from hpt.train import prompt_attention

    module = getattr(policy, "module", policy)  # DDP wraps the policy
    model = getattr(module, "model", None)
    return (
        share > 0
        and model is not None
        and not config.model.gradient_checkpointing
        and prompt_attention.drops_padding(model, next(module.parameters()).device)
    )


def micro_batch(batch: Batch, rows: torch.Tensor, packed: bool) -> Batch:
    """Rows ``rows`` of ``batch`` as one forward pass: packed padding-free, or padded."""
    return batch.pack(rows) if packed else batch.select(rows)


def forward(policy: torch.nn.Module, micro: Batch, share_prompts: int = 0) -> Any:
    """``policy``'s (logprobs, entropy, values) on a micro-batch, packed or padded (each distinct
    prompt run once when that saves at least ``share_prompts`` prompt tokens; 0: never)."""
    return policy(
        micro.input_ids,
        micro.attention_mask,
        micro.response_index,
        micro.labels,
        position_ids=micro.position_ids,
        share_prompts=share_prompts,
        response_mask=micro.response_mask,
    )


# ----------------------------------------------------------------------------------------------
# throughput: tokens/s and model FLOP utilisation (verl's definitions)


def throughput(
    model: Any,
    batch: Batch,
    collected: StepData,
    config: TrainConfig,
    seconds: float,
    compute_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """``perf/tokens_per_s``, ``perf/flops`` and ``perf/mfu`` of one step (global over ranks).

    Tokens are the step's trained response tokens plus its generated tokens, over step time x
    devices. FLOPs (:mod:`hpt.train.flops`, from the model's config): generation, the
    forward-only passes of :func:`prepare`, and forward + backward of every update epoch. MFU is
    against the peak of ``compute_dtype`` (the autocast dtype), else of the weights' dtype.
    """
    from hpt.train.flops import mfu, step_flops

    lengths = batch.lengths().tolist()
    flops = step_flops(
        model.config,
        trained=lengths * config.optim.ppo_epochs,
        generated=collected.generated,
        forward_only=[
            length
            for length, passes in zip(lengths, batch.extras["forward_passes"].tolist())
            for _ in range(int(passes))
        ],
    )
    tokens = float(batch.response_mask.sum()) + collected.metrics.get("tokens/generated", 0.0)
    world = dist.world_size()
    parameter = next(model.parameters())
    total_flops = dist.all_reduce_sum(flops)
    return {
        "tokens_per_s": tokens / max(seconds, 1e-9),  # this rank's
        "perf/tokens_per_s": dist.all_reduce_sum(tokens) / max(seconds * world, 1e-9),
        "perf/flops": total_flops,
        "perf/mfu": mfu(
            total_flops,
            max(seconds, 1e-9),
            parameter.device,
            compute_dtype or parameter.dtype,
            world,
        ),
    }


# ----------------------------------------------------------------------------------------------
# 3. the update: mini-batches of questions, micro-batches of rows


# on a CPU, the output head's [tokens, vocab] buffers are reused from pass to pass of one update
@reusing_head_buffers()
def update(
    batch: Batch,
    policy: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    algorithm: Algorithm,
    config: TrainConfig,
    need_old: bool,
) -> dict[str, float]:
    """Optimiser steps over ``batch``; returns the step's loss and update metrics."""
    world = dist.world_size()
    device = next(policy.parameters()).device
    packed = packs(config, policy)
    share = shares_prompts(config, policy, packed)
    unpadded = unpads(config, policy, share)
    totals: dict[str, float] = {"loss": 0.0, "grad_norm": 0.0, "updates": 0, "skipped_updates": 0}
    sums = DeviceSums()  # the passes' metrics, summed on the device and read once at the end
    row_counts = [0, 0]  # rows without gradient, rows in all
    # a row-wise property of the batch (its advantages do not change over the epochs)
    without_gradient = rows_without_gradient(
        algorithm,
        batch.kinds,
        batch.extras["advantages"],
        batch.response_mask,
        batch.row_weights,
    )
    for _epoch in range(config.optim.ppo_epochs):
        for rows in mini_batch_rows(batch, config):
            counts = batch_counts(algorithm, batch.kinds[rows], batch.response_mask[rows])
            counts = dist.all_reduce_counts(counts)  # normalise over every rank's rows
            optimizer.zero_grad(set_to_none=True)
            learning, still, without = split_still_rows(
                rows, without_gradient[rows], config.optim.zero_gradient_rows
            )
            row_counts[0] += without
            row_counts[1] += len(rows)
            parts = plan_passes(batch, learning, config, packed, share, unpadded)
            still_parts = plan_passes(batch, still, config, packed, share, unpadded, True)
            real_passes = len(parts) + len(still_parts)
            # rows that add nothing to the gradient run forward only (for the metrics), first:
            # under DDP a rank's first forward after a synced backward broadcasts the buffers
            passes = dist.same_count(policy, len(still_parts))
            pool = still_parts or parts  # a rank without such rows keeps step on its own rows
            for k in range(passes):
                micro = micro_batch(batch, pool[min(k, len(pool) - 1)], packed).to(device)
                with torch.no_grad():
                    out, entropy, _ = _loss(policy, micro, share, algorithm, config, counts)
                if k < len(still_parts):  # else: a pass keeping step with other ranks
                    _add_metrics(sums, out, entropy, micro.response_mask, real_passes)
            passes = dist.same_count(policy, len(parts))
            for k in range(passes):
                real = k < len(parts)  # else: a zero-loss pass keeping step with other ranks
                micro = micro_batch(batch, parts[min(k, len(parts) - 1)], packed).to(device)
                with dist.no_sync_unless_last(policy, k == passes - 1):
                    out, entropy, loss = _loss(policy, micro, share, algorithm, config, counts)
                    # DDP and FSDP average gradients over ranks; the loss is already a global sum
                    (loss * (world if real else 0.0)).backward()
                if real:
                    _add_metrics(sums, out, entropy, micro.response_mask, real_passes)
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), config.optim.grad_clip)
            grad_norm = dist.full_norm(grad_norm)
            totals["grad_norm"] = max(
                totals["grad_norm"], grad_norm if math.isfinite(grad_norm) else float("inf")
            )
            if not math.isfinite(grad_norm) or grad_norm > config.optim.skip_grad_norm_above:
                totals["skipped_updates"] += 1  # as the released recipe: skip, do not step
                optimizer.zero_grad(set_to_none=True)
                continue
            optimizer.step()
            totals["updates"] += 1
    read = sums.read()
    summed, loss_metrics = read.get("totals", {}), read.get("means", {})
    totals["loss"] = dist.all_reduce_sum(summed.get("loss", 0.0))
    totals["entropy"] = dist.all_reduce_sum(summed.get("entropy_sum", 0.0)) / max(
        dist.all_reduce_sum(summed.get("entropy_tokens", 0.0)), 1.0
    )
    # the share of rows without gradient to give, over every rank's rows (whatever ran for them)
    totals["rows_without_gradient"] = dist.all_reduce_sum(float(row_counts[0])) / max(
        dist.all_reduce_sum(float(row_counts[1])), 1.0
    )
    return {**loss_metrics, **totals}  # totals last: the global loss, not a micro-batch mean


def mini_batch_rows(batch: Batch, config: TrainConfig) -> list[torch.Tensor]:
    """The rows (indices into ``batch``) of each mini-batch of an update epoch, in order: this
    rank's questions, ``optim.mini_batch_questions`` split over the ranks at a time."""
    questions = torch.unique(batch.group)
    per_mini = max(1, math.ceil(config.optim.mini_batch_questions / dist.world_size()))
    return [
        torch.nonzero(torch.isin(batch.group, questions[start : start + per_mini])).flatten()
        for start in range(0, max(len(questions), 1), per_mini)
    ]


def rows_the_update_runs(batch: Batch, algorithm: Algorithm, config: TrainConfig) -> torch.Tensor:
    """The rows :func:`update` runs at all, in order: every row but those that add nothing to
    the loss or its gradient under ``optim.zero_gradient_rows: skip`` (:func:`split_still_rows`);
    ``batch.extras["advantages"]`` must be set. :func:`prepare`'s forward-only passes cover
    only these."""
    every = torch.arange(len(batch))
    if config.optim.zero_gradient_rows != "skip":
        return every
    without = rows_without_gradient(
        algorithm, batch.kinds, batch.extras["advantages"], batch.response_mask, batch.row_weights
    )
    kept = [
        torch.cat(split_still_rows(rows, without[rows], "skip")[:2])
        for rows in mini_batch_rows(batch, config)
    ]
    return torch.cat(kept).sort().values if kept else every[:0]


def split_still_rows(
    rows: torch.Tensor, without: torch.Tensor, mode: str
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``rows`` as (the rows to run forward and backward, those to run forward only, and how
    many add nothing to the loss or its gradient: ``without`` [len(rows)], from
    :func:`~hpt.estimator.unified.rows_without_gradient`).

    Those rows go by ``mode`` (``optim.zero_gradient_rows``): ``forward`` runs them forward only
    (for the metrics), ``backward`` forward and backward with the others, ``skip`` not at all.
    Where every row is one, the first still runs backward: the gradients are then zeros, not
    missing, and AdamW steps as it would with them (its momentum and weight decay).
    """
    learning, still = rows[~without], rows[without]
    count = len(still)
    if mode == "backward":
        return rows, rows[:0], count
    if learning.numel() == 0:
        learning, still = still[:1], still[1:]
    return learning, (still if mode == "forward" else still[:0]), count


def _loss(
    policy: torch.nn.Module,
    micro: Batch,
    share: int,
    algorithm: Algorithm,
    config: TrainConfig,
    counts: Any,
) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """One pass's :func:`unified_loss` output, entropy, and loss (the value loss added)."""
    logprobs, entropy, values = forward(policy, micro, share)
    # one update per batch: pi_old == pi_theta, so the ratio is sg(pi)/sg(pi) = 1
    old = micro.extras.get("old_logprobs")
    old = logprobs.detach() if old is None else old
    out = unified_loss(
        algorithm,
        logprobs,
        old,
        micro.extras["advantages"],
        micro.response_mask,
        kinds=micro.kinds,
        entropy=entropy,
        ref_logprobs=micro.extras.get("ref_logprobs"),
        row_weights=micro.row_weights,
        counts=counts,
    )
    loss = out.loss
    if values is not None:
        loss = loss + config.optim.value_coef * value_loss(values, micro, counts)
    return out, entropy, loss


def _add_metrics(
    sums: DeviceSums, out: Any, entropy: torch.Tensor, mask: torch.Tensor, passes: int
) -> None:
    """A pass's metrics into the update's running sums (their means over its ``passes``)."""
    sums.add(
        "totals",
        {
            "loss": out.stats["loss"],
            "entropy_sum": (entropy.detach() * mask).sum(),
            "entropy_tokens": mask.sum(dtype=torch.float64),
        },
    )
    sums.add("means", out.stats, divide_by=passes)  # the mini-batch's mean


def value_loss(values: torch.Tensor, micro: Batch, counts: Any) -> torch.Tensor:
    """PPO's clipped value loss, summed over rollout tokens, normalised by the mini-batch's count."""
    returns, old = micro.extras["returns"], micro.extras["old_values"]
    clipped = old + (values - old).clamp(-0.2, 0.2)
    per_token = 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    mask = micro.response_mask & (micro.kinds == KIND_ID["rollout"])[:, None]
    return (per_token * mask).sum() / max(counts.of(["rollout"])[0], 1.0)


class DeviceSums:
    """Named groups of running sums of scalar tensors, kept where they are computed and read in
    one copy.

    Reading a GPU tensor (``float(t)``) waits for every kernel queued before it: a metric read a
    pass would make each pass wait for the last. Each :meth:`add` stacks its scalars into one
    vector and adds it to its group's running sum, in float64 and divided as Python floats would
    be: the values equal those of summing ``float(value) / divide_by`` pass by pass.
    """

    def __init__(self) -> None:
        self._sums: dict[tuple[str, tuple[str, ...]], torch.Tensor] = {}  # (group, keys) -> sum

    def add(self, group: str, values: dict[str, torch.Tensor], divide_by: int = 1) -> None:
        """Add ``values / divide_by`` to ``group``'s sums."""
        if not values:
            return
        vector = torch.stack(list(values.values())).double()  # detached scalars
        if divide_by != 1:
            vector = vector / divide_by
        key = (group, tuple(values))
        self._sums[key] = vector if key not in self._sums else self._sums[key] + vector

    def read(self) -> dict[str, dict[str, float]]:
        """Each group's sums as floats, in one device-to-host copy."""
        if not self._sums:
            return {}
        values = iter(torch.cat(list(self._sums.values())).tolist())
        out: dict[str, dict[str, float]] = {}
        for group, keys in self._sums:
            sums = out.setdefault(group, {})
            for name in keys:
                sums[name] = sums.get(name, 0.0) + next(values)
        return out
