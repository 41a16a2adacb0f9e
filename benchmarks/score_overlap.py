"""Scoring overlapped with generation against scoring after it: what a step waits for rewards.

The HF engine hands rollouts to ``on_finished`` as their rows stop (rows leave the batch in
groups); :class:`hpt.rewards.StreamingScorer` scores them in a background thread while the rest
decode. This script generates the same rollouts twice on the demo's tiny model (same seed), once
scoring after generation and once streaming, with a reward that waits ``--cost-ms`` per response
(a verifier that waits on a sandbox or a remote judge), and prints generation time, the wait for
scores after generation, and the total of each.

Responses stop early on the two tokens the model samples most (so that rows finish at different
times, as real responses do); ``--max-new-tokens`` caps the rest.

    .venv/bin/python benchmarks/score_overlap.py [--cost-ms 20] [--questions 16] [--n 8]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

COST_S = 0.02  # set from --cost-ms


def waiting_reward(responses: list[str], answers: list[str]) -> list[float]:
    """Score 1.0 when a response contains its answer, after waiting COST_S a response."""
    time.sleep(COST_S * len(responses))
    return [float(a in r) for r, a in zip(responses, answers)]


def main() -> None:
    global COST_S
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cost-ms", type=float, default=20.0, help="reward wait per response")
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    COST_S = args.cost_ms / 1000.0

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hpt.demo.tiny import build_tiny
    from hpt.rewards import StreamingScorer, register_reward, score
    from hpt.rollout import HFEngine, SamplingParams

    register_reward("bench_waiting")(waiting_reward)
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_tiny(Path(tmp) / "tiny", seed=0)
        model = AutoModelForCausalLM.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": f"What is {i} + {3 * i + 7}?"}],
            add_generation_prompt=True,
            tokenize=False,
        )
        for i in range(args.questions)
    ]
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    answers = [str(4 * i + 7) for i in range(args.questions) for _ in range(args.n)]
    sampling = SamplingParams(temperature=1.0, max_new_tokens=args.max_new_tokens, seed=0)
    probe = HFEngine(model, tokenizer, batch_size=len(prompts) * args.n).generate(
        prompts, args.n, sampling
    )
    counts = torch.bincount(torch.tensor([t for r in probe for t in r.response_ids[4:]]))
    stops = counts.topk(2).indices.tolist()
    engine = HFEngine(model, tokenizer, batch_size=len(prompts) * args.n, stop_token_ids=stops)
    engine.generate(prompts, args.n, sampling)  # warm-up

    rows = []
    for repeat in range(args.repeats):
        started = time.perf_counter()
        rollouts = engine.generate(prompts, args.n, sampling)
        generated = time.perf_counter()
        after = score([r.text for r in rollouts], answers, "bench_waiting", timeout=60.0)
        done = time.perf_counter()
        rows.append(("after", repeat, generated - started, done - generated, done - started))

        scorer = StreamingScorer(answers, "bench_waiting", timeout=60.0)
        started = time.perf_counter()
        streamed_rollouts = engine.generate(prompts, args.n, sampling, on_finished=scorer.submit)
        generated = time.perf_counter()
        streamed = scorer.result([r.text for r in streamed_rollouts])
        done = time.perf_counter()
        assert streamed_rollouts == rollouts and streamed.scores == after.scores
        rows.append(("overlapped", repeat, generated - started, done - generated, done - started))

    lengths = [len(r.response_ids) for r in rollouts]
    print(
        f"{len(rollouts)} rollouts, response length min {min(lengths)} / mean "
        f"{sum(lengths) / len(lengths):.1f} / max {max(lengths)}; reward {args.cost_ms:g} ms a "
        f"response ({COST_S * len(rollouts):.2f} s in all)"
    )
    print(f"{'scoring':<11} {'repeat':>6} {'generate s':>10} {'wait s':>8} {'total s':>8}")
    for mode, repeat, gen, wait, total in rows:
        print(f"{mode:<11} {repeat:>6} {gen:>10.3f} {wait:>8.3f} {total:>8.3f}")
    for mode in ("after", "overlapped"):
        totals = sorted(r[4] for r in rows if r[0] == mode)
        print(f"{mode}: median total {totals[len(totals) // 2]:.3f} s")


if __name__ == "__main__":
    main()
