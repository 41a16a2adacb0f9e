"""The training configuration: nested dataclasses read from YAML, with one line of help per key.

A config is YAML whose keys mirror :class:`TrainConfig`; a key left out keeps its default (the
defaults run the embedded demo with the paper's HPT optimiser settings). ``--set key.sub=value``
overrides any key on the command line; the value is read as YAML (``--set optim.lr=1e-5``,
``--set eval.benchmarks=[AIME24,AMC23]``, ``--set stages.1.optim.lr=1e-6``).

Loading rejects unknown keys at any depth (naming the dotted key, its place in the file and the
valid keys), coerces scalars to the declared types and checks ranges, so a typo fails before a
model is loaded. Every field carries its help in ``field(metadata={"help": ...})``:
:func:`field_help` returns it for ``--help`` and :func:`render_config_table` renders the markdown
table of the README.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hpt.errors import ConfigError

_MISSING = dataclasses.MISSING


def opt(
    default: Any = _MISSING,
    help: str = "",
    *,
    factory: Any = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
) -> Any:
    """A dataclass field with its one-line help and optional range checks (``ge``, ``gt``, ``le``)."""
    metadata = {"help": help, "ge": ge, "gt": gt, "le": le}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def section(cls: type, help: str) -> Any:
    """A nested config section (a dataclass field whose default is ``cls()``)."""
    return field(default_factory=cls, metadata={"help": help})


# --------------------------------------------------------------------------------------------
# The schema
# --------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """The policy model and its tokenizer."""

    path: str | None = opt(
        None, "Hugging Face model id or local folder; null: the embedded tiny demo model"
    )
    tokenizer: str | None = opt(None, "tokenizer id or folder; null: the same as `path`")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt(
        "auto", "parameter dtype; auto: the dtype stored in the checkpoint"
    )
    gguf_file: str | None = opt(None, "GGUF file name inside `path` to load instead of safetensors")
    rope_theta: float | None = opt(
        None, "override the RoPE base (the paper: 40000 for Qwen2.5-Math)", gt=0
    )
    max_position_embeddings: int | None = opt(
        None, "override the context length (the paper: 16384 for Qwen2.5-Math)", gt=0
    )
    gradient_checkpointing: bool = opt(False, "recompute activations in backward to save memory")
    trust_remote_code: bool = opt(False, "allow model code from the hub (only for trusted models)")


@dataclass
class DataConfig:
    """Training questions, their demonstrations, prompts and length limits."""

    train: str | None = opt(
        None,
        "training questions: .json/.jsonl/.parquet file, folder or HF dataset id; "
        "null: the demo's synthetic task",
    )
    split: str | None = opt("train", "dataset split to read for an HF dataset id")
    fields: dict[str, str] | None = opt(
        None, "map our field names (prompt, answer, demonstration, ...) to dotted paths in a row"
    )
    limit: int | None = opt(None, "use only the first N training questions", gt=0)
    system_prompt: str | None = opt(None, "system message prepended to chat prompts; null: none")
    instruction: str | None = opt(
        None, "text appended to each question, e.g. 'put your final answer within \\boxed{}'"
    )
    template: str | None = opt(
        None,
        "plain prompt with {question} (or a name: llama) for base models; "
        "null: the tokenizer's chat template",
    )
    drop_system: bool = opt(False, "remove system messages found in the data's chat prompts")
    reward: str = opt("math", "verifier: math, choice, or module:function")
    reward_timeout: float = opt(
        5.0, "seconds allowed to score one response (then it scores 0)", gt=0
    )
    max_prompt_tokens: int = opt(1024, "prompts longer than this are dropped", gt=0)
    max_response_tokens: int = opt(
        1024, "the response budget of rollouts and demonstrations, in tokens", gt=0
    )
    overlong_demonstrations: Literal["drop", "truncate", "error"] = opt(
        "drop",
        "demonstrations longer than max_response_tokens: drop the demonstration (counted and "
        "reported), truncate it, or stop with an error",
    )
    questions_per_step: int = opt(16, "questions sampled per training step (the batch)", gt=0)
    shuffle: bool = opt(True, "reshuffle the questions every epoch (seeded)")


@dataclass
class RolloutConfig:
    """Sampling of the online responses."""

    n: int = opt(8, "responses sampled per question", gt=0)
    temperature: float = opt(1.0, "sampling temperature", ge=0)
    top_p: float = opt(1.0, "nucleus sampling threshold", gt=0, le=1)
    top_k: int = opt(0, "top-k sampling; 0: off", ge=0)
    max_new_tokens: int | None = opt(
        None, "response length limit; null: data.max_response_tokens", gt=0
    )
    engine: Literal["hf", "vllm"] = opt("hf", "generation engine: hf (transformers) or vllm")
    batch_size: int = opt(64, "sequences generated together by the hf engine", gt=0)


@dataclass
class OptimConfig:
    """AdamW, the learning-rate schedule and the update's safety checks."""

    lr: float = opt(5e-6, "AdamW learning rate (the paper's HPT: 5e-6)", gt=0)
    weight_decay: float = opt(0.01, "AdamW weight decay", ge=0)
    betas: tuple[float, float] = opt((0.9, 0.999), "AdamW betas")
    eps: float = opt(1e-8, "AdamW epsilon", gt=0)
    schedule: Literal["constant", "cosine"] = opt("constant", "learning-rate schedule after warmup")
    warmup_steps: int = opt(0, "linear warmup steps", ge=0)
    min_lr_ratio: float = opt(
        0.0, "cosine schedule: final lr as a fraction of the peak", ge=0, le=1
    )
    grad_clip: float = opt(1.0, "clip the gradient norm to this; .inf: no clipping", gt=0)
    skip_grad_norm_above: float = opt(
        80.0,
        "skip the update when the gradient norm is above this or not finite; .inf: never",
        gt=0,
    )
    mini_batch_questions: int | None = opt(
        None, "questions per optimiser mini-batch; null: one update per step", gt=0
    )
    micro_batch_size: int = opt(8, "rows per forward/backward pass (gradient accumulation)", gt=0)
    ppo_epochs: int = opt(1, "passes over each step's batch", gt=0)
    value_coef: float = opt(0.5, "weight of the value loss (PPO with GAE only)", ge=0)
    logits_chunk_size: int = opt(
        4096, "tokens per chunk of the output head (bounds the logits memory)", gt=0
    )


