"""String normalisation of final answers, and the exact comparisons it makes possible.

:func:`normalize_answer` rewrites the notational variants of one answer to one string
(``\\dfrac12``, ``\\frac{1}{2}``; ``45^\\circ``, ``45``; ``\\$1{,}000.``, ``1000``; ``x = 3``, ``3``),
so that most correct answers are recognised by string equality, without the cost of a symbolic
check. :func:`as_number` and :func:`as_text` read the normalised string as a rational number or a
plain-words answer; both sides of a comparison in one of these forms are decided exactly here.
Anything else goes to math-verify (``hpt.rewards.math``).

The rules follow the answer normalisation of Hendrycks et al., "Measuring Mathematical Problem
Solving With the MATH Dataset" (arXiv 2103.03874), extended for units, money and thousands
separators.
"""

from __future__ import annotations

import re
from fractions import Fraction

_UNICODE = {
    "\u2212": "-",  # minus sign
    "\u2013": "-",
    "\u00d7": "\\times ",
    "\u22c5": "\\cdot ",
    "\u00b7": "\\cdot ",
    "\u03c0": "\\pi ",
    "\u221e": "\\infty ",
    "\u2264": "\\le ",
    "\u2265": "\\ge ",
    "\u221a": "\\sqrt",
    "\u00b0": "",  # degree sign
    "\u00a0": " ",
}
_SPACING = re.compile(
    r"(?<!\\)\\left(?![a-zA-Z])|\\right(?![a-zA-Z])|\\big[lr]?(?![a-zA-Z])|\\Big[lr]?(?![a-zA-Z])"
    r"|\\displaystyle|(?<!\\)\\[!,;:> ]|\\q?quad(?![a-zA-Z])|~"
)
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\degree(?![a-zA-Z])|\\circ(?![a-zA-Z])")
_PERCENT = re.compile(r"\\?%|\\percent(?![a-zA-Z])")
_DOLLARS = re.compile(r"\\\$|\$")
_FRAC_ALIAS = re.compile(r"\\[dt]frac(?![a-zA-Z])")
_BINOM_ALIAS = re.compile(r"\\[dt]binom(?![a-zA-Z])")
_TEXT_COMMAND = re.compile(
    r"\\(?:text|textbf|textit|textrm|textnormal|mathrm|mathbf|mathit|mbox|operatorname|boldsymbol)"
    r"\s*\{([^{}]*)\}"
)
_UNIT_WORDS = (
    "square units|sq units|cubic units|units?|square (?:feet|inches|meters|metres|centimeters|cm|m)"
    "|sq ?(?:ft|in|m|cm)|cubic (?:feet|inches|meters|metres|centimeters|cm|m)"
    "|cm|mm|km|kg|mg|ml|mph|km/h|m/s|ft|in|yd|mi|hrs?|min|sec|seconds?|minutes?|hours?|days?|weeks?"
    "|months?|years?|inch(?:es)?|feet|foot|yards?|miles?|meters?|metres?|centimeters?"
    "|millimeters?|kilometers?|grams?|kilograms?|pounds?|lbs?|ounces?|oz|liters?|litres?"
    "|gallons?|cents?|dollars?|euros?|degrees?|radians?|people|persons?|students?|apples?"
    "|marbles?|cookies?|books?|ways|points?|times|percent"
)
_TEXT_UNIT_WORDS = (
    _UNIT_WORDS + "|m|s|g|h|l|L|K|N|J|W|V|A"
)  # one letter is a unit only inside \\text
_TRAILING_UNIT = re.compile(
    rf"^(?P<value>.*?[\d}}])\s*(?:\\(?:text|mbox|mathrm)\s*\{{\s*(?:{_TEXT_UNIT_WORDS})\s*\}}"
    rf"|\s(?:{_UNIT_WORDS}))(?:\s*\^\s*\{{?[23]\}}?)?\s*$"
)
_ASSIGNMENT = re.compile(r"^[a-zA-Z](?:_\{?\w+\}?)?\s*=\s*(?P<value>[^=<>]+)$")
_SPACE_AFTER_COMMAND = re.compile(r"(\\[a-zA-Z]+)\s+(?=[a-zA-Z])")
_WHITESPACE = re.compile(r"\s+")
_SHORT_FRAC = re.compile(r"\\frac(\d)(\d)|\\frac\{([^{}]*)\}(\w)|\\frac(\w)\{([^{}]*)\}")
_SHORT_SQRT = re.compile(r"\\sqrt(\w)")
_UNBRACED_SCRIPT = re.compile(r"([\^_])\s*([\w])")
_THOUSANDS = re.compile(r"^[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_DECIMAL_NUMBER = re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)$")
_PLAIN_FRACTION = re.compile(r"^(?P<sign>[-+]?)(?P<num>\d+)/(?P<den>\d+)$")
_LATEX_FRACTION = re.compile(r"^(?P<sign>[-+]?)\\frac\{(?P<num>[-+]?\d+)\}\{(?P<den>[-+]?\d+)\}$")
_WORDS = re.compile(r"^[A-Za-z][A-Za-z '\-]*[A-Za-z]$")
_MAX_NUMBER_CHARS = 64


def _unwrap_box(answer: str) -> str:
    from hpt.rewards.extract import extract_boxed

    while True:
        inner = extract_boxed(answer)
        stripped = answer.strip()
        if inner is None or not (stripped.startswith("\\boxed") or stripped.startswith("\\fbox")):
            return answer
        answer = inner


