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

The package: :mod:`.schema` (the sections), :mod:`.errors` (one-line errors naming the key and
where it came from), :mod:`.load` (YAML, overrides, stages) and :mod:`.dump` (YAML out, help).
"""

from hpt.train.config.dump import (
    config_to_dict,
    dump_config,
    field_help,
    render_config_table,
    save_config,
)
from hpt.train.config.load import apply_override, load_config, resolve_stages
from hpt.train.config.schema import (
    DataConfig,
    DemoConfig,
    DistributedConfig,
    EvalConfig,
    Float,
    Int,
    LoggingConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    RolloutConfig,
    StageConfig,
    TrainConfig,
)

__all__ = [
    "DataConfig",
    "DemoConfig",
    "DistributedConfig",
    "EvalConfig",
    "Float",
    "Int",
    "LoggingConfig",
    "LoraConfig",
    "ModelConfig",
    "OptimConfig",
    "RolloutConfig",
    "StageConfig",
    "TrainConfig",
    "apply_override",
    "config_to_dict",
    "dump_config",
    "field_help",
    "load_config",
    "render_config_table",
    "resolve_stages",
    "save_config",
]