@dataclass
class EvalConfig:
    """Held-out evaluation before, during and after training."""

    every: int = opt(0, "evaluate every N steps; 0: only before and after training", ge=0)
    sets: dict[str, str] = opt(
        help="held-out sets, name -> file, folder or HF id; accuracy logged as eval/<name>",
        factory=dict,
    )
    k: int = opt(1, "samples per question (accuracy is avg@k)", gt=0)
    temperature: float = opt(0.6, "sampling temperature", ge=0)
    top_p: float = opt(0.95, "nucleus sampling threshold", gt=0, le=1)
    max_new_tokens: int | None = opt(
        None, "response length limit; null: data.max_response_tokens", gt=0
    )
    limit: int | None = opt(None, "evaluate only the first N questions", gt=0)
    benchmarks: list[str] = opt(
        help="benchmark names or paths evaluated after training with hpt eval", factory=list
    )


@dataclass
class LoggingConfig:
    """What a run writes besides metrics.jsonl."""

    tensorboard: bool = opt(False, "also write TensorBoard events (needs tensorboard installed)")
    progress: bool = opt(True, "show a progress bar (only on a terminal)")
    plots: bool = opt(True, "draw PNG plots of the run when it ends")


@dataclass
class DemoConfig:
    """The embedded demo: a tiny model warmed up on a synthetic task (used when model.path is null)."""

    size: str = opt("tiny", "size of the tiny model (hpt.demo.tiny.build_model)")
    pretrain_steps: int = opt(
        400, "SFT warm-up steps on the easy split so the model solves some questions", ge=0
    )
    pretrain_lr: float = opt(1e-3, "learning rate of the warm-up", gt=0)
    train_questions: int = opt(2000, "synthetic post-training questions (the train split)", gt=0)
    test_questions: int = opt(
        400, "synthetic held-out questions in each of the val, test and ood splits", gt=0
    )