def _strip_math_delimiters(answer: str) -> str:
    answer = answer.strip()
    for left, right in (("\\(", "\\)"), ("\\[", "\\]"), ("$$", "$$"), ("$", "$")):
        if (
            answer.startswith(left)
            and answer.endswith(right)
            and len(answer) >= len(left) + len(right)
        ):
            answer = answer[len(left) : len(answer) - len(right)].strip()
    return answer


def _short_frac(match: re.Match[str]) -> str:
    groups = match.groups()
    if groups[0] is not None:
        return f"\\frac{{{groups[0]}}}{{{groups[1]}}}"
    if groups[2] is not None:
        return f"\\frac{{{groups[2]}}}{{{groups[3]}}}"
    return f"\\frac{{{groups[4]}}}{{{groups[5]}}}"


def normalize_answer(answer: str) -> str:
    """The canonical string of a final answer, for exact comparison.

    Removes math delimiters, outer boxes, ``\\left``/``\\right`` and spacing commands, degree
    signs, percent signs, dollar signs, trailing periods, trailing units (``5\\text{ cm}``, ``12
    inches``), a leading one-variable assignment (``x = 3``), thousands separators (``1{,}000``)
    and whitespace (a space that ends a command is kept: ``\\pi r``); unwraps ``\\text{...}`` and
    friends; writes ``\\dfrac``/``\\tfrac`` as ``\\frac`` and ``\\frac12``/``\\sqrt2`` with braces.

    Args:
        answer: an extracted answer or a ground truth (may be boxed or in ``$...$``).

    Returns:
        The normalised string ('' for an empty answer).
    """
    text = _strip_math_delimiters(_unwrap_box(answer))
    for char, replacement in _UNICODE.items():
        text = text.replace(char, replacement)
    text = _SPACING.sub(" ", text)
    text = _DEGREES.sub("", text)
    text = _PERCENT.sub("", text)
    text = _DOLLARS.sub("", text)
    text = text.replace("{,}", ",")
    text = _FRAC_ALIAS.sub(r"\\frac", text)
    text = _BINOM_ALIAS.sub(r"\\binom", text)
    text = text.strip().rstrip(".").strip()
    unit = _TRAILING_UNIT.match(text)
    if unit:
        text = unit.group("value")
    text = _TEXT_COMMAND.sub(r"\1", text).strip()
    assignment = _ASSIGNMENT.match(text)
    if assignment:
        text = assignment.group("value")
    text = _UNBRACED_SCRIPT.sub(r"\1{\2}", text)  # x^2 -> x^{2}; \log_2 8 stays \log_{2}8
    text = _SPACE_AFTER_COMMAND.sub("\\1\x00", text)
    text = _WHITESPACE.sub("", text).replace("\x00", " ")
    text = _SHORT_FRAC.sub(_short_frac, text)
    text = _SHORT_SQRT.sub(r"\\sqrt{\1}", text)
    if _THOUSANDS.match(text):
        text = text.replace(",", "")
    text = text.rstrip(".")
    if text.startswith("."):
        text = "0" + text
    return text


_INTEGER = re.compile(r"^(?P<sign>-?)0*(?P<digits>\d+)$")


def integers_equal(left: str, right: str) -> bool | None:
    """Whether two normalised integers of any length are equal (None if either is not one)."""
    match_left, match_right = _INTEGER.match(left), _INTEGER.match(right)
    if match_left is None or match_right is None:
        return None
    if match_left.group("digits") != match_right.group("digits"):
        return False
    return match_left.group("digits") == "0" or match_left.group("sign") == match_right.group(
        "sign"
    )


def as_number(normalised: str) -> Fraction | None:
    """The exact rational value of a normalised answer that is a plain number, else None.

    Plain numbers: integers, decimals, ``a/b`` and ``\\frac{a}{b}`` with integer parts, signed.
    """
    if len(normalised) > _MAX_NUMBER_CHARS:
        return None
    try:
        if _DECIMAL_NUMBER.match(normalised):
            return Fraction(normalised)
        match = _PLAIN_FRACTION.match(normalised) or _LATEX_FRACTION.match(normalised)
        if match and int(match.group("den")) != 0:
            value = Fraction(int(match.group("num")), int(match.group("den")))
            return -value if match.group("sign") == "-" else value
    except (ValueError, ZeroDivisionError):
        return None
    return None


def as_text(normalised: str) -> str | None:
    """A plain-words answer (``Monday``, ``north east``) in lower case, else None.

    Words need two letters or more: single letters are variables or options, not words.
    """
    if not _WORDS.match(normalised):
        return None
    return normalised.lower()


_DANGLING = re.compile(r"(?:[-+*/^_=,&]|\\|\{)$")


def is_malformed(normalised: str) -> bool:
    """True for an answer no grader would accept: unbalanced braces or a dangling operator.

    Examples: ``3+``, ``\\frac{1}{``, ``x^``; a trailing backslash.
    """
    depth = 0
    for char in normalised.replace("\\{", "").replace("\\}", ""):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth < 0:
            return True
    return depth != 0 or bool(_DANGLING.search(normalised))


def numbers_differ(left: Fraction, right: Fraction, *, rel_tol: float = 1e-6) -> bool:
    """True when two numbers are further apart than a rounding of the last printed digits."""
    scale = max(abs(left), abs(right), Fraction(1))
    return abs(left - right) > Fraction(rel_tol) * scale
