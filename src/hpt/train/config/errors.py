"""Where a config key came from, and pydantic's validation errors as one line naming the key."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import ValidationError
from typing_extensions import is_typeddict

from hpt.errors import ConfigError


def _fields(cls: type) -> dict[str, Any]:
    """Field name -> pydantic FieldInfo of a section, in schema order."""
    return dict(cls.__pydantic_fields__)


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
        from hpt.train.config.schema import StageConfig

        return "stage" if tp is StageConfig else "section"
    return getattr(tp, "__name__", str(tp))


_BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def _config_error(
    error: ValidationError,
    raw: Any,
    source: _Source,
    schema: type | None = None,
    prefix: str = "",
) -> ConfigError:
    """The first problem of a pydantic ValidationError as one line: the dotted key, its value, the
    valid keys or choices and where the value came from (``raw``: the input, ``prefix``: where
    ``schema`` sits)."""
    if schema is None:
        from hpt.train.config.schema import TrainConfig

        schema = TrainConfig
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
