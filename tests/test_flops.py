"""FLOP counts (hpt.train.flops) against real tiny HF models, hand sums, the GPU table and timing."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from hpt.train import flops as F
from hpt.train.flops import (
    attention_flops,
    flops_per_token,
    gpu_peak_flops,
    measured_matmul_flops,
    mfu,
    peak_flops,
    step_flops,
)

TINY = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=300,
)


@pytest.fixture(autouse=True)
def _no_env_peak(monkeypatch):
    monkeypatch.delenv(F.PEAK_FLOPS_ENV, raising=False)


def linear_weight_count(model: nn.Module) -> int:
    """Independent count: every nn.Linear weight (lm_head included), embeddings skipped."""
    total = 0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            total += module.weight.numel()
    return total


def build(cls, config):
    torch.manual_seed(0)
    return cls(config).eval()


@pytest.mark.parametrize("tie", [False, True])
def test_flops_per_token_qwen2_matches_linear_weights(tie):
    config = Qwen2Config(**TINY, tie_word_embeddings=tie)
    assert getattr(config, "head_dim", None) is None  # exercises the hidden // heads fallback
    model = build(Qwen2ForCausalLM, config)
    n_linear = linear_weight_count(model)
    assert n_linear == 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128) + 300 * 64
    assert flops_per_token(config) == 2 * n_linear


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"tie_word_embeddings": True},
        {"head_dim": 32},  # head_dim != hidden // heads: q/o are 64x128, k/v 64x64
        {"num_key_value_heads": 4},  # plain multi-head attention
    ],
)
def test_flops_per_token_llama_matches_linear_weights(extra):
    config = LlamaConfig(**{**TINY, **extra})
    model = build(LlamaForCausalLM, config)
    assert flops_per_token(config) == 2 * linear_weight_count(model)


def test_missing_kv_heads_and_head_dim_fall_back():
    mha = LlamaConfig(**{**TINY, "num_key_value_heads": 4})
    bare = {k: v for k, v in TINY.items() if k != "num_key_value_heads"}
    assert flops_per_token(SimpleNamespace(**bare)) == 2 * linear_weight_count(
        build(LlamaForCausalLM, mha)
    )
    assert flops_per_token(SimpleNamespace(**bare, head_dim=None)) == flops_per_token(mha)


def test_flops_per_token_ignores_embedding_and_reads_text_config():
    config = Qwen2Config(**TINY)
    bigger_vocab = Qwen2Config(**{**TINY, "vocab_size": 400})
    # Only the head grows: 100 more rows of 64, times 2.
    assert flops_per_token(bigger_vocab) - flops_per_token(config) == 2 * 100 * 64
    wrapper = SimpleNamespace(text_config=config)
    assert flops_per_token(wrapper) == flops_per_token(config)


@pytest.mark.parametrize(
    "missing",
    ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"],
)
def test_missing_field_is_a_clear_value_error(missing):
    fields = {**TINY, "head_dim": 16}
    del fields[missing]
    with pytest.raises(ValueError, match=missing):
        flops_per_token(SimpleNamespace(**fields))


def test_bad_fields_and_lengths_raise():
    with pytest.raises(ValueError, match="hidden_size"):
        flops_per_token(SimpleNamespace(**{**TINY, "hidden_size": 0}))
    with pytest.raises(ValueError, match="head_dim"):
        flops_per_token(SimpleNamespace(**{**TINY, "num_attention_heads": 5}))
    with pytest.raises(ValueError, match="non-negative"):
        step_flops(Qwen2Config(**TINY), trained=[3, -1])
    with pytest.raises(ValueError, match="non-negative"):
        attention_flops(Qwen2Config(**TINY), [2.5])


# hidden 8, 2 layers, 2 heads of 4, 1 kv head, intermediate 16, vocab 10.
SMALL = SimpleNamespace(
    hidden_size=8,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=4,
    intermediate_size=16,
    vocab_size=10,
)


def test_step_flops_hand_computed():
    # Per layer: q 8*8=64, k 8*4=32, v 32, o 8*8=64, mlp 3*8*16=384 -> 576; x2 layers = 1152;
    # head 10*8 = 80 -> 1232 weights -> 2464 FLOPs a token.
    assert flops_per_token(SMALL) == 2464
    # Attention unit: 4 * head_dim 4 * heads 2 * layers 2 = 64 FLOPs per (query, key) pair.
    assert attention_flops(SMALL, [3, 5]) == 64 * (9 + 25)
    # trained [3, 5]: 3 * (8 * 2464 + 64 * 34) = 3 * 21888 = 65664
    assert step_flops(SMALL, trained=[3, 5]) == 65664
    # generated [4]: 4 * 2464 + 64 * (1 + 2 + 3 + 4) = 9856 + 640 = 10496
    assert step_flops(SMALL, trained=[], generated=[4]) == 10496
    # forward_only [2]: 2 * 2464 + 64 * 4 = 5184
    assert step_flops(SMALL, trained=[], forward_only=[2]) == 5184
    assert step_flops(SMALL, trained=[3, 5], generated=[4], forward_only=[2]) == 81344
    assert step_flops(SMALL, trained=[]) == 0


def test_attention_flops_scale_quadratically():
    config = Qwen2Config(**TINY)
    # 4 * s^2 * head_dim 16 * heads 4 * layers 2
    assert attention_flops(config, [10]) == 4 * 100 * 16 * 4 * 2
    assert attention_flops(config, [20]) == 4 * attention_flops(config, [10])
    assert attention_flops(config, [10, 10]) == 2 * attention_flops(config, [10])
    assert attention_flops(config, []) == 0
    # Trained = 3x forward, dense part linear in tokens, attention quadratic.
    dense = flops_per_token(config)
    assert step_flops(config, trained=[20]) == 3 * (20 * dense + 4 * attention_flops(config, [10]))


def test_peak_flops_env_override(monkeypatch):
    monkeypatch.setenv(F.PEAK_FLOPS_ENV, "1.5e12")
    assert peak_flops("cpu") == 1.5e12
    assert peak_flops("cuda:3", torch.bfloat16) == 1.5e12  # no GPU needed when overridden
    assert mfu(3e12, 2.0, "cpu", world_size=2) == pytest.approx(0.5)
    for bad in ("fast", "0", "-1", "inf", "nan"):
        monkeypatch.setenv(F.PEAK_FLOPS_ENV, bad)
        with pytest.raises(ValueError, match=F.PEAK_FLOPS_ENV):
            peak_flops("cpu")


@pytest.mark.parametrize(
    ("name", "dtype", "tf32", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, False, 989.5),
        ("NVIDIA H100 80GB HBM3", torch.float32, True, 494.7),
        ("NVIDIA H100 80GB HBM3", torch.float32, False, 66.9),
        ("NVIDIA H100 PCIe", torch.bfloat16, False, 756.5),
        ("NVIDIA H100 NVL", torch.float16, False, 835.5),
        ("NVIDIA H200", torch.bfloat16, False, 989.5),
        ("NVIDIA H200 NVL", torch.bfloat16, False, 835.5),
        ("NVIDIA GH200 480GB", torch.bfloat16, False, 989.5),
        ("NVIDIA H800", torch.bfloat16, False, 989.5),
        ("NVIDIA H20", torch.bfloat16, False, 148.0),
        ("NVIDIA A100-SXM4-80GB", torch.bfloat16, False, 312.0),
        ("NVIDIA A100 80GB PCIe", torch.float32, True, 156.0),
        ("NVIDIA A100-SXM4-40GB", torch.float32, False, 19.5),
        ("NVIDIA A10", torch.bfloat16, False, 125.0),
        ("NVIDIA L4", torch.bfloat16, False, 121.0),
        ("NVIDIA L40S", torch.bfloat16, False, 362.05),
        ("NVIDIA L40", torch.bfloat16, False, 181.05),
        ("NVIDIA GeForce RTX 4090", torch.bfloat16, False, 165.2),
        ("Tesla V100-SXM2-32GB", torch.float16, False, 125.0),
        ("Tesla V100-SXM2-32GB", torch.float32, True, 15.7),  # no TF32 on Volta
        ("Tesla T4", torch.float16, False, 65.0),
    ],
)
def test_gpu_table_lookup(name, dtype, tf32, tflops):
    assert gpu_peak_flops(name, dtype, tf32=tf32) == pytest.approx(tflops * 1e12)


@pytest.mark.parametrize(
    ("name", "dtype"),
    [
        ("NVIDIA A10G", torch.bfloat16),  # not the A10: measured instead
        ("Some Future GPU", torch.bfloat16),
        ("Tesla V100-SXM2-32GB", torch.bfloat16),  # no bf16 tensor cores
        ("NVIDIA H100 80GB HBM3", torch.float64),
    ],
)
def test_gpu_table_unknown_is_none(name, dtype):
    assert gpu_peak_flops(name, dtype) is None


def test_cuda_peak_uses_device_name(monkeypatch):
    # No GPU here: stand in for the driver's name only, the lookup path is the real one.
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert peak_flops("cuda", torch.bfloat16) == pytest.approx(989.5e12)
    assert peak_flops(torch.device("cuda:1"), torch.bfloat16) == pytest.approx(989.5e12)


def test_cpu_peak_is_measured_positive_and_cached():
    measured_matmul_flops.cache_clear()
    t0 = time.perf_counter()
    first = peak_flops("cpu")
    elapsed = time.perf_counter() - t0
    assert first > 1e8  # any CPU of this decade does > 0.1 GFLOP/s
    assert elapsed < 3.0  # ~0.8 s budget, slack for a shared machine
    hits = measured_matmul_flops.cache_info().hits
    t0 = time.perf_counter()
    assert peak_flops(torch.device("cpu")) == first
    assert time.perf_counter() - t0 < 0.01
    assert measured_matmul_flops.cache_info().hits == hits + 1


def test_mfu_of_a_timed_forward_backward_is_a_fraction():
    config = Qwen2Config(**TINY)
    model = build(Qwen2ForCausalLM, config).train()
    batch, seq = 4, 32
    ids = torch.randint(
        0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0)
    )
    model(input_ids=ids, labels=ids).loss.backward()  # warm-up
    model.zero_grad()
    t0 = time.perf_counter()
    model(input_ids=ids, labels=ids).loss.backward()
    seconds = time.perf_counter() - t0
    work = step_flops(config, trained=[seq] * batch)
    value = mfu(work, seconds, "cpu")
    assert 0 < value <= 1, value
    assert value == pytest.approx(work / (seconds * peak_flops("cpu")))


def test_mfu_rejects_bad_input():
    with pytest.raises(ValueError, match="seconds"):
        mfu(1.0, 0.0, "cpu")
    with pytest.raises(ValueError, match="world_size"):
        mfu(1.0, 1.0, "cpu", world_size=0)
