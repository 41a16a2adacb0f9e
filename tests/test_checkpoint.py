"""Checkpoints: exact resume (weights, optimizer, scheduler, RNG), atomic writes, keep-last-K."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from hpt.errors import ConfigError, ModelError
from hpt.train import checkpoint as ckpt
from hpt.train.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)

VOCAB = 48


def tiny_qwen(seed: int) -> nn.Module:
    """A two-layer Qwen2 with tied input/output embeddings, built offline."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return Qwen2ForCausalLM(config)


def make_run(seed: int):
    model = tiny_qwen(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return model, optimizer, scheduler


def train_steps(model, optimizer, scheduler, steps: int) -> list[float]:
    """Steps whose batches come from all three RNGs (torch, numpy, python), so RNG state matters."""
    losses = []
    for _ in range(steps):
        ids = torch.randint(0, VOCAB, (2, 8))
        ids[0, int(np.random.randint(8))] = random.randrange(VOCAB)
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
    return losses


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def draws() -> tuple:
    return random.random(), float(np.random.rand()), float(torch.rand(()))


# -- round trip --------------------------------------------------------------------------------


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    model, optimizer, scheduler = make_run(seed=1)
    train_steps(model, optimizer, scheduler, 3)
    path = save_checkpoint(
        tmp_path, 3, model, optimizer, scheduler, {"sampler": {"epoch": 1, "position": 5}}, keep=2
    )
    saved_weights = params(model)
    saved_moments = [s["exp_avg"].clone() for s in optimizer.state.values()]
    uninterrupted_losses = train_steps(model, optimizer, scheduler, 3)  # batches use every RNG
    final = params(model)

    other, other_optimizer, other_scheduler = make_run(seed=99)  # different initial weights
    assert not torch.equal(
        other.model.embed_tokens.weight, saved_weights["model.embed_tokens.weight"]
    )
    extra = load_checkpoint(path, other, other_optimizer, other_scheduler)
    assert extra == {"sampler": {"epoch": 1, "position": 5}, "step": 3}
    assert_same_tensors(params(other), saved_weights)
    for state, moment in zip(other_optimizer.state.values(), saved_moments):
        assert torch.equal(state["exp_avg"], moment)
    assert other_scheduler.last_epoch == 3 and other_scheduler.get_last_lr() == [1e-2 / 4]
    assert train_steps(other, other_optimizer, other_scheduler, 3) == uninterrupted_losses
    assert_same_tensors(params(other), final)


def test_rng_streams_continue_where_they_were_saved(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    draws()
    path = save_checkpoint(tmp_path, 1, nn.Linear(2, 2))
    expected = [draws() for _ in range(3)]
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    load_checkpoint(path, nn.Linear(2, 2))
    assert [draws() for _ in range(3)] == expected
    load_checkpoint(path, nn.Linear(2, 2), restore_rng=False)
    assert draws() != expected[0]


def test_checkpoint_folder_is_a_loadable_hugging_face_model(tmp_path):
    from transformers import AutoModelForCausalLM

    model, optimizer, scheduler = make_run(seed=2)
    path = save_checkpoint(tmp_path, 1, model, optimizer, scheduler)
    files = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt"} <= files
    assert "state.json" in files
    loaded = AutoModelForCausalLM.from_pretrained(path)
    assert_same_tensors(params(loaded), params(model))


def test_plain_module_with_tied_weights_and_value_head_round_trips(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10))
    model[1].weight = model[0].weight  # tied, as an LM head tied to its embedding
    head = nn.Linear(4, 1)
    path = save_checkpoint(tmp_path, 5, model, value_head=head)
    other = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10))
    other[1].weight = other[0].weight
    other_head = nn.Linear(4, 1)
    assert load_checkpoint(path, other, value_head=other_head, restore_rng=False) == {"step": 5}
    assert_same_tensors(params(other), params(model))
    assert_same_tensors(params(other_head), params(head))


def test_loading_into_a_different_model_is_a_model_error(tmp_path):
    path = save_checkpoint(tmp_path, 1, nn.Linear(3, 3))
    with pytest.raises(ModelError, match="does not fit"):
        load_checkpoint(path, nn.Linear(3, 4))
    with pytest.raises(ModelError, match="value head"):
        load_checkpoint(path, nn.Linear(3, 3), value_head=nn.Linear(3, 1))


def test_a_folder_without_state_is_not_a_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="not a checkpoint"):
        load_checkpoint(tmp_path, nn.Linear(2, 2))


def test_extra_state_step_must_agree(tmp_path):
    with pytest.raises(ValueError, match="disagrees"):
        save_checkpoint(tmp_path, 2, nn.Linear(2, 2), extra_state={"step": 3})


# -- atomicity -----------------------------------------------------------------------------------


def test_failure_mid_write_leaves_previous_checkpoints_and_no_partial_folder(tmp_path, monkeypatch):
    model, optimizer, scheduler = make_run(seed=3)
    first = save_checkpoint(tmp_path, 1, model, optimizer, scheduler)
    weights_at_1 = params(model)
    train_steps(model, optimizer, scheduler, 1)

    def crash(*args, **kwargs):  # the weights and optimizer are already written at this point
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "rng_state", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 2, model, optimizer, scheduler)
    monkeypatch.undo()

    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-1"]  # no step-2, no temp folder
    assert latest_checkpoint(tmp_path) == first
    fresh, fresh_optimizer, fresh_scheduler = make_run(seed=4)
    load_checkpoint(first, fresh, fresh_optimizer, fresh_scheduler)
    assert_same_tensors(params(fresh), weights_at_1)


def test_leftovers_of_a_hard_crash_are_never_loaded_and_are_cleaned(tmp_path):
    first = save_checkpoint(tmp_path, 1, nn.Linear(2, 2))
    root = tmp_path / "checkpoints"
    (root / ".step-7.tmp-dead").mkdir()  # killed while writing (no cleanup ran)
    (root / ".step-7.tmp-dead" / "model.safetensors").write_bytes(b"partial")
    (root / "step-9").mkdir()  # a folder without state.json is not a checkpoint
    assert latest_checkpoint(tmp_path) == first
    save_checkpoint(tmp_path, 2, nn.Linear(2, 2))
    assert not (root / ".step-7.tmp-dead").exists()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-1", "step-2"]


def test_saving_a_step_again_replaces_it_whole(tmp_path):
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    save_checkpoint(tmp_path, 4, a, extra_state={"tag": "a"})
    path = save_checkpoint(tmp_path, 4, b, extra_state={"tag": "b"})
    other = nn.Linear(2, 2)
    assert load_checkpoint(path, other, restore_rng=False)["tag"] == "b"
    assert_same_tensors(params(other), params(b))
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-4"]


# -- keep-last-K ---------------------------------------------------------------------------------


def test_only_the_newest_k_are_kept(tmp_path):
    model = nn.Linear(2, 2)
    for step in (1, 2, 3, 10, 11):
        save_checkpoint(tmp_path, step, model, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-10", "step-11"]  # numeric order
    save_checkpoint(tmp_path, 12, model, keep=None)
    assert len(list_checkpoints(tmp_path)) == 3


def test_no_checkpoint_yet():
    assert latest_checkpoint("/nonexistent/run") is None
