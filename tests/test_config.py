"""The training config: strict loading, coercion, overrides, stages, round trip, docs, recipes."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from hpt.errors import ConfigError
from hpt.train.config import (
    TrainConfig,
    apply_override,
    config_to_dict,
    field_help,
    load_config,
    render_config_table,
    resolve_stages,
    save_config,
)

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    message = str(info.value)
    assert "\n" not in message, "user errors are one line"
    return message


# -- loading and defaults ----------------------------------------------------------------------


def test_defaults_without_file_equal_the_dataclass_defaults():
    assert load_config(None) == TrainConfig()


def test_yaml_values_land_in_their_sections(tmp_path):
    path = write(
        tmp_path,
        "name: x\nmax_steps: 7\noptim:\n  lr: 1.0e-5\n  betas: [0.8, 0.9]\n"
        "data:\n  fields: {prompt: question}\n  template: llama\nalgo: {gate_threshold: 0.25}\n",
    )
    config = load_config(path)
    assert (config.name, config.max_steps, config.optim.lr) == ("x", 7, 1e-5)
    assert config.optim.betas == (0.8, 0.9)
    assert config.data.fields == {"prompt": "question"}
    assert config.data.template == "llama"
    assert config.algo == {"gate_threshold": 0.25}
    assert config.optim.weight_decay == TrainConfig().optim.weight_decay  # untouched default
    assert config.run_dir == Path("runs") / "x"


def test_empty_file_gives_the_defaults(tmp_path):
    assert load_config(write(tmp_path, "# nothing\n")) == TrainConfig()


# -- unknown keys --------------------------------------------------------------------------------


def test_unknown_top_level_key_names_it_its_line_and_the_valid_keys(tmp_path):
    path = write(tmp_path, "name: x\nmax_stpes: 3\n")
    message = error_of(path)
    assert "'max_stpes'" in message and f"{path}:2" in message
    assert "did you mean 'max_steps'" in message
    assert "valid keys at the top level" in message and "save_every" in message


def test_unknown_nested_key_is_reported_with_its_dotted_path(tmp_path):
    path = write(tmp_path, "optim:\n  lr: 1.0e-5\n  lrr: 3\n")
    message = error_of(path)
    assert "'optim.lrr'" in message and f"{path}:3" in message
    assert "valid keys of 'optim'" in message and "weight_decay" in message


def test_unknown_key_inside_a_stage_section_is_reported(tmp_path):
    path = write(tmp_path, "stages:\n  - algorithm: sft\n    optim:\n      lrate: 1\n")
    message = error_of(path)
    assert "'stages.0.optim.lrate'" in message and f"{path}:4" in message


def test_unknown_key_from_an_override_names_the_override():
    message = error_of(None, ["rollout.temp=0.7"])
    assert "'rollout.temp'" in message and "--set rollout.temp=0.7" in message
    assert "temperature" in message


def test_a_scalar_where_a_section_belongs_is_rejected(tmp_path):
    assert "'optim'" in error_of(write(tmp_path, "optim: 3\n"))


# -- types and ranges ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, expected",
    [
        ("optim.lr=1e-5", 1e-5),  # YAML reads 1e-5 (no dot) as a string: coerced
        ("optim.lr=3", 3.0),
        ("max_steps=12", 12),
        ("max_steps=1e3", 1000),
        ("resume=true", True),
        ("name=2024", "2024"),
        ("model.rope_theta=null", None),
        ("optim.grad_clip=.inf", float("inf")),
    ],
)
def test_scalars_are_coerced_to_the_declared_type(override, expected):
    config = load_config(None, [override])
    key, _ = override.split("=", 1)
    value = config
    for part in key.split("."):
        value = getattr(value, part)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("max_steps=ten", "'max_steps' must be int"),
        ("max_steps=2.5", "'max_steps' must be int"),
        ("max_steps=true", "'max_steps' must be int"),  # a bool is not a number
        ("resume=3", "'resume' must be bool"),
        ("model.dtype=float64", "auto | float32 | bfloat16 | float16"),
        ("optim.betas=[0.9]", "'optim.betas' must be tuple[float, float]"),
        ("eval.benchmarks=aime24", "'eval.benchmarks' must be list[str]"),
        ("rollout.n=0", "'rollout.n' must be > 0"),
        ("rollout.top_p=1.5", "'rollout.top_p' must be <= 1"),
        ("optim.warmup_steps=-1", "'optim.warmup_steps' must be >= 0"),
        ("keep_checkpoints=0", "'keep_checkpoints' must be > 0"),
    ],
)
def test_wrong_types_and_ranges_fail_with_the_key(override, fragment):
    message = error_of(None, [override])
    assert fragment in message and "--set" in message


def test_a_choice_typo_gets_a_suggestion_and_the_choices():
    message = error_of(None, ["distributed.strategy=fsdp"])
    assert "'distributed.strategy' must be ddp | fsdp2, got 'fsdp'" in message
    assert "did you mean 'fsdp2'" in message


def test_the_new_sections_have_their_defaults_and_ranges():
    config = load_config(None)
    assert (config.distributed.strategy, config.distributed.mixed_precision) == ("ddp", "auto")
    assert (config.lora.r, config.lora.alpha, config.lora.dropout, config.lora.merge) == (
        0,
        16.0,
        0.0,
        False,
    )
    assert "q_proj" in config.lora.target_modules and "down_proj" in config.lora.target_modules
    assert config.rollout.compile is False
    loaded = load_config(
        None, ["lora.r=8", "distributed.strategy=fsdp2", "distributed.mixed_precision=bf16"]
    )
    assert (loaded.lora.r, loaded.distributed.strategy) == (8, "fsdp2")
    assert "'lora.dropout' must be < 1" in error_of(None, ["lora.dropout=1"])
    assert "'lora.r' must be >= 0" in error_of(None, ["lora.r=-1"])
    assert "'lora.alpha' must be > 0" in error_of(None, ["lora.alpha=0"])
    assert "auto | bf16 | fp32" in error_of(None, ["distributed.mixed_precision=fp16"])


def test_assignment_is_validated_with_a_one_line_config_error():
    config = TrainConfig()
    config.model.path = "some/model"  # the demo fills paths in like this
    config.optim.lr = "1e-4"  # coerced as on loading
    assert (config.model.path, config.optim.lr) == ("some/model", 1e-4)
    with pytest.raises(ConfigError, match=r"'OptimConfig.lr' must be > 0, got -1"):
        config.optim.lr = -1
    with pytest.raises(ConfigError, match="did you mean 'lr'"):
        config.optim.lrr = 1
    assert config.optim.lr == 1e-4  # a rejected assignment changes nothing


def test_sections_stay_dataclasses_for_replace_and_asdict():
    config = load_config(None)
    replaced = dataclasses.replace(config, model=dataclasses.replace(config.model, path="m"))
    assert replaced.model.path == "m" and config.model.path is None
    assert dataclasses.asdict(config.demo)["size"] == "tiny"
    with pytest.raises(ValueError):  # replace validates too
        dataclasses.replace(config.rollout, n=0)


def test_list_elements_are_checked_with_their_index(tmp_path):
    path = write(tmp_path, "eval:\n  benchmarks: [aime24, [1, 2]]\n")
    assert "'eval.benchmarks.1' must be str" in error_of(path)


# -- files -----------------------------------------------------------------------------------------


def test_missing_file_is_a_config_error(tmp_path):
    assert "not found" in error_of(tmp_path / "nope.yaml")


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "name: x\noptim:\n  lr: [1, 2\nseed: 3\n")
    message = error_of(path)
    assert message.startswith("invalid YAML") and f"{path}:" in message


def test_a_file_that_is_not_a_mapping_is_rejected(tmp_path):
    assert "mapping" in error_of(write(tmp_path, "- 1\n- 2\n"))


def test_duplicate_keys_are_rejected(tmp_path):
    path = write(tmp_path, "optim:\n  lr: 1.0\n  lr: 2.0\n")
    assert "duplicate config key 'optim.lr'" in error_of(path)


# -- overrides --------------------------------------------------------------------------------------


def test_overrides_apply_in_order_and_parse_yaml_values():
    config = load_config(
        None,
        ["optim.lr=0.1", "optim.lr=0.2", "eval.benchmarks=[aime24, amc23]", "algo={sft_coef: 0.3}"],
    )
    assert config.optim.lr == 0.2
    assert config.eval.benchmarks == ["aime24", "amc23"]
    assert config.algo == {"sft_coef": 0.3}


def test_override_of_a_stage_element_by_index(tmp_path):
    path = write(tmp_path, "stages:\n  - {algorithm: sft}\n  - {algorithm: grpo}\n")
    config = load_config(path, ["stages.1.optim.lr=1e-6", "stages.0.max_steps=4"])
    assert config.stages[1].optim == {"lr": 1e-6}
    assert config.stages[0].max_steps == 4


@pytest.mark.parametrize("bad", ["optim.lr", "=3", "stages.3.max_steps=1"])
def test_malformed_overrides_are_config_errors(bad):
    error_of(None, [bad])


def test_apply_override_creates_missing_sections():
    raw: dict = {}
    apply_override(raw, "data.train=foo.jsonl")
    assert raw == {"data": {"train": "foo.jsonl"}}


# -- stages -------------------------------------------------------------------------------------------


def test_a_run_without_stages_is_one_stage_with_derived_values_filled():
    config = load_config(None, ["data.questions_per_step=12", "data.max_response_tokens=99"])
    ((name, stage),) = resolve_stages(config)
    assert name == config.algorithm
    assert stage.optim.mini_batch_questions == 12
    assert stage.rollout.max_new_tokens == 99 and stage.eval.max_new_tokens == 99
    assert config.optim.mini_batch_questions is None  # the top level keeps the user's null


def test_stages_override_sections_key_by_key_and_replace_algo(tmp_path):
    path = write(
        tmp_path,
        "algorithm: hpt\nmax_steps: 9\nalgo: {gate_threshold: 0.25}\n"
        "optim: {lr: 1.0e-6, weight_decay: 0.1}\ndata: {train: a.jsonl, questions_per_step: 8}\n"
        "stages:\n"
        "  - {algorithm: sft, max_steps: 3, algo: {}, optim: {lr: 5.0e-5}}\n"
        "  - {name: rl, data: {train: b.jsonl}}\n",
    )
    config = load_config(path)
    (first_name, first), (second_name, second) = resolve_stages(config)
    assert (first_name, second_name) == ("1-sft", "rl")
    assert (first.algorithm, first.max_steps, first.algo) == ("sft", 3, {})
    assert (first.optim.lr, first.optim.weight_decay) == (5e-5, 0.1)
    assert first.data.train == "a.jsonl"
    assert (second.algorithm, second.max_steps, second.algo) == ("hpt", 9, {"gate_threshold": 0.25})
    assert (second.optim.lr, second.data.train, second.data.questions_per_step) == (
        1e-6,
        "b.jsonl",
        8,
    )
    assert first.stages == [] and second.stages == []
    assert [s.algorithm for s in config.resolved_stages()] == ["sft", "hpt"]


def test_stage_values_are_type_checked(tmp_path):
    path = write(tmp_path, "stages:\n  - optim: {lr: fast}\n")
    assert "'stages.0.optim.lr' must be float" in error_of(path)


def test_stage_names_must_be_unique(tmp_path):
    path = write(tmp_path, "stages:\n  - {name: a}\n  - {name: a}\n")
    assert "unique" in error_of(path)


def test_a_bad_algorithm_override_names_its_key_and_line(tmp_path):
    path = write(tmp_path, "algorithm: grpo\nalgo:\n  sft_coef: 0.3\n  clip_low: 2\n")
    message = error_of(path)
    assert f"'algo.clip_low' ({path}:4)" in message and "less than or equal to 1" in message
    path = write(tmp_path, "stages:\n  - algorithm: sft\n    algo: {clip_lo: 0.1}\n")
    message = error_of(path)
    assert "'stages.0.algo.clip_lo'" in message and "did you mean 'clip_low'" in message


def test_algorithm_name_is_checked_when_the_algorithms_layer_exists():
    pytest.importorskip("hpt.algorithms")
    message = error_of(None, ["algorithm=grpoo"])
    assert "unknown algorithm 'grpoo'" in message and "hpt" in message
    assert "did you mean 'grpo'" in message


# -- round trip, help and docs ---------------------------------------------------------------------


def test_save_config_round_trips(tmp_path):
    config = load_config(
        None,
        [
            "name=rt",
            "optim.betas=[0.5, 0.6]",
            "optim.skip_grad_norm_above=.inf",
            "eval.sets={held: x.jsonl}",
            "stages=[{algorithm: sft, optim: {lr: 0.1}}, {name: b, data: {train: y}}]",
        ],
    )
    path = save_config(config, tmp_path / "config.yaml")
    assert load_config(path) == config
    assert config_to_dict(load_config(path)) == config_to_dict(config)


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        keys.append(key)
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            keys += _all_keys(tp, key + ".")
        elif typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            keys += _all_keys(typing.get_args(tp)[0], key + "[].")
    return keys


def test_every_key_has_a_one_line_help():
    helps = field_help()
    assert sorted(helps) == sorted(_all_keys(TrainConfig))
    for key, text in helps.items():
        assert text and "\n" not in text, key


def test_the_markdown_table_has_a_row_per_key_with_its_default():
    table = render_config_table()
    for key in field_help():
        assert f"| `{key}` |" in table
    assert "| `optim.lr` | float | `5.0e-06` |" in table
    assert "| `model.dtype` | auto \\| float32 \\| bfloat16 \\| float16 | `auto` |" in table


# -- the paper's recipes -------------------------------------------------------------------------------


def test_the_recipes_are_there():
    names = {path.name for path in CONFIGS}
    expected = {
        "hpt_qwen2.5_math_7b.yaml",
        "hpt_qwen2.5_math_1.5b.yaml",
        "hpt_llama3.1_8b.yaml",
        "luffy.yaml",
        "srft.yaml",
        "sft.yaml",
        "grpo.yaml",
        "sft_then_grpo.yaml",
    }
    assert expected <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_loads_and_round_trips(path, tmp_path):
    config = load_config(path)
    assert resolve_stages(config)
    assert load_config(save_config(config, tmp_path / "c.yaml")) == config


def test_hpt_7b_recipe_matches_the_paper():
    config = load_config(CONFIGS[0].parent / "hpt_qwen2.5_math_7b.yaml")
    assert (config.algorithm, config.max_steps) == ("hpt", 500)
    assert config.model.path == "Qwen/Qwen2.5-Math-7B"
    assert (config.model.rope_theta, config.model.max_position_embeddings) == (40000, 16384)
    assert config.data.train == "Elliott/Openr1-Math-46k-8192"
    assert (config.data.questions_per_step, config.rollout.n, config.rollout.temperature) == (
        128,
        8,
        1.0,
    )
    assert (config.data.max_prompt_tokens, config.data.max_response_tokens) == (1024, 8192)
    optim = config.optim
    assert (optim.lr, optim.schedule, optim.weight_decay, optim.grad_clip) == (
        5e-6,
        "constant",
        0.01,
        1.0,
    )
    assert (optim.skip_grad_norm_above, optim.mini_batch_questions) == (80, 64)
    assert config.algo["entropy_coef"] == 0.001 and config.algo["gate_threshold"] == 0.0
    assert (config.eval.temperature, config.eval.top_p, config.eval.k) == (0.6, 0.95, 8)


def test_baseline_recipes_use_their_learning_rates_and_gates():
    load = {p.name: load_config(p) for p in CONFIGS}
    assert load["hpt_qwen2.5_math_1.5b.yaml"].algo["sft_coef"] == 0.3
    assert load["hpt_llama3.1_8b.yaml"].algo["gate_threshold"] == 0.25
    assert load["hpt_llama3.1_8b.yaml"].data.template == "llama"
    assert load["luffy.yaml"].optim.lr == 1e-6 and load["srft.yaml"].optim.lr == 1e-6
    sft = load["sft.yaml"]
    assert (sft.algorithm, sft.optim.lr, sft.data.questions_per_step, sft.max_steps) == (
        "sft",
        5e-5,
        64,
        2157,
    )
    stages = resolve_stages(load["sft_then_grpo.yaml"])
    assert [(name, s.algorithm) for name, s in stages] == [("sft", "sft"), ("grpo", "grpo")]
    assert stages[1][1].data.train == "Elliott/Openr1-Math-48k-Complement"


def test_readme_config_table_is_current():
    """The README's table of config keys is the one the code renders (keys, defaults, help)."""
    from pathlib import Path

    from hpt.train.config import render_config_table

    readme = Path(__file__).parents[1] / "README.md"
    assert render_config_table().strip() in readme.read_text()


