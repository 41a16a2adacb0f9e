"""The vLLM rollout engine against the HF engine and the trainer's Policy (needs vLLM: slow).

Skipped where vLLM is not installed (the project's .venv). Run in the vLLM virtualenv (see
DEVELOPERS.md, "vLLM on CPU")::

    /work/vllm-venv/bin/python -m pytest -q -m slow tests/test_vllm.py -p no:cacheprovider
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

pytestmark = pytest.mark.slow

PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16, 17, 18, 19]]


def load_sharpened(tiny_dir):
    """The tiny model with its final norm scaled: peaked next-token distributions, no near-ties."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    with torch.no_grad():
        model.model.norm.weight.mul_(4.0)
    return model.eval(), AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def colocated(tiny_dir):
    """(model, tokenizer, VLLMEngine) sharing one model, as the trainer builds them."""
    from hpt.rollout import make_engine

    model, tokenizer = load_sharpened(tiny_dir)
    engine = make_engine("vllm", model, tokenizer, model_path=str(tiny_dir), max_model_len=128)
    return model, tokenizer, engine


def gap(model, rollouts, temperature):
    """``rollout/logprob_gap``: mean |Policy log-prob - engine log-prob| over response tokens."""
    from hpt.estimator.unified import KIND_ID
    from hpt.train.batch import Row, collate
    from hpt.train.policy import Policy

    rows = [
        Row(
            r.prompt_ids, r.response_ids, "rollout", r.prompt_index, 0.0, sample_logprobs=r.logprobs
        )
        for r in rollouts
    ]
    batch = collate(rows, 0, KIND_ID)
    with torch.no_grad():
        logprobs = Policy(model, temperature=temperature)(
            batch.input_ids, batch.attention_mask, batch.response_index, batch.labels
        )[0]
    return float((logprobs - batch.extras["sample_logprobs"]).abs()[batch.response_mask].mean())


def test_vllm_matches_hf_engine_and_trainer_logprobs(colocated):
    """Greedy responses equal HF's token for token; sampled log-probs are the trainer's (at T)."""
    from hpt.rollout import HFEngine, SamplingParams

    model, tokenizer, engine = colocated
    greedy = SamplingParams(temperature=0, max_new_tokens=12)
    ours = engine.generate(PROMPTS, 2, greedy)
    reference = HFEngine(model, tokenizer).generate(PROMPTS, 2, greedy)
    assert [r.prompt_index for r in ours] == [0, 0, 1, 1, 2, 2]
    assert [r.response_ids for r in ours] == [r.response_ids for r in reference]
    assert all(len(r.logprobs) == len(r.response_ids) for r in ours)
    sampling = SamplingParams(temperature=0.7, max_new_tokens=12, seed=1)
    sampled = engine.generate(PROMPTS, 4, sampling)
    assert len(sampled) == 12 and sampled == engine.generate(PROMPTS, 4, sampling)  # seeded
    assert len({tuple(r.response_ids) for r in sampled}) > 3  # n samples differ
    assert gap(model, sampled, 0.7) < 1e-4
    assert gap(model, sampled, 1.0) > 1e-2  # the gap does see a temperature mismatch
    assert engine.exact_logprobs(sampling) is False  # close, not equal: the trainer recomputes


def test_seeded_batch_larger_than_one_step(colocated):
    """More prompt tokens than one scheduler step takes (4096 on CPU), seeded: no chunked-prefill
    generator rewind (vLLM 0.32 on CPU: "CPU Generator does not use offset"), reproducible."""
    from hpt.rollout import SamplingParams

    _, _, engine = colocated
    prompts = [[5 + (i + k) % 50 for k in range(100)] for i in range(48)]  # 19,200 prompt tokens
    sampling = SamplingParams(temperature=1.0, max_new_tokens=4, seed=5)
    rollouts = engine.generate(prompts, 4, sampling)
    assert len(rollouts) == 192 and all(len(r.logprobs) == len(r.response_ids) for r in rollouts)
    again = engine.generate(prompts, 4, sampling)
    assert [r.response_ids for r in again] == [r.response_ids for r in rollouts]


