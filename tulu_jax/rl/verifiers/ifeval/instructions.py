"""The 25 IFEval instructions (google-research ``instruction_following_eval``), re-implemented check for check.

``build(instruction_id, kwargs)`` validates the official kwargs and returns a ``Check``: a function of the response
that says whether the instruction is followed. Where the official ``build_description`` would pick a random value
for a missing or out-of-range argument, we refuse the ground truth instead (a reward must be deterministic).
Patterns that the official code builds from kwargs (keywords, postscript markers, section splitters) stay regular
expressions, as there.
"""

from __future__ import annotations

import collections
import json
import re
from collections.abc import Callable
from typing import Any

from tulu_jax.rl.verifiers.ifeval import util

Check = Callable[[str], bool]

RELATIONS = ("less than", "at least")
CONSTRAINED_RESPONSE_OPTIONS = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


# ------------------------------------------------------------------------------------- argument checks


def _int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return value


def _str(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    return value


def _words(value: Any, name: str) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{name} must be a non-empty list of non-empty strings, got {value!r}")
    return value


def _relation(value: Any, name: str) -> str:
    if value not in RELATIONS:
        raise ValueError(f"{name} must be one of {RELATIONS}, got {value!r}")
    return value


def _compare(count: int, relation: str, threshold: int) -> bool:
    return count < threshold if relation == "less than" else count >= threshold


def _pattern(text: str, flags: int = 0, *, before: str = "", after: str = "") -> re.Pattern[str]:
    """``before + text + after`` as a regex: the official code splices kwargs into patterns unescaped.

    A kwarg that is not a valid regular expression (the official code would crash) is matched literally.
    """
    try:
        return re.compile(before + text + after, flags)
    except re.error:
        return re.compile(before + re.escape(text) + after, flags)


# -------------------------------------------------------------------------------------------- keywords


def keywords_existence(*, keywords: Any) -> Check:
    """Every keyword (a case-insensitive regex) occurs."""
    patterns = [_pattern(k, re.IGNORECASE) for k in sorted(_words(keywords, "keywords"))]
    return lambda text: all(p.search(text) for p in patterns)


def keywords_frequency(*, keyword: Any, frequency: Any, relation: Any) -> Check:
    """The keyword (a case-insensitive regex, not a whole word) occurs ``relation`` ``frequency`` times."""
    pattern = _pattern(_str(keyword, "keyword").strip(), re.IGNORECASE)
    threshold, relation = _int(frequency, "frequency"), _relation(relation, "relation")
    return lambda text: _compare(len(pattern.findall(text)), relation, threshold)


def keywords_forbidden_words(*, forbidden_words: Any) -> Check:
    """No forbidden word occurs as a whole word (case-insensitive)."""
    words = sorted(set(_words(forbidden_words, "forbidden_words")))
    patterns = [_pattern(w, re.IGNORECASE, before=r"\b", after=r"\b") for w in words]
    return lambda text: not any(p.search(text) for p in patterns)


def keywords_letter_frequency(*, letter: Any, let_frequency: Any, let_relation: Any) -> Check:
    """The letter occurs ``let_relation`` ``let_frequency`` times, ignoring case."""
    if not isinstance(letter, str) or len(letter) != 1 or not letter.strip():
        raise ValueError(f"letter must be a single character, got {letter!r}")
    letter = letter.lower()
    threshold, relation = _int(let_frequency, "let_frequency"), _relation(let_relation, "let_relation")
    return lambda text: _compare(collections.Counter(text.lower())[letter], relation, threshold)


# ----------------------------------------------------------------------------------- language and case


def language_response_language(*, language: Any) -> Check:
    """langdetect finds ``language``; text it cannot classify counts as followed (official)."""
    if language not in util.LANGUAGE_CODES:
        raise ValueError(f"language must be one of {sorted(util.LANGUAGE_CODES)}, got {language!r}")

    def check(text: str) -> bool:
        detected = util.detect_language(text)
        return detected is None or detected == language  # undetectable counts as followed (official)

    return check


def change_case_english_capital() -> Check:
    """All cased characters are upper case and the text is English (or undetectable)."""
    def check(text: str) -> bool:
        if not text.isupper():
            return False
        detected = util.detect_language(text)
        return detected is None or detected == "en"

    return check


def change_case_english_lowercase() -> Check:
    """All cased characters are lower case and the text is English (or undetectable)."""
    def check(text: str) -> bool:
        if not text.islower():
            return False
        detected = util.detect_language(text)
        return detected is None or detected == "en"

    return check


def change_case_capital_word_frequency(*, capital_frequency: Any, capital_relation: Any) -> Check:
    """Tokens (``nltk.word_tokenize``) in all capitals number ``capital_relation`` N."""
    threshold = _int(capital_frequency, "capital_frequency")
    relation = _relation(capital_relation, "capital_relation")
    return lambda text: _compare(sum(w.isupper() for w in util.word_tokenize(text)), relation, threshold)


# ---------------------------------------------------------------------------------------------- length


def length_number_sentences(*, num_sentences: Any, relation: Any) -> Check:
    """Punkt sentences number ``relation`` ``num_sentences``."""
    threshold, relation = _int(num_sentences, "num_sentences"), _relation(relation, "relation")
    return lambda text: _compare(util.count_sentences(text), relation, threshold)


def length_number_words(*, num_words: Any, relation: Any) -> Check:
    """``\\w+`` words number ``relation`` ``num_words``."""
    threshold, relation = _int(num_words, "num_words"), _relation(relation, "relation")
    return lambda text: _compare(util.count_words(text), relation, threshold)


def length_number_paragraphs(*, num_paragraphs: Any) -> Check:
    """Exactly N paragraphs separated by ``***`` (an empty one inside fails)."""
    expected = _int(num_paragraphs, "num_paragraphs")

    def check(text: str) -> bool:
        paragraphs = re.split(r"\s?\*\*\*\s?", text)
        count = len(paragraphs)
        for index, paragraph in enumerate(paragraphs):
            if not paragraph.strip():
                if index in (0, len(paragraphs) - 1):
                    count -= 1  # a divider at either end does not open an empty paragraph
                else:
                    return False
        return count == expected

    return check


def length_nth_paragraph_first_word(*, num_paragraphs: Any, nth_paragraph: Any, first_word: Any) -> Check:
    """N paragraphs split by blank lines; paragraph ``nth`` starts with ``first_word``."""
    expected = _int(num_paragraphs, "num_paragraphs")
    nth = _int(nth_paragraph, "nth_paragraph")
    if not 1 <= nth <= expected:
        raise ValueError(f"nth_paragraph must be in 1..num_paragraphs={expected}, got {nth}")
    word = _str(first_word, "first_word").lower()

    def check(text: str) -> bool:
        paragraphs = text.split("\n\n")
        count = sum(1 for p in paragraphs if p.strip())
        if nth > count:
            return False
        paragraph = paragraphs[nth - 1].strip()
        if not paragraph:
            return False
        first = paragraph.split()[0].strip().lstrip("'").lstrip('"')
        found = ""
        for letter in first:
            if letter in {".", ",", "?", "!", "'", '"'}:
                break
            found += letter.lower()
        return count == expected and found == word

    return check


# --------------------------------------------------------------------------------------------- content


def count_placeholders(text: str) -> int:
    """``len(re.findall(r"\\[.*?\\]", text))`` in linear time (the regex is quadratic on a line of ``[``)."""
    count = 0
    for line in text.split("\n"):  # "." does not cross newlines
        start = line.find("[")
        while start >= 0:
            end = line.find("]", start + 1)
            if end < 0:
                break  # no "]" left on this line for any later "[" either
            count += 1
            start = line.find("[", end + 1)
    return count


def content_number_placeholders(*, num_placeholders: Any) -> Check:
    """At least N ``[placeholders]``."""
    threshold = _int(num_placeholders, "num_placeholders")
    return lambda text: count_placeholders(text) >= threshold


def content_postscript(*, postscript_marker: Any) -> Check:
    """A line (lower-cased) starts with the postscript marker (``P.S.``/``P.P.S`` spelled loosely)."""
    marker = _str(postscript_marker, "postscript_marker").strip()
    if marker == "P.P.S":
        pattern = re.compile(r"\s*p\.\s?p\.\s?s.*$", re.MULTILINE)
    elif marker == "P.S.":
        pattern = re.compile(r"\s*p\.\s?s\..*$", re.MULTILINE)
    else:
        pattern = _pattern(marker.lower(), re.MULTILINE, before=r"\s*", after=r".*$")
    return lambda text: bool(pattern.findall(text.lower()))


# ---------------------------------------------------------------------------------------------- format


def format_number_bullet_lists(*, num_bullets: Any) -> Check:
    """Exactly N lines that start with ``*`` (not ``**``) or ``-`` after blanks."""
    expected = _int(num_bullets, "num_bullets")

    def check(text: str) -> bool:
        stars = re.findall(r"^\s*\*[^\*].*$", text, flags=re.MULTILINE)
        dashes = re.findall(r"^\s*-.*$", text, flags=re.MULTILINE)
        return len(stars) + len(dashes) == expected

    return check


def format_constrained_response() -> Check:
    """One of the three "My answer is yes/no/maybe." options occurs."""
    return lambda text: any(option in text.strip() for option in CONSTRAINED_RESPONSE_OPTIONS)


def format_number_highlighted_sections(*, num_highlights: Any) -> Check:
    """At least N non-empty ``*highlights*`` (``**bold**`` counts too)."""
    threshold = _int(num_highlights, "num_highlights")

    def check(text: str) -> bool:
        single = sum(1 for h in re.findall(r"\*[^\n\*]*\*", text) if h.strip("*").strip())
        double = sum(
            1 for h in re.findall(r"\*\*[^\n\*]*\*\*", text) if h.removeprefix("**").removesuffix("**").strip()
        )
        return single + double >= threshold

    return check


def format_multiple_sections(*, section_spliter: Any, num_sections: Any) -> Check:
    """At least N sections opened by ``<splitter> <number>``."""
    splitter = _pattern(_str(section_spliter, "section_spliter").strip(), before=r"\s?", after=r"\s?\d+\s?")
    threshold = _int(num_sections, "num_sections")
    return lambda text: len(splitter.split(text)) - 1 >= threshold


def format_json_format() -> Check:
    """The whole text (a ```json fence allowed) parses as JSON."""
    def check(text: str) -> bool:
        text = text.strip()
        for fence in ("```json", "```Json", "```JSON", "```"):
            text = text.removeprefix(fence)
        text = text.removesuffix("```").strip()
        try:
            json.loads(text)
        except (ValueError, RecursionError):  # deep nesting is not valid JSON for us either
            return False
        return True

    return check


def titles(text: str) -> list[str]:
    """``re.findall(r"<<[^\\n]+>>", text)`` in linear time (the regex is quadratic on a line of ``<<``).

    On a line, the regex starts at the first ``<<`` and extends greedily to the line's last ``>>`` (at least one
    character between them); that match leaves no ``>>`` for a second one on the same line.
    """
    found = []
    for line in text.split("\n"):
        start = line.find("<<")
        end = line.rfind(">>")
        if start >= 0 and end >= start + 3:
            found.append(line[start : end + 2])
    return found


def format_title() -> Check:
    """A non-empty ``<<title>>`` on some line."""
    return lambda text: any(t.lstrip("<").rstrip(">").strip() for t in titles(text))


# ----------------------------------------------------------------- combination, start/end, punctuation


def combination_two_responses() -> Check:
    """Exactly two different non-empty responses separated by ``******``."""
    def check(text: str) -> bool:
        responses = text.split("******")
        valid = []
        for index, response in enumerate(responses):
            if response.strip():
                valid.append(response)
            elif index not in (0, len(responses) - 1):
                return False
        return len(valid) == 2 and valid[0].strip() != valid[1].strip()

    return check


def combination_repeat_prompt(*, prompt_to_repeat: Any) -> Check:
    """The text starts with the prompt (case-insensitive, stripped)."""
    prompt = _str(prompt_to_repeat, "prompt_to_repeat").strip().lower()
    return lambda text: text.strip().lower().startswith(prompt)


def startend_end_checker(*, end_phrase: Any) -> Check:
    """The text ends with the phrase (case-insensitive, stripped, outer quotes ignored)."""
    phrase = _str(end_phrase, "end_phrase").strip().lower()
    return lambda text: text.strip().strip('"').lower().endswith(phrase)


def startend_quotation() -> Check:
    """The stripped text is wrapped in double quotes."""
    def check(text: str) -> bool:
        text = text.strip()
        return len(text) > 1 and text[0] == '"' and text[-1] == '"'

    return check


def punctuation_no_comma() -> Check:
    """No comma at all."""
    return lambda text: "," not in text


INSTRUCTIONS: dict[str, Callable[..., Check]] = {
    "keywords:existence": keywords_existence,
    "keywords:frequency": keywords_frequency,
    "keywords:forbidden_words": keywords_forbidden_words,
    "keywords:letter_frequency": keywords_letter_frequency,
    "language:response_language": language_response_language,
    "length_constraints:number_sentences": length_number_sentences,
    "length_constraints:number_paragraphs": length_number_paragraphs,
    "length_constraints:number_words": length_number_words,
    "length_constraints:nth_paragraph_first_word": length_nth_paragraph_first_word,
    "detectable_content:number_placeholders": content_number_placeholders,
    "detectable_content:postscript": content_postscript,
    "detectable_format:number_bullet_lists": format_number_bullet_lists,
    "detectable_format:constrained_response": format_constrained_response,
    "detectable_format:number_highlighted_sections": format_number_highlighted_sections,
    "detectable_format:multiple_sections": format_multiple_sections,
    "detectable_format:json_format": format_json_format,
    "detectable_format:title": format_title,
    "combination:two_responses": combination_two_responses,
    "combination:repeat_prompt": combination_repeat_prompt,
    "startend:end_checker": startend_end_checker,
    "change_case:capital_word_frequency": change_case_capital_word_frequency,
    "change_case:english_capital": change_case_english_capital,
    "change_case:english_lowercase": change_case_english_lowercase,
    "punctuation:no_comma": punctuation_no_comma,
    "startend:quotation": startend_quotation,
}


def build(instruction_id: str, kwargs: dict[str, Any] | None) -> Check:
    """The check for one instruction with its official kwargs (None values are dropped, as open-instruct does).

    Raises ValueError naming the instruction for an unknown id, an unknown or missing argument, or a bad value.
    """
    factory = INSTRUCTIONS.get(instruction_id)
    if factory is None:
        raise ValueError(f"unknown IFEval instruction {instruction_id!r}; known: {sorted(INSTRUCTIONS)}")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise ValueError(f"{instruction_id}: kwargs must be an object, got {kwargs!r}")
    args = {k: v for k, v in (kwargs or {}).items() if v is not None}
    try:
        return factory(**args)
    except TypeError as e:  # unexpected or missing keyword
        raise ValueError(f"{instruction_id}: bad arguments {sorted(args)}: {e}") from None
    except ValueError as e:
        raise ValueError(f"{instruction_id}: {e}") from None
