"""The training configuration: pydantic dataclasses read from YAML, with one line of help per key.

A config is YAML whose keys mirror :class:`TrainConfig`; a key left out keeps its default (the
defaults run the embedded demo with the paper's HPT optimiser settings). ``--set key.sub=value``
overrides any key on the command line; the value is read as YAML (``--set optim.lr=1e-5``,
``--set eval.benchmarks=[AIME24,AMC23]``, ``--set stages.1.optim.lr=1e-6``).

The schema is pydantic v2 (``pydantic.dataclasses``, so ``dataclasses.replace`` and ``asdict``
work on every section): it rejects unknown keys at any depth, coerces scalars to the declared
types and checks the ranges, on loading and on assignment (``config.optim.lr = -1`` fails). Its
errors become one :class:`~hpt.errors.ConfigError` line naming the dotted key, the value, the
valid keys or choices and where the value came from (``file:line`` or ``--set k=v``). Every
field's ``Field(description=...)`` is its help: :func:`field_help` returns it for ``--help`` and
:func:`render_config_table` renders the markdown table of the README.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass
from typing_extensions import TypedDict, is_typeddict

from hpt.errors import ConfigError

_SCHEMA = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)


def _number(value: Any) -> Any:
    """Numbers as a command line writes them: ``"1e-5"`` (YAML reads no-dot exponents as text)
    is a number; a bool (an int in Python) is not."""
    if isinstance(value, bool):
        raise ValueError("a bool is not a number")
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return value  # pydantic rejects it, naming the type
    return value


Int = Annotated[int, BeforeValidator(_number)]
Float = Annotated[float, BeforeValidator(_number)]


def _section(cls: type) -> type:
    """A config section: a pydantic dataclass whose assignments raise a one-line ConfigError."""
    cls = dataclass(config=_SCHEMA)(cls)
    validated_setattr = cls.__setattr__

    def __setattr__(self: Any, name: str, value: Any) -> None:
        try:
            validated_setattr(self, name, value)
        except ValidationError as error:
            raise _config_error(
                error, {name: value}, _Source(), type(self), type(self).__name__
            ) from None

    cls.__setattr__ = __setattr__
    return cls


# --------------------------------------------------------------------------------------------
# The schema
# --------------------------------------------------------------------------------------------


@_section
class ModelConfig:
    """The policy model and its tokenizer."""

    path: str | None = Field(
        None,
        description="Hugging Face model id or local folder; null: the embedded tiny demo model",
    )
    tokenizer: str | None = Field(
        None, description="tokenizer id or folder; null: the same as `path`"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="parameter dtype; auto: the dtype stored in the checkpoint"
    )
    gguf_file: str | None = Field(
        None, description="GGUF file name inside `path` to load instead of safetensors"
    )
    rope_theta: Float | None = Field(
        None, description="override the RoPE base (the paper: 40000 for Qwen2.5-Math)", gt=0
    )
    max_position_embeddings: Int | None = Field(
        None, description="override the context length (the paper: 16384 for Qwen2.5-Math)", gt=0
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in backward to save memory"
    )
    trust_remote_code: bool = Field(
        False, description="allow model code from the hub (only for trusted models)"
    )


@_section
class LoraConfig:
    """LoRA adapters on the policy (peft); r = 0 trains every weight."""

    r: Int = Field(0, description="adapter rank; 0: off (full fine-tuning)", ge=0)
    alpha: Float = Field(16.0, description="LoRA scaling numerator (scale = alpha / r)", gt=0)
    dropout: Float = Field(0.0, description="dropout on the adapters' input", ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
        description="names of the linear layers that get adapters",
    )
    merge: bool = Field(False, description="also write a merged model to final/merged")


@_section
class DataConfig:
    """Training questions, their demonstrations, prompts and length limits."""

    train: str | None = Field(
        None,
        description="training questions: .json/.jsonl/.parquet file, folder or HF dataset id; "
        "null: the demo's synthetic task",
    )
    split: str | None = Field("train", description="dataset split to read for an HF dataset id")
    fields: dict[str, str] | None = Field(
        None,
        description="map our field names (prompt, answer, demonstration, ...) to dotted paths "
        "in a row",
    )
    limit: Int | None = Field(None, description="use only the first N training questions", gt=0)
    system_prompt: str | None = Field(
        None, description="system message prepended to chat prompts; null: none"
    )
    instruction: str | None = Field(
        None,
        description="text appended to each question, e.g. 'put your final answer within \\boxed{}'",
    )
    template: str | None = Field(
        None,
        description="plain prompt with {question} (or a name: llama) for base models; "
        "null: the tokenizer's chat template",
    )
    drop_system: bool = Field(
        False, description="remove system messages found in the data's chat prompts"
    )
    reward: str = Field("math", description="verifier: math, choice, or module:function")
    reward_timeout: Float = Field(
        5.0, description="seconds allowed to score one response (then it scores 0)", gt=0
    )
    max_prompt_tokens: Int = Field(1024, description="prompts longer than this are dropped", gt=0)
    max_response_tokens: Int = Field(
        1024, description="the response budget of rollouts and demonstrations, in tokens", gt=0
    )
    overlong_demonstrations: Literal["drop", "truncate", "error"] = Field(
        "drop",
        description="demonstrations longer than max_response_tokens: drop the demonstration "
        "(counted and reported), truncate it, or stop with an error",
    )
    questions_per_step: Int = Field(
        16, description="questions sampled per training step (the batch)", gt=0
    )
    shuffle: bool = Field(True, description="reshuffle the questions every epoch (seeded)")


@_section
class RolloutConfig:
    """Sampling of the online responses."""

    n: Int = Field(8, description="responses sampled per question", gt=0)
    temperature: Float = Field(1.0, description="sampling temperature", ge=0)
    top_p: Float = Field(1.0, description="nucleus sampling threshold", gt=0, le=1)
    top_k: Int = Field(0, description="top-k sampling; 0: off", ge=0)
    max_new_tokens: Int | None = Field(
        None, description="response length limit; null: data.max_response_tokens", gt=0
    )
    engine: Literal["hf", "vllm"] = Field(
        "hf", description="generation engine: hf (transformers) or vllm"
    )
    batch_size: Int = Field(64, description="sequences generated together by the hf engine", gt=0)
    compile: bool = Field(False, description="torch.compile the hf engine's decode step")
    old_logprobs: Literal["auto", "engine", "recompute"] = Field(
        "auto",
        description="pi_old of rollout tokens when a step makes several updates: engine (the "
        "log-probs sampling returned, no extra forward pass), recompute (a forward pass of the "
        "trainer), auto: engine where they are exact (hf engine, no top-k/top-p, ddp), else "
        "recompute",
    )


@_section
class OptimConfig:
    """AdamW, the learning-rate schedule and the update's safety checks."""

    lr: Float = Field(5e-6, description="AdamW learning rate (the paper's HPT: 5e-6)", gt=0)
    weight_decay: Float = Field(0.01, description="AdamW weight decay", ge=0)
    betas: tuple[Float, Float] = Field((0.9, 0.999), description="AdamW betas")
    eps: Float = Field(1e-8, description="AdamW epsilon", gt=0)
    schedule: Literal["constant", "cosine"] = Field(
        "constant", description="learning-rate schedule after warmup"
    )
    warmup_steps: Int = Field(0, description="linear warmup steps", ge=0)
    min_lr_ratio: Float = Field(
        0.0, description="cosine schedule: final lr as a fraction of the peak", ge=0, le=1
    )
    grad_clip: Float = Field(
        1.0, description="clip the gradient norm to this; .inf: no clipping", gt=0
    )
    skip_grad_norm_above: Float = Field(
        80.0,
        description="skip the update when the gradient norm is above this or not finite; "
        ".inf: never",
        gt=0,
    )
    mini_batch_questions: Int | None = Field(
        None, description="questions per optimiser mini-batch; null: one update per step", gt=0
    )
    micro_batch_size: Int = Field(
        8, description="rows per forward/backward pass (gradient accumulation)", gt=0
    )
    micro_batch_tokens: Int = Field(
        0,
        description="tokens per forward/backward pass, rows grouped to fill it (dynamic batch "
        "size, as verl's use_dynamic_bsz); 0: micro_batch_size rows a pass",
        ge=0,
    )
    packing: bool | Literal["auto"] = Field(
        "auto",
        description="concatenate a pass's rows into one padding-free sequence (position ids "
        "restart per row); false: right-padded rows; auto: packed where the model's attention "
        "has a varlen kernel (flash-attention), padded otherwise (SDPA/eager attend over the "
        "whole packed sequence with a block-diagonal mask, slower: 1.2-1.7x measured on CPU)",
    )
    ppo_epochs: Int = Field(1, description="passes over each step's batch", gt=0)
    value_coef: Float = Field(0.5, description="weight of the value loss (PPO with GAE only)", ge=0)
    logits_chunk_size: Int = Field(
        4096, description="tokens per chunk of the output head (bounds the logits memory)", gt=0
    )


