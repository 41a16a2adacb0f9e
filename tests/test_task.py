"""The synthetic arithmetic task: correct answers, worked solutions, disjoint graded splits."""

from __future__ import annotations

import re
from statistics import mean

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hpt.data import Question
from hpt.demo.task import SPLITS, demonstration, is_held_out, make_questions
from hpt.errors import ConfigError

STEP = re.compile(r"(\d)\+(\d)(?:\+(\d))?=(\d+), carry (\d)\.")


def boxed(text: str) -> str:
    return re.findall(r"\\boxed\{([^}]*)\}", text)[-1]


@pytest.fixture(scope="module")
def splits():
    return {split: make_questions(split, 300, seed=0) for split in SPLITS}


def test_questions_are_chat_prompts_with_correct_answers(splits):
    for split, questions in splits.items():
        assert len(questions) == 300
        for q in questions:
            assert isinstance(q, Question)
            assert q.prompt[0]["role"] == "user" and len(q.prompt) == 1
            a, b = q.meta["a"], q.meta["b"]
            assert q.answer == str(a + b), (split, q)
            numbers = [int(x) for x in re.findall(r"\d+", q.prompt[0]["content"])]
            assert numbers == [a, b], q.prompt
            assert q.source == f"arith-{q.meta['level']}"
            assert len(str(a)) == len(str(b)) == q.meta["level"]


def test_demonstrations_end_with_the_boxed_answer(splits):
    """Every split but easy is clean; easy's wrong demonstrations are exactly its carry slips."""
    for name, questions in splits.items():
        wrong = 0
        for q in questions:
            a, b = q.meta["a"], q.meta["b"]
            assert q.demonstration.endswith(f"The answer is \\boxed{{{boxed(q.demonstration)}}}.")
            if boxed(q.demonstration) != q.answer:
                wrong += 1
                assert q.demonstration == demonstration(a, b, forget_carry=True)
            assert q.answer == str(a + b)
        if name != "easy":
            assert wrong == 0
        else:  # 30% slip; only the ones with a carry come out wrong
            assert 0.1 * len(questions) < wrong < 0.3 * len(questions)


def test_forgotten_carries():
    assert demonstration(57, 48, forget_carry=True) == (
        "7+8=15, carry 1. 5+4=9, carry 0. The answer is \\boxed{95}."
    )
    assert demonstration(7, 8, forget_carry=True) == "7+8=15, carry 1. The answer is \\boxed{5}."
    assert demonstration(95, 5, forget_carry=True).endswith("\\boxed{90}.")
    assert demonstration(3, 4, forget_carry=True) == demonstration(3, 4)  # no carry, no slip


def test_demonstration_example():
    assert demonstration(57, 48) == (
        "7+8=15, carry 1. 5+4+1=10, carry 1. The answer is \\boxed{105}."
    )
    assert demonstration(3, 4) == "3+4=7, carry 0. The answer is \\boxed{7}."


@given(st.integers(0, 99_999), st.integers(0, 99_999))
def test_carry_derivation_is_correct(a, b):
    steps = STEP.findall(demonstration(a, b))
    assert len(steps) == max(len(str(a)), len(str(b)))
    carry, digits = 0, []
    for x, y, c, total, new_carry in steps:
        assert int(c or 0) == carry
        assert int(total) == int(x) + int(y) + carry
        carry = int(new_carry)
        assert carry == int(total) // 10
        digits.append(int(total) % 10)
    written = int(str(carry) + "".join(str(d) for d in reversed(digits)))
    assert written == a + b == int(boxed(demonstration(a, b)))


def test_splits_are_disjoint_and_test_is_held_out(splits):
    ids = [q.id for questions in splits.values() for q in questions]
    assert len(ids) == len(set(ids))

    def additions(split):
        return {(q.meta["a"], q.meta["b"]) for q in splits[split]}

    assert all(is_held_out(a, b) for a, b in additions("test") | additions("ood"))
    assert not any(is_held_out(a, b) for a, b in additions("train") | additions("easy"))
    assert not additions("test") & (additions("train") | additions("easy"))


def test_test_has_the_train_distribution_with_different_questions(splits):
    def level_share(split):
        levels = [q.meta["level"] for q in splits[split]]
        return {level: levels.count(level) / len(levels) for level in (1, 2, 3)}

    for level, share in level_share("train").items():
        assert abs(share - level_share("test")[level]) < 0.12, level
    train_texts = {q.prompt[0]["content"] for q in splits["train"]}
    assert len(train_texts & {q.prompt[0]["content"] for q in splits["test"]}) == 0


def test_difficulty_increases_from_easy_to_train_to_ood(splits):
    levels = {split: [q.meta["level"] for q in qs] for split, qs in splits.items()}
    assert set(levels["easy"]) == {1, 2, 3} and levels["easy"].count(3) < len(levels["easy"]) / 8
    assert set(levels["train"]) == {1, 2, 3}
    assert set(levels["ood"]) == {4, 5}
    assert mean(levels["easy"]) < mean(levels["train"]) < mean(levels["ood"])


def test_deterministic_for_a_seed():
    first, again = make_questions("train", 50, seed=7), make_questions("train", 50, seed=7)
    assert first == again
    other = make_questions("train", 50, seed=8)
    assert [q.prompt for q in other] != [q.prompt for q in first]


def test_unknown_split_is_a_config_error():
    with pytest.raises(ConfigError, match="'hard'"):
        make_questions("hard", 3)


def test_responses_are_short_for_the_tiny_tokenizer(tiny):
    _, tokenizer = tiny
    for split in ("train", "ood"):
        for q in make_questions(split, 100, seed=1):
            assert len(tokenizer(q.demonstration)["input_ids"]) < 80, q.demonstration
    longest_train = max(
        len(tokenizer(q.demonstration)["input_ids"]) for q in make_questions("train", 200, seed=2)
    )
    assert longest_train < 60


def test_demo_data_splits_the_test_set_by_difficulty(tmp_path):
    """The embedded default evaluates `test` in two parts: levels 1-2 and level 3, nothing lost."""
    import json

    from hpt.demo.default import write_task_data

    sizes = {"easy": 10, "train": 10, "test": 60, "ood": 5, "val": 5}
    paths = write_task_data(tmp_path, seed=0, sizes=sizes)

    def levels(name):
        return [json.loads(line)["level"] for line in paths[name].read_text().splitlines()]

    easy, hard = levels("test_easy"), levels("test_hard")
    assert set(easy) == {1, 2} and set(hard) == {3}
    assert sorted(easy + hard) == sorted(levels("test"))
