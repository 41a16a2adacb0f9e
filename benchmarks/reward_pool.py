"""The reward pool's costs: start-up, replacing a killed worker, and the overhead per batch.

For each start method (``forkserver``, the default; ``spawn``; ``fork``, for reference), in a
fresh interpreter each (the forkserver is per process):

- ``cold start``: from creating the pool to the first math-verify verdict (workers warmed up);
- ``replace``: after a task that hangs and is killed, until a pool of one worker answers again;
- ``128 trivial``: a batch of 128 tasks that do next to nothing (``normalize_answer``), the
  pool's own overhead per batch, median over repeats;
- ``128 math``: a batch of 128 short responses that all need math-verify (``score(...)``);
- ``one hung``: 16 math items of which one hangs, timeout 1 s.

Also the same 128 math items checked serially in this process (math-verify's own cost). Run it
from the repository root: ``.venv/bin/python benchmarks/reward_pool.py [--repeats N]``. It
prints numbers and asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

HANG = r"\boxed{9^{9^{9^{9}}}}"


def math_batch(offset: int, n: int = 128) -> tuple[list[str], list[str]]:
    """Short responses whose boxed answer equals the truth only symbolically (math-verify)."""
    responses = [rf"We expand. Hence $\boxed{{x(x+{i + offset})}}$." for i in range(n)]
    answers = [f"x^2+{i + offset}x" for i in range(n)]
    return responses, answers


def measure(start_method: str, repeats: int) -> dict[str, float]:
    """The numbers of one start method (run in a fresh interpreter)."""
    from hpt.rewards import math as math_verifier
    from hpt.rewards.pool import Task, VerifierPool

    def math_tasks(responses: list[str], answers: list[str], timeout: float) -> list[Task]:
        pending = [math_verifier.decide(r, a) for r, a in zip(responses, answers)]
        return [Task(math_verifier.VERIFY_FUNCTION, p.args, timeout) for p in pending]

    numbers: dict[str, float] = {}
    started = time.perf_counter()
    pool = VerifierPool(2, start_method=start_method)
    assert pool.run(math_tasks([r"\boxed{x(x+1)}"], ["x^2+x"], 30.0))[0].value == 1.0
    numbers["cold start s"] = time.perf_counter() - started

    single = VerifierPool(1, start_method=start_method)
    trivial = Task("hpt.rewards.normalize:normalize_answer", ("x = 1",), 30.0)
    single.run([trivial])
    waits = []
    for _ in range(3):
        assert single.run(math_tasks([HANG], ["5"], 0.3))[0].status == "timeout"
        started = time.perf_counter()
        single.run([trivial])
        waits.append(time.perf_counter() - started)
    single.close()
    numbers["replace s"] = statistics.median(waits)

    tasks = [Task("hpt.rewards.normalize:normalize_answer", (f"x = {i}",), 5.0) for i in range(128)]
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        assert all(o.status == "ok" for o in pool.run(tasks))
        times.append(time.perf_counter() - started)
    numbers["128 trivial ms"] = 1e3 * statistics.median(times)

    times = []
    for repeat in range(repeats):
        batch = math_tasks(*math_batch(1000 * (repeat + 1)), 5.0)
        started = time.perf_counter()
        assert sum(o.value for o in pool.run(batch)) == 128
        times.append(time.perf_counter() - started)
    numbers["128 math ms"] = 1e3 * statistics.median(times)

    responses, answers = math_batch(90_000, 15)
    started = time.perf_counter()
    outcomes = pool.run(math_tasks([HANG, *responses], ["5", *answers], 1.0))
    numbers["one hung s"] = time.perf_counter() - started
    assert [o.status for o in outcomes].count("timeout") == 1
    pool.close()
    return numbers


def serial_math_ms() -> float:
    """math-verify's own cost for the 128 math items, checked one after another here."""
    from hpt.rewards import math as math_verifier

    math_verifier.warm_up()
    responses, answers = math_batch(50_000)
    started = time.perf_counter()
    for response, answer in zip(responses, answers):
        math_verifier.verify_latex(*math_verifier.decide(response, answer).args)
    return 1e3 * (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="batches timed per number")
    parser.add_argument("--methods", default="forkserver,spawn,fork", help="start methods")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one method, as JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.repeats)))
        return
    rows = {}
    for method in args.methods.split(","):
        command = [sys.executable, __file__, "--one", method, "--repeats", str(args.repeats)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        rows[method] = json.loads(output.strip().splitlines()[-1])
    columns = list(next(iter(rows.values())))
    print(f"{'start method':<12}" + "".join(f"{c:>16}" for c in columns))
    for method, numbers in rows.items():
        print(f"{method:<12}" + "".join(f"{numbers[c]:>16.2f}" for c in columns))
    print(f"128 math items serially in this process: {serial_math_ms():.0f} ms (2 workers)")


if __name__ == "__main__":
    main()