@dataclass
class StageConfig:
    """One stage of a multi-stage run (e.g. SFT then GRPO); unset keys keep the top-level value."""

    name: str = opt("", "stage name; empty: '<index>-<algorithm>'")
    algorithm: str | None = opt(None, "algorithm of this stage")
    max_steps: int | None = opt(None, "training steps of this stage", ge=0)
    algo: dict[str, Any] | None = opt(
        None, "algorithm overrides of this stage (replace the top-level `algo`)"
    )
    data: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "overrides of the `data` section", "section": DataConfig},
    )
    rollout: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "overrides of the `rollout` section", "section": RolloutConfig},
    )
    optim: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "overrides of the `optim` section", "section": OptimConfig},
    )
    eval: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "overrides of the `eval` section", "section": EvalConfig},
    )


@dataclass
class TrainConfig:
    """A training run: writes runs/<name>/ (config.yaml, metrics.jsonl, checkpoints/, summary.json)."""

    name: str = opt("demo", "run name: the run writes <output_dir>/<name>/")
    algorithm: str = opt("hpt", "algorithm name (see `hpt algorithms`)")
    max_steps: int = opt(60, "training steps", ge=0)
    save_every: int = opt(20, "checkpoint every N steps (and at the end); 0: only at the end", ge=0)
    seed: int = opt(0, "seed of sampling, data order and initialisation")
    resume: bool = opt(False, "continue from the newest checkpoint of runs/<name>/")
    overwrite: bool = opt(False, "replace an existing run of the same name (else it is an error)")
    output_dir: str = opt("runs", "parent folder of runs")
    keep_checkpoints: int | None = opt(2, "keep the newest K checkpoints; null: keep all", gt=0)
    model: ModelConfig = section(ModelConfig, "the policy model")
    data: DataConfig = section(DataConfig, "training data, prompts and length limits")
    rollout: RolloutConfig = section(RolloutConfig, "sampling of rollouts")
    algo: dict[str, Any] = opt(
        help="overrides passed to hpt.get_algorithm (clip_low, clip_high, dual_clip, aggregation, "
        "gate_threshold, gate_upper, shaping_gamma, sft_coef, entropy_coef, kl_coef, "
        "kl_estimator, norm_length)",
        factory=dict,
    )
    optim: OptimConfig = section(OptimConfig, "optimiser and update")
    eval: EvalConfig = section(EvalConfig, "held-out evaluation")
    logging: LoggingConfig = section(LoggingConfig, "logging and plots")
    demo: DemoConfig = section(DemoConfig, "the embedded demo")
    stages: list[StageConfig] = opt(
        help="optional stages run in order, each overriding keys above (e.g. SFT then GRPO)",
        factory=list,
    )

    @property
    def run_dir(self) -> Path:
        """``<output_dir>/<name>``: where the run writes."""
        return Path(self.output_dir) / self.name

    def resolved_stages(self) -> list[TrainConfig]:
        """The configs of the stages, in order (see :func:`resolve_stages`)."""
        return [stage for _, stage in resolve_stages(self)]


# --------------------------------------------------------------------------------------------
# Where a key came from (for one-line errors)
# --------------------------------------------------------------------------------------------


@dataclass
class _Source:
    """The origin of each dotted key: a line of a YAML file or a ``--set`` override."""

    file: str | None = None
    lines: dict[str, int] = field(default_factory=dict)
    overrides: dict[str, str] = field(default_factory=dict)

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


