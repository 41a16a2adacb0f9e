"""Rollout engines: sample responses to tokenised prompts behind one interface.

:class:`HFEngine` (Hugging Face ``generate``) is the default; any object with the
:class:`RolloutEngine` ``generate`` method can replace it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hpt.rollout.base import Rollout, RolloutEngine, SamplingParams, streams_finished

__all__ = [
    "ENGINES",
    "HFEngine",
    "Rollout",
    "RolloutEngine",
    "SamplingParams",
    "VLLMEngine",
    "make_engine",
    "streams_finished",
]

# engine name (config key rollout.engine) -> "module:class", imported only when asked for
ENGINES: dict[str, str] = {"hf": "hpt.rollout.hf:HFEngine", "vllm": "hpt.rollout.vllm:VLLMEngine"}


def make_engine(name: str, model: Any, tokenizer: Any, **options: Any) -> Any:
    """The rollout engine registered as ``name`` (``hf`` or ``vllm``), built for ``model``."""
    import inspect
    import pkgutil

    from hpt.errors import ConfigError

    if name not in ENGINES:
        raise ConfigError(f"unknown rollout engine {name!r}; choose from {', '.join(ENGINES)}")
    engine = pkgutil.resolve_name(ENGINES[name])
    accepted = inspect.signature(engine).parameters
    # each engine takes the options it knows (batch_size for hf, model_path for vllm, ...)
    return engine(model, tokenizer, **{k: v for k, v in options.items() if k in accepted})


def __getattr__(name: str) -> Any:
    if name in ("HFEngine", "VLLMEngine"):  # transformers / vllm load only when asked for
        import pkgutil

        return pkgutil.resolve_name(ENGINES["hf" if name == "HFEngine" else "vllm"])
    raise AttributeError(f"module 'hpt.rollout' has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    from hpt.rollout.hf import HFEngine
    from hpt.rollout.vllm import VLLMEngine
