"""End-to-end tests of the training recipe on the tiny model (a few steps each)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hpt.cli import main as cli
from hpt.train.config import load_config
from hpt.train.logger import STEP_KEYS
from hpt.train.recipe import train
from run_settings import settings

PROMISED = (
    "step",
    "loss",
    "reward_mean",
    "route_sft",
    "route_rl",
    "entropy",
    "grad_norm",
    "lr",
    "tokens_per_s",
)


def overrides(tmp_path: Path, tiny_dir: Path, task_file: Path, **extra) -> list[str]:
    return settings(tmp_path / "runs", tiny_dir, task_file, **extra)


def run(tmp_path, tiny_dir, task_file, **extra):
    config = load_config(None, overrides(tmp_path, tiny_dir, task_file, **extra))
    summary = train(config)
    lines = [
        json.loads(line) for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    return config, summary, lines


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "model.safetensors"))


@pytest.mark.parametrize(
    "algorithm, extra",
    [
        ("sft", {}),
        ("grpo", {}),
        ("luffy", {"rollout.n": 3}),
        ("hpt", {}),
        ("ppo", {}),
        ("grpo", {"algo": "{kl_coef: 0.05}", "optim.mini_batch_questions": 2}),
        ("ppo", {"algo": "{kl_coef: 0.05}", "optim.autocast": "bfloat16"}),
    ],
    ids=["sft", "grpo", "luffy", "hpt", "ppo-critic", "grpo-kl-minibatches", "ppo-kl-bf16"],
)
def test_each_family_trains(tmp_path, tiny_dir, task_file, algorithm, extra):
    extra = {
        "data.reward": "reward_fixtures:parity",
        **extra,
    }  # varied rewards: non-zero advantages
    config, summary, lines = run(tmp_path, tiny_dir, task_file, algorithm=algorithm, **extra)
    assert [line["step"] for line in lines] == [1, 2]
    for line in lines:
        for key in PROMISED:
            assert key in line, key
        assert math.isfinite(line["loss"])
        assert line["grad_norm"] > 0
    assert set(PROMISED) <= set(STEP_KEYS) | {"step"}
    before = load_file(str(Path(tiny_dir) / "model.safetensors"))
    after = final_weights(config.run_dir)
    changed = sum(not torch.equal(before[name], after[name]) for name in before if name in after)
    assert changed > 0
    assert {"eval_before", "eval_after", "steps", "seconds"} <= set(
        json.loads((config.run_dir / "summary.json").read_text())
    )
    assert summary["steps"] == 2


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_training_logprobs_use_the_rollout_temperature(tmp_path, tiny_dir, task_file, temperature):
    """pi_old (recomputed by the trainer) equals the engine's sampling log-probs at T = 0.7 and 1."""
    _, _, lines = run(
        tmp_path,
        tiny_dir,
        task_file,
        algorithm="grpo",
        max_steps=1,
        **{
            "rollout.temperature": temperature,
            "optim.mini_batch_questions": 2,
            "rollout.old_logprobs": "recompute",
        },
    )
    assert lines[0]["rollout/logprob_gap"] < 1e-4


def test_hpt_never_solved_routes_everything_to_sft(tmp_path, tiny_dir, task_file):
    _, _, lines = run(
        tmp_path,
        tiny_dir,
        task_file,
        algorithm="hpt",
        **{"data.reward": "reward_fixtures:always_zero"},
    )
    for line in lines:
        assert line["route_sft"] == 1.0 and line["route_rl"] == 0.0
        assert line["tokens_rollout"] == 0 and line["tokens_sft"] > 0


def test_hpt_always_solved_routes_everything_to_rl(tmp_path, tiny_dir, task_file):
    _, _, lines = run(
        tmp_path,
        tiny_dir,
        task_file,
        algorithm="hpt",
        **{"data.reward": "reward_fixtures:always_one"},
    )
    for line in lines:
        assert line["route_rl"] == 1.0 and line["route_sft"] == 0.0
        assert line["tokens_sft"] == 0 and line["tokens_rollout"] > 0
        assert line["reward_mean"] == 1.0