@_section
class DistributedConfig:
    """Data-parallel training under torchrun (one process per device)."""

    strategy: Literal["ddp", "fsdp2"] = Field(
        "ddp",
        description="data-parallel strategy under torchrun: ddp replicates the model, fsdp2 "
        "shards each decoder layer with torch.distributed.fsdp.fully_shard",
    )
    mixed_precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto",
        description="fsdp2 parameter dtype in forward/backward; auto: bf16 on GPUs that support "
        "it, else fp32; gradients reduce in fp32",
    )


@_section
class EvalConfig:
    """Held-out evaluation before, during and after training."""

    every: Int = Field(
        0, description="evaluate every N steps; 0: only before and after training", ge=0
    )
    sets: dict[str, str] = Field(
        default_factory=dict,
        description="held-out sets, name -> file, folder or HF id; accuracy logged as eval/<name>",
    )
    k: Int = Field(1, description="samples per question (accuracy is avg@k)", gt=0)
    temperature: Float = Field(0.6, description="sampling temperature", ge=0)
    top_p: Float = Field(0.95, description="nucleus sampling threshold", gt=0, le=1)
    max_new_tokens: Int | None = Field(
        None, description="response length limit; null: data.max_response_tokens", gt=0
    )
    limit: Int | None = Field(None, description="evaluate only the first N questions", gt=0)
    benchmarks: list[str] = Field(
        default_factory=list,
        description="benchmark names or paths evaluated after training with hpt eval",
    )


