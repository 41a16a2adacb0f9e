"""Training: the config, the recipe (generate, score, route, assemble, update), checkpoints and logs.

``import hpt.train`` stays light; the names below load their modules on first use:
``load_config`` and ``TrainConfig`` (:mod:`hpt.train.config`), ``train`` (:mod:`hpt.train.recipe`),
``save_checkpoint``/``load_checkpoint``/``latest_checkpoint`` (:mod:`hpt.train.checkpoint`),
``RunLogger`` (:mod:`hpt.train.logger`) and ``plot_run`` (:mod:`hpt.train.plots`).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TrainConfig": "hpt.train.config",
    "load_config": "hpt.train.config",
    "save_config": "hpt.train.config",
    "train": "hpt.train.recipe",
    "save_checkpoint": "hpt.train.checkpoint",
    "load_checkpoint": "hpt.train.checkpoint",
    "latest_checkpoint": "hpt.train.checkpoint",
    "RunLogger": "hpt.train.logger",
    "plot_run": "hpt.train.plots",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hpt.train' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
