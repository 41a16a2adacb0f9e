"""The training recipe, read top to bottom.

``train(config)``: open the run folder -> load data (before the slow model load, so a bad file
fails in a second) -> load the model -> evaluate -> for each stage: set up (algorithm, policy,
optimiser, engine) -> steps (collect, prepare, update; log, evaluate, checkpoint) -> evaluate ->
save. The step's three phases live in :mod:`hpt.train.step`; the run folder in
:mod:`hpt.train.run`. Every algorithm runs through this one loop: it reads the algorithm's data
and never its name.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from hpt.algorithms import get_algorithm
from hpt.estimator.unified import KIND_ID
from hpt.train import distributed as dist
from hpt.train.batch import collate
from hpt.train.config import TrainConfig
from hpt.train.heldout import HeldOut
from hpt.train.policy import Policy, autocast_dtype
from hpt.train.run import Run
from hpt.train.setup import (
    QuestionSampler,
    TrainData,
    apply_lora,
    build_optimizer,
    build_scheduler,
    is_lora,
    load_model_and_tokenizer,
    load_tokenizer,
    load_train_data,
    rounded_away_fraction,
)
from hpt.train.step import (
    check_shared_prompts,
    collect_rows,
    old_logprobs_from_engine,
    prepare,
    throughput,
    update,
)


class Callback:
    """Hooks into the loop (as TRL's ``TrainerCallback``); override the ones you need.

    ``model`` is the Hugging Face model being trained (in training mode when a hook returns).
    """

    def on_stage_begin(self, stage: int, model: Any, tokenizer: Any) -> None:
        """Before the first step of stage ``stage`` (0-based)."""

    def on_step_end(self, step: int, metrics: dict[str, Any], model: Any, tokenizer: Any) -> None:
        """After step ``step`` (1-based, across stages) was logged."""


def train(config: TrainConfig, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Run ``config`` (all its stages) and return the run's summary.

    ``config.model.path`` and ``config.data.train`` must be set (the CLI fills the embedded
    demo's; see :func:`hpt.demo.default.resolve`).
    """
    dist.init_from_env()
    try:
        for stage in config.resolved_stages():
            dist.check_world(stage)  # before anything is loaded or written
        return _train(config, list(callbacks))
    finally:
        dist.shutdown()


def _train(config: TrainConfig, callbacks: list[Callback]) -> dict[str, Any]:
    started = time.time()
    stages = config.resolved_stages()
    with Run(config, total_steps=sum(stage.max_steps for stage in stages)) as run:
        tokenizer = load_tokenizer(config.model)
        data = load_train_data(stages[0], tokenizer, _algorithm(stages[0]), log=run.log)
        heldout = HeldOut(stages[0])
        model, tokenizer = load_model_and_tokenizer(config.model, tokenizer)
        model = apply_lora(model, config.lora)  # r = 0: the model itself
        for stage in stages:
            check_shared_prompts(stage, model)  # before anything is evaluated or trained

        before = run.eval_before()
        if before is None:
            before = heldout.evaluate(model, tokenizer, log=run.log)
            run.save_eval_before(before)

        offset, history = 0, []
        for index, stage in enumerate(stages):
            if run.resume is not None and index < run.resume.stage:
                offset += stage.max_steps  # done before the interruption: weights come later
                continue
            if index > 0:
                data = load_train_data(stage, tokenizer, _algorithm(stage), log=run.log)
            model, metrics = train_stage(
                stage, index, offset, model, tokenizer, data, run, heldout, callbacks
            )
            history += metrics
            offset += stage.max_steps

        after = heldout.evaluate(model, tokenizer, final=True, log=run.log)
        run.save_final(model, tokenizer)
        return run.finish(
            {
                "name": config.name,
                "stages": [{"algorithm": s.algorithm, "steps": s.max_steps} for s in stages],
                "eval_before": before,
                "eval_after": after,
                "steps": offset,
                "seconds": round(time.time() - started, 2),
                "totals": _totals(history),
            }
        )


def train_stage(
    config: TrainConfig,
    index: int,
    offset: int,
    model: Any,
    tokenizer: Any,
    data: TrainData,
    run: Run,
    heldout: HeldOut,
    callbacks: list[Callback] = (),  # type: ignore[assignment]
) -> tuple[Any, list[dict[str, Any]]]:
    """One stage: ``config.max_steps`` steps of its algorithm on ``model``.

    ``offset`` is the global step at which the stage starts. Returns the trained model (``model``
    itself, or under FSDP2 its gathered copy) and the stage's step metrics.
    """
    from hpt.rollout import make_engine

    # -- setup
    torch.manual_seed(config.seed)
    algorithm = _algorithm(config)
    temperature = config.rollout.temperature  # train on the distribution the rollouts came from
    autocast = autocast_dtype(config.optim.autocast, model, config.distributed.strategy)
    policy = Policy(
        model,
        value_head=algorithm.needs_values,
        chunk_size=config.optim.logits_chunk_size,
        temperature=temperature,
        compile=config.optim.compile,
        autocast=autocast,
    )
    reference = None
    if algorithm.needs_reference_model and is_lora(model):  # no second copy: adapters off
        reference = Policy(
            model,
            chunk_size=config.optim.logits_chunk_size,
            temperature=temperature,
            adapter_disabled=True,
            autocast=autocast,
        )
    elif algorithm.needs_reference_model:
        ref_model, _ = load_model_and_tokenizer(config.model, tokenizer)
        reference = Policy(
            ref_model.eval().requires_grad_(False),
            chunk_size=config.optim.logits_chunk_size,
            temperature=temperature,
            autocast=autocast,
        )
    # ddp: a wrapper to train through; fsdp2: shards `policy` in place (before the optimiser)
    wrapped = dist.wrap(policy, config.distributed.strategy, config.distributed.mixed_precision)
    optimizer = build_optimizer(policy, config.optim)
    rounded = rounded_away_fraction(policy, config.optim.lr)
    if rounded is not None and rounded[1] > 0.5:
        run.log(
            f"warning: the optimiser updates {str(rounded[0])[6:]} weights: a step of lr "
            f"{config.optim.lr:g} is under half the rounding step of {rounded[1]:.0%} of them, "
            "which then never change; model.dtype=float32 keeps float32 weights, computing in "
            "bf16 through optim.autocast (ddp) or distributed.mixed_precision (fsdp2)"
        )
    scheduler = build_scheduler(optimizer, config.optim, config.max_steps)
    sampler = QuestionSampler(
        len(data.questions), config.seed, rank=dist.rank(), world=dist.world_size()
    )
    engine = make_engine(
        config.rollout.engine,
        model,
        tokenizer,
        batch_size=config.rollout.batch_size,
        compile=config.rollout.compile,
        fused=config.rollout.fused,
        cuda_graphs=config.rollout.cuda_graphs,
        pack_weights=config.rollout.pack_weights,
        dtype=config.rollout.dtype,
        model_path=config.model.path,
        max_model_len=config.data.max_prompt_tokens + config.rollout.max_new_tokens,
    )
    unused = getattr(engine, "cuda_graphs_unused", lambda: None)()
    if unused is not None:
        run.log(f"warning: rollout.cuda_graphs is on but no CUDA graph is used: {unused}")
    start = run.restore(index, policy, optimizer, scheduler, sampler)
    multiple_updates = config.optim.ppo_epochs > 1 or (
        config.data.questions_per_step > config.optim.mini_batch_questions
    )
    need_old = algorithm.needs_old_logprobs and multiple_updates
    old_from_engine = need_old and old_logprobs_from_engine(config, engine, algorithm, autocast)
    run.log(
        f"stage {index + 1}: {algorithm.name} on {len(data.questions)} questions "
        f"({data.report.get('with_demonstration', 0)} with demonstrations), "
        f"steps {offset + start + 1}..{offset + config.max_steps}"
    )
    for callback in callbacks:
        callback.on_stage_begin(index, model, tokenizer)

    # -- steps
    history = []
    for local_step in range(start + 1, config.max_steps + 1):
        step = offset + local_step
        started = time.perf_counter()
        model.train()
        questions = sampler.next(config.data.questions_per_step)
        seed = config.seed * 1_000_003 + (local_step - 1) * 1009 + dist.rank()
        with dist.gathered(policy):  # generation needs whole layers (FSDP2; else a no-op)
            collected = collect_rows(questions, data, algorithm, engine, config, seed)
        if not collected.rows:
            run.log(f"step {step}: no trainable rows (no demonstrations and no rollouts); skipped")
            scheduler.step()
            continue
        batch = collate(collected.rows, data.pad_id, KIND_ID)
        clock = time.perf_counter()
        prepared = prepare(batch, policy, reference, algorithm, config, need_old, old_from_engine)
        prepared["time/prepare"] = time.perf_counter() - clock
        clock = time.perf_counter()
        metrics = update(batch, wrapped, optimizer, algorithm, config, need_old)
        metrics["time/update"] = time.perf_counter() - clock
        metrics.update(prepared)
        metrics["lr"] = scheduler.get_last_lr()[0]
        scheduler.step()
        seconds = time.perf_counter() - started
        metrics.update(collected.metrics)
        metrics.setdefault("reward_mean", float("nan"))
        metrics.update(throughput(model, batch, collected, config, seconds, autocast))
        metrics["time/step"] = seconds

        # -- log, evaluate, checkpoint
        metrics = {"step": step, "stage": index, **metrics}
        if config.eval.every and step % config.eval.every == 0 and local_step < config.max_steps:
            with dist.gathered(policy):
                metrics.update(
                    heldout.evaluate(model, tokenizer, quick=True, prefix="eval/", log=run.log)
                )
        run.log_step(step, metrics)
        history.append(metrics)
        last = local_step == config.max_steps
        if config.save_every and (step % config.save_every == 0 or last):
            run.save_checkpoint(
                step, index, local_step, policy, optimizer, scheduler, sampler, tokenizer
            )
        for callback in callbacks:
            callback.on_step_end(step, metrics, model, tokenizer)
    if dist.is_sharded(policy):
        model = dist.full_model(policy)  # the next stage, the evaluation and final/ need it whole
    return model, history


def _algorithm(config: TrainConfig) -> Any:
    return get_algorithm(config.algorithm, **dict(config.algo))


def _totals(history: list[dict[str, Any]]) -> dict[str, float]:
    keys = ("tokens/generated", "tokens/demonstration", "skipped_updates", "updates")
    return {k: float(sum(m.get(k, 0.0) for m in history)) for k in keys}