@_section
class LoggingConfig:
    """What a run writes besides metrics.jsonl."""

    tensorboard: bool = Field(
        False, description="also write TensorBoard events (needs tensorboard installed)"
    )
    progress: bool = Field(True, description="show a progress bar (only on a terminal)")
    plots: bool = Field(True, description="draw PNG plots of the run when it ends")


@_section
class DemoConfig:
    """The embedded demo: a tiny model warmed up on a synthetic task (used when model.path is null)."""

    size: str = Field("tiny", description="size of the tiny model (hpt.demo.tiny.build_model)")
    pretrain_steps: Int = Field(
        400,
        description="SFT warm-up steps on the easy split so the model solves some questions",
        ge=0,
    )
    pretrain_lr: Float = Field(1e-3, description="learning rate of the warm-up", gt=0)
    train_questions: Int = Field(
        2000, description="synthetic post-training questions (the train split)", gt=0
    )
    test_questions: Int = Field(
        400,
        description="synthetic held-out questions in each of the val, test and ood splits",
        gt=0,
    )


def _fields(cls: type) -> dict[str, Any]:
    """Field name -> pydantic FieldInfo of a section, in schema order."""
    return dict(cls.__pydantic_fields__)


def _overrides_of(section: type) -> Any:
    """A stage's partial ``section``: any subset of its keys, each validated as in the section.

    A TypedDict (total=False) validates to a plain dict that holds only the keys given.
    """
    keys = {
        name: Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
        for name, info in _fields(section).items()
    }
    partial = TypedDict(f"{section.__name__}Overrides", keys, total=False)  # type: ignore[misc]
    partial.__pydantic_config__ = _SCHEMA  # type: ignore[attr-defined]
    return Annotated[partial, BeforeValidator(lambda value: {} if value is None else value)]


