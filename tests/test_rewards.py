"""hpt.rewards: extraction, the registry, user functions, and never raising or hanging."""

from __future__ import annotations

import hashlib
import logging
import math
import os
import subprocess
import sys
import threading
import time

import pytest

import hpt
from hpt.errors import RewardError
from hpt.rewards import (
    extract_all_boxed,
    extract_boxed,
    extract_choice,
    get_reward,
    list_rewards,
    normalize_answer,
    register_reward,
    reset_stats,
    score,
    start_pool,
    stats,
)
from hpt.rewards.pool import Task, VerifierPool, get_pool

SLACK = 2.0
HANG = r"\boxed{9^{9^{9^{9}}}}"


# --- user reward functions (top level: the verifier processes import them from this module) ---


@register_reward("test_length_match")
def length_match(responses: list[str], answers: list[str]) -> list[float]:
    """1.0 when a response is as long as its answer."""
    return [float(len(r) == len(a)) for r, a in zip(responses, answers)]


def raising(responses, answers):
    raise ValueError("boom\nsecond line")


def sleeping(responses, answers):
    time.sleep(3600)


def unstoppable(responses, answers):
    """Write this worker's pid to the file named by the answer, then hang inside C code that
    never checks for signals (minutes of OpenSSL key stretching): only a kill stops it."""
    with open(answers[0], "w") as file:
        file.write(str(os.getpid()))
    return [float(bool(hashlib.pbkdf2_hmac("sha256", b"x", b"y", 2**31 - 1)))]


def pid_after(seconds):
    time.sleep(seconds)
    return os.getpid()


def exiting(responses, answers):
    os._exit(3)


def partly_unscored(responses, answers):
    return [None, 1.0, math.nan, 0.5][: len(responses)]


def wrong_length(responses, answers):
    return [1.0]


def not_a_list(responses, answers):
    return "1.0"


NOT_CALLABLE = 3


@pytest.fixture(scope="module", autouse=True)
def warm_pool():
    """Start the verifier processes once (about a second) before the timed tests."""
    start_pool()
    assert score([r"\boxed{x^2}"], ["x^{3}"], timeout=30.0).checked == 1


# --- extraction ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"\boxed{5}", "5"),
        (r"a \boxed{1} b \boxed{2} c", "2"),
        (r"\boxed{\frac{a}{b^{2}}}", r"\frac{a}{b^{2}}"),
        (r"\fbox{7}", "7"),
        (r"\boxed 5.", "5"),
        (r"\boxed{\{1,2\}}", r"\{1,2\}"),
        (r"\boxed{4} and then \boxed{5", "4"),
        (r"\boxed{}", ""),
        ("no box", None),
        (r"\boxed", None),
        (r"\boxedx{3}", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_extract_all_boxed_skips_nested_and_unclosed():
    assert extract_all_boxed(r"\boxed{1} \boxed{\boxed{2}} \fbox{3} \boxed{4") == [
        "1",
        r"\boxed{2}",
        "3",
    ]


def test_extraction_is_linear_on_pathological_input():
    text = r"\boxed{" * 50_000 + "{" * 100_000
    started = time.perf_counter()
    assert extract_boxed(text) is None
    assert extract_choice(text) is None
    assert time.perf_counter() - started < 2.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"\boxed{C}", "C"),
        ("The answer is (B).", "B"),
        ("answer: d", None),  # lower case is not an option
        ("The answer is I think unclear", None),
        (r"Answer: A. Then again \boxed{\text{(D)}}", "D"),
        ("", None),
    ],
)
def test_extract_choice(text, expected):
    assert extract_choice(text) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (r"\dfrac12", r"\frac{1}{2}"),
        (r"$\left( 1, 2 \right)$", "(1,2)"),
        (r"45^{\circ}", "45"),
        (r"\$1{,}000.", "1000"),
        (r"x = \sqrt2", r"\sqrt{2}"),
        (r"12\text{ cm}^2", "12"),
        (r"\pi r^2", r"\pi r^{2}"),
        (r"\boxed{\text{Monday}}", "Monday"),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


# --- registry --------------------------------------------------------------------------------


def test_get_reward_is_exported_and_scores_a_batch():
    reward = hpt.get_reward("math")
    scores = reward(
        [r"\boxed{\frac{1}{2}}", "no box", r"\boxed{x^2+2x+1}"], ["0.5", "1", "(x+1)^2"]
    )
    assert scores == [1.0, 0.0, 1.0]
    assert all(isinstance(s, float) for s in scores)
    assert reward.last is not None and reward.last.checked == 1


