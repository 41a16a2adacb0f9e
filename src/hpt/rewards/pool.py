"""A pool of verifier processes with a timeout per task that is enforced by killing.

A symbolic check can hang (``9^{9^{9^{9}}}`` makes sympy build an integer with billions of
digits) or crash; a user's reward function can loop forever. Neither may stall or kill a training
run, and a hung computation must not keep a CPU busy afterwards. So every task runs in a worker
process (``python -m hpt.rewards._worker``):

- a task gets ``budget`` seconds from the moment its worker has imported the function; the worker
  interrupts Python-level hangs itself (SIGALRM, in its own main thread), and the pool kills the
  worker with SIGKILL when it has not answered ``grace`` seconds later (a hang inside C code),
  then starts a replacement;
- a worker that dies (segfault, ``os._exit``) fails only its current task;
- workers are plain subprocesses, not ``multiprocessing`` children: they neither fork a process
  that holds torch threads nor re-import the user's ``__main__``, and the pool works from any
  thread (no signals in the calling process) and inside pytest;
- the pool is persistent (:func:`get_pool`), so the start-up cost (a Python interpreter plus
  math-verify and sympy, about a second, paid in parallel) is paid once per process.
"""

from __future__ import annotations

import atexit
import logging
import os
import pickle
import select
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO

logger = logging.getLogger(__name__)

_HEADER = struct.Struct("!I")
_STARTUP_FAILURES_BEFORE_GIVING_UP = 3
MATH_WARM_UP = "hpt.rewards.math:warm_up"


