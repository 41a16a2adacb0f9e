"""``hpt train [CONFIG.yaml] [--set key=value [key=value ...]]... [--dry-run]``."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from hpt.algorithms import get_algorithm, table_row


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hpt train",
        description="Train a model. Without CONFIG: the embedded default (a tiny model, the bundled "
        "arithmetic task, Hybrid Post-Training), built and cached on first use.",
    )
    parser.add_argument(
        "config", nargs="?", help="YAML config (see configs/); omit for the embedded default"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override config keys: --set optim.lr=1e-6 rollout.n=16 (several pairs after one flag, "
        "or the flag repeated); put CONFIG before --set",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the config and print the plan (algorithm row, batch sizes, steps, data, model) "
        "without loading weights or data",
    )
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from hpt.demo.default import default_config, resolve
    from hpt.train.config import load_config

    # null model.path / data.train / eval.sets: the embedded demo's (built once and cached);
    # the CLI resolves them, so the library's train() never depends on the demo
    if args.config is None:
        config = default_config(args.overrides, prepare=not args.dry_run)
    else:
        config = resolve(load_config(args.config, args.overrides), prepare=not args.dry_run)
    if args.dry_run:
        print_plan(config)
        return 0
    from hpt.train.recipe import train

    summary = train(config)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 reports
        return 0
    before, after = summary.get("eval_before", {}), summary.get("eval_after", {})
    for name in after:
        if "/" not in name:
            print(
                f"held-out accuracy on {name}: {before.get(name, float('nan')):.3f} -> {after[name]:.3f}"
            )
    print(
        f"{summary['steps']} steps in {summary['seconds']:.0f} s; run folder: {summary['run_dir']}"
    )
    return 0


def plan(config: Any) -> dict[str, Any]:
    """What a config will do, computed without loading weights or data."""
    stages = []
    for stage in config.resolved_stages():
        algorithm = get_algorithm(stage.algorithm, **dict(stage.algo))
        rows = table_row(algorithm)
        rollouts = (
            stage.data.questions_per_step * stage.rollout.n if algorithm.needs_rollouts else 0
        )
        stages.append(
            {
                "algorithm": rows,
                "steps": stage.max_steps,
                "questions_per_step": stage.data.questions_per_step,
                "rollouts_per_question": stage.rollout.n if algorithm.needs_rollouts else 0,
                "rollouts_per_step": rollouts,
                "mini_batch_questions": stage.optim.mini_batch_questions,
                "optimizer_steps_per_step": stage.optim.ppo_epochs
                * -(-stage.data.questions_per_step // stage.optim.mini_batch_questions),
                "micro_batch_rows": stage.optim.micro_batch_size,
                "lr": stage.optim.lr,
                "schedule": stage.optim.schedule,
                "train_data": stage.data.train,
                "max_prompt_tokens": stage.data.max_prompt_tokens,
                "max_response_tokens": stage.data.max_response_tokens,
                "reward": stage.data.reward,
            }
        )
    model = config.model
    return {
        "name": config.name,
        "run_dir": f"{config.output_dir}/{config.name}",
        "model": {
            k: getattr(model, k)
            for k in ("path", "dtype", "rope_theta", "max_position_embeddings")
            if getattr(model, k, None) is not None
        },
        "stages": stages,
        "eval": {
            "sets": dict(config.eval.sets or {}),
            "k": config.eval.k,
            "every": config.eval.every,
        },
    }


def print_plan(config: Any) -> None:
    """Print :func:`plan` as readable text (and JSON-serialisable content)."""
    from rich.console import Console
    from rich.table import Table

    info = plan(config)
    console = Console()
    console.print(f"[bold]run[/bold] {info['name']} -> {info['run_dir']}")
    console.print(f"[bold]model[/bold] {json.dumps(info['model'])}")
    for index, stage in enumerate(info["stages"], 1):
        table = Table(title=f"stage {index}: {stage['algorithm']['name']}", show_header=False)
        for key, value in stage["algorithm"].items():
            table.add_row(f"algorithm.{key}", str(value))
        for key, value in stage.items():
            if key != "algorithm":
                table.add_row(key, str(value))
        console.print(table)
    console.print(f"[bold]eval[/bold] {json.dumps(info['eval'])}")