def test_unknown_reward_lists_the_registered_ones():
    with pytest.raises(RewardError) as error:
        get_reward("maths")
    message = str(error.value)
    assert "\n" not in message and "'maths'" in message
    for name in ("math", "choice", "exact", "test_length_match"):
        assert name in message
    assert {"math", "choice", "exact"} <= set(list_rewards())


@pytest.mark.parametrize(
    ("path", "fragment"),
    [
        ("no_such_module_hpt:fn", "ModuleNotFoundError"),
        ("test_rewards:no_such_function", "AttributeError"),
        ("test_rewards:NOT_CALLABLE", "not a function"),
        ("test_rewards:", "expected 'module:function'"),
    ],
)
def test_import_failures_are_one_line_reward_errors(path, fragment):
    with pytest.raises(RewardError) as error:
        get_reward(path)
    assert fragment in str(error.value) and path in str(error.value)
    assert "\n" not in str(error.value)


def test_builtin_names_are_reserved():
    with pytest.raises(RewardError):
        register_reward("math")


def test_registered_user_function_runs_in_a_worker():
    result = score(["abc", "abcd"], ["xyz", "xyz"], "test_length_match")
    assert result.scores == [1.0, 0.0]
    assert result.checked == 2 and result.errors == 0


def test_user_function_by_import_path():
    assert get_reward("test_rewards:length_match")(["ab", "a"], ["cd", "cd"]) == [1.0, 0.0]


def test_choice_and_exact():
    assert score(["Answer: B", r"\boxed{C}"], ["B", "B"], "choice").scores == [1.0, 0.0]
    unreadable = score(["Answer: B"], ["42"], "choice")
    assert unreadable.scores == [0.0] and unreadable.unscored == 1
    assert score([r"so \boxed{ 12 }", "12"], ["12", "12.0"], "exact").scores == [1.0, 0.0]


def test_length_mismatch_and_bad_timeout_are_value_errors():
    with pytest.raises(ValueError):
        score(["a"], [], "math")
    with pytest.raises(ValueError):
        score(["a"], ["a"], "math", timeout=0)


# --- robustness ------------------------------------------------------------------------------


def test_hanging_math_scores_zero_within_the_timeout_and_is_counted():
    started = time.perf_counter()
    result = score([HANG, r"\boxed{2}"], ["5", "2"], timeout=1.0)
    assert time.perf_counter() - started < 1.0 + SLACK
    assert result.scores == [0.0, 1.0]
    assert result.timeouts == 1 and result.errors == 0


def test_user_function_that_sleeps_forever_times_out():
    started = time.perf_counter()
    result = score(["a"], ["a"], "test_rewards:sleeping", timeout=1.0)
    assert time.perf_counter() - started < 1.0 + SLACK
    assert result.scores == [0.0] and result.timeouts == 1


def test_hang_inside_c_kills_the_worker_and_the_pool_recovers(tmp_path):
    pool = get_pool()
    killed = pool.killed
    started = time.perf_counter()
    # 3 s: time for a fresh worker to import this module and write its pid on a loaded machine
    result = score(["a"], [str(tmp_path / "pid")], "test_rewards:unstoppable", timeout=3.0)
    assert time.perf_counter() - started < 3.0 + SLACK
    assert result.scores == [0.0] and result.timeouts == 1
    assert pool.killed == killed + 1
    hung = int((tmp_path / "pid").read_text())
    assert not _running(hung)  # killed and reaped: no process left spinning
    assert score([r"\boxed{x+x}"], ["2x"], timeout=30.0).scores == [1.0]


def test_one_hung_item_costs_one_timeout_not_one_per_item():
    responses = [HANG] + [rf"\boxed{{x(x+{i})}}" for i in range(1, 21)]
    answers = ["5"] + [f"x^2+{i}x" for i in range(1, 21)]
    started = time.perf_counter()
    result = score(responses, answers, timeout=1.0)
    assert time.perf_counter() - started < 1.0 + SLACK
    assert result.scores == [0.0] + [1.0] * 20
    assert result.timeouts == 1 and result.errors == 0


def test_raising_user_function_scores_zero_and_warns_once(caplog):
    with caplog.at_level(logging.WARNING, logger="hpt.rewards"):
        result = score(["a"] * 10, ["a"] * 10, "test_rewards:raising")
    assert result.scores == [0.0] * 10 and result.errors == 10
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "ValueError: boom" in warnings[0].getMessage()
    assert "\n" not in warnings[0].getMessage()


