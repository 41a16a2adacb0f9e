"""Scale-out on CPU: FSDP2 (``fully_shard``) under ``torchrun`` with 2 gloo processes.

Two processes must end with the weights of one (SFT: the same rows, split over ranks), FSDP2 must
match DDP on an RL run whose ranks hold different numbers of rows (HPT: a question routed to SFT
adds 1 row, one routed to RL adds n), and a resumed sharded run must end bit for bit where the
uninterrupted one ended.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hpt.cli import main as cli
from run_settings import settings as run_settings


def settings(out: Path, tiny_dir: Path, task_file: Path, **extra: object) -> list[str]:
    return run_settings(out, tiny_dir, task_file, **{"optim.micro_batch_size": 3, **extra})


def torchrun(overrides: list[str], processes: int = 2) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += [f"--nproc_per_node={processes}", "-m", "hpt.cli", "train", "--set", *overrides]
    tests = str(Path(__file__).parent)  # distributed_rewards imports by path in every rank
    path = os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HPT_PROGRESS": "0", "PYTHONPATH": path}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "model.safetensors"))


def assert_same_weights(a: dict, b: dict, rtol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if name.endswith("k_proj.bias"):
            # its gradient is exactly zero (a key bias adds the same q.b to all of a query's
            # scores, which softmax ignores): Adam steps it by rounding noise alone, which differs
            # between implementations (fused AdamW under DDP, the default one for FSDP2's shards)
            continue
        # ||a - b|| / ||a|| per tensor: elements with a gradient of about zero get Adam steps of
        # rounding noise, so an element-wise bound would test the noise
        difference = (a[name] - b[name]).norm() / a[name].norm().clamp_min(1e-6)
        assert difference <= rtol, f"{name}: relative difference {difference:.2e}"


def torchrun_variants(
    tmp_path: Path, tiny_dir: Path, task_file: Path, algorithm: str, variants: dict[str, list[str]]
) -> dict[str, Path]:
    """One 2-process run of ``algorithm`` per variant (its extra overrides), rewards split by
    answer; returns each variant's run folder."""
    runs = {}
    for name, extra in variants.items():
        out = tmp_path / name
        result = torchrun(
            settings(out, tiny_dir, task_file, algorithm=algorithm)
            + ["data.reward=distributed_rewards:by_answer", *extra]
        )
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = out / "t"
    return runs


def test_fsdp2_two_processes_end_with_the_weights_of_one(tmp_path, tiny_dir, task_file):
    args = settings(tmp_path / "one", tiny_dir, task_file, algorithm="sft")
    assert cli(["train", "--set", *args]) == 0
    result = torchrun(
        settings(tmp_path / "two", tiny_dir, task_file, algorithm="sft")
        + ["distributed.strategy=fsdp2"]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = metrics(tmp_path / "one" / "t"), metrics(tmp_path / "two" / "t")
    assert [m["step"] for m in two] == [1, 2]
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    # the final folder is one ordinary safetensors model, loadable in one process
    assert_same_weights(weights(tmp_path / "one" / "t"), weights(tmp_path / "two" / "t"), 1e-4)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "t" / "final")


def test_fsdp2_matches_ddp_on_hpt_with_uneven_ranks(tmp_path, tiny_dir, task_file):
    # the same passes on ddp and fsdp2 (prompts unshared): only the sharding differs; and fsdp2
    # with shared prompts (one decoder call a pass, so each layer's forward runs once). Two
    # updates a step: ddp takes pi_old from the engine, fsdp2 recomputes it over rollout rows
    # only, in passes the ranks keep step in (in these 4 steps each rank once holds two
    # demonstrations alone, no row for that pass, while the other has rollouts)
    strategies = {"ddp": "false", "fsdp2": "false", "fsdp2-shared": "true"}
    runs = torchrun_variants(
        tmp_path,
        tiny_dir,
        task_file,
        "hpt",
        {
            name: [
                f"distributed.strategy={name.split('-')[0]}",
                f"optim.share_prompts={share}",
                "optim.mini_batch_questions=2",
                "max_steps=4",
            ]
            for name, share in strategies.items()
        },
    )
    ddp = metrics(runs["ddp"])
    # a step routed questions both ways: 1 row (a demonstration) or n rows (rollouts) each, so
    # the ranks held different numbers of rows and of micro-batches
    assert any(0 < m["route_sft"] < 1 for m in ddp)
    for name in ("fsdp2", "fsdp2-shared"):
        for a, b in zip(ddp, metrics(runs[name])):
            assert b["route_sft"] == a["route_sft"]
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6)
        assert_same_weights(weights(runs["ddp"]), weights(runs[name]), 1e-4)