def test_resume_is_bit_identical(tmp_path, tiny_dir, task_file):
    straight, _, _ = run(
        tmp_path / "a", tiny_dir, task_file, algorithm="hpt", max_steps=4, save_every=2
    )
    first, _, _ = run(
        tmp_path / "b", tiny_dir, task_file, algorithm="hpt", max_steps=2, save_every=2
    )
    resumed, _, lines = run(
        tmp_path / "b", tiny_dir, task_file, algorithm="hpt", max_steps=4, save_every=2, resume=True
    )
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    a, b = final_weights(straight.run_dir), final_weights(resumed.run_dir)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_two_stage_sft_then_grpo(tmp_path, tiny_dir, task_file):
    config_file = tmp_path / "two.yaml"
    config_file.write_text(
        "stages:\n  - {algorithm: sft, max_steps: 1}\n  - {algorithm: grpo, max_steps: 2}\n"
    )
    config = load_config(config_file, overrides(tmp_path, tiny_dir, task_file))
    summary = train(config)
    lines = [json.loads(x) for x in (config.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3]
    assert [line["stage"] for line in lines] == [0, 1, 1]
    assert lines[0]["route_sft"] == 1.0 and lines[1]["route_rl"] == 1.0
    assert [stage["algorithm"] for stage in summary["stages"]] == ["sft", "grpo"]


def test_reward_that_raises_scores_zero_and_is_counted(tmp_path, tiny_dir, task_file):
    _, _, lines = run(
        tmp_path,
        tiny_dir,
        task_file,
        algorithm="grpo",
        max_steps=1,
        **{"data.reward": "reward_fixtures:raises"},
    )
    assert lines[0]["reward_errors"] == 16 and lines[0]["reward_mean"] == 0.0


def test_reward_that_hangs_times_out_and_is_counted(tmp_path, tiny_dir, task_file):
    _, _, lines = run(
        tmp_path,
        tiny_dir,
        task_file,
        algorithm="grpo",
        max_steps=1,
        **{"data.reward": "reward_fixtures:hangs", "data.reward_timeout": 0.5},
    )
    assert lines[0]["reward_timeouts"] > 0 and lines[0]["reward_mean"] == 0.0


def _cli_train(tmp_path, tiny_dir, data_file, *extra) -> int:
    args = ["train"]
    for item in overrides(tmp_path, tiny_dir, data_file, max_steps=1):
        args += ["--set", item]
    for item in extra:
        args += ["--set", item]
    return cli(args)


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"prompt": "1+1?", "answer": "2"}\n{"prompt": "broken\n', "line 2"),
        ('{"prompt": "1+1?"}\n', "answer"),
        ("", "empty"),
    ],
    ids=["malformed-json", "missing-field", "empty-file"],
)
def test_bad_data_exits_2_with_one_line(tmp_path, tiny_dir, capsys, content, message):
    data = tmp_path / "bad.jsonl"
    data.write_text(content)
    assert _cli_train(tmp_path, tiny_dir, data) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    assert message in err[0] and "bad.jsonl" in err[0]


@pytest.mark.parametrize(
    "setting, message",
    [
        ("algorithm=nonsense", "unknown algorithm"),
        ("optim.lrr=1", "optim.lrr"),
        ("algo={clip_lo: 1}", "clip_lo"),
    ],
)
def test_bad_config_exits_2_with_one_line(tmp_path, tiny_dir, task_file, capsys, setting, message):
    assert _cli_train(tmp_path, tiny_dir, task_file, setting) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_missing_model_exits_2(tmp_path, tiny_dir, task_file, capsys):
    assert _cli_train(tmp_path, tiny_dir, task_file, f"model.path={tmp_path / 'nope'}") == 2
    assert "not found" in capsys.readouterr().err


def test_existing_run_is_not_overwritten_unless_asked(tmp_path, tiny_dir, task_file, capsys):
    assert _cli_train(tmp_path, tiny_dir, task_file, "save_every=1") == 0
    run_dir = tmp_path / "runs" / "t"
    metrics = (run_dir / "metrics.jsonl").read_text()
    # (the embedded default sets overwrite=true; a user's config does not)
    assert _cli_train(tmp_path, tiny_dir, task_file, "overwrite=false") == 2
    assert "resume=true" in capsys.readouterr().err
    assert (run_dir / "metrics.jsonl").read_text() == metrics
    (run_dir / "notes.txt").write_text("mine")
    assert _cli_train(tmp_path, tiny_dir, task_file, "overwrite=true") == 0
    assert not (run_dir / "checkpoints").exists()  # no stale checkpoint a later resume could pick
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 1
    assert (run_dir / "notes.txt").read_text() == "mine"  # only the run's own outputs are replaced


