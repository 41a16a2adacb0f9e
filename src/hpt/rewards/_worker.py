"""Verifier-process start-up: importing this module loads math-verify and runs its warm-up.

``hpt.rewards.pool`` names it in the forkserver's preload list, so the warm-up (about a second:
math-verify, sympy, and sympy's first-use costs) runs once in the forkserver and every worker,
replacements included, is forked warm. A worker that was not forked from such a server (another
library started the forkserver first, or the ``spawn`` start method) imports it when it starts.
The calling process never imports it. It must not raise: the forkserver dies on an exception
other than ImportError.
"""

from __future__ import annotations

import sys


def _warm_up() -> None:
    try:
        from hpt.rewards.math import warm_up

        warm_up()
    except Exception as error:  # workers still serve; a failing verifier reports its own errors
        print(
            f"hpt.rewards worker: warm-up failed: {type(error).__name__}: {error}", file=sys.stderr
        )


_warm_up()