@_section
class StageConfig:
    """One stage of a multi-stage run (e.g. SFT then GRPO); unset keys keep the top-level value."""

    name: str = Field("", description="stage name; empty: '<index>-<algorithm>'")
    algorithm: str | None = Field(None, description="algorithm of this stage")
    max_steps: Int | None = Field(None, description="training steps of this stage", ge=0)
    algo: dict[str, Any] | None = Field(
        None, description="algorithm overrides of this stage (replace the top-level `algo`)"
    )
    data: _overrides_of(DataConfig) = Field(  # type: ignore[valid-type]
        default_factory=dict, description="overrides of the `data` section"
    )
    rollout: _overrides_of(RolloutConfig) = Field(  # type: ignore[valid-type]
        default_factory=dict, description="overrides of the `rollout` section"
    )
    optim: _overrides_of(OptimConfig) = Field(  # type: ignore[valid-type]
        default_factory=dict, description="overrides of the `optim` section"
    )
    eval: _overrides_of(EvalConfig) = Field(  # type: ignore[valid-type]
        default_factory=dict, description="overrides of the `eval` section"
    )


@_section
class TrainConfig:
    """A training run: writes runs/<name>/ (config.yaml, metrics.jsonl, checkpoints/, summary.json)."""

    name: str = Field("demo", description="run name: the run writes <output_dir>/<name>/")
    algorithm: str = Field("hpt", description="algorithm name (see `hpt algorithms`)")
    max_steps: Int = Field(60, description="training steps", ge=0)
    save_every: Int = Field(
        20, description="checkpoint every N steps (and at the end); 0: only at the end", ge=0
    )
    seed: Int = Field(0, description="seed of sampling, data order and initialisation")
    resume: bool = Field(False, description="continue from the newest checkpoint of runs/<name>/")
    overwrite: bool = Field(
        False, description="replace an existing run of the same name (else it is an error)"
    )
    output_dir: str = Field("runs", description="parent folder of runs")
    keep_checkpoints: Int | None = Field(
        2, description="keep the newest K checkpoints; null: keep all", gt=0
    )
    model: ModelConfig = Field(default_factory=ModelConfig, description="the policy model")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapters (peft)")
    data: DataConfig = Field(
        default_factory=DataConfig, description="training data, prompts and length limits"
    )
    rollout: RolloutConfig = Field(
        default_factory=RolloutConfig, description="sampling of rollouts"
    )
    algo: dict[str, Any] = Field(
        default_factory=dict,
        description="overrides passed to hpt.get_algorithm (clip_low, clip_high, dual_clip, "
        "aggregation, gate_threshold, gate_upper, shaping_gamma, sft_coef, entropy_coef, kl_coef, "
        "kl_estimator, norm_length)",
    )
    optim: OptimConfig = Field(default_factory=OptimConfig, description="optimiser and update")
    distributed: DistributedConfig = Field(
        default_factory=DistributedConfig, description="multi-process training (torchrun)"
    )
    eval: EvalConfig = Field(default_factory=EvalConfig, description="held-out evaluation")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="logging and plots")
    demo: DemoConfig = Field(default_factory=DemoConfig, description="the embedded demo")
    stages: list[StageConfig] = Field(
        default_factory=list,
        description="optional stages run in order, each overriding keys above (e.g. SFT then GRPO)",
    )

    @property
    def run_dir(self) -> Path:
        """``<output_dir>/<name>``: where the run writes."""
        return Path(self.output_dir) / self.name

    def resolved_stages(self) -> list[TrainConfig]:
        """The configs of the stages, in order (see :func:`resolve_stages`)."""
        return [stage for _, stage in resolve_stages(self)]


_TRAIN_CONFIG = TypeAdapter(TrainConfig)


# --------------------------------------------------------------------------------------------
# Where a key came from, and pydantic's errors as one line
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Source:
    """The origin of each dotted key: a line of a YAML file or a ``--set`` override."""

    file: str | None = None
    lines: dict[str, int] = dataclasses.field(default_factory=dict)
    overrides: dict[str, str] = dataclasses.field(default_factory=dict)

    def where(self, key: str) -> str:
        """`` (file:line)`` or `` (--set k=v)`` for ``key``, a key under it or its nearest parent."""
        below = [text for name, text in self.overrides.items() if name.startswith(key + ".")]
        if below:
            return f" (--set {below[-1]})"
        probe = key
        while True:
            if probe in self.overrides:
                return f" (--set {self.overrides[probe]})"
            if probe in self.lines and self.file:
                return f" ({self.file}:{self.lines[probe]})"
            if "." not in probe:
                break
            probe = probe.rsplit(".", 1)[0]
        return f" ({self.file})" if self.file else ""


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _unwrap(tp: Any) -> Any:
    """``tp`` without ``Annotated`` metadata and, for ``X | None``, without the None."""
    while typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(tp) if arg is not type(None)]
        if len(args) == 1:
            return _unwrap(args[0])
    return tp


