"""The demo's synthetic task: addition word problems of graded difficulty, with worked solutions.

Each question asks for the sum of two numbers of ``level`` digits, phrased as a short word problem.
Its demonstration is a compact digit-by-digit carry derivation that ends with
``The answer is \\boxed{SUM}.``, so the ``"math"`` reward can verify any response. A tiny model
pre-trained with SFT on the easy split (1-2 digits, and a few 3-digit sums) solves some but not all
of the harder ones: the regime of partial competence in which Hybrid Post-Training (arXiv 2509.04419) routes each question
to SFT or RL by how often the model gets it right.

Splits (all deterministic for a seed):

- ``"easy"``: levels 1-2 and a thin share (7%) of level 3, the pre-training data. A share of its
  demonstrations (:data:`EASY_SLIP`, 30%) make one systematic mistake: they write each carry
  down and then forget to add it (``7+8=15, carry 1. 5+4=9, carry 0.``), ending with a wrong sum.
  A model pre-trained on it forgets carries now and then when it samples: an error that rewards
  can remove (RL) and that greedy decoding mostly hides.
- ``"train"``: levels 1-3 in equal parts, the post-training distribution.
- ``"test"``: the same distribution as ``"train"``, held out: an addition ``(a, b)`` that can appear
  in ``"test"`` never appears in ``"easy"`` or ``"train"``.
- ``"ood"``: levels 4-5, harder than anything trained on.
- ``"val"``: the distribution of ``"test"`` from another stream, for choosing settings (a
  learning rate) without looking at ``"test"``.

Only ``"easy"`` has wrong demonstrations; every split's ``answer`` is the true sum.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hpt.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from hpt.data import Question

NAMES = ("Ann", "Ben", "Cara", "Dan", "Eve", "Finn", "Gia", "Hugo", "Ivy", "Jack")
ITEMS = ("apples", "books", "coins", "marbles", "pens", "stamps", "cards", "shells")
TEMPLATES = (
    "{name} has {a} {items} and buys {b} more. How many {items} does {name} have now?",
    "A box holds {a} {items}. {name} puts in {b} more. How many {items} are in the box?",
    "{name} found {a} {items} on Monday and {b} on Tuesday. How many {items} in total?",
    "What is {a} + {b}?",
)


@dataclass(frozen=True)
class SplitSpec:
    """The difficulty levels of a split and their sampling weights."""

    levels: tuple[int, ...]
    weights: tuple[float, ...]
    held_out: bool  # True: only additions reserved for evaluation; False: only the others
    slip: float = 0.0  # share of demonstrations that forget to add their carries


EASY_SLIP = 0.3

SPLITS: dict[str, SplitSpec] = {
    "easy": SplitSpec(levels=(1, 2, 3), weights=(1.0, 1.0, 0.15), held_out=False, slip=EASY_SLIP),
    "train": SplitSpec(levels=(1, 2, 3), weights=(1.0, 1.0, 1.0), held_out=False),
    "test": SplitSpec(levels=(1, 2, 3), weights=(1.0, 1.0, 1.0), held_out=True),
    "ood": SplitSpec(levels=(4, 5), weights=(1.0, 1.0), held_out=True),
    "val": SplitSpec(levels=(1, 2, 3), weights=(1.0, 1.0, 1.0), held_out=True),
}

HELD_OUT_MODULUS = 5  # one addition in five is reserved for the held-out splits


def is_held_out(a: int, b: int) -> bool:
    """Whether the addition ``a + b`` is reserved for the held-out splits (a stable hash)."""
    return zlib.crc32(f"{a}+{b}".encode()) % HELD_OUT_MODULUS == 0


def operand_range(level: int) -> tuple[int, int]:
    """The inclusive range of the operands of a level: ``level`` digits (level 1 includes 0)."""
    if level < 1:
        raise ConfigError(f"arithmetic level must be >= 1, got {level}")
    return (0 if level == 1 else 10 ** (level - 1), 10**level - 1)


def sample_operands(rng: random.Random, level: int, held_out: bool) -> tuple[int, int]:
    """Draw ``(a, b)`` of ``level`` digits from the held-out or the training part of the level."""
    low, high = operand_range(level)
    while True:
        a, b = rng.randint(low, high), rng.randint(low, high)
        if is_held_out(a, b) == held_out:
            return a, b


def problem_text(a: int, b: int, rng: random.Random) -> str:
    """A word problem asking for ``a + b``, with a template, name and item drawn from ``rng``."""
    template = rng.choice(TEMPLATES)
    return template.format(a=a, b=b, name=rng.choice(NAMES), items=rng.choice(ITEMS))


def demonstration(a: int, b: int, *, forget_carry: bool = False) -> str:
    """The worked solution of ``a + b``: one column at a time from the units, with carries.

    Example: ``demonstration(57, 48)`` is
    ``"7+8=15, carry 1. 5+4+1=10, carry 1. The answer is \\boxed{105}."``
    With ``forget_carry`` every carry is written down and then not added (a systematic slip):
    ``"7+8=15, carry 1. 5+4=9, carry 0. The answer is \\boxed{95}."``
    """
    width = max(len(str(a)), len(str(b)))
    digits_a, digits_b = str(a).zfill(width)[::-1], str(b).zfill(width)[::-1]
    steps, digits, carry = [], [], 0
    for x, y in zip(digits_a, digits_b):
        total = int(x) + int(y) + carry
        terms = f"{x}+{y}" + (f"+{carry}" if carry else "")
        steps.append(f"{terms}={total}, carry {total // 10}.")
        digits.append(str(total % 10))
        carry = 0 if forget_carry else total // 10
    written = int(str(carry) + "".join(reversed(digits)))  # int() drops the leading zeros
    return " ".join(steps) + f" The answer is \\boxed{{{written}}}."


def make_questions(split: str, n: int, seed: int = 0) -> list[Question]:
    """``n`` questions of a split, deterministic for ``(split, seed)``.

    Args:
        split: ``"easy"``, ``"train"``, ``"test"`` or ``"ood"`` (see the module docstring).
        n: how many questions.
        seed: the seed; different splits draw from different streams for the same seed.

    Returns:
        Questions with chat prompts ``[{"role": "user", "content": ...}]``, the sum as the answer,
        the carry derivation as the demonstration, ``source="arith-<level>"`` and
        ``meta={"level", "a", "b"}``.
    """
    from hpt.data import Question

    spec = SPLITS.get(split)
    if spec is None:
        raise ConfigError(f"unknown arithmetic split {split!r}; choose from {', '.join(SPLITS)}")
    rng = random.Random(f"hpt-arith:{split}:{seed}")
    questions = []
    for index in range(n):
        level = rng.choices(spec.levels, weights=spec.weights)[0]
        a, b = sample_operands(rng, level, spec.held_out)
        slip = spec.slip > 0 and rng.random() < spec.slip
        questions.append(
            Question(
                id=f"arith-{split}-{seed}-{index}",
                prompt=[{"role": "user", "content": problem_text(a, b, rng)}],
                answer=str(a + b),
                demonstration=demonstration(a, b, forget_carry=slip),
                source=f"arith-{level}",
                meta={"level": level, "a": a, "b": b},
            )
        )
    return questions


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    """Plain texts of problems and solutions of every level, to train the demo tokenizer on."""
    rng = random.Random(f"hpt-arith-corpus:{seed}")
    texts = []
    for index in range(n):
        level = 1 + index % 5
        a, b = sample_operands(rng, level, held_out=rng.random() < 0.2)
        texts.append(problem_text(a, b, rng))
        texts.append(demonstration(a, b))
    texts.extend(template.replace("{", "").replace("}", " ") for template in TEMPLATES)
    return texts