# --------------------------------------------------------------------------------------------
# Type checking and coercion
# --------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    """A short readable name of a type annotation: ``float | None``, ``list[str]``, ``"a" | "b"``."""
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
    if dataclasses.is_dataclass(tp):
        return "section" if tp is not StageConfig else "stage"
    return getattr(tp, "__name__", str(tp))


class _Mismatch(Exception):
    """A value that does not fit a type (turned into a ConfigError naming the key)."""


def _coerce(value: Any, tp: Any, key: str, source: _Source, partial: bool) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert it (``"1e-5"`` -> ``1e-05``).

    Raises:
        _Mismatch: the value does not fit (the caller names the key).
        ConfigError: a nested section or list element is wrong (already names its key).
    """
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source, partial)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is Literal:
        if value in args:
            return value
        raise _Mismatch
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise _Mismatch
        return _build(tp, value, key, source, partial=partial)
    if origin is list or tp is list:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        item_tp = args[0] if args else Any
        return [
            _coerce_key(item, item_tp, _join(key, i), source, partial)
            for i, item in enumerate(value)
        ]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        if len(args) == 2 and args[1] is Ellipsis:
            item_types = [args[0]] * len(value)
        elif len(args) != len(value):
            raise _Mismatch
        else:
            item_types = list(args)
        return tuple(
            _coerce_key(item, item_tp, _join(key, i), source, partial)
            for i, (item, item_tp) in enumerate(zip(value, item_types))
        )
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise _Mismatch
        value_tp = args[1] if args else Any
        return {
            str(k): _coerce_key(item, value_tp, _join(key, k), source, partial)
            for k, item in value.items()
        }
    return _coerce_scalar(value, tp)


def _coerce_scalar(value: Any, tp: Any) -> Any:
    """bool, int, float and str, with the conversions a command line needs (``"5e-6"`` -> float)."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no"):
            return value.strip().lower() in ("true", "yes")
        raise _Mismatch
    if isinstance(value, bool):  # a bool is an int in Python; never accept it as a number
        raise _Mismatch
    if tp is int:
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                raise _Mismatch from None
            if number.is_integer():
                return int(number)
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)):
            return str(value)
        raise _Mismatch
    raise TypeError(f"unsupported config annotation {tp!r}")  # a bug in the schema, not user input


def _coerce_key(value: Any, tp: Any, key: str, source: _Source, partial: bool) -> Any:
    """:func:`_coerce`, turning a mismatch into a ConfigError that names the key and its place."""
    try:
        return _coerce(value, tp, key, source, partial)
    except _Mismatch:
        raise ConfigError(
            f"config key {key!r} must be {_type_name(tp)}, got {value!r}{source.where(key)}"
        ) from None


def _check_range(value: Any, metadata: Mapping[str, Any], key: str, source: _Source) -> None:
    """Apply the field's ``ge``/``gt``/``le`` bounds to a number (None passes)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    bounds = (
        ("ge", ">=", lambda b: value >= b),
        ("gt", ">", lambda b: value > b),
        ("le", "<=", lambda b: value <= b),
    )
    for name, symbol, holds in bounds:
        bound = metadata.get(name)
        if bound is not None and not holds(bound):
            raise ConfigError(
                f"config key {key!r} must be {symbol} {bound}, got {value!r}{source.where(key)}"
            )


def _unknown_key(cls: type, key: str, prefix: str, source: _Source) -> ConfigError:
    valid = [f.name for f in dataclasses.fields(cls)]
    dotted = _join(prefix, key)
    close = difflib.get_close_matches(str(key), valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    scope = f"of {prefix!r}" if prefix else "at the top level"
    return ConfigError(
        f"unknown config key {dotted!r}{source.where(dotted)}{hint} valid keys {scope}: "
        + ", ".join(valid)
    )


def _build(
    cls: type, raw: Mapping[str, Any], prefix: str, source: _Source, *, partial: bool = False
) -> Any:
    """Validate a mapping against dataclass ``cls``; return an instance, or (partial) a checked dict."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config key {prefix!r} must be a mapping{source.where(prefix)}")
    fields_by_name = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in fields_by_name:
            raise _unknown_key(cls, key, prefix, source)
        dotted = _join(prefix, key)
        metadata = fields_by_name[key].metadata
        section_cls = metadata.get("section")
        if section_cls is not None:  # a stage's partial override of a section
            values[key] = _build(
                section_cls, value if value is not None else {}, dotted, source, partial=True
            )
            continue
        coerced = _coerce_key(value, hints[key], dotted, source, partial)
        _check_range(coerced, metadata, dotted, source)
        values[key] = coerced
    if partial:
        return values
    return cls(**values)