@dataclass(frozen=True)
class Task:
    """One call to run in a worker.

    Attributes:
        function: import path ``"module:function"`` of a function importable in a fresh process.
        args: positional arguments (picklable).
        budget: seconds the call may run once the function is imported.
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


def read_message(stream: BinaryIO) -> Any:
    """One length-prefixed pickle from a blocking ``stream``; EOFError at end of stream."""
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise EOFError
    (length,) = _HEADER.unpack(header)
    payload = stream.read(length)
    if len(payload) < length:
        raise EOFError
    return pickle.loads(payload)


def encode_message(message: Any) -> bytes:
    """A message as bytes: 4-byte big-endian length, then the pickle."""
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(payload)) + payload


def _worker_environment() -> dict[str, str]:
    """The parent's environment, with its ``sys.path`` (user modules import the same way)."""
    environment = dict(os.environ)
    paths = [os.path.abspath(p) if p else os.getcwd() for p in sys.path if isinstance(p, str)]
    environment["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    environment.setdefault("OMP_NUM_THREADS", "1")
    environment.setdefault("TOKENIZERS_PARALLELISM", "false")
    return environment


@dataclass
class _Worker:
    """The parent's view of one worker process."""

    process: subprocess.Popen
    spawned_at: float
    ready: bool = False
    task: int | None = None
    deadline: float = float("inf")
    inbox: bytearray = field(default_factory=bytearray)

    @property
    def fd(self) -> int:
        return self.process.stdout.fileno()  # type: ignore[union-attr]

    def messages(self) -> list[Any] | None:
        """Read what is available; the complete messages, or None once the worker's pipe closed."""
        try:
            chunk = os.read(self.fd, 1 << 16)
        except BlockingIOError:  # nothing to read after all
            return []
        except OSError:
            return None
        if not chunk:
            return None
        self.inbox += chunk
        found = []
        while len(self.inbox) >= _HEADER.size:
            (length,) = _HEADER.unpack_from(self.inbox)
            if len(self.inbox) < _HEADER.size + length:
                break
            found.append(pickle.loads(bytes(self.inbox[_HEADER.size : _HEADER.size + length])))
            del self.inbox[: _HEADER.size + length]
        return found

    def kill(self) -> bool:
        """SIGKILL and reap (a hung worker may ignore anything gentler); True if it was alive."""
        alive = self.process.poll() is None
        if alive:
            self.process.kill()
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()  # type: ignore[union-attr]
            except OSError:
                pass
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL is not ignorable
            logger.warning("hpt.rewards: worker %d did not exit after SIGKILL", self.process.pid)
        return alive


class VerifierPool:
    """Worker processes that run :class:`Task` s, each under its own deadline.

    Args:
        size: number of worker processes (at most this many tasks run at once).
        grace: seconds past a task's budget before its worker is killed.
        startup_timeout: seconds a new worker may take to import its modules, and a task may take
            to import its function, before the worker counts as failed.
        warm_up: ``module:function`` paths each worker calls before it takes work (default:
            math-verify's warm-up, about 2.5 s, so that no item pays sympy's first-use cost).
    """

    def __init__(
        self,
        size: int,
        *,
        grace: float = 0.5,
        startup_timeout: float = 60.0,
        warm_up: Sequence[str] = (MATH_WARM_UP,),
    ) -> None:
        if size < 1:
            raise ValueError(f"VerifierPool size must be >= 1, got {size}")
        self.size = size
        self.grace = grace
        self.startup_timeout = startup_timeout
        self.warm_up = tuple(warm_up)
        self.owner_pid = os.getpid()
        self.spawned = 0  # worker processes started
        self.killed = 0  # workers killed while still running (hung tasks)
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()

    def _spawn(self) -> _Worker:
        process = subprocess.Popen(
            [sys.executable, "-m", "hpt.rewards._worker", *self.warm_up],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=_worker_environment(),
            start_new_session=True,  # a terminal's Ctrl-C reaches the parent only
        )
        self.spawned += 1
        os.set_blocking(process.stdout.fileno(), False)  # type: ignore[union-attr]
        worker = _Worker(process, time.monotonic())
        worker.deadline = worker.spawned_at + self.startup_timeout
        return worker

    def _replace(self, worker: _Worker) -> None:
        self.killed += worker.kill()
        self._workers[self._workers.index(worker)] = self._spawn()

    def start(self) -> None:
        """Start the missing workers now (they warm up in the background)."""
        with self._lock:
            self._fill()

    def _fill(self) -> None:
        """Bring the workers to ``size``: drop dead ones, retire idle extras, start missing ones."""
        alive = []
        for worker in self._workers:
            if worker.process.poll() is None and len(alive) < self.size:
                alive.append(worker)
            else:
                worker.kill()
        self._workers = alive
        while len(self._workers) < self.size:
            self._workers.append(self._spawn())

    def resize(self, size: int) -> None:
        """Use ``size`` workers from the next :meth:`run` on (started or retired then)."""
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
        if not tasks:
            return []
        with self._lock:
            try:
                return self._run(tasks)
            except BaseException:  # Ctrl-C mid-run: no worker may keep a task of this run
                for worker in [w for w in self._workers if w.task is not None]:
                    worker.task = None
                    self._replace(worker)
                raise

    def _run(self, tasks: Sequence[Task]) -> list[Outcome]:
        results: list[Outcome | None] = [None] * len(tasks)
        queue = deque(range(len(tasks)))
        self._fill()
        startup_failures = 0
        while queue or any(w.task is not None for w in self._workers):
            if startup_failures >= _STARTUP_FAILURES_BEFORE_GIVING_UP and queue:
                self._give_up(queue, results)
            self._dispatch(tasks, queue, results)
            now = time.monotonic()
            wait = min(1.0, max(0.0, min(w.deadline for w in self._workers) - now))
            readable, _, _ = select.select([w.fd for w in self._workers], [], [], wait)
            for worker in [w for w in self._workers if w.fd in readable]:
                startup_failures += self._receive(worker, tasks, results)
            now = time.monotonic()
            for worker in [w for w in self._workers if w.deadline <= now]:
                if worker.task is not None:
                    results[worker.task] = Outcome("timeout")
                    worker.task = None
                else:
                    startup_failures += 1
                    logger.warning("hpt.rewards: a verifier worker did not start in time")
                self._replace(worker)
        return [r if r is not None else Outcome("error", "not run") for r in results]

    def _dispatch(self, tasks: Sequence[Task], queue: deque[int], results: list) -> None:
        for worker in self._workers:
            if not queue:
                return
            if not worker.ready or worker.task is not None:
                continue
            index = queue.popleft()
            task = tasks[index]
            try:
                worker.process.stdin.write(  # type: ignore[union-attr]
                    encode_message(("call", index, task.function, task.args, task.budget))
                )
                worker.process.stdin.flush()  # type: ignore[union-attr]
            except (BrokenPipeError, OSError):
                queue.appendleft(index)  # never started: another worker takes it
                self._replace(worker)
                continue
            except Exception as error:  # unpicklable arguments
                results[index] = Outcome("error", f"cannot send task: {error}")
                continue
            worker.task = index
            worker.deadline = time.monotonic() + self.startup_timeout

    def _receive(self, worker: _Worker, tasks: Sequence[Task], results: list) -> int:
        """Handle a readable worker; returns 1 when it died before it was ready, else 0."""
        messages = worker.messages()
        if messages is None:
            code = worker.process.poll()
            if worker.task is not None:
                results[worker.task] = Outcome("error", f"verifier process died (exit code {code})")
                worker.task = None
            failed_start = 0 if worker.ready else 1
            if failed_start:
                logger.warning("hpt.rewards: a verifier worker exited at start (code %s)", code)
            self._replace(worker)
            return failed_start
        for message in messages:
            kind = message[0]
            if kind == "ready":
                worker.ready = True
                worker.deadline = float("inf")
            elif kind == "started" and message[1] == worker.task:
                worker.deadline = time.monotonic() + tasks[message[1]].budget + self.grace
            elif kind in ("ok", "error", "timeout") and message[1] == worker.task:
                value = message[2] if len(message) > 2 else None
                results[message[1]] = Outcome(kind, value)
                worker.task = None
                worker.deadline = float("inf")
        return 0

    def _give_up(self, queue: deque[int], results: list) -> None:
        logger.warning(
            "hpt.rewards: verifier workers fail to start (is %s able to import hpt?); "
            "%d items score 0",
            sys.executable,
            len(queue),
        )
        while queue:
            results[queue.popleft()] = Outcome("error", "verifier workers fail to start")

    def close(self) -> None:
        """Kill every worker (only in the process that started them; waits for a running
        :meth:`run` in another thread to finish)."""
        if os.getpid() != self.owner_pid:
            return
        with self._lock:
            for worker in self._workers:
                worker.kill()
            self._workers = []

    def pids(self) -> list[int]:
        """Process ids of the current workers (for tests and monitoring)."""
        return [w.process.pid for w in self._workers]


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
    size = workers or default_workers()
    with _POOL_LOCK:
        if _POOL is None or _POOL.owner_pid != os.getpid():
            _POOL = VerifierPool(size)
        elif _POOL.size != size:
            _POOL.resize(size)
        return _POOL


def start_pool(workers: int | None = None) -> None:
    """Start the process-wide pool's workers now, in the background (about 3 s of start-up,
    overlapped with whatever the caller does next, such as loading a model)."""
    get_pool(workers).start()


def shutdown() -> None:
    """Kill the process-wide pool's workers (registered with atexit)."""
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
            box["outcome"] = Outcome("error", f"{type(error).__name__}: {error}".splitlines()[0])

    thread = threading.Thread(target=target, daemon=True, name="hpt-reward")
    thread.start()
    thread.join(budget)
    return box.get("outcome", Outcome("timeout"))