def test_rollout_dtype_needs_the_fused_hf_step(tmp_path):
    message = error_of(None, ["rollout.dtype=bfloat16", "rollout.fused=false"])
    assert "rollout.dtype=bfloat16 (--set rollout.dtype=bfloat16)" in message
    assert "rollout.fused=false" in message
    message = error_of(write(tmp_path, "rollout:\n  engine: vllm\n  dtype: bfloat16\n"), [])
    assert "run.yaml:3" in message and "rollout.engine=vllm" in message
    assert load_config(None, ["rollout.dtype=bfloat16"]).rollout.dtype == "bfloat16"


def test_shared_prompts_under_fsdp2_need_the_one_call_pass(tiny):
    """FSDP2 runs each layer's forward once a pass: shared prompts there need the one-call pass,
    which the model decides (checked once it is loaded, before anything is trained)."""
    from transformers import AutoModelForCausalLM, GPT2Config

    from hpt.train.step import check_shared_prompts

    config = load_config(None, ["optim.share_prompts=true", "distributed.strategy=fsdp2"])
    check_shared_prompts(config, tiny[0])  # a Qwen2: one call, accepted
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(ConfigError, match="optim.share_prompts=true: under fsdp2") as error:
        check_shared_prompts(config, gpt2)
    assert "gpt2 models" in str(error.value) and "\n" not in str(error.value)
    check_shared_prompts(load_config(None, ["distributed.strategy=fsdp2"]), gpt2)  # auto
    check_shared_prompts(load_config(None, ["optim.share_prompts=true"]), gpt2)  # ddp: two calls


def test_shared_prompts_are_refused_with_gradient_checkpointing():
    """Checkpointed layers recompute in backward without the shared pass's KV cache (two calls)
    or its swapped attention (one call): both failed with a traceback; now one line."""
    message = error_of(None, ["optim.share_prompts=true", "model.gradient_checkpointing=true"])
    assert "optim.share_prompts=true (--set optim.share_prompts=true)" in message
    assert "gradient checkpointing" in message
    load_config(None, ["optim.share_prompts=auto", "model.gradient_checkpointing=true"])


def test_autocast_is_refused_under_fsdp2():
    message = error_of(None, ["optim.autocast=bfloat16", "distributed.strategy=fsdp2"])
    assert "optim.autocast=bfloat16 (--set optim.autocast=bfloat16)" in message
    assert "distributed.mixed_precision" in message
    assert load_config(None, ["optim.autocast=bfloat16"]).optim.autocast == "bfloat16"
    for off in ("off", "false"):  # YAML reads both as false
        assert load_config(None, [f"optim.autocast={off}"]).optim.autocast is False
    message = error_of(None, ["optim.autocast=true", "distributed.strategy=fsdp2"])
    assert "optim.autocast=true" in message
    error_of(None, ["optim.autocast=fp16"])  # not a choice
