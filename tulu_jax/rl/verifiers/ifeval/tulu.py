"""Tülu 3 RLVR's JSON constraints: ``{"func_name": "validate_lowercase", "N": null, "quantifier": null, ...}``.

One constraint per row, scored 1.0 or 0.0 by open-instruct's ``if_functions.py`` (the 25 IFEval families written as
plain functions; their argument names are the ground truth's keys, and null keys are ignored). We follow the current
open-instruct semantics, which changed four functions of the December 2024 version used to train Tülu 3:
``validate_placeholders`` returned a tuple (always truthy), ``validate_choice`` tested ``text in option``,
``validate_sections`` counted splitter occurrences (exactly N) rather than numbered headers (at least N), and "around"
in ``validate_frequency_capital_words`` meant exactly N. Our own choices: text that langdetect cannot classify fails
the language check (open-instruct raised), and ``options`` given as one string is read as a Python/JSON list literal,
else as a comma-separated list (open-instruct iterated its characters).
"""

from __future__ import annotations

import ast
import inspect
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tulu_jax.rl.verifiers.ifeval import instructions, util

QUANTIFIERS = ("at least", "around", "at most")


def _quantity(count: int, n: int, quantifier: str, tolerance: int) -> bool:
    if quantifier == "at least":
        return count >= n
    if quantifier == "at most":
        return count <= n
    return abs(count - n) <= tolerance


def _tolerance(n: int) -> int:
    return max(round(n * 0.1), 1)  # "around": within 10% (at least 1)


def verify_keywords(text: str, keyword_list: list[str]) -> bool:
    """Every keyword occurs as a substring, ignoring case."""
    lower = text.lower()
    return all(k.lower() in lower for k in keyword_list)


def verify_keyword_frequency(text: str, word: str, N: int) -> bool:
    """The word occurs exactly N times as a whole ``\\w+`` word, ignoring case."""
    word = word.lower()
    return sum(1 for w in re.findall(r"\b\w+\b", text.lower()) if w == word) == N


def validate_forbidden_words(text: str, forbidden_words: list[str]) -> bool:
    """No forbidden word occurs, even as a substring, ignoring case."""
    lower = text.lower()
    return not any(w.lower() in lower for w in forbidden_words)


def verify_letter_frequency(text: str, letter: str, N: int) -> bool:
    """The letter occurs exactly N times (case-sensitive)."""
    return text.count(letter) == N


def validate_response_language(text: str, language: str) -> bool:
    """langdetect finds ``language`` (undetectable text fails)."""
    return util.detect_language(text) == language


def verify_paragraph_count(text: str, N: int) -> bool:
    """Exactly N non-empty paragraphs separated by ``* * *``."""
    text = "\n".join(line.strip() for line in text.splitlines()).strip()
    paragraphs = text.split("* * *")
    return all(p.strip() for p in paragraphs) and len(paragraphs) == N


def validate_word_constraint(text: str, N: int, quantifier: str) -> bool:
    """Whitespace-separated words number at least / at most / around (10%) N."""
    return _quantity(len(text.strip().split()), N, quantifier, _tolerance(N))


_SENTENCE_BREAK = re.compile(r"(?<!\w\.\w.)(?<![A-Z][a-z]\.)(?<=\.|\?|!)\s")


def verify_sentence_constraint(text: str, N: int, quantifier: str) -> bool:
    """Sentences (split after . ? ! before whitespace) number at least / at most / around (1) N."""
    return _quantity(len(_SENTENCE_BREAK.split(text)), N, quantifier, 1)


def validate_paragraphs(text: str, N: int, first_word: str, i: int) -> bool:
    """Exactly N blank-line-separated paragraphs, the i-th (1-based) starting with ``first_word``."""
    paragraphs = text.split("\n\n")
    return len(paragraphs) == N and paragraphs[i - 1].strip().startswith(first_word)


def verify_postscript(text: str, postscript_marker: str) -> bool:
    """The marker occurs, followed by some text."""
    index = text.find(postscript_marker)
    return index >= 0 and len(text[index:].strip()) > len(postscript_marker)


def validate_placeholders(text: str, N: int) -> bool:
    """At least N ``[placeholders]``."""
    return instructions.count_placeholders(text) >= N  # = len(re.findall(r"\[(.*?)\]", text)), linear time


def verify_bullet_points(text: str, N: int) -> bool:
    """Exactly N lines starting with ``*`` or ``-``."""
    return sum(1 for line in text.split("\n") if line.strip().startswith(("*", "-"))) == N


def validate_title(text: str) -> bool:
    """Some ``<<…>>`` on one line."""
    # re.search(r"<<(.*?)>>", text) in linear time: some line has ">>" at least two characters after its first "<<"
    for line in text.split("\n"):
        start = line.find("<<")
        if start >= 0 and line.rfind(">>") >= start + 2:
            return True
    return False


