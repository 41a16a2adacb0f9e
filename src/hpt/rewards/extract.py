"""Answer extraction: the last ``\\boxed{...}`` of a response, and multiple-choice letters.

Every function here is linear in the length of its input (no backtracking regular expression
runs over a whole response), so a 100k-character response costs microseconds, not seconds.
"""

from __future__ import annotations

import re

BOX_COMMANDS = ("\\boxed", "\\fbox")
"""LaTeX commands whose argument is taken as the final answer."""

CHOICE_LETTERS = "ABCDEFGHIJ"
"""Multiple-choice letters recognised by :func:`extract_choice` (up to ten options)."""


_BRACE_TOKEN = re.compile(r"\\.|[{}]", re.DOTALL)
_BRACELESS_ARGUMENT = re.compile(r"[^\s$]+")


def _closing_braces(text: str, start: int = 0) -> dict[int, int]:
    """Map the index of every ``{`` at or after ``start`` to the index of its ``}``.

    One pass over the braces (escaped ``\\{`` / ``\\}`` skipped); unclosed groups are absent.
    """
    pairs: dict[int, int] = {}
    stack: list[int] = []
    for token in _BRACE_TOKEN.finditer(text, start):
        char = token.group(0)
        if char == "{":
            stack.append(token.start())
        elif char == "}" and stack:
            pairs[stack.pop()] = token.start()
    return pairs


def _argument_start(text: str, after: int) -> int | None:
    """Index where a box command's argument starts (``after`` is the end of the command name)."""
    index = after
    while index < len(text) and text[index] in " \t":
        index += 1
    if index >= len(text):
        return None
    if text[index] != "{" and index == after:  # "\\boxedx": another command, not a box
        return None
    return index


def _box_argument(
    text: str, after: int, pairs: dict[int, int] | None = None
) -> tuple[str, int] | None:
    """(argument, end index) of a box command ending at ``after``; None when it has none.

    ``\\boxed{a{b}c}`` gives ``a{b}c`` (nested braces balanced); ``\\boxed 5`` gives ``5`` (a
    braceless argument runs to the next whitespace or ``$``); None when the group never closes.
    ``pairs`` is :func:`_closing_braces` of the text (computed from ``after`` when omitted).
    """
    index = _argument_start(text, after)
    if index is None:
        return None
    if text[index] == "{":
        close = (pairs if pairs is not None else _closing_braces(text, index)).get(index)
        return None if close is None else (text[index + 1 : close], close + 1)
    match = _BRACELESS_ARGUMENT.match(text, index)
    return (match.group(0).rstrip(".,;"), match.end()) if match else None


def _box_positions(text: str) -> list[int]:
    """Start index of every box command in ``text``, in order."""
    positions = []
    for command in BOX_COMMANDS:
        position = text.find(command)
        while position != -1:
            positions.append(position)
            position = text.find(command, position + len(command))
    return sorted(positions)


def _command_length(text: str, position: int) -> int:
    return next(len(c) for c in BOX_COMMANDS if text.startswith(c, position))


def _boxes(text: str) -> list[tuple[int, int, str]]:
    """(start, end, content) of every complete box, outer and nested, in order."""
    positions = _box_positions(text)
    if not positions:
        return []
    pairs = _closing_braces(text, positions[0])
    boxes = []
    for position in positions:
        argument = _box_argument(text, position + _command_length(text, position), pairs)
        if argument is not None:
            boxes.append((position, argument[1], argument[0]))
    return boxes


def extract_all_boxed(text: str) -> list[str]:
    """Contents of every ``\\boxed{...}`` / ``\\fbox{...}`` in order of appearance.

    Boxes nested inside another box are not listed separately (the outer box is). Linear in
    ``len(text)``.

    Args:
        text: a model response or a ground truth.

    Returns:
        The box arguments, possibly empty strings (``\\boxed{}``); unclosed boxes are skipped.
    """
    outer: list[str] = []
    covered_until = -1
    for start, end, content in _boxes(text):
        if start >= covered_until:
            outer.append(content)
            covered_until = end
    return outer


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``, or braceless ``\\boxed 5``).

    Args:
        text: a model response (any length; the scan is linear).

    Returns:
        The argument of the last box that closes, or None when the text has no complete box.

    Examples:
        >>> extract_boxed(r"so \\boxed{1} or rather \\boxed{\\frac{1}{2}}.")
        '\\\\frac{1}{2}'
        >>> extract_boxed("no box") is None
        True
    """
    last = max((text.rfind(command) for command in BOX_COMMANDS), default=-1)
    if last == -1:
        return None
    argument = _box_argument(text, last + _command_length(text, last))
    if argument is not None:  # the common case: only the tail after the last box is scanned
        return argument[0]
    boxes = _boxes(text)
    return boxes[-1][2] if boxes else None


_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mathbf|textrm|mbox|bf)\s*\{([^{}]*)\}")
_CHOICE_ALONE = re.compile(r"^[\s*_]*[(\[]?\s*([A-J])\s*[)\]]?(?:[\s.:)]|$)")
_STATED = re.compile(
    r"(?:(?i:answer)\s*(?:(?i:is)\b)?|(?i:option|choice)\s*(?:(?i:is)\b|[:：]))"
    r"\s*[:：]?\s*(?:(?i:option|choice)\s+)?[*_\s]*(?:\\text(?:bf)?\{\s*)?"
    r"(?P<paren>[(\[])?\s*(?P<letter>[A-J])\s*[)\]]?(?P<after>[^A-Za-z0-9]|$)"
)
_PRONOUN_FOLLOW = re.compile(r"\s+[a-z']")


def _choice_from_fragment(fragment: str) -> str | None:
    """A letter from a short answer such as ``B``, ``(B)``, ``\\text{B}``, ``B) 42`` or ``B.``."""
    cleaned = _TEXT_WRAPPER.sub(r"\1", fragment.strip()).replace("$", "").strip()
    match = _CHOICE_ALONE.match(cleaned)
    return match.group(1) if match else None


def _stated_choices(text: str) -> list[tuple[int, str]]:
    """(position, letter) of every "the answer is (C)" / "Answer: D" statement in ``text``."""
    found = []
    for match in _STATED.finditer(text):
        letter = match.group("letter")
        # "the answer is I think..." / "the answer is A prime": a word, not an option
        if letter in "AI" and not match.group("paren"):
            if _PRONOUN_FOLLOW.match(text, match.start("letter") + 1):
                continue
        found.append((match.start("letter"), letter))
    return found


def extract_choice(text: str) -> str | None:
    """The multiple-choice letter (A-J) a response commits to; the last commitment wins.

    Recognised: boxed letters (``\\boxed{B}``, ``\\boxed{\\text{B}}``, ``\\boxed{(B)}``),
    statements ("The answer is (C)", "Answer: D", "the correct option is B"), and a response that
    is only a letter ("(B)"). Lower-case letters are not options ("the answer is a prime").

    Args:
        text: a model response.

    Returns:
        The upper-case letter, or None when the response commits to no option.
    """
    candidates = _stated_choices(text)
    for position, _end, content in _boxes(text):
        letter = _choice_from_fragment(content)
        if letter is not None:
            candidates.append((position, letter))
    if candidates:
        return max(candidates)[1]
    if len(text) <= 16:
        return _choice_from_fragment(text)
    return None


def choice_of_answer(answer: str) -> str | None:
    """The letter of a multiple-choice ground truth (``B``, ``b``, ``(B)``, ``\\boxed{B}``)."""
    boxed = extract_boxed(answer)
    fragment = (boxed if boxed is not None else answer).strip()
    return _choice_from_fragment(fragment.upper())
