r"""A grading table: (response, ground truth, expected verdict) cases written for this project.

Each case is a response as a model might write it, a ground truth as a data set might store it,
and the verdict a careful human grader would give. Near-misses (an interval's bracket, a sign, an
exponent off by one, an anagram of the right word) must score 0. Cases where a sensible grader
could go either way (mixed numbers, 0.1 versus 10%, a truncated last box) are left out.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Case:
    """One row of the table."""

    note: str
    response: str
    answer: str
    expected: float
    reward: str = "math"


def box(answer: str, lead: str = "So the final answer is ") -> str:
    """A short response ending with a boxed answer."""
    return f"{lead}$\\boxed{{{answer}}}$."


_FILLER = "Let us consider the problem carefully; we expand, simplify and check each step. "
_LONG = (_FILLER * (100_000 // len(_FILLER) + 1))[:100_000]
_BIG_DIGITS = "".join(str((7 * i + 3) % 10) for i in range(5000))
_BIG_DIGITS_OFF = _BIG_DIGITS[:-1] + str((int(_BIG_DIGITS[-1]) + 1) % 10)
_ONES = "+".join(["1"] * 300)
_PM = r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}"

CASES: list[Case] = [
    # --- fractions, \dfrac, \tfrac ------------------------------------------------------------
    Case("frac equal", box(r"\frac{1}{2}"), r"\frac{1}{2}", 1.0),
    Case("dfrac vs short frac", box(r"\dfrac{1}{2}"), r"\frac12", 1.0),
    Case("tfrac vs decimal", box(r"\tfrac{3}{4}"), "0.75", 1.0),
    Case("slash vs frac", box("1/2"), r"\frac{1}{2}", 1.0),
    Case("unreduced fraction", box(r"\frac{2}{4}"), r"\frac{1}{2}", 1.0),
    Case("other fraction", box(r"\frac{1}{3}"), r"\frac{1}{2}", 0.0),
    Case("sign of fraction", box(r"-\frac{1}{2}"), r"\frac{1}{2}", 0.0),
    Case("minus inside numerator", box(r"-\frac{3}{7}"), r"\frac{-3}{7}", 1.0),
    Case("frac with sqrt", box(r"\frac{\sqrt{3}}{2}"), r"\frac{\sqrt3}{2}", 1.0),
    Case("rationalised denominator", box(r"\frac{\sqrt{3}}{3}"), r"\frac{1}{\sqrt{3}}", 1.0),
    Case("wrong surd", box(r"\frac{\sqrt{2}}{2}"), r"\frac{\sqrt{3}}{2}", 0.0),
    Case("truncated decimal", box("0.333"), r"\frac{1}{3}", 0.0),
    Case("22/7 is not pi", box(r"\dfrac{22}{7}"), r"\pi", 0.0),
    Case("improper fraction vs decimal", box(r"\frac{10}{4}"), "2.5", 1.0),
    Case("symbolic fraction", box(r"\frac{x+1}{2}"), r"\frac{1}{2}(x+1)", 1.0),
    Case("symbolic fraction near miss", box(r"\frac{x+1}{2}"), r"\frac{x}{2}+1", 0.0),
    Case("frac of pi", box(r"\frac{\pi}{2}"), r"\pi/2", 1.0),
    Case("dfrac with spaces", box(r"\dfrac { 5 } { 8 }"), r"\frac{5}{8}", 1.0),
    Case("inverted fraction", box(r"\frac{8}{5}"), r"\frac{5}{8}", 0.0),
    Case("frac x over 2", box(r"\frac{1}{2}x"), r"\frac{x}{2}", 1.0),
    # --- tuples, intervals, sets ---------------------------------------------------------------
    Case("pair", box("(1, 2)"), "(1,2)", 1.0),
    Case("pair swapped", box("(2, 1)"), "(1,2)", 0.0),
    Case("decreasing pairs differ", box("(3,1)"), "(2,1)", 0.0),
    Case("half-open interval", box("[1, 5)"), "[1,5)", 1.0),
    Case("closed vs half-open", box("[1,5]"), "[1,5)", 0.0),
    Case("ray closed", box(r"(-\infty, 3]"), r"(-\infty,3]", 1.0),
    Case("ray open vs closed", box(r"(-\infty, 3)"), r"(-\infty,3]", 0.0),
    Case(
        "union of rays", box(r"(-\infty,-1)\cup(2,\infty)"), r"(-\infty,-1) \cup (2, \infty)", 1.0
    ),
    Case(
        "union bracket near miss",
        box(r"(-\infty,-1)\cup[2,\infty)"),
        r"(-\infty,-1)\cup(2,\infty)",
        0.0,
    ),
    Case("triple", box("(1,2,3)"), "(1, 2, 3)", 1.0),
    Case("triple permuted", box("(1,3,2)"), "(1,2,3)", 0.0),
    Case("pair with left right", box(r"\left(\frac{1}{2}, -3\right)"), "(0.5,-3)", 1.0),
    Case("pair sign near miss", box(r"\left(\frac{1}{2}, 3\right)"), "(0.5,-3)", 0.0),
    Case("set order", box(r"\{1, 2, 3\}"), r"\{3,2,1\}", 1.0),
    Case("set missing element", box(r"\{1, 2\}"), r"\{3,2,1\}", 0.0),
    Case("closed unit interval", box(r"\left[ 0, 1 \right]"), "[0,1]", 1.0),
    Case("point in 3d", box(r"(1,-1,\frac{1}{2})"), r"(1, -1, 0.5)", 1.0),
    Case("point in 3d near miss", box(r"(1,-1,\frac{1}{2})"), r"(1, 1, 0.5)", 0.0),
    # --- matrices and vectors ------------------------------------------------------------------
    Case("matrix spacing", box(_PM), r"\begin{pmatrix}1&2\\3&4\end{pmatrix}", 1.0),
    Case("pmatrix vs bmatrix", box(r"\begin{bmatrix} 1 & 2 \\ 3 & 4 \end{bmatrix}"), _PM, 1.0),
    Case("matrix entry differs", box(r"\begin{pmatrix} 1 & 2 \\ 3 & 5 \end{pmatrix}"), _PM, 0.0),
    Case("matrix transposed", box(r"\begin{pmatrix} 1 & 3 \\ 2 & 4 \end{pmatrix}"), _PM, 0.0),
    Case(
        "column vector",
        box(r"\begin{pmatrix} 1 \\ -2 \end{pmatrix}"),
        r"\begin{pmatrix}1\\-2\end{pmatrix}",
        1.0,
    ),
    Case(
        "column vector sign",
        box(r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}"),
        r"\begin{pmatrix}1\\-2\end{pmatrix}",
        0.0,
    ),
    Case(
        "matrix with fractions",
        box(r"\begin{pmatrix} \frac{1}{2} & 0 \\ 0 & 1 \end{pmatrix}"),
        r"\begin{pmatrix}0.5&0\\0&1\end{pmatrix}",
        1.0,
    ),
    # --- degrees and units ---------------------------------------------------------------------
    Case("degrees vs number", box(r"45^\circ"), "45", 1.0),
    Case("braced degrees", box(r"45^{\circ}"), r"45^\circ", 1.0),
    Case("number vs degrees truth", box("45"), r"45^\circ", 1.0),
    Case("supplementary angle", box(r"135^\circ"), r"45^\circ", 0.0),
    Case("unicode degree sign", box("30\u00b0"), "30", 1.0),
    Case("cm unit", box(r"12\text{ cm}"), "12", 1.0),
    Case("squared unit", box(r"12 \text{ cm}^2"), "12", 1.0),
    Case("inches", box(r"12\text{ inches}"), "12", 1.0),
    Case("wrong length with unit", box(r"13\text{ cm}"), "12", 0.0),
    Case("unit on both sides", box(r"5 \text{ meters}"), r"5\text{ m}", 1.0),
    Case("mph", box(r"60 \text{ mph}"), "60", 1.0),
    Case("hours", box(r"6\text{ hours}"), "6", 1.0),
    Case("mbox units", box(r"3 \mbox{ units}"), "3", 1.0),
    Case("apples", box(r"7 \text{ apples}"), "7", 1.0),
    Case("plain unit word", box("15 minutes"), "15", 1.0),
    Case("plain unit word wrong", box("16 minutes"), "15", 0.0),
    Case("degrees word", box(r"90 \text{ degrees}"), "90", 1.0),
    # --- percentages and money -----------------------------------------------------------------
    Case("percent vs number", box(r"25\%"), "25", 1.0),
    Case("number vs percent truth", box("25"), r"25\%", 1.0),
    Case("percent both", box(r"25\%"), r"25\%", 1.0),
    Case("percent off by ten", box(r"2.5\%"), r"25\%", 0.0),
    Case("dollars and cents", box(r"\$12.50"), "12.5", 1.0),
    Case("dollars near miss", box(r"\$12.05"), "12.5", 0.0),
    Case("latex thousands separator", box(r"\$1{,}000"), "1000", 1.0),
    Case("comma thousands", box("1,000,000"), "1000000", 1.0),
    Case("thousands near miss", box("1,000"), "100", 0.0),
    Case("dollars word", box(r"12.5\text{ dollars}"), r"\$12.50", 1.0),
    Case("cents", box(r"50 \text{ cents}"), "50", 1.0),
    Case("thin space thousands", box(r"1\,234"), "1234", 1.0),
    Case("dollar sign with space", box(r"\$ 2.50"), r"\$2.5", 1.0),
    Case("percent sign plain", box("40%"), "40", 1.0),
    # --- scientific notation ------------------------------------------------------------------
    Case("times ten to the five", box(r"3 \times 10^{5}"), "300000", 1.0),
    Case("exponent off by one", box(r"3 \times 10^{6}"), "300000", 0.0),
    Case("cdot negative exponent", box(r"1.5 \cdot 10^{-3}"), "0.0015", 1.0),
    Case("negative exponent near miss", box(r"1.5 \times 10^{-4}"), "0.0015", 0.0),
    Case("avogadro", box(r"6.02\times10^{23}"), r"6.02 \times 10^{23}", 1.0),
    Case("2500", box(r"2.5\times 10^{3}"), "2500", 1.0),
    Case("power of ten", box(r"10^{-2}"), "0.01", 1.0),
    Case("mantissa near miss", box(r"1.23\times10^{4}"), "12400", 0.0),
    Case("mantissa", box(r"1.23\times10^{4}"), "12300", 1.0),
    # --- text answers ---------------------------------------------------------------------------
    Case("weekday", box(r"\text{Monday}"), "Monday", 1.0),
    Case("other weekday", box(r"\text{Tuesday}"), r"\text{Monday}", 0.0),
    Case("anagram is not equal", box(r"\text{dog}"), r"\text{god}", 0.0),
    Case("yes case-insensitive", box(r"\text{yes}"), "Yes", 1.0),
    Case("no vs yes", box(r"\text{no}"), r"\text{yes}", 0.0),
    Case("direction", box(r"\text{north}"), r"\text{North}", 1.0),
    Case("opposite direction", box(r"\text{east}"), r"\text{west}", 0.0),
    Case("parity", box(r"\text{odd}"), r"\text{even}", 0.0),
    Case("bold text", box(r"\textbf{even}"), "even", 1.0),
    Case("two words", box(r"\text{isosceles triangle}"), r"\text{Isosceles Triangle}", 1.0),
    Case("two words near miss", box(r"\text{scalene triangle}"), r"\text{isosceles triangle}", 0.0),
    # --- several boxed answers: the last one counts -------------------------------------------
    Case("corrected answer", r"First \boxed{3}, but correcting: \boxed{4}", "4", 1.0),
    Case("first box does not count", r"First \boxed{3}, but correcting: \boxed{4}", "3", 0.0),
    Case("assignments in boxes", r"\boxed{x=2} is wrong, so \boxed{x = 5}", "5", 1.0),
    Case("nested boxes", r"\boxed{\boxed{7}}", "7", 1.0),
    Case("fbox", r"Answer: \fbox{12}", "12", 1.0),
    Case("boxed then fbox", r"\boxed{1} then \fbox{2}", "2", 1.0),
    Case("braceless box", r"The answer is \boxed 5", "5", 1.0),
    Case("braceless then braced", r"\boxed 5 and finally \boxed{6}", "5", 0.0),
    Case("nested braces in box", r"\boxed{\frac{\sqrt{\frac{1}{4}}}{1}}", "0.5", 1.0),
    Case("boxed ground truth", box(r"\frac{1}{2}"), r"\boxed{\frac{1}{2}}", 1.0),
    Case("boxed ground truth wrong", box(r"\frac{1}{3}"), r"\boxed{\frac{1}{2}}", 0.0),
    Case("dollar ground truth", box("3"), "$3$", 1.0),
    # --- no boxed answer ------------------------------------------------------------------------
    Case("stated not boxed", "The answer is 5.", "5", 0.0),
    Case("inline math not boxed", "$5$", "5", 0.0),
    Case("empty response", "", "5", 0.0),
    Case("box without argument", r"\boxed", "5", 0.0),
    Case("unclosed box", r"\boxed{5", "5", 0.0),
    Case("empty box", r"\boxed{}", "5", 0.0),
    Case("boxed-like command", r"\boxedfive{5}", "5", 0.0),
    # --- empty and malformed LaTeX -------------------------------------------------------------
    Case("fraction missing denominator", box(r"\frac{1}{}"), r"\frac12", 0.0),
    Case("unbalanced inner brace", r"\boxed{\frac{1}{2}", r"\frac12", 0.0),
    Case("parens reversed", box(")("), "1", 0.0),
    Case("empty sqrt", box(r"\sqrt{}"), "0", 0.0),
    Case("division by zero", box("1/0"), "1", 0.0),
    Case("broken matrix", box(r"\begin{pmatrix}1&2"), _PM, 0.0),
    Case("carets", box("^^^"), "3", 0.0),
    Case("lone dollar", box("$"), "5", 0.0),
    Case("empty ground truth", box("5"), "", 0.0),
    Case("line break only", box(r"\\"), "1", 0.0),
    Case("dangling operator", box("3+"), "3", 0.0),
    # --- huge expressions -----------------------------------------------------------------------
    Case("power tower vs small number", box(r"9^{9^{9^{9}}}"), "5", 0.0),
    Case("power tower equal strings", box(r"9^{9^{9^{9}}}"), r"9^{9^{9^{9}}}", 1.0),
    Case("power of two", box(r"2^{10}"), "1024", 1.0),
    Case("big power of two", box(r"2^{100}"), "1267650600228229401496703205376", 1.0),
    Case("big power of two off by one", box(r"2^{100}+1"), "1267650600228229401496703205376", 0.0),
    Case("sum of 300 ones", box(_ONES), "300", 1.0),
    Case("sum of 300 ones near miss", box(_ONES), "301", 0.0),
    Case("5000 digits equal", box(_BIG_DIGITS), _BIG_DIGITS, 1.0),
    Case("5000 digits last differs", box(_BIG_DIGITS), _BIG_DIGITS_OFF, 0.0),
    Case("binomial power", box(r"(1+x)^{50}"), r"(x+1)^{50}", 1.0),
    # --- very long responses (100k characters) --------------------------------------------------
    Case("long then right", _LONG + r"\boxed{42}", "42", 1.0),
    Case("long then wrong", _LONG + r"\boxed{41}", "42", 0.0),
    Case("long with boxes throughout", (r"\boxed{1} " + _FILLER) * 1200 + r"\boxed{42}", "42", 1.0),
    Case("long run of unclosed boxes", r"\boxed{" * 14_000, "42", 0.0),
    Case("long without box", "42 " * 34_000, "42", 0.0),
    Case("long nesting then box", "{" * 50_000 + r"\boxed{42}", "42", 1.0),
    Case("long box closes early", r"\boxed{42}" + "}" * 50_000, "42", 1.0),
    # --- other notations: surds, pi, equations, signs, numbers ---------------------------------
    Case("sqrt 8", box(r"\sqrt{8}"), r"2\sqrt{2}", 1.0),
    Case("wrong surd multiple", box(r"2\sqrt{3}"), r"2\sqrt{2}", 0.0),
    Case("pi", box(r"\pi"), r"\pi", 1.0),
    Case("pi approximated", box("3.14"), r"\pi", 0.0),
    Case("two pi spacing", box(r"2\pi"), r"2 \pi", 1.0),
    Case("area with pi r", box(r"\pi r^2"), r"\pi r^{2}", 1.0),
    Case("expanded square", box("x^2+2x+1"), "(x+1)^2", 1.0),
    Case("expanded square near miss", box("x^2+2x-1"), "(x+1)^2", 0.0),
    Case("assignment vs value", box("x=3"), "3", 1.0),
    Case("value vs assignment", box("3"), "x=3", 1.0),
    Case("line equation", box("y = 2x + 1"), "y=2x+1", 1.0),
    Case("line equation near miss", box("y=2x-1"), "y = 2x+1", 0.0),
    Case("negative", box("-5"), "-5", 1.0),
    Case("sign dropped", box("5"), "-5", 0.0),
    Case("unicode minus", box("\u22125"), "-5", 1.0),
    Case("leading dot", box("0.5"), ".5", 1.0),
    Case("trailing zero", box("5.0"), "5", 1.0),
    Case("decimal near miss", box("5.01"), "5", 0.0),
    Case("trailing period in truth", box("10"), "10.", 1.0),
    Case("infinity", box(r"\infty"), r"\infty", 1.0),
    Case("minus infinity", box(r"-\infty"), r"\infty", 0.0),
    Case("complex", box("3+2i"), "3+2i", 1.0),
    Case("complex conjugate", box("3-2i"), "3+2i", 0.0),
    Case("complex reordered", box("2i+3"), "3+2i", 1.0),
    Case("binomial coefficient", box(r"\dbinom{5}{2}"), "10", 1.0),
    Case("factorial", box("5!"), "120", 1.0),
    Case("factorial near miss", box("5!"), "24", 0.0),
    Case("commuted sum", box("a+b"), "b+a", 1.0),
    Case("surd over two", box(r"\sqrt{2}/2"), r"\frac{1}{\sqrt{2}}", 1.0),
    Case("superscript braces", box("x^{2}"), "x^2", 1.0),
    Case("plain integer", box("17"), "17", 1.0),
    Case("integer near miss", box("71"), "17", 0.0),
    Case("logarithm value", box(r"\log_2 8"), "3", 1.0),
    Case("inequality strictness", box(r"x \geq 3"), "x > 3", 0.0),
    Case("display delimiters", r"\[\boxed{\displaystyle \frac{3}{5}}\]", "0.6", 1.0),
    # --- multiple-choice letters ----------------------------------------------------------------
    Case("boxed letter", r"Thus $\boxed{B}$.", "B", 1.0, "choice"),
    Case("boxed text letter", r"\boxed{\text{B}}", "B", 1.0, "choice"),
    Case("boxed parenthesised letter", r"\boxed{(B)}", "B", 1.0, "choice"),
    Case("boxed wrong letter", r"\boxed{B}", "C", 0.0, "choice"),
    Case("stated in parentheses", "Checking each option, the answer is (C).", "C", 1.0, "choice"),
    Case("answer colon", "Answer: D", "D", 1.0, "choice"),
    Case("answer colon wrong", "Answer: D", "A", 0.0, "choice"),
    Case(
        "revised statement",
        "The answer is (A). Wait, actually the answer is (C).",
        "C",
        1.0,
        "choice",
    ),
    Case(
        "revised statement, first letter",
        "The answer is (A). Wait, actually the answer is (C).",
        "A",
        0.0,
        "choice",
    ),
    Case("box then statement", r"\boxed{A} ... on reflection, Final answer: B", "B", 1.0, "choice"),
    Case("statement then box", r"The answer is B. Double-checking: \boxed{D}", "D", 1.0, "choice"),
    Case("article is not an option", "I think the answer is a prime number.", "A", 0.0, "choice"),
    Case("capital article is not an option", "The answer is A prime number.", "A", 0.0, "choice"),
    Case("no letter", "I don't know.", "A", 0.0, "choice"),
    Case("letter alone", "(B)", "B", 1.0, "choice"),
    Case("lower-case truth", r"\boxed{B}", "(b)", 1.0, "choice"),
    Case("boxed truth", "Answer: C", r"\boxed{C}", 1.0, "choice"),
    Case("bold boxed letter", r"\boxed{\textbf{E}}", "E", 1.0, "choice"),
    Case("tenth option", "The correct option is J.", "J", 1.0, "choice"),
    Case("out of range letter", r"\boxed{K}", "A", 0.0, "choice"),
    Case("markdown bold label", "**Answer:** C", "C", 1.0, "choice"),
    Case("markdown bold letter", "Answer: **B**", "B", 1.0, "choice"),
    Case("answer is option", "So the answer is option C", "C", 1.0, "choice"),
    Case(
        "option mentioned then answer",
        "Option A is tempting, but the answer is D.",
        "D",
        1.0,
        "choice",
    ),
    Case(
        "mentioned option is not the answer",
        "Option A is tempting, but the answer is D.",
        "A",
        0.0,
        "choice",
    ),
    Case("boxed letter with value", r"\boxed{B) 42}", "B", 1.0, "choice"),
    Case("long then stated", _LONG + " The answer is (B).", "B", 1.0, "choice"),
    Case("long then nothing", _LONG, "B", 0.0, "choice"),
]
