"""LoRA through peft: only adapters train, the reference is the adapter-free model, checkpoints
hold the adapter, resume is exact, and final/ is a peft adapter (plus a merged model)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from hpt.cli import main as cli
from hpt.train.config import load_config
from hpt.train.recipe import train
from run_settings import settings as run_settings


def settings(out: Path, tiny_dir: Path, task_file: Path, **extra: object) -> list[str]:
    return run_settings(out, tiny_dir, task_file, **{"optim.lr": 1e-2, "lora.r": 4, **extra})


def test_lora_trains_only_the_adapters_and_leaves_a_peft_folder(tmp_path, tiny_dir, task_file):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = load_config(None, settings(tmp_path, tiny_dir, task_file, **{"lora.merge": True}))
    train(config)
    final = tmp_path / "t" / "final"
    adapter = json.loads((final / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and set(adapter["target_modules"]) >= {"q_proj", "v_proj"}
    tensors = load_file(str(final / "adapter_model.safetensors"))
    assert tensors and all("lora_" in name for name in tensors)
    assert any(t.abs().sum() > 0 for n, t in tensors.items() if "lora_B" in n)  # B starts at 0
    # the base weights did not move: the merged model differs from the base exactly by B @ A
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    merged = AutoModelForCausalLM.from_pretrained(final / "merged")
    base_sd, merged_sd = base.state_dict(), merged.state_dict()
    changed = {k for k in base_sd if not torch.equal(base_sd[k], merged_sd[k])}
    assert changed and all(any(m in k for m in adapter["target_modules"]) for k in changed)
    # final/ loads as base + adapter, and computes what the merged model computes
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), final)
    ids = torch.tensor([[1, 5, 9, 13]])
    torch.testing.assert_close(loaded(ids).logits, merged(ids).logits, rtol=1e-4, atol=1e-4)


def test_the_optimizer_sees_only_adapters(tiny_dir):
    from transformers import AutoModelForCausalLM

    from hpt.train.setup import apply_lora, build_optimizer

    config = load_config(None, ["lora.r=2", "lora.target_modules=[q_proj]"])
    model = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_dir), config.lora)
    optimizer = build_optimizer(model, config.optim)
    names = {id(p): n for n, p in model.named_parameters()}
    trained = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    assert trained and all("lora_" in n and "q_proj" in n for n in trained)


def test_reference_is_the_model_with_adapters_off(tmp_path, tiny_dir, task_file):
    """GRPO with a KL term and LoRA: one model; the reference is its adapter-free output."""
    from transformers import AutoModelForCausalLM

    from hpt.train.policy import Policy
    from hpt.train.setup import apply_lora

    config = load_config(None, ["lora.r=2"])
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    model = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_dir), config.lora)
    for name, p in model.named_parameters():  # move the adapters away from zero
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    mask = torch.ones_like(ids)
    index, labels = torch.tensor([[0, 1, 2, 3]]), ids[:, 1:]
    adapted = Policy(model)(ids, mask, index, labels)[0]
    reference = Policy(model, adapter_disabled=True)(ids, mask, index, labels)[0]
    expected = Policy(base)(ids, mask, index, labels)[0]
    torch.testing.assert_close(reference, expected)
    assert (adapted - expected).abs().max() > 1e-3
    # and the whole run trains with it
    args = settings(tmp_path, tiny_dir, task_file, algorithm="grpo", algo="{kl_coef: 0.1}")
    summary = train(load_config(None, args))
    assert summary["steps"] == 2


def test_lora_resume_is_exact(tmp_path, tiny_dir, task_file):
    full = settings(tmp_path / "full", tiny_dir, task_file, algorithm="hpt", save_every=1)
    train(load_config(None, full + ["max_steps=3"]))
    checkpoint = tmp_path / "full" / "t" / "checkpoints" / "step-2"
    assert (checkpoint / "adapter_model.safetensors").is_file()
    cut = tmp_path / "cut" / "t"
    shutil.copytree(tmp_path / "full" / "t", cut)
    shutil.rmtree(cut / "checkpoints" / "step-3")
    shutil.rmtree(cut / "final")
    resumed = settings(tmp_path / "cut", tiny_dir, task_file, algorithm="hpt", save_every=1)
    train(load_config(None, resumed + ["max_steps=3", "resume=true"]))
    a = load_file(str(tmp_path / "full" / "t" / "final" / "adapter_model.safetensors"))
    b = load_file(str(cut / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_target_modules_that_name_nothing_is_one_line(tmp_path, tiny_dir, task_file, capsys):
    args = settings(tmp_path, tiny_dir, task_file, **{"lora.target_modules": "[qkv]"})
    assert cli(["train", "--set", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lora.target_modules ['qkv'] names no module" in err[0]
    assert "q_proj" in err[0]  # the layers it has
