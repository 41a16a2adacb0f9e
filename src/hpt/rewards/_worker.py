"""A verifier worker process: ``python -m hpt.rewards._worker [module:warm_up ...]``.

Started by ``hpt.rewards.pool``; the arguments name functions to call once before taking work.

Protocol (length-prefixed pickles; messages are tuples):

- worker -> parent at start: ``("ready",)`` once its warm-up imports are done.
- parent -> worker: ``("call", task_id, "module:function", args, budget_seconds)``.
- worker -> parent: ``("started", task_id)`` once the function is imported, then one of
  ``("ok", task_id, value)``, ``("error", task_id, "Type: message")``, ``("timeout", task_id)``.

The protocol uses a private copy of the original stdout; file descriptor 1 is pointed at stderr so
that a print inside a verifier cannot corrupt it. A soft timeout (SIGALRM, this process's main
thread) stops Python-level hangs without losing the worker; the parent kills the worker when even
that does not return (a hang inside C code such as a huge integer power). The worker exits when
the parent closes its stdin or dies.
"""

from __future__ import annotations

import os
import pkgutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from hpt.rewards.pool import encode_message, read_message


class SoftTimeout(BaseException):
    """Raised by SIGALRM inside a verifier that ran past its budget (BaseException: user code's
    ``except Exception`` does not swallow it)."""


def resolve(reference: str, cache: dict[str, Callable[..., Any]]) -> Callable[..., Any]:
    """The function named by ``"module:qualified.name"`` (imported once, then cached)."""
    function = cache.get(reference)
    if function is None:
        function = cache[reference] = pkgutil.resolve_name(reference)
    return function


def _on_alarm(signum: int, frame: Any) -> None:
    raise SoftTimeout


def _exit_with_parent(parent_pid: int) -> None:
    while True:
        time.sleep(0.5)
        if os.getppid() != parent_pid:
            os._exit(0)


def _call(function: Callable[..., Any], args: tuple, budget: float) -> tuple[str, Any]:
    signal.setitimer(signal.ITIMER_REAL, max(budget, 1e-3))
    try:
        return "ok", function(*args)
    except SoftTimeout:
        return "timeout", None
    except Exception as error:  # a verifier's crash is a result, not the worker's death
        first_line = (str(error).splitlines() or [""])[0][:300]
        return "error", f"{type(error).__name__}: {first_line}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def main() -> None:
    """Serve calls until stdin closes (or the parent goes away)."""
    try:
        _serve()
    except (BrokenPipeError, EOFError, KeyboardInterrupt):
        pass


def _serve() -> None:
    channel = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    requests = sys.stdin.buffer
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the parent, which kills us
    cache: dict[str, Callable[..., Any]] = {}
    for reference in sys.argv[1:]:  # warm-up functions, e.g. hpt.rewards.math:warm_up
        try:
            resolve(reference, cache)()
        except Exception as error:  # still serve other functions; they report their own errors
            print(f"hpt.rewards worker: warm-up {reference} failed: {error}", file=sys.stderr)
    channel.write(encode_message(("ready",)))
    while True:
        try:
            _kind, task_id, reference, args, budget = read_message(requests)
        except EOFError:
            return
        try:
            function = resolve(reference, cache)
        except Exception as error:
            channel.write(encode_message(("error", task_id, f"cannot import {reference}: {error}")))
            continue
        channel.write(encode_message(("started", task_id)))
        status, value = _call(function, args, budget)
        try:
            reply = encode_message((status, task_id, value))
        except Exception as error:  # an unpicklable return value
            reply = encode_message(("error", task_id, f"unpicklable result: {error}"))
        channel.write(reply)


if __name__ == "__main__":
    main()
