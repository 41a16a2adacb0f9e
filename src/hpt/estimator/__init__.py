"""The Unified Policy Gradient Estimator (UPGE) as small registries of pure tensor functions.

arXiv 2509.04419 writes every post-training gradient as

    grad_uni = 1_stable * (1 / pi_ref) * A_hat * grad pi_theta

Each factor lives in its own module, as a registry of named functions:

- :mod:`hpt.estimator.reference`  the denominator ``1/pi_ref`` (current, old, one, sequence)
- :mod:`hpt.estimator.advantage`  ``A_hat`` (one, sign, group_norm, group_centered, rloo, batch_whiten,
  gae) and per-sequence weights (SRFT)
- :mod:`hpt.estimator.mask`       ``1_stable`` (none, clip, cispo, sequence_clip)
- :mod:`hpt.estimator.shaping`    ``f(pi)`` in place of ``pi`` (LUFFY)
- :mod:`hpt.estimator.likelihood` ``grad pi_theta`` in code: token log-probs and entropy
- :mod:`hpt.estimator.aggregate`  token-mean, seq-mean-token-mean, seq-mean-token-sum(-norm)
- :mod:`hpt.estimator.unified`    the loss: sum over terms of coef * aggregate(per-token surrogate)

This package imports only torch and the standard library (and :mod:`hpt.errors`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from hpt.errors import ConfigError

F = TypeVar("F", bound=Callable[..., Any])


class Registry(Generic[F]):
    """A named table of functions: ``@registry.register("name")`` adds, ``registry.get`` looks up.

    Each entry carries its traits, given at registration: what the trainer must provide for it
    (``needs_old``: pi_old log-probs, ``token_level``: a value head and token advantages,
    ``uses_entropy``: token entropies), what it reports (``ratio``: pi/pi_old is meaningful) and its
    display ``symbol`` in ``hpt algorithms``. Adding a part is one registration.

    Args:
        what: what the registry holds, for error messages ("advantage estimator", ...).
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self._items: dict[str, F] = {}
        self._traits: dict[str, dict[str, Any]] = {}

    def register(self, name: str, **traits: Any) -> Callable[[F], F]:
        """Decorator adding a function under ``name`` with its ``traits`` (registered once)."""

        def decorator(fn: F) -> F:
            if name in self._items and self._items[name] is not fn:
                raise ValueError(f"{self.what} {name!r} is already registered")
            self._items[name] = fn
            self._traits[name] = dict(traits)
            return fn

        return decorator

    def trait(self, name: str, key: str, default: Any = False) -> Any:
        """The trait ``key`` of the entry ``name`` (``default`` when it has none)."""
        self.get(name)  # unknown names fail with the list of valid ones
        return self._traits[name].get(key, default)

    def get(self, name: str) -> F:
        """The function registered as ``name``; ConfigError (a ValueError) listing valid names."""
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise ConfigError(
                f"unknown {self.what} {name!r}; valid: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)


__all__ = ["Registry"]