@pytest.mark.parametrize("name", ["wrong_length", "not_a_list"])
def test_malformed_return_values_are_errors(name):
    result = score(["a", "b"], ["a", "b"], f"test_rewards:{name}")
    assert result.scores == [0.0, 0.0] and result.errors == 2


def test_none_and_nan_are_unscored_and_score_zero():
    result = score(["a"] * 4, ["a"] * 4, "test_rewards:partly_unscored")
    assert result.scores == [0.0, 1.0, 0.0, 0.5]
    assert result.unscored == 2 and result.errors == 0


def test_function_defined_in_a_test_runs_in_a_thread_with_its_timeout():
    @register_reward("test_local_sleeper")
    def local_sleeper(responses, answers):
        time.sleep(2.5)
        return [1.0] * len(responses)

    @register_reward("test_local_ok")
    def local_ok(responses, answers):
        return [0.25] * len(responses)

    started = time.perf_counter()
    result = score(["a"], ["a"], "test_local_sleeper", timeout=0.5)
    assert time.perf_counter() - started < 0.5 + SLACK
    assert result.scores == [0.0] and result.timeouts == 1
    assert score(["a", "b"], ["a", "b"], "test_local_ok").scores == [0.25, 0.25]


def test_scoring_from_another_thread():
    box = {}

    def work():
        box["result"] = score(
            [HANG, r"\boxed{\dfrac{2}{4}}", r"\boxed{x(x+1)}"], ["1", "0.5", "x^2+x"], timeout=1.0
        )

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(1.0 + 2 * SLACK)
    assert not thread.is_alive()
    assert box["result"].scores == [0.0, 1.0, 1.0]
    assert box["result"].timeouts == 1


def test_stats_count_every_call():
    reset_stats()
    score([HANG, "none"], ["5", "5"], timeout=0.5)
    score(["a"], ["a"], "test_rewards:raising")
    totals = stats()
    assert totals["calls"] == 2 and totals["items"] == 3
    assert totals["timeouts"] == 1 and totals["errors"] == 1 and totals["checked"] == 2


def test_string_decided_items_do_not_touch_the_pool():
    pool = get_pool()
    submitted = pool.submitted
    result = score([r"\boxed{\dfrac{1}{2}}", "none", r"\boxed{7}"], ["1/2", "1", "8"])
    assert result.scores == [1.0, 0.0, 0.0] and result.checked == 0
    assert pool.submitted == submitted


