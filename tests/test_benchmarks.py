"""The benchmark scripts' own logic: the GPU check's refusals and the step benchmark's table.

Benchmarks measure and assert nothing about speed; these tests check only that the prepared GPU
check refuses cleanly where it cannot run, and that the table reports MFU as the FLOP bound over
the step and the CUDA peak only where there is one.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_grpo_step():
    spec = importlib.util.spec_from_file_location("grpo_step", ROOT / "benchmarks" / "grpo_step.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["grpo_step"] = module  # dataclasses look their module up while building
    spec.loader.exec_module(module)
    return module


def run_gpu_check(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")}
    environment |= {
        "PYTHON": sys.executable,
        "OUT": str(tmp_path / "out"),
        "GPU_CHECK_WHEELS": str(tmp_path / "no-wheels"),
        **env,
    }
    return subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh")],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: the check would run")
def test_gpu_check_refuses_in_one_line_without_a_gpu(tmp_path):
    result = run_gpu_check(tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert lines == ["gpu_check: no CUDA device visible to torch; this script is for a GPU machine"]
    assert not (tmp_path / "out").exists()  # nothing measured, nothing written


def test_gpu_check_names_a_missing_package_in_one_line(tmp_path):
    # TRL is not a dependency of hpt (benchmarks/README.md): in the project's venv it is missing
    if importlib.util.find_spec("trl") is not None:
        pytest.skip("trl is installed here")
    result = run_gpu_check(tmp_path, GPU_CHECK_CPU="1")
    assert result.returncode == 2, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("gpu_check: No module named 'trl'")
    assert "make gpu-wheels" in last
    assert "trl missing" in result.stdout  # the versions line names what is absent


def fake_summary(step_trl: float, step_hpt: float, cuda: float | None) -> dict:
    side = {
        "median_cpu_s": 1.0,
        "median_stage_s": {"generate": 0.5, "update": 0.5},
        "peak_rss_mib": 100.0,
        "peak_cuda_mib": cuda,
    }
    return {
        "sides": {
            "trl": {**side, "median_step_s": step_trl},
            "hpt": {**side, "median_step_s": step_hpt},
        },
        "ratio_hpt_over_trl": step_hpt / step_trl,
        "cpu_ratio_hpt_over_trl": 1.0,
        "flop_bound": {
            "params": 2e6,
            "tokens": 1000,
            "peak_flops": 1e11,
            "generate_s": 0.1,
            "train_s": 0.3,
            "step_s": 0.4,
        },
    }


def test_table_reports_mfu_as_the_bound_over_the_step():
    grpo_step = load_grpo_step()
    table = grpo_step.format_table({"case": fake_summary(2.0, 0.8, None)})
    header, _, trl, hpt = table.splitlines()[:4]
    assert "MFU (bound/step)" in header and "peak CUDA MiB" not in header
    assert trl.split()[-1] == "0.20"  # 0.4 s of FLOPs at peak over a 2.0 s step
    assert hpt.split()[-2:] == ["0.50", "0.40"]  # MFU 0.4 / 0.8, then hpt / TRL
    # a GPU's small-model step: two significant digits, not 0.00
    assert [grpo_step.mfu_text(x) for x in (0.0107, 0.00042, 0.5)] == ["0.011", "0.00042", "0.50"]


def test_free_length_scales_the_bound_and_compares_time_per_response_token():
    """At free length each side's bound counts its own mean response length, and the summary
    line gives the ratio of the step's time per response token."""
    grpo_step = load_grpo_step()
    summary = fake_summary(2.0, 0.8, None)
    summary["settings"] = {"force_length": False, "max_new_tokens": 64}
    summary["flop_bound"]["prompt_tokens"] = 16.0
    summary["sides"]["trl"]["mean_response_tokens"] = 64.0  # full length: the case's bound
    summary["sides"]["hpt"]["mean_response_tokens"] = 24.0  # (16 + 24) / (16 + 64) of it
    summary["per_token_ratio_hpt_over_trl"] = 0.8 / 24 / (2.0 / 64)
    assert grpo_step.side_bound(summary, "trl") == 0.4
    assert abs(grpo_step.side_bound(summary, "hpt") - 0.2) < 1e-12
    lines = grpo_step.format_table({"case": summary}).splitlines()
    trl, hpt = lines[2].split(), lines[3].split()
    assert trl[-1] == "0.20" and "64.0" in trl  # MFU 0.4 / 2.0; the mean response length
    assert hpt[-2:] == ["0.25", "0.40"] and "24.0" in hpt  # MFU 0.2 / 0.8, then hpt / TRL
    assert "hpt/TRL time per response token 1.07" in lines[-1]
    # forced length (the default): the case's bound for both sides, whatever the lengths
    summary["settings"]["force_length"] = True
    assert grpo_step.side_bound(summary, "hpt") == 0.4


def test_table_adds_the_cuda_peak_where_measured():
    grpo_step = load_grpo_step()
    table = grpo_step.format_table({"case": fake_summary(2.0, 1.0, 1536.0)})
    header, _, trl, _ = table.splitlines()[:4]
    assert "peak CUDA MiB" in header
    assert "1536" in trl.split()


def test_share_prompts_flags_reach_hpt_overrides():
    """--share-prompts auto|true|false (and --no-share-prompts, = false) become hpt's
    optim.share_prompts."""
    grpo_step = load_grpo_step()
    for argv, expected in (
        ([], "auto"),
        (["--share-prompts", "true"], "true"),
        (["--no-share-prompts"], "false"),
    ):
        setting = grpo_step.parse_args(argv).share_prompts
        assert setting == expected
        settings = grpo_step.Settings(share_prompts=setting)
        overrides = grpo_step.hpt_overrides(settings, Path("m"), Path("q.jsonl"), Path("w"))
        assert f"optim.share_prompts={expected}" in overrides