def validate_choice(text: str, options: list[str]) -> bool:
    """One of the options occurs."""
    return any(option in text for option in options)


def validate_highlighted_sections(text: str, N: int) -> bool:
    """At least N ``*…*`` spans."""
    return len(re.findall(r"\*(.*?)\*", text)) >= N


def validate_sections(text: str, N: int, section_splitter: str) -> bool:
    """At least N ``<splitter> <number>`` section headers, ignoring case."""
    pattern = r"\s?" + re.escape(section_splitter) + r"\s?\d+\s?"
    return len(re.split(pattern, text, flags=re.IGNORECASE)) - 1 >= N


def validate_json_format(text: str) -> bool:
    """The text parses as JSON."""
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return False
    return True


def validate_repeat_prompt(text: str, original_prompt: str) -> bool:
    """The text starts with the original prompt, exactly."""
    return text.startswith(original_prompt)


def validate_two_responses(text: str) -> bool:
    """Exactly one ``******`` between two different responses."""
    if text.count("******") != 1:
        return False
    first, second = text.split("******")
    return first.strip() != second.strip()


def validate_uppercase(text: str) -> bool:
    """No lower-case character."""
    return text == text.upper()


def validate_lowercase(text: str) -> bool:
    """No upper-case character."""
    return text == text.lower()


def validate_frequency_capital_words(text: str, N: int, quantifier: str) -> bool:
    """All-capital ``\\b[A-Z]+\\b`` words number at least / at most / around (10%) N."""
    return _quantity(len(re.findall(r"\b[A-Z]+\b", text)), N, quantifier, _tolerance(N))


def validate_end(text: str, end_phrase: str) -> bool:
    """The text ends with the phrase, exactly."""
    return text.endswith(end_phrase)


def validate_quotation(text: str) -> bool:
    """The text starts and ends with a double quote."""
    return text.startswith('"') and text.endswith('"')


def validate_no_commas(text: str) -> bool:
    """No comma."""
    return "," not in text


FUNCTIONS: dict[str, Callable[..., bool]] = {
    f.__name__: f
    for f in (
        verify_keywords, verify_keyword_frequency, validate_forbidden_words, verify_letter_frequency,
        validate_response_language, verify_paragraph_count, validate_word_constraint, verify_sentence_constraint,
        validate_paragraphs, verify_postscript, validate_placeholders, verify_bullet_points, validate_title,
        validate_choice, validate_highlighted_sections, validate_sections, validate_json_format,
        validate_repeat_prompt, validate_two_responses, validate_uppercase, validate_lowercase,
        validate_frequency_capital_words, validate_end, validate_quotation, validate_no_commas,
    )
}


# ----------------------------------------------------------------------------------------------- argument validation


def _options(value: Any) -> list[str]:
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            value = [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, tuple):
        value = list(value)
    return value


def _check_arg(func_name: str, name: str, value: Any) -> Any:
    if name == "options":
        value = _options(value)
    if name in ("N", "i"):
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    elif name == "quantifier":
        ok = value in QUANTIFIERS
    elif name == "letter":
        ok = isinstance(value, str) and len(value) == 1
    elif name in ("keyword_list", "forbidden_words", "options"):
        ok = isinstance(value, list) and bool(value) and all(isinstance(v, str) and v for v in value)
    else:
        ok = isinstance(value, str) and bool(value)
    if not ok:
        raise ValueError(f"{func_name}: bad value for {name!r}: {value!r}")
    return value


@dataclass(frozen=True)
class Constraint:
    """A validated Tülu constraint: the function and its (non-null) arguments."""

    func_name: str
    args: dict[str, Any] = field(default_factory=dict)

    def check(self, response: str) -> bool:
        """Whether ``response`` satisfies the constraint."""
        return bool(FUNCTIONS[self.func_name](response, **self.args))


def parse(ground_truth: dict[str, Any]) -> Constraint:
    """Validate a ``{"func_name": ..., ...}`` ground truth (ValueError naming the function and argument if bad)."""
    func_name = ground_truth.get("func_name")
    func = FUNCTIONS.get(func_name)  # type: ignore[arg-type]
    if func is None:
        raise ValueError(f"unknown Tülu IFEval func_name {func_name!r}; known: {sorted(FUNCTIONS)}")
    params = list(inspect.signature(func).parameters)[1:]
    given = {k: v for k, v in ground_truth.items() if k != "func_name" and v is not None}
    unknown = sorted(set(given) - set(params))
    missing = [p for p in params if p not in given]
    if unknown or missing:
        raise ValueError(f"{func_name}: arguments {params} expected; unknown {unknown}, missing {missing}")
    args = {name: _check_arg(func_name, name, given[name]) for name in params}
    if func_name == "validate_paragraphs" and not 1 <= args["i"] <= args["N"]:
        raise ValueError(f"validate_paragraphs: i must be in 1..N={args['N']}, got {args['i']}")
    return Constraint(func_name, args)
