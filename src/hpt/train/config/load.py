"""Reading YAML, ``--set`` overrides, loading a config and resolving its stages."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from hpt.errors import ConfigError
from hpt.train.config.errors import _config_error, _join, _Source
from hpt.train.config.schema import _TRAIN_CONFIG, TrainConfig


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
        _check_combinations(stage_config, prefix, source)
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


def _check_combinations(config: TrainConfig, prefix: str, source: _Source) -> None:
    """Keys that contradict each other (checked here, before any model is loaded)."""
    key = f"{prefix}optim.share_prompts"
    # under fsdp2, true needs the one-call shared pass: hpt.train.step.check_shared_prompts,
    # once the model is loaded
    if config.optim.share_prompts is True and config.model.gradient_checkpointing:
        raise ConfigError(
            f"{key}=true{source.where(key)}: gradient checkpointing recomputes each layer in "
            "backward without the shared pass's prompt cache or attention layout; use auto (off "
            "with model.gradient_checkpointing) or false"
        )
    key = f"{prefix}optim.autocast"
    if config.optim.autocast in (True, "bfloat16") and config.distributed.strategy == "fsdp2":
        raise ConfigError(
            f"{key}={str(config.optim.autocast).lower()}{source.where(key)}: under fsdp2 the "
            "compute dtype is distributed.mixed_precision; use optim.autocast=auto or false"
        )
    rollout = config.rollout
    key = f"{prefix}rollout.dtype"
    if rollout.dtype != "auto" and (rollout.engine != "hf" or not rollout.fused):
        raise ConfigError(
            f"{key}={rollout.dtype}{source.where(key)}: only the hf engine's fused decode step "
            f"samples in another dtype than the model's (rollout.engine={rollout.engine}, "
            f"rollout.fused={str(rollout.fused).lower()})"
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