# --------------------------------------------------------------------------------------------
# Overrides, loading, stages
# --------------------------------------------------------------------------------------------


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
    config = _build(TrainConfig, raw, "", source)
    for index, (_, stage_config) in enumerate(resolve_stages(config)):
        prefix = f"stages.{index}." if config.stages else ""
        _check_algorithm(stage_config, prefix, source)
    return config


def _merge(obj: Any, overrides: Mapping[str, Any]) -> Any:
    """``obj`` (a dataclass) with the keys of a checked partial mapping replaced, recursively."""
    changes = {}
    for key, value in overrides.items():
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current) and isinstance(value, Mapping):
            changes[key] = _merge(current, value)
        else:
            changes[key] = value
    return dataclasses.replace(obj, **changes)


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
    """Validate the algorithm name and its overrides with hpt.algorithms."""
    from hpt.algorithms import get_algorithm, list_algorithms

    key = f"{prefix}algorithm"
    names = list_algorithms()
    if config.algorithm not in names:
        raise ConfigError(
            f"unknown algorithm {config.algorithm!r} at {key!r}{source.where(key)}; "
            f"choose from {', '.join(names)}"
        )
    try:
        get_algorithm(config.algorithm, **config.algo)
    except (ValueError, TypeError) as error:
        key = f"{prefix}algo" if prefix and config.algo else "algo"
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


def field_help(cls: type = TrainConfig, prefix: str = "") -> dict[str, str]:
    """Dotted key -> one-line help for every key of ``cls`` and its sections (stages as ``stages[].key``)."""
    helps: dict[str, str] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = _join(prefix, f.name)
        helps[key] = f.metadata.get("help", "")
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            helps.update(field_help(tp, key))
        elif typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            helps.update(field_help(typing.get_args(tp)[0], f"{key}[]"))
    return helps


def _rows(cls: type, prefix: str) -> list[tuple[str, str, str, str]]:
    rows = []
    hints = typing.get_type_hints(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        key = _join(prefix, f.name)
        tp = hints[f.name]
        help_ = f.metadata.get("help", "")
        if dataclasses.is_dataclass(tp):
            rows.append((key, "section", "", help_))
            rows.extend(_rows(tp, key))
            continue
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
        if item is not None and dataclasses.is_dataclass(item):
            rows.append((key, "list of stages", "[]", help_))
            rows.extend(_rows(item, f"{key}[]"))
            continue
        default = _yaml_scalar(config_to_dict({"v": getattr(defaults, f.name)})["v"])
        rows.append((key, _type_name(tp), default, help_))
    return rows


def _yaml_scalar(value: Any) -> str:
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def render_config_table(cls: type = TrainConfig) -> str:
    """The markdown table of every config key: key, type, default and help (for the README)."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, type_name, default, help_ in _rows(cls, ""):
        default_cell = f"`{cell(default)}`" if default else ""
        lines.append(f"| `{key}` | {cell(type_name)} | {default_cell} | {cell(help_)} |")
    return "\n".join(lines) + "\n"