def test_fsdp2_resume_is_bit_exact(tmp_path, tiny_dir, task_file, capsys):
    full = settings(tmp_path / "full", tiny_dir, task_file, algorithm="hpt", save_every=1)
    full += ["distributed.strategy=fsdp2", "max_steps=3"]
    result = torchrun(full)
    assert result.returncode == 0, result.stderr[-3000:]
    state = json.loads((tmp_path / "full/t/checkpoints/step-3/state.json").read_text())
    assert state["sharded"] and state["world_size"] == 2
    # an interruption after step 2: the folder as it was then
    cut = tmp_path / "cut" / "t"
    shutil.copytree(tmp_path / "full" / "t", cut)
    shutil.rmtree(cut / "checkpoints" / "step-3")
    shutil.rmtree(cut / "final")
    lines = (cut / "metrics.jsonl").read_text().splitlines()
    (cut / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n")
    resumed = settings(tmp_path / "cut", tiny_dir, task_file, algorithm="hpt", save_every=1)
    result = torchrun(resumed + ["distributed.strategy=fsdp2", "max_steps=3", "resume=true"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert [m["step"] for m in metrics(cut)] == [1, 2, 3]
    assert metrics(cut)[2]["loss"] == metrics(tmp_path / "full" / "t")[2]["loss"]
    a, b = weights(tmp_path / "full" / "t"), weights(cut)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # resuming a sharded checkpoint in one process is one clear line
    assert cli(["train", "--set", *resumed, "max_steps=4", "resume=true"]) == 2
    assert "written by 2 processes" in capsys.readouterr().err


def test_fsdp2_without_torchrun_is_one_line(tmp_path, tiny_dir, task_file, capsys):
    args = settings(tmp_path, tiny_dir, task_file) + ["distributed.strategy=fsdp2"]
    assert cli(["train", "--set", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "torchrun" in err[0]
    assert not (tmp_path / "t").exists()  # nothing was written


def test_world_size_must_divide_the_batch(tmp_path, tiny_dir, task_file):
    result = torchrun(settings(tmp_path, tiny_dir, task_file, **{"data.questions_per_step": 3}))
    # each rank exits 2 with one line; torchrun itself then exits 1
    assert result.returncode != 0 and "exitcode  : 2" in result.stderr
    lines = [x for x in result.stderr.splitlines() if x.startswith("hpt train: error:")]
    # (torchrun may stop the second rank before it prints its line)
    assert lines, result.stderr[-2000:]
    assert all("data.questions_per_step=3 is not divisible by the world size 2" in x for x in lines)
    assert not (tmp_path / "t").exists()


def test_shutdown_leaves_a_process_group_it_did_not_create(tmp_path):
    """An in-process vLLM engine creates a 1-rank group of its own: hpt must not destroy it."""
    import torch.distributed as torch_dist

    from hpt.train import distributed as dist

    torch_dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        assert dist.init_from_env() is True  # joins nothing: a group exists
        dist.shutdown()
        assert torch_dist.is_initialized()  # still the owner's
    finally:
        torch_dist.destroy_process_group()
    assert not torch_dist.is_initialized()


def test_ddp_with_shared_prompts_ends_as_without(tmp_path, tiny_dir, task_file):
    """DDP over 2 ranks, a question's 4 rollouts split over passes of 3 rows: passes that run
    each distinct prompt once end with the weights of running every row whole."""
    runs = torchrun_variants(
        tmp_path,
        tiny_dir,
        task_file,
        "grpo",
        {share: [f"optim.share_prompts={share}"] for share in ("true", "false")},
    )
    shared, whole = metrics(runs["true"]), metrics(runs["false"])
    assert [m["step"] for m in shared] == [1, 2]
    for a, b in zip(shared, whole):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)
    assert_same_weights(weights(runs["false"]), weights(runs["true"]), 1e-4)


def test_fsdp2_rows_without_gradient_forward_only_or_skipped_end_as_backward(
    tmp_path, tiny_dir, task_file
):
    """GRPO under FSDP2 over 2 ranks: the questions with odd answers score 0 on every rollout
    (advantage 0), so their rows run forward only (in passes every rank keeps step with) or not
    at all; the runs end with the weights and losses of running them backward too."""
    runs = torchrun_variants(
        tmp_path,
        tiny_dir,
        task_file,
        "grpo",
        {
            mode: ["distributed.strategy=fsdp2", f"optim.zero_gradient_rows={mode}"]
            for mode in ("forward", "backward", "skip")
        },
    )
    forward_only, backward = metrics(runs["forward"]), metrics(runs["backward"])
    assert [m["step"] for m in forward_only] == [1, 2]
    assert any(m["rows_without_gradient"] > 0 for m in forward_only)
    for a, b, c in zip(forward_only, backward, metrics(runs["skip"])):
        assert (
            a["rows_without_gradient"] == b["rows_without_gradient"] == c["rows_without_gradient"]
        )
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)
        assert c["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)
        assert a["entropy"] == pytest.approx(b["entropy"], rel=1e-4)
    for mode in ("forward", "skip"):
        assert_same_weights(weights(runs["backward"]), weights(runs[mode]), 1e-4)
