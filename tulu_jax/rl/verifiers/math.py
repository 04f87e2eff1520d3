"""MATH ("flex"): extract the final answer, then compare it to the reference by normalized string or symbolically.

Candidates, in order: the content of the last ``\\boxed{…}`` (the last ``\\fbox{…}`` only if there is no
``\\boxed``), and the Minerva answer ("Final Answer: The final answer is X. I hope it is correct."); only if neither
exists, the text between the last two ``$``; only if that is missing too, the whole (Minerva-normalized) response.
A candidate is correct if, against the reference, its Hendrycks-normalized string matches, its Minerva-normalized
string matches, or ``math-verify`` finds the two mathematically equivalent. Model output is parsed, never evaluated.

Time: extraction is linear in the response; candidates longer than ``MAX_ANSWER_CHARS`` are judged wrong, and the
symbolic check only looks at answers up to ``MAX_SYMBOLIC_CHARS`` under math-verify's own (signal based) limit when it
runs on a main thread. The hard limit for any input is the killable worker process of ``registry.verify``.

Deliberate differences from the reference implementation (open-instruct ``verify_math_sample``, Dec 2024):

- the symbolic check is ``math-verify`` (sets, intervals, bounded time) instead of the lm-eval Minerva ``is_equiv``
  (sympy ``parse_latex`` of both sides, ``simplify`` of their difference); signs are kept either way (``-3`` != ``3``);
- the Minerva-normalized string comparison is tried as well as the Hendrycks one, so a candidate is never judged
  wrong where only the reference's weaker normalization would have accepted it;
- ``\\boxed X`` (a space, no braces) ends at ``$`` or the end of its line and is taken only if it is the last box;
  the reference takes the text after the last ``\\boxed `` up to ``$`` whenever there is one, even when a
  ``\\boxed{}`` follows it;
- the Minerva answer is searched in linear time (same result as the reference regex);
- candidates (and the whole-response fallback) longer than ``MAX_ANSWER_CHARS`` are judged wrong and empty ones are
  dropped, instead of being compared;
- the ground truth must be a non-empty answer of at most ``MAX_ANSWER_CHARS`` (a ValueError otherwise).
"""

from __future__ import annotations

import functools
import re
import threading
from typing import Any

MAX_ANSWER_CHARS = 1000
MAX_SYMBOLIC_CHARS = 300
SYMBOLIC_TIMEOUT_S = 2  # math-verify takes whole seconds (signal.alarm)

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_MINERVA_PREFIX = "Final Answer: The final answer is"
_MINERVA_SUFFIX = " I hope it is correct"
_MINERVA_END = "I hope it is correct."


