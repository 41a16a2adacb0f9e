"""Verifier processes with a timeout per task, on pebble's ``ProcessPool``.

A symbolic check can hang (``9^{9^{9^{9}}}`` makes sympy build an integer with billions of
digits, inside C code) or crash; a user's reward function can loop forever. Neither may stall or
kill a training run, and a hung computation must not keep a CPU busy afterwards. So every task
runs in a worker process of a `pebble <https://pebble.readthedocs.io>`_ pool, which kills the
worker of a task that runs past its timeout and starts a replacement, while the other workers
keep serving. What this module adds to pebble:

- workers come from a *forkserver*: a clean interpreter, started once, that has imported
  math-verify and run its warm-up (``hpt.rewards._worker``); each worker is a fork of it, so a
  replacement is ready in milliseconds, and no worker is a fork of a process holding torch
  threads or a CUDA context (safe inside a ``torchrun`` rank). As with any multiprocessing
  start method but ``fork``, a script that scores must guard its top level with
  ``if __name__ == "__main__":`` (multiprocessing imports the main module in the workers);
- a worker dies at once on pebble's SIGTERM, even inside C code (pebble would wait 3 s for its
  Python handler, then SIGKILL), and exits when its parent process has gone;
- a broken pool (a worker that died at a moment pebble cannot attribute, workers that do not
  start) is replaced and its unfinished tasks are run once more; nothing waits forever;
- the pool is persistent (:func:`get_pool`): created on first use, reused by every call, shut
  down at interpreter exit.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import pkgutil
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError, Future, wait
from concurrent.futures import TimeoutError as TaskTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import pebble

from hpt.errors import RewardError

logger = logging.getLogger(__name__)

WORKER_MODULE = "hpt.rewards._worker"
"""Imported by the forkserver (and by each worker): loads math-verify and warms it up."""


@dataclass(frozen=True)
class Task:
    """One call to run in a worker.

    Attributes:
        function: import path ``"module:function"`` of a function importable in a fresh process.
        args: positional arguments (picklable).
        budget: seconds the call may run once a worker has taken it.
    """

    function: str
    args: tuple
    budget: float


@dataclass(frozen=True)
class Outcome:
    """What became of a task: ``status`` is ``"ok"``, ``"error"`` or ``"timeout"``.

    ``value`` is the function's return value (``"ok"``) or a one-line error (``"error"``).
    """

    status: str
    value: Any = None


def _one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:300]}"


_FUNCTIONS: dict[str, Callable[..., Any]] = {}


def call(reference: str, args: tuple) -> Any:
    """Worker side: call the function named ``"module:function"`` (imported once per worker)."""
    function = _FUNCTIONS.get(reference)
    if function is None:
        try:
            function = _FUNCTIONS[reference] = pkgutil.resolve_name(reference)
        except Exception as error:
            raise ImportError(f"cannot import {reference}: {_one_line(error)}") from None
    return function(*args)


def _exit_with_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(0)


def _initialize_worker() -> None:
    """Worker side, once at start (pebble's ``initializer``; it must not raise)."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # pebble's kill is final, even inside C code
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    try:
        __import__(WORKER_MODULE)  # a no-op when the forkserver preloaded it
    except BaseException as error:  # still serve; the verifier reports its own errors
        logger.warning("hpt.rewards worker: warm-up failed: %s", _one_line(error))


def _context(start_method: str) -> Any:
    if start_method not in multiprocessing.get_all_start_methods():
        start_method = "spawn"
    context = multiprocessing.get_context(start_method)
    if start_method == "forkserver":  # takes effect if the forkserver has not started yet
        context.set_forkserver_preload(["__main__", WORKER_MODULE])
    return context


class VerifierPool:
    """Worker processes that run :class:`Task` s, each under its own timeout.

    Args:
        size: number of worker processes (at most this many tasks run at once).
        start_method: ``"forkserver"`` (default, where available) or ``"spawn"``; ``"fork"`` also
            works but forks the calling process, torch threads and all.
        startup_timeout: seconds the pool may take to start a task before the task fails.
    """

    def __init__(
        self, size: int, *, start_method: str = "forkserver", startup_timeout: float = 60.0
    ) -> None:
        if size < 1:
            raise ValueError(f"VerifierPool size must be >= 1, got {size}")
        self.size = size
        self.start_method = start_method
        self.startup_timeout = startup_timeout
        self.owner_pid = os.getpid()
        self.submitted = 0  # tasks handed to workers
        self.killed = 0  # workers killed because their task ran past its timeout
        self._pool: pebble.ProcessPool | None = None
        self._pool_size = 0  # workers of ``_pool``
        self._lock = threading.Lock()

    def _current(self) -> pebble.ProcessPool:
        """The pebble pool, (re)created when missing, broken or of another size."""
        with self._lock:
            pool = self._pool
            if pool is not None and (not pool.active or self._pool_size != self.size):
                self._pool = None
                _stop(pool)
            if self._pool is None:
                self._pool = pebble.ProcessPool(
                    max_workers=self.size,
                    initializer=_initialize_worker,
                    context=_context(self.start_method),
                )
                self._pool_size = self.size
            return self._pool

    def start(self) -> None:
        """Start the workers now (``active`` makes pebble start its pool)."""
        _ = self._current().active

    def resize(self, size: int) -> None:
        """Use ``size`` workers from the next :meth:`run` on (the pool is restarted then)."""
        if size < 1:
            raise ValueError(f"VerifierPool size must be >= 1, got {size}")
        self.size = size

    def run(self, tasks: Sequence[Task]) -> list[Outcome]:
        """Run every task; never raises for a task's failure, never waits past its deadline.

        Args:
            tasks: the calls to make; they run in any order, ``size`` at a time.

        Returns:
            One :class:`Outcome` per task, in the order of ``tasks``.
        """
        outcomes: list[Outcome | None] = [None] * len(tasks)
        for _ in (1, 2):  # a broken pool's unfinished tasks run once more, on a new one
            reason = self._run_once(tasks, outcomes)
            if reason is None:
                break
            logger.warning("hpt.rewards: the verifier pool broke (%s); restarting it", reason)
        failed = Outcome("error", f"verifier pool broke twice: {reason}")
        return [failed if outcome is None else outcome for outcome in outcomes]

    def _run_once(self, tasks: Sequence[Task], outcomes: list[Outcome | None]) -> str | None:
        """Run the tasks that have no outcome yet; None, or why some still have none."""
        todo = [index for index, outcome in enumerate(outcomes) if outcome is None]
        if not todo:
            return None
        pool = self._current()
        futures: dict[Future, int] = {}
        reason = None
        try:
            for index in todo:
                task = tasks[index]
                future = pool.schedule(call, args=(task.function, task.args), timeout=task.budget)
                futures[future] = index
            self.submitted += len(todo)
            waves = -(-len(todo) // self.size)
            longest = max(tasks[index].budget for index in todo)
            deadline = time.monotonic() + self.startup_timeout + waves * (longest + 1.0)
            pending = set(futures)
            while pending and pool.active and time.monotonic() < deadline:
                _, pending = wait(pending, timeout=0.5)
        except RuntimeError as error:  # schedule() on a pool that broke meanwhile
            reason = _one_line(error)
        finally:  # also on Ctrl-C: pebble stops the worker of a cancelled running task
            for future in futures:
                future.cancel()
        for future, index in futures.items():
            outcomes[index] = self._outcome(future)
        if all(outcomes[index] is not None for index in todo):
            return None
        with self._lock:  # the next run starts a new pebble pool
            if self._pool is pool:
                self._pool = None
                _stop(pool)
        return reason or ("tasks did not start in time" if pool.active else "broken process pool")

    def _outcome(self, future: Future) -> Outcome | None:
        """The outcome of a task; None when it did not run to an end (the pool broke)."""
        try:
            error = future.exception(timeout=0)
        except (CancelledError, TaskTimeout):
            return None
        if error is None:
            return Outcome("ok", future.result())
        if isinstance(error, TaskTimeout):
            self.killed += 1
            return Outcome("timeout")
        if isinstance(error, pebble.ProcessExpired):
            return Outcome("error", f"verifier process died (exit code {error.exitcode})")
        if isinstance(error, BrokenProcessPool):
            return None
        return Outcome("error", _one_line(error))

    def close(self) -> None:
        """Stop every worker (only in the process that started them)."""
        if os.getpid() != self.owner_pid:
            return
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            _stop(pool)


def _stop(pool: pebble.ProcessPool) -> None:
    pool.stop()
    try:
        pool.join(timeout=10)
    except (RuntimeError, TimeoutError):  # pragma: no cover - pebble kills its workers anyway
        logger.warning("hpt.rewards: the verifier pool did not stop within 10 s")


_POOL: VerifierPool | None = None
_POOL_LOCK = threading.Lock()


def default_workers() -> int:
    """Worker count when none is given: the CPUs this process may use, at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


def get_pool(workers: int | None = None) -> VerifierPool:
    """The process-wide pool: created on first use, resized when ``workers`` changes, created
    anew in a forked child (the parent's workers stay the parent's)."""
    global _POOL
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise RewardError(
            "hpt.rewards: a verifier process started scoring while it imported the main script; "
            "guard the script's top level with `if __name__ == '__main__':`"
        )
    size = workers or default_workers()
    with _POOL_LOCK:
        if _POOL is None or _POOL.owner_pid != os.getpid():
            _POOL = VerifierPool(size)
        elif _POOL.size != size:
            _POOL.resize(size)
        return _POOL


def start_pool(workers: int | None = None) -> None:
    """Start the process-wide pool's workers now, in a background thread (the forkserver's
    warm-up, about a second, overlaps with whatever the caller does next, such as loading a
    model)."""
    threading.Thread(target=get_pool(workers).start, daemon=True, name="hpt-pool").start()


def shutdown() -> None:
    """Stop the process-wide pool's workers (registered with atexit)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is not None:
            _POOL.close()
            _POOL = None


atexit.register(shutdown)


def run_in_thread(function: Callable[..., Any], args: tuple, budget: float) -> Outcome:
    """Call ``function(*args)`` in a daemon thread and wait at most ``budget`` seconds.

    For functions a worker process cannot import (defined in ``__main__`` or inside a function).
    A thread cannot be killed: on timeout it is abandoned and keeps running in the background.
    """
    box: dict[str, Outcome] = {}

    def target() -> None:
        try:
            box["outcome"] = Outcome("ok", function(*args))
        except Exception as error:
            box["outcome"] = Outcome("error", _one_line(error))

    thread = threading.Thread(target=target, daemon=True, name="hpt-reward")
    thread.start()
    thread.join(budget)
    return box.get("outcome", Outcome("timeout"))