def _keys(tp: Any) -> dict[str, Any] | None:
    """Key -> annotation of a section or a stage's partial section; None for anything else."""
    if dataclasses.is_dataclass(tp):
        return {name: info.annotation for name, info in _fields(tp).items()}
    if is_typeddict(tp):
        return typing.get_type_hints(tp)
    return None


def _type_name(tp: Any) -> str:
    """A short readable name of a type annotation: ``float | None``, ``list[str]``, ``"a" | "b"``."""
    while typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any"
    if origin is Literal:
        return " | ".join(str(arg) for arg in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(arg) for arg in args)
    if origin in (list, tuple, dict):
        inner = ", ".join("..." if arg is Ellipsis else _type_name(arg) for arg in args)
        return f"{origin.__name__}[{inner}]"
    if is_typeddict(tp):
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return "section" if tp is not StageConfig else "stage"
    return getattr(tp, "__name__", str(tp))


_BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def _config_error(
    error: ValidationError,
    raw: Any,
    source: _Source,
    schema: type = TrainConfig,
    prefix: str = "",
) -> ConfigError:
    """The first problem of a pydantic ValidationError as one line: the dotted key, its value, the
    valid keys or choices and where the value came from (``raw``: the input, ``prefix``: where
    ``schema`` sits)."""
    problem = error.errors()[0]
    # Walk the location through the schema: the key the user wrote and the annotation it has.
    tp: Any = schema
    parts: list[str] = [prefix] if prefix else []
    value: Any = raw
    for part in problem["loc"]:
        tp = _unwrap(tp)
        keys = _keys(tp)
        origin = typing.get_origin(tp)
        if keys is not None and isinstance(part, str):
            if part not in keys:
                return _unknown_key(list(keys), part, ".".join(parts), source)
            tp = keys[part]
        elif origin is list and isinstance(part, int):
            tp = typing.get_args(tp)[0]
        elif origin is dict and isinstance(part, str):
            tp = typing.get_args(tp)[1]
        else:  # a tuple's element, or a validator's own tag: name the key that holds it
            break
        parts.append(str(part))
        value = value[part] if isinstance(value, (Mapping, list)) else problem["input"]
    key = ".".join(parts)
    bound = next((b for b in _BOUNDS if b in problem.get("ctx", {})), None)
    if bound is not None:
        limit = problem["ctx"][bound]
        limit = int(limit) if isinstance(limit, float) and limit.is_integer() else limit
        expected = f"{_BOUNDS[bound]} {limit}"
    else:
        expected = _type_name(tp)
    hint = ""
    if typing.get_origin(_unwrap(tp)) is Literal:
        choices = [str(arg) for arg in typing.get_args(_unwrap(tp))]
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(
        f"config key {key!r} must be {expected}, got {value!r}{source.where(key)}{hint}"
    )


def _unknown_key(valid: list[str], key: str, prefix: str, source: _Source) -> ConfigError:
    dotted = _join(prefix, key)
    close = difflib.get_close_matches(str(key), valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    scope = f"of {prefix!r}" if prefix else "at the top level"
    return ConfigError(
        f"unknown config key {dotted!r}{source.where(dotted)}{hint} valid keys {scope}: "
        + ", ".join(valid)
    )


# --------------------------------------------------------------------------------------------
# Reading YAML, overrides, loading, stages
# --------------------------------------------------------------------------------------------


def _key_lines(node: Any, prefix: str, lines: dict[str, int], file: str) -> None:
    """Record the 1-based line of every key of a composed YAML node; reject duplicate keys."""
    import yaml

    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = _join(prefix, key_node.value)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"duplicate config key {key!r} ({file}:{line})")
            seen.add(key)
            lines[key] = line
            _key_lines(value_node, key, lines, file)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            key = _join(prefix, index)
            lines[key] = item.start_mark.line + 1
            _key_lines(item, key, lines, file)