def _running(pid: int) -> bool:
    """Whether a process exists and is not a zombie (an orphan's zombie waits for init)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # pragma: no cover - no /proc
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def test_private_pool_runs_many_tasks_in_order_and_closes():
    pool = VerifierPool(2)
    tasks = [
        Task("hpt.rewards.normalize:normalize_answer", (f"x = {i}",), 30.0) for i in range(300)
    ]
    assert [o.value for o in pool.run(tasks)] == [str(i) for i in range(300)]
    outcomes = pool.run([Task("test_rewards:pid_after", (0.2,), 30.0)] * 2)
    pids = {o.value for o in outcomes}
    assert len(pids) == 2  # two workers, one task each
    pool.close()
    assert not any(_running(pid) for pid in pids)


def test_user_function_that_exits_fails_its_items_only():
    result = score(["a", "b"], ["a", "b"], "test_rewards:exiting")
    assert result.scores == [0.0, 0.0] and result.errors == 2
    assert score(["ab"], ["cd"], "test_length_match").scores == [1.0]


def test_interrupted_run_leaves_no_task_behind(monkeypatch):
    """Ctrl-C during a run: its task is stopped, and the next run gets its own result soon."""
    pool = VerifierPool(1)
    assert pool.run([Task("hpt.rewards.normalize:normalize_answer", ("1",), 30.0)])[0].value == "1"

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("hpt.rewards.pool.wait", interrupt)
    with pytest.raises(KeyboardInterrupt):
        pool.run([Task("time:sleep", (60.0,), 120.0)])
    monkeypatch.undo()
    started = time.perf_counter()
    outcomes = pool.run([Task("hpt.rewards.normalize:normalize_answer", ("x = 3",), 30.0)])
    assert outcomes[0].status == "ok" and outcomes[0].value == "3"
    assert time.perf_counter() - started < 10.0  # not behind the interrupted 60 s sleep
    pool.close()


_IMPORT_CHECK = """
import sys
import hpt.rewards
heavy = [m for m in ("math_verify", "sympy", "torch", "transformers") if m in sys.modules]
assert not heavy, heavy
from hpt.rewards import score
assert score(["\\\\boxed{3}"], ["3"]).scores == [1.0]
import hpt.rewards.pool as pool
assert pool._POOL is None, "a string-decided batch started the pool"
"""


def test_import_is_light_and_fast_path_starts_no_process():
    subprocess.run([sys.executable, "-c", _IMPORT_CHECK], check=True, timeout=60)


_ORPHAN = """
import os
from hpt.rewards.pool import VerifierPool, Task
pool = VerifierPool(1)
print(pool.run([Task("os:getpid", (), 30.0)])[0].value, flush=True)
os._exit(0)  # no atexit: the worker must notice on its own
"""


def test_workers_exit_when_their_parent_dies():
    output = subprocess.run(
        [sys.executable, "-c", _ORPHAN], capture_output=True, text=True, check=True, timeout=60
    )
    pid = int(output.stdout.split()[0])
    deadline = time.monotonic() + 10.0
    while _running(pid):
        if time.monotonic() > deadline:
            pytest.fail(f"worker {pid} outlived its parent")
        time.sleep(0.05)


@pytest.mark.slow
def test_throughput_of_math_on_typical_responses():
    responses, answers = [], []
    for i in range(400):
        answer = [rf"\frac{{{i}}}{{{i + 1}}}", f"{i}", rf"{i}\sqrt{{2}}", f"x^2+{i}x"][i % 4]
        written = [rf"\dfrac{{{i}}}{{{i + 1}}}", f"{i}.0", rf"\sqrt{{{2 * i * i}}}", f"x({i}+x)"][
            i % 4
        ]
        responses.append("Step 1. We simplify. " * 40 + rf"Hence $\boxed{{{written}}}$.")
        answers.append(answer)
    started = time.perf_counter()
    result = score(responses, answers)
    rate = len(responses) / (time.perf_counter() - started)
    print(f"math throughput: {rate:.0f} items/s ({result.checked} needed math-verify)")
    assert sum(result.scores) >= 390 and rate > 20


def test_pool_resizes_in_place():
    pool = get_pool(2)
    try:
        assert get_pool(1) is pool
        assert score([r"\boxed{2x}"], ["x+x"], workers=1, timeout=30.0).scores == [1.0]
        outcomes = pool.run([Task("test_rewards:pid_after", (0.2,), 30.0)] * 2)
        assert len({o.value for o in outcomes}) == 1  # one worker ran both
    finally:
        get_pool(2)
    assert pool.size == 2


def test_empty_batches_start_nothing():
    pool = get_pool()
    submitted = pool.submitted
    assert score([], [], "test_length_match").scores == []
    assert score([], []).scores == []
    assert pool.submitted == submitted


# --- scoring while generating -------------------------------------------------------------------


def test_streaming_scorer_equals_one_score_call_whatever_the_pieces():
    from types import SimpleNamespace

    from hpt.rewards import StreamingScorer

    texts = [r"\boxed{2}", r"\boxed{\dfrac{2}{4}}", "no box", HANG, r"\boxed{x(x+1)}", r"\boxed{7}"]
    answers = ["2", "0.5", "3", "1", "x^2+x", "8"]
    whole = score(texts, answers, timeout=1.0)
    scorer = StreamingScorer(answers, "math", timeout=1.0)
    item = [SimpleNamespace(text=t) for t in texts]
    scorer.submit([(4, item[4]), (1, item[1])])  # out of order, in pieces
    scorer.submit([(3, item[3])])
    scorer.submit([(1, item[1])])  # reported twice: scored once
    result = scorer.result(texts)  # 0, 2 and 5 were never submitted: scored now
    assert result.scores == whole.scores == [1.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    assert result.timeouts == whole.timeouts == 1
    assert (result.errors, result.unscored) == (whole.errors, whole.unscored)
    assert scorer.busy_s > 0
    with pytest.raises(IndexError):
        StreamingScorer(answers).submit([(6, item[0])])


def test_streaming_scorer_scores_in_the_background_and_checks_its_reward_first():
    from types import SimpleNamespace

    from hpt.rewards import StreamingScorer

    started = threading.Event()
    release = threading.Event()

    @register_reward("test_local_gated")
    def gated(responses, answers):
        started.set()
        release.wait(5.0)
        return [1.0] * len(responses)

    scorer = StreamingScorer(["a", "b"], "test_local_gated")
    scorer.submit([(0, SimpleNamespace(text="a"))])  # returns while the reward is running
    assert started.wait(5.0)
    release.set()
    assert scorer.result(["a", "b"]).scores == [1.0, 1.0]
    with pytest.raises(RewardError):
        StreamingScorer(["a"], "no_such_reward")
