"""``hpt eval``: evaluate a model on benchmarks (avg@k, pass@k, maj@k) and write the results."""

from __future__ import annotations

import argparse
from pathlib import Path

from hpt.errors import ConfigError
from hpt.eval.benchmarks import BENCHMARKS, ENV_BENCHMARK_DIR

__all__ = ["main", "parse_fields"]


def parse_fields(pairs: list[str] | None) -> dict[str, str] | None:
    """``["prompt=question", "answer=meta.final"]`` -> ``{"prompt": "question", ...}``.

    Raises:
        ConfigError: an item without ``=``.
    """
    if not pairs:
        return None
    fields = {}
    for pair in pairs:
        ours, sep, theirs = pair.partition("=")
        if not sep or not ours.strip() or not theirs.strip():
            raise ConfigError(f"--field {pair!r}: expected OURS=PATH, e.g. --field prompt=question")
        fields[ours.strip()] = theirs.strip()
    return fields


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hpt eval",
        description="Evaluate a model on benchmarks: k samples a question, avg@k, pass@k, maj@k.",
    )
    add = parser.add_argument
    add("--model", required=True, help="local HF folder, .gguf file, or hub id")
    add(
        "--benchmarks",
        nargs="+",
        required=True,
        metavar="B",
        help=f"names ({', '.join(BENCHMARKS)}), data files, or a folder of benchmark folders",
    )
    add(
        "--benchmark-dir",
        type=Path,
        help=f"where named benchmarks live (default ${ENV_BENCHMARK_DIR})",
    )
    add("--output", "-o", type=Path, help="output folder (default eval/<model name>)")
    add("--name", help="the run's row name in tables (default: the model's name)")
    add("--k", type=int, default=1, help="samples a question (default 1)")
    add(
        "--temperature",
        type=float,
        default=0.6,
        help="sampling temperature (default 0.6; 0: greedy)",
    )
    add("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    add("--max-new-tokens", type=int, default=1024, help="response token limit (default 1024)")
    add("--seed", type=int, default=0, help="sampling seed (default 0)")
    add("--limit", type=int, help="only the first N questions of each benchmark")
    add(
        "--field",
        action="append",
        metavar="OURS=PATH",
        help="field mapping for custom files, e.g. --field prompt=question --field answer=final",
    )
    add("--reward", help="reward of custom files: math (default), choice or module:function")
    add(
        "--template",
        help="plain prompt instead of the chat template: llama, or a string with {question}",
    )
    add("--system-prompt", help="system turn replacing the rows' own")
    add(
        "--drop-system", action="store_true", help="drop the rows' system turns (ARC-c carries one)"
    )
    add("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    add("--gguf-file", help="GGUF file name inside the --model folder")
    add("--device", help="cuda, cpu, ... (default cuda when available)")
    add("--batch-size", type=int, default=64, help="sequences a generate call (default 64)")
    add("--timeout", type=float, default=5.0, help="verifier timeout a sample, seconds (default 5)")
    add("--overwrite", action="store_true", help="discard samples of an earlier run in --output")
    add("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str]) -> int:
    """Run ``hpt eval``; user errors raise ``hpt.errors`` (the dispatcher prints one line, exit 2)."""
    args = _parser().parse_args(argv)
    for flag, value in (
        ("--k", args.k),
        ("--max-new-tokens", args.max_new_tokens),
        ("--batch-size", args.batch_size),
        ("--limit", args.limit or 1),
    ):
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    from hpt.eval.evaluate import evaluate
    from hpt.eval.models import model_label
    from hpt.rollout import SamplingParams

    sampling = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
    )
    output = args.output or Path("eval") / (args.name or model_label(args.model, args.gguf_file))
    evaluate(
        args.model,
        args.benchmarks,
        k=args.k,
        sampling=sampling,
        output_dir=output,
        limit=args.limit,
        benchmark_dir=args.benchmark_dir,
        reward=args.reward,
        fields=parse_fields(args.field),
        template=args.template,
        system_prompt=args.system_prompt,
        drop_system=args.drop_system,
        dtype=args.dtype,
        gguf_file=args.gguf_file,
        device=args.device,
        batch_size=args.batch_size,
        name=args.name,
        timeout=args.timeout,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    print(f"wrote {output}/results.json, results.md, samples.jsonl, pass_at_k.png")
    return 0
