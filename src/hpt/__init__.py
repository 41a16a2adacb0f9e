"""hybrid-post-training: LLM post-training through the Unified Policy Gradient Estimator.

SFT, PPO, GRPO and their descendants, LUFFY, SRFT and Hybrid Post-Training (HPT) are one
estimator with four interchangeable parts (arXiv 2509.04419). ``import hpt`` stays light (torch
only); the public names below load their modules on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "Algorithm": "hpt.algorithms",
    "Term": "hpt.algorithms",
    "list_algorithms": "hpt.algorithms",
    "get_algorithm": "hpt.algorithms",
    "outcome_advantages": "hpt.algorithms",
    "route": "hpt.gate",
    "unified_loss": "hpt.estimator.unified",
    "LossOutput": "hpt.estimator.unified",
    "get_reward": "hpt.rewards",
    "HPTError": "hpt.errors",
    "ConfigError": "hpt.errors",
    "DataError": "hpt.errors",
}

__all__ = [  # the names of _EXPORTS, spelled out for tools that read __all__ statically
    "Algorithm",
    "ConfigError",
    "DataError",
    "HPTError",
    "LossOutput",
    "Term",
    "__version__",
    "get_algorithm",
    "get_reward",
    "list_algorithms",
    "outcome_advantages",
    "route",
    "unified_loss",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hpt' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # pragma: no cover
    from hpt.algorithms import Algorithm, Term, get_algorithm, list_algorithms, outcome_advantages
    from hpt.errors import ConfigError, DataError, HPTError
    from hpt.estimator.unified import LossOutput, unified_loss
    from hpt.gate import route
    from hpt.rewards import get_reward