def _read_yaml(path: Path, source: _Source) -> dict[str, Any]:
    """Read a YAML mapping, recording key lines; one-line ConfigError with file and line on failure."""
    import yaml

    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        place = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"invalid YAML ({place}): {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config must be a mapping of keys to values ({path}:1)")
    _key_lines(node, "", source.lines, str(path))
    return data


def apply_override(raw: dict[str, Any], assignment: str, source: _Source | None = None) -> None:
    """Apply one ``key.sub=value`` to a raw config mapping in place (value parsed as YAML).

    List elements are addressed by index: ``stages.1.optim.lr=1e-6``.
    """
    import yaml

    key, sep, text = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(
            f"--set expects key=value, got {assignment!r} (a CONFIG file goes before --set)"
        )
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        raise ConfigError(f"--set {assignment}: the value is not valid YAML") from None
    parts = key.split(".")
    node: Any = raw
    for depth, part in enumerate(parts[:-1]):
        here = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            node = node[_list_index(node, part, here)]
        else:
            if not isinstance(node.get(part), (dict, list)):
                node[part] = {}
            node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(node, last, key)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:  # pragma: no cover - guarded above
        raise ConfigError(f"--set {assignment}: {key!r} is not inside a section")
    if source is not None:
        source.overrides[key] = assignment


def _list_index(items: list, part: str, key: str) -> int:
    if not part.lstrip("-").isdigit() or not -len(items) <= int(part) < len(items):
        raise ConfigError(f"--set: {key!r} names no element of a list of {len(items)}")
    return int(part)


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> TrainConfig:
    """Read, override and validate a training config.

    Args:
        path: A YAML file; None: the defaults (the embedded demo).
        overrides: ``key.sub=value`` strings (values parsed as YAML), applied in order.

    Returns:
        The validated :class:`TrainConfig` (stages included; see :func:`resolve_stages`).

    Raises:
        ConfigError: missing file, YAML syntax error, unknown key, wrong type or range, unknown
            algorithm or algorithm override; one line naming the key and its file line.
    """
    source = _Source(file=str(path) if path is not None else None)
    raw = _read_yaml(Path(path), source) if path is not None else {}
    for assignment in overrides:
        apply_override(raw, assignment, source)
    try:
        config = _TRAIN_CONFIG.validate_python(raw)
    except ValidationError as error:
        raise _config_error(error, raw, source) from None
    for index, (_, stage_config) in enumerate(resolve_stages(config)):
        prefix = f"stages.{index}." if config.stages else ""
        _check_algorithm(stage_config, prefix, source)
    return config


def _merge(obj: Any, overrides: Mapping[str, Any]) -> Any:
    """``obj`` (a section) with the keys of a validated partial mapping replaced."""
    return dataclasses.replace(obj, **overrides)


def resolve_stages(config: TrainConfig) -> list[tuple[str, TrainConfig]]:
    """The run's stages as full configs, in order, with their ``null: <other key>`` defaults filled.

    Without ``stages`` this is ``[(config.algorithm, config)]``. Otherwise each stage's config is
    the top-level config with the stage's keys applied (sections merge key by key; ``algo``, when
    the stage sets it, replaces the top-level one) and ``stages`` emptied; names default to
    ``"<index>-<algorithm>"`` counted from 1. Run name and output folder are the top-level ones.
    In every returned config ``optim.mini_batch_questions``, ``rollout.max_new_tokens`` and
    ``eval.max_new_tokens`` are numbers (taken from the stage's own batch and response limit).
    """
    if not config.stages:
        return [(config.algorithm, _fill_derived(config))]
    resolved = []
    for index, stage in enumerate(config.stages):
        algorithm = stage.algorithm or config.algorithm
        stage_config = dataclasses.replace(
            config,
            algorithm=algorithm,
            max_steps=config.max_steps if stage.max_steps is None else stage.max_steps,
            algo=dict(config.algo if stage.algo is None else stage.algo),
            data=_merge(config.data, stage.data),
            rollout=_merge(config.rollout, stage.rollout),
            optim=_merge(config.optim, stage.optim),
            eval=_merge(config.eval, stage.eval),
            stages=[],
        )
        resolved.append((stage.name or f"{index + 1}-{algorithm}", _fill_derived(stage_config)))
    names = [name for name, _ in resolved]
    if len(set(names)) != len(names):
        raise ConfigError(f"stage names must be unique, got {names}")
    return resolved