def test_sync_copies_changed_weights_only(colocated):
    """After an optimiser step vLLM samples from the new weights; unchanged weights copy nothing."""
    from hpt.rollout import HFEngine, SamplingParams

    model, tokenizer, engine = colocated
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    sampling = SamplingParams(temperature=1.0, max_new_tokens=12, seed=2)
    greedy = SamplingParams(temperature=0, max_new_tokens=12)
    try:
        before = engine.generate(PROMPTS, 2, sampling)
        greedy_before = engine.generate(PROMPTS, 1, greedy)
        assert engine.sync_weights() is False  # nothing changed since generate's sync
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 0.05
        optimizer.step()
        assert gap(model, before, 1.0) > 1e-2  # stale samples: the old weights' log-probs
        syncs = engine.syncs
        after = engine.generate(PROMPTS, 2, sampling)
        assert engine.syncs == syncs + 1
        assert gap(model, after, 1.0) < 1e-4
        greedy_after = engine.generate(PROMPTS, 1, greedy)
        assert engine.syncs == syncs + 1
        hf = HFEngine(model, tokenizer).generate(PROMPTS, 1, greedy)
        assert [r.response_ids for r in greedy_after] == [r.response_ids for r in hf]
        assert [r.response_ids for r in greedy_after] != [r.response_ids for r in greedy_before]
    finally:
        model.load_state_dict(saved)


def test_lora_model_syncs_merged_weights(tiny_dir):
    """A PEFT LoRA model is synced as base + adapter; its own weights are left unmerged."""
    import peft

    from hpt.rollout import HFEngine, SamplingParams
    from hpt.rollout.vllm import VLLMEngine, hf_weight_name

    model, tokenizer = load_sharpened(tiny_dir)
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
    lora = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:  # zero at init: make the adapter change the outputs
                p.normal_(0.0, 0.5)
    names = {hf_weight_name(n) for n in lora.get_base_model().state_dict()} - {None}
    assert names == set(plain)
    engine = VLLMEngine(lora, tokenizer, model_path=str(tiny_dir), max_model_len=128)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=12, seed=3)
    rollouts = engine.generate(PROMPTS, 2, sampling)
    assert gap(lora, rollouts, 1.0) < 1e-4
    assert gap(lora.get_base_model(), rollouts, 1.0) < 1e-4
    with lora.disable_adapter():
        assert gap(lora, rollouts, 1.0) > 1e-2  # the base alone scores them differently
    greedy = SamplingParams(temperature=0, max_new_tokens=12)
    ours = engine.generate(PROMPTS, 1, greedy)
    assert [r.response_ids for r in ours] == [
        r.response_ids for r in HFEngine(lora, tokenizer).generate(PROMPTS, 1, greedy)
    ]
    unmerged = {hf_weight_name(k): v for k, v in lora.get_base_model().state_dict().items()}
    for name, value in plain.items():
        torch.testing.assert_close(unmerged[name], value, atol=1e-5, rtol=0)


def test_vllm_errors_are_one_line(tiny_dir, tmp_path):
    """No model_path, a folder vLLM cannot load, sleep mode on CPU: one ConfigError each."""
    from vllm.platforms import current_platform

    from hpt.errors import ConfigError
    from hpt.rollout.vllm import VLLMEngine

    model, tokenizer = load_sharpened(tiny_dir)
    with pytest.raises(ConfigError, match="needs model.path"):
        VLLMEngine(model, tokenizer, model_path=None)
    with pytest.raises(ConfigError, match="vLLM could not start on model_path") as error:
        VLLMEngine(model, tokenizer, model_path=str(tmp_path))
    assert "\n" not in str(error.value)
    if not current_platform.is_sleep_mode_available():
        with pytest.raises(ConfigError, match="sleep mode is not available"):
            VLLMEngine(model, tokenizer, model_path=str(tiny_dir), sleep=True)