@pytest.mark.parametrize(
    "config",
    sorted(Path(__file__).parents[1].joinpath("configs").glob("*.yaml")),
    ids=lambda p: p.stem,
)
def test_paper_recipes_dry_run(config, capsys):
    assert cli(["train", str(config), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "stage 1" in out and "max_response_tokens" in out


def test_set_takes_several_pairs_after_one_flag(capsys):
    config = str(Path(__file__).parents[1] / "configs" / "grpo.yaml")
    argv = [
        "train",
        config,
        "--dry-run",
        "--set",
        "optim.lr=3e-6",
        "rollout.n=5",
        "--set",
        "seed=7",
    ]
    assert cli(argv) == 0
    out = capsys.readouterr().out
    assert "3e-06" in out and "rollouts_per_question    │ 5 " in out
    from hpt.train.config import load_config

    resolved = load_config(config, ["optim.lr=3e-6", "rollout.n=5", "seed=7"])
    assert (resolved.optim.lr, resolved.rollout.n, resolved.seed) == (3e-6, 5, 7)
    # a CONFIG after --set is not taken for an override silently
    assert cli(["train", "--dry-run", "--set", "seed=1", config]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "key=value" in err[0] and "grpo.yaml" in err[0]


def test_ddp_two_processes_match_one(tmp_path, tiny_dir, task_file):
    """torchrun with 2 gloo processes (DDP) for 2 steps gives the losses of one process."""
    import os
    import subprocess
    import sys

    settings = overrides(
        tmp_path, tiny_dir, task_file, algorithm="sft", **{"data.questions_per_step": 4}
    )
    single, _, single_lines = run(tmp_path / "one", tiny_dir, task_file, algorithm="sft")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        "-m",
        "hpt.cli",
        "train",
    ]
    for item in settings:
        command += ["--set", item]
    command += ["--set", f"output_dir={tmp_path / 'two'}"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HPT_PROGRESS": "0"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [
        json.loads(x) for x in (tmp_path / "two" / "t" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [line["step"] for line in lines] == [1, 2]
    for one, two in zip(single_lines, lines):
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-4)
    a, b = final_weights(single.run_dir), final_weights(tmp_path / "two" / "t")
    assert a.keys() == b.keys()
    for name in a:
        if name.endswith("k_proj.bias"):
            # its gradient is exactly zero (a key bias adds the same q.b to all of a query's
            # scores, which softmax ignores): Adam steps it by rounding noise alone, on both sides
            continue
        # per tensor ||a - b|| / ||a||: an element whose gradient is about zero gets Adam steps of
        # rounding noise (the packed micro-batches of one and two processes sum in other orders)
        difference = (a[name] - b[name]).norm() / a[name].norm().clamp_min(1e-6)
        assert difference <= 1e-4, f"{name}: relative difference {difference:.2e}"


@pytest.mark.slow
def test_smollm2_trains_two_hpt_steps(tmp_path, task_file):
    """The real-model path: 49k vocabulary, a real chat template, pretrained weights."""
    from transformers import AutoModelForCausalLM

    from hpt.demo.tiny import load_smollm2

    model, tokenizer = load_smollm2()
    folder = tmp_path / "smollm2"
    # save as a plain safetensors folder: a model built from the config, with the GGUF's weights
    import copy

    plain_config = copy.deepcopy(model.config)
    if hasattr(plain_config, "quantization_config"):  # dequantised already: save plain weights
        del plain_config.quantization_config
    plain = AutoModelForCausalLM.from_config(plain_config)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert tokenizer.chat_template and len(tokenizer) > 40000
    config, summary, lines = run(
        tmp_path,
        folder,
        task_file,
        algorithm="hpt",
        max_steps=2,
        **{
            "rollout.max_new_tokens": 24,
            "optim.lr": 1e-5,
            "optim.micro_batch_size": 4,
            "data.max_response_tokens": 64,
        },
    )
    assert [line["step"] for line in lines] == [1, 2]
    assert all(math.isfinite(line["loss"]) for line in lines)
    assert all(line["route_sft"] + line["route_rl"] == 1.0 for line in lines)
    after = final_weights(config.run_dir)
    before = plain.state_dict()
    assert any(not torch.equal(before[name], after[name]) for name in after if name in before)


def test_configs_demo_yaml_is_the_embedded_default():
    """configs/demo.yaml (for users to copy) says exactly what `hpt train` with no config runs."""
    from hpt.demo.default import default_config
    from hpt.train.config import config_to_dict

    from_file = load_config(Path(__file__).parents[1] / "configs" / "demo.yaml")
    embedded = default_config(prepare=False)
    a, b = config_to_dict(from_file), config_to_dict(embedded)
    # the demo fills the model path, the training file and the eval sets with its cached ones
    for config in (a, b):
        config["model"].pop("path"), config["data"].pop("train"), config["eval"].pop("sets")
    assert a == b


def test_the_library_train_does_not_import_the_demo():
    """No import circle: train() needs resolved paths; only the CLI fills the demo's."""
    import subprocess
    import sys

    code = (
        "import sys, hpt.train.recipe, hpt.train.step; print('hpt.demo' in ' '.join(sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_callbacks_see_every_step(tmp_path, tiny_dir, task_file):
    from hpt.train.recipe import Callback

    seen: list[tuple[str, int]] = []

    class Record(Callback):
        def on_stage_begin(self, stage, model, tokenizer):
            seen.append(("stage", stage))

        def on_step_end(self, step, metrics, model, tokenizer):
            assert metrics["step"] == step and model.training
            seen.append(("step", step))

    overrides = [
        f"output_dir={tmp_path}", f"model.path={tiny_dir}", f"data.train={task_file}",
        "algorithm=sft", "max_steps=1", "save_every=0", "data.questions_per_step=2",
        "logging.plots=false", "stages=[{algorithm: sft, max_steps: 1}, {algorithm: grpo, max_steps: 2}]",
        "rollout.n=2", "data.max_response_tokens=8", "data.overlong_demonstrations=truncate",
    ]  # fmt: skip
    train(load_config(None, overrides), callbacks=[Record()])
    assert seen == [("stage", 0), ("step", 1), ("stage", 1), ("step", 2), ("step", 3)]


def test_each_step_logs_its_stage_times_and_throughput(tmp_path, tiny, tiny_dir, task_file):
    model, _ = tiny
    _, _, lines = run(tmp_path, tiny_dir, task_file, algorithm="grpo")
    for line in lines:
        stages = [line[k] for k in ("time/generate", "time/score", "time/prepare", "time/update")]
        assert all(t >= 0 for t in stages) and sum(stages) <= line["time/step"]
        assert 0 <= line["perf/score_overlapped_s"] <= line["time/generate"] + line["time/score"]
        # one process: the step's tokens / its time, the generated ones included
        assert line["perf/tokens_per_s"] == pytest.approx(line["tokens_per_s"], rel=1e-9)
        assert line["perf/tokens_per_s"] > line["tokens/generated"] / line["time/step"] > 0
        # FLOPs at least those of generating the step's tokens: 2 x matmul weights x tokens
        weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
        assert line["perf/flops"] > 2 * weights * line["tokens/generated"]
        assert 0 < line["perf/mfu"] <= 1


def test_half_precision_weights_that_adamw_rounds_away_are_counted(
    tmp_path, tiny_dir, task_file, capsys
):
    """The warning's count: weights an AdamW step of lr cannot change, against a real step."""
    from hpt.train.setup import rounded_away_fraction

    torch.manual_seed(0)
    layer = torch.nn.Linear(500, 400).bfloat16()
    torch.nn.init.normal_(layer.weight, std=0.02)
    dtype, predicted = rounded_away_fraction(layer, 5e-6)
    before = layer.weight.detach().clone()
    optimizer = torch.optim.AdamW(layer.parameters(), lr=5e-6, weight_decay=0.0)
    for p in layer.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    unchanged = float((layer.weight.detach() == before).float().mean())
    assert dtype == torch.bfloat16
    assert 0.85 < predicted <= unchanged < predicted + 0.1  # a sufficient condition: a lower bound
    assert rounded_away_fraction(layer.float(), 5e-6) is None
    # a run on bf16 weights says so in one line
    small_lr = {"model.dtype": "bfloat16", "optim.lr": 5e-6}
    run(tmp_path / "bf16", tiny_dir, task_file, algorithm="sft", **small_lr)
    assert "warning: the optimiser updates bfloat16 weights" in capsys.readouterr().err
    run(tmp_path / "fp32", tiny_dir, task_file, algorithm="sft", **{"optim.lr": 5e-6})
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("graphs", [False, True])
def test_rollout_cuda_graphs_reaches_the_engine(
    tmp_path, tiny_dir, task_file, monkeypatch, capsys, graphs
):
    """rollout.cuda_graphs (opt-in) gives the hf engine its graphed step (used on CUDA only);
    on a CPU the run says, once, that the key changes nothing there. rollout.pack_weights (here
    off where graphs are on) reaches the fused step."""
    import hpt.rollout
    from hpt.rollout.fused import mkl_packing

    engines = []
    make_engine = hpt.rollout.make_engine

    def recorded(*args, **kwargs):
        engines.append(make_engine(*args, **kwargs))
        return engines[-1]

    monkeypatch.setattr(hpt.rollout, "make_engine", recorded)
    extra = {
        "rollout.cuda_graphs": str(graphs).lower(),
        "rollout.pack_weights": str(not graphs).lower(),
        "max_steps": 1,
    }
    run(tmp_path, tiny_dir, task_file, algorithm="grpo", **extra)
    assert (engines[0].decoder.graphed is not None) == graphs
    assert engines[0].decoder.fused.pack == (not graphs and mkl_packing())
    warned = "warning: rollout.cuda_graphs is on but no CUDA graph is used: the model is on cpu"
    assert capsys.readouterr().err.count(warned) == int(graphs)