def _fill_derived(config: TrainConfig) -> TrainConfig:
    """Replace the ``null`` keys whose default is another key's value by that value."""
    data = config.data
    return dataclasses.replace(
        config,
        optim=dataclasses.replace(
            config.optim,
            mini_batch_questions=config.optim.mini_batch_questions or data.questions_per_step,
        ),
        rollout=dataclasses.replace(
            config.rollout,
            max_new_tokens=config.rollout.max_new_tokens or data.max_response_tokens,
        ),
        eval=dataclasses.replace(
            config.eval, max_new_tokens=config.eval.max_new_tokens or data.max_response_tokens
        ),
    )


def _check_algorithm(config: TrainConfig, prefix: str, source: _Source) -> None:
    """Validate the algorithm name and its overrides with hpt.get_algorithm (their one schema)."""
    from hpt.algorithms import get_algorithm, list_algorithms

    key = f"{prefix}algorithm"
    names = list_algorithms()
    if config.algorithm not in names:
        close = difflib.get_close_matches(config.algorithm, names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"unknown algorithm {config.algorithm!r} at {key!r}{source.where(key)}{hint} "
            f"choose from {', '.join(names)}"
        )
    try:
        get_algorithm(config.algorithm, **config.algo)
    except (ValueError, TypeError) as error:  # TypeError: a key that is not a name
        key = f"{prefix}algo" if prefix and config.algo else "algo"
        override = getattr(error, "override", None)
        if override is not None:
            key = f"{key}.{override}"
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError(
            f"bad algorithm override at {key!r}{source.where(key)}: {message}"
        ) from None


# --------------------------------------------------------------------------------------------
# Writing and documenting
# --------------------------------------------------------------------------------------------


def config_to_dict(config: Any) -> dict[str, Any]:
    """A config (or section) as plain YAML-safe data: dicts, lists, scalars."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, Mapping):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(config)


def dump_config(config: TrainConfig) -> str:
    """The config as YAML text (keys in schema order)."""
    import yaml

    return yaml.safe_dump(config_to_dict(config), sort_keys=False, allow_unicode=True)


def save_config(config: TrainConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML, atomically; ``load_config`` of it gives it back."""
    from hpt.utils import atomic_write_text

    return atomic_write_text(path, dump_config(config))


def _schema_rows(cls: type, prefix: str) -> list[tuple[str, Any, Any, str]]:
    """(dotted key, annotation, default, help) of every key of ``cls``, sections expanded."""
    rows = []
    defaults = cls()
    for name, info in _fields(cls).items():
        key = _join(prefix, name)
        tp = _unwrap(info.annotation)
        rows.append((key, info.annotation, getattr(defaults, name), info.description or ""))
        if dataclasses.is_dataclass(tp):
            rows.extend(_schema_rows(tp, key))
        elif typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            rows.extend(_schema_rows(typing.get_args(tp)[0], f"{key}[]"))
    return rows


def field_help(cls: type = TrainConfig, prefix: str = "") -> dict[str, str]:
    """Dotted key -> one-line help for every key of ``cls`` and its sections (stages as ``stages[].key``)."""
    return {key: help_ for key, _, _, help_ in _schema_rows(cls, prefix)}


def _yaml_scalar(value: Any) -> str:
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def render_config_table(cls: type = TrainConfig) -> str:
    """The markdown table of every config key: key, type, default and help (for the README)."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, tp, default, help_ in _schema_rows(cls, ""):
        inner = _unwrap(tp)
        if dataclasses.is_dataclass(inner):
            type_name, default_cell = "section", ""
        elif typing.get_origin(inner) is list and dataclasses.is_dataclass(
            typing.get_args(inner)[0]
        ):
            type_name, default_cell = "list of stages", "`[]`"
        else:
            type_name = _type_name(tp)
            default_cell = f"`{cell(_yaml_scalar(config_to_dict({'v': default})['v']))}`"
        lines.append(f"| `{key}` | {cell(type_name)} | {default_cell} | {cell(help_)} |")
    return "\n".join(lines) + "\n"