# ------------------------------------------------------------------------------------------ extraction


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{…}`` (else ``\\fbox{…}``, balanced braces), or ``\\boxed X`` to ``$``/EOL."""
    # As in the reference, \fbox is looked at only when there is no \boxed at all.
    for command in _BOX_COMMANDS:
        start = text.rfind(command)
        if start >= 0:
            break
    else:
        return None
    i = start + len(command)
    if text.startswith(" ", i):
        rest = text[i:]
        end = min((p for p in (rest.find("$"), rest.find("\n")) if p >= 0), default=len(rest))
        return rest[:end].strip() or None
    if not text.startswith("{", i):
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None  # unbalanced: no closing brace


def minerva_answer(text: str) -> str | None:
    """The X of "Final Answer: The final answer is X. I hope it is correct." (lm-eval's regex, in linear time).

    Same result as ``re.search(r"Final Answer: The final answer is(.*?). I hope it is correct.", text + END)``:
    the first line whose first prefix is followed, later on that line, by the suffix with one character each side.
    """
    text += _MINERVA_END
    start = 0
    while True:
        p = text.find(_MINERVA_PREFIX, start)
        if p < 0:
            return None
        line_end = text.find("\n", p)
        line_end = len(text) if line_end < 0 else line_end
        body = p + len(_MINERVA_PREFIX)
        q = text.find(_MINERVA_SUFFIX, body + 1, line_end)
        if q >= 0 and q + len(_MINERVA_SUFFIX) < line_end:
            return text[body : q - 1].strip()
        start = line_end + 1  # a later prefix on the same line can only see fewer suffixes


def dollar_answer(text: str) -> str | None:
    """The text between the last two ``$`` signs, or None if there are fewer than two."""
    last = text.rfind("$")
    before = text.rfind("$", 0, last) if last > 0 else -1
    return text[before + 1 : last] if before >= 0 else None


def candidates(response: str) -> list[str]:
    """Candidate final answers of ``response`` in priority order.

    Boxed and Minerva answers; else the last ``$…$``; else the whole response ("probably won't work", as the
    reference says, but a bare "5" is an answer).
    """
    boxed = last_boxed(response)
    minerva = minerva_answer(response)
    unboxed = [minerva]
    if boxed is None and minerva is None:
        dollars = dollar_answer(response)
        unboxed = [response if dollars is None else dollars]
    # The box content is compared as written, the rest Minerva-normalized (as in the reference); text too long to
    # be an answer is never normalized (regex time).
    found = [] if boxed is None else [boxed]
    found += [normalize_final_answer(c) for c in unboxed if c is not None and len(c) <= MAX_ANSWER_CHARS]
    return [c for c in found if c.strip() and len(c) <= MAX_ANSWER_CHARS]


def extract_answer(response: str) -> str | None:
    """The first candidate final answer of ``response`` (what the grader compares first), or None."""
    found = candidates(response)
    return found[0] if found else None


# ------------------------------------------------------------------------------- Minerva normalization

# Lewkowycz et al. (2022), appendix D, as used by lm-eval's minerva_math and open-instruct.
_SUBSTITUTIONS = (
    ("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), ("\\ ", ""), (" ", ""), ("mbox", "text"),
    (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}"),
)
_REMOVED_EXPRESSIONS = (
    "square", "ways", "integers", "dollars", "mph", "inches", "ft", "hours", "km", "units", "\\ldots", "sue",
    "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters", "meals", "edges",
    "students", "childrentickets", "multiples", "\\text{s}", "\\text{.}", "\\text{\ns}", "\\text{}^2",
    "\\text{}^3", "\\text{\n}", "\\text{}", "\\mathrm{th}", "^\\circ", "^{\\circ}", "\\;", ",\\!", "{,}", '"',
    "\\dots",
)


def normalize_final_answer(answer: str) -> str:
    """Minerva normalization of a final answer: drop units words and TeX decoration, keep the value."""
    answer = answer.split("=")[-1]
    for before, after in _SUBSTITUTIONS:
        answer = answer.replace(before, after)
    for expr in _REMOVED_EXPRESSIONS:
        answer = answer.replace(expr, "")
    answer = re.sub(r"(.*?)(\$)(.*?)(\$)(.*)", "$\\3$", answer)
    answer = re.sub(r"(\\text\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\textbf\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\overline\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\boxed\{)(.*)(\})", "\\2", answer)
    # Shorthand TeX: \fracab -> \frac{a}{b}, \sqrta -> \sqrt{a}
    answer = re.sub(r"(frac)([^{])(.)", "frac{\\2}{\\3}", answer)
    answer = re.sub(r"(sqrt)([^{])", "sqrt{\\2}", answer)
    answer = answer.replace("$", "")
    if answer.replace(",", "").isdigit():
        answer = answer.replace(",", "")
    return answer


# ----------------------------------------------------------------------------- Hendrycks normalization


class _Unnormalizable(Exception):
    """The Hendrycks normalizer gives up; the reference implementation then compares raw strings."""


def _fix_fracs(string: str) -> str:
    parts = string.split("\\frac")
    out = parts[0]
    for part in parts[1:]:
        out += "\\frac"
        if part[:1] == "{":
            out += part
            continue
        if len(part) < 2:
            raise _Unnormalizable
        a, b, rest = part[0], part[1], part[2:]
        out += "{" + a + "}{" + b + "}" + rest if b != "{" else "{" + a + "}" + b + rest
    return out


def _fix_a_slash_b(string: str) -> str:
    parts = string.split("/")
    if len(parts) != 2 or not all(re.fullmatch(r"-?\d+", p) for p in parts):
        return string
    a, b = int(parts[0]), int(parts[1])
    return "\\frac{" + str(a) + "}{" + str(b) + "}" if string == f"{a}/{b}" else string


def _remove_right_units(string: str) -> str:
    # "\text{ " only ever introduces units on the right in MATH.
    if "\\text{ " not in string:
        return string
    parts = string.split("\\text{ ")
    if len(parts) != 2:
        raise _Unnormalizable
    return parts[0]


def _fix_sqrt(string: str) -> str:
    parts = string.split("\\sqrt")
    out = parts[0]
    for part in parts[1:]:
        if not part:
            raise _Unnormalizable
        out += "\\sqrt" + part if part[0] == "{" else "\\sqrt{" + part[0] + "}" + part[1:]
    return out


def strip_string(string: str) -> str:
    """Hendrycks et al.'s MATH answer normalization (``\\left``/``\\right``, ``\\dfrac``, degrees, units, spaces …).

    Raises ``_Unnormalizable`` where the reference implementation fails (it then compares the raw strings).
    """
    string = string.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    string = string.replace("tfrac", "frac").replace("dfrac", "frac")
    string = string.replace("\\left", "").replace("\\right", "")
    string = string.replace("^{\\circ}", "").replace("^\\circ", "")
    string = string.replace("\\$", "")
    string = _remove_right_units(string)
    string = string.replace("\\%", "")
    string = string.replace(" .", " 0.").replace("{.", "{0.")
    if not string:
        return string
    if string[0] == ".":
        string = "0" + string
    # "k = 5" -> "5" when the left side is a short name
    sides = string.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:
        string = sides[1]
    string = _fix_sqrt(string)
    string = string.replace(" ", "")
    string = _fix_fracs(string)
    if string == "0.5":
        string = "\\frac{1}{2}"
    return _fix_a_slash_b(string)


def hendrycks_equal(a: str, b: str) -> bool:
    """Equality after ``strip_string``; raw equality where normalization fails (as in the reference code)."""
    try:
        return strip_string(a) == strip_string(b)
    except _Unnormalizable:
        return a == b


# -------------------------------------------------------------------------------------- symbolic check


@functools.cache
def _math_verify() -> Any:
    import logging

    import math_verify

    # Its timeouts are reported at WARNING level for every slow item; we count timeouts ourselves.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    return math_verify


def symbolic_equal(a: str, b: str) -> bool:
    """Whether math-verify parses both LaTeX answers and finds them equivalent; False on any failure.

    On the main thread math-verify's own signal-based limit bounds each step; elsewhere signals are unavailable
    and the caller's process-level limit (``registry.verify``) applies.
    """
    if len(a) > MAX_SYMBOLIC_CHARS or len(b) > MAX_SYMBOLIC_CHARS:
        return False
    mv = _math_verify()
    limit = SYMBOLIC_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    gold = mv.parse(f"${b}$", parsing_timeout=limit)
    pred = mv.parse(f"${a}$", parsing_timeout=limit)
    if not gold or not pred:
        return False
    return bool(mv.verify(gold, pred, timeout_seconds=limit))


def answers_equal(candidate: str, reference: str, *, symbolic: bool = True) -> bool:
    """Whether a candidate answer matches the reference (normalized strings, else symbolically)."""
    if len(candidate) > MAX_ANSWER_CHARS:
        return False
    if hendrycks_equal(candidate, reference):
        return True
    if normalize_final_answer(candidate) == normalize_final_answer(reference):
        return True
    return symbolic and symbolic_equal(candidate, reference)


def check_reference(ground_truth: str) -> str:
    """The reference answer, stripped; ValueError if it is empty or implausibly long."""
    reference = ground_truth.strip()
    if not reference or len(reference) > MAX_ANSWER_CHARS:
        raise ValueError(f"MATH ground truth must be a non-empty answer of at most {MAX_ANSWER_CHARS} characters")
    return reference


def score(response: str, ground_truth: str) -> float:
    """1.0 if any candidate final answer of ``response`` matches ``ground_truth``, else 0.0."""
    reference = check_reference(ground_truth)
    found = candidates(response)
    if any(answers_equal(c, reference, symbolic=False) for c in found):
        return 1.0
    return float(any(symbolic_equal(c, reference) for c in found))
