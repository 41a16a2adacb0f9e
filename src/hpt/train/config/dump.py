"""Writing a config as YAML, and its help: ``--help`` lines and the README's table."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hpt.train.config.errors import _fields, _join, _type_name, _unwrap
from hpt.train.config.schema import TrainConfig


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
