"""Tülu 3 RLVR JSON constraints (``{"func_name": ...}``): hand-made cases for every function, and validation."""

from __future__ import annotations

import json

import pytest

from tulu_jax.rl.verifiers import verify
from tulu_jax.rl.verifiers.ifeval import tulu

# Every key that Tülu 3's IFEval rows carry; unused ones are null.
ALL_KEYS = ("N", "quantifier", "end_phrase", "keyword_list", "word", "forbidden_words", "letter", "i", "first_word",
            "postscript_marker", "options", "section_splitter", "original_prompt", "language")


def tulu_row(func_name: str, **args) -> str:
    """A ground truth as stored in the RLVR data: JSON with every key, null where unused."""
    return json.dumps({"func_name": func_name, **{k: None for k in ALL_KEYS}, **args})


CASES = [
    # (func_name, args, response, expected)
    ("verify_keywords", {"keyword_list": ["Ocean", "blue"]}, "The ocean is BLUE.", True),
    ("verify_keywords", {"keyword_list": ["ocean", "green"]}, "The ocean is blue.", False),
    ("verify_keyword_frequency", {"word": "cat", "N": 2}, "Cat! A cat, not a category.", True),
    ("verify_keyword_frequency", {"word": "cat", "N": 2}, "cat cat cat", False),
    ("validate_forbidden_words", {"forbidden_words": ["bad", "evil"]}, "all good here", True),
    ("validate_forbidden_words", {"forbidden_words": ["bad"]}, "a BADGE", False),  # substring, any case
    ("verify_letter_frequency", {"letter": "a", "N": 3}, "banana", True),
    ("verify_letter_frequency", {"letter": "a", "N": 3}, "bAnana", False),  # case-sensitive
    ("validate_response_language", {"language": "fr"}, "Bonjour, je suis très content de vous voir.", True),
    ("validate_response_language", {"language": "fr"}, "Hello, I am very happy to see you today, my friend.", False),
    ("validate_response_language", {"language": "en"}, "12345", False),  # undetectable fails
    ("verify_paragraph_count", {"N": 2}, "First.\n  * * *  \nSecond.", True),
    ("verify_paragraph_count", {"N": 3}, "First.\n* * *\n* * *\nThird.", False),  # empty paragraph
    ("validate_word_constraint", {"N": 10, "quantifier": "around"}, " ".join(["w"] * 11), True),
    ("validate_word_constraint", {"N": 10, "quantifier": "around"}, " ".join(["w"] * 12), False),
    ("validate_word_constraint", {"N": 3, "quantifier": "at most"}, "one two three", True),
    ("validate_word_constraint", {"N": 4, "quantifier": "at least"}, "one two three", False),
    ("verify_sentence_constraint", {"N": 3, "quantifier": "at least"}, "One. Two! Three? Four.", True),
    ("verify_sentence_constraint", {"N": 1, "quantifier": "at most"}, "Mr. Smith came. He left.", False),
    ("verify_sentence_constraint", {"N": 2, "quantifier": "around"}, "Only one sentence here.", True),
    ("validate_paragraphs", {"N": 2, "first_word": "Second", "i": 2}, "First para.\n\nSecond para.", True),
    ("validate_paragraphs", {"N": 2, "first_word": "Second", "i": 2}, "First.\n\nThird.", False),
    ("verify_postscript", {"postscript_marker": "P.S."}, "Body.\nP.S. see you", True),
    ("verify_postscript", {"postscript_marker": "P.S."}, "Body.\nP.S.", False),  # marker alone
    ("validate_placeholders", {"N": 2}, "Dear [name], at [address].", True),
    ("validate_placeholders", {"N": 3}, "Dear [name], at [address].", False),  # fixed: upstream's tuple bug
    ("verify_bullet_points", {"N": 2}, "* one\n- two\nthree", True),
    ("verify_bullet_points", {"N": 2}, "* one\n* two\n* three", False),
    ("validate_title", {}, "<<My Title>>\nText", True),
    ("validate_title", {}, "<My Title>\nText", False),
    ("validate_choice", {"options": ["My answer is yes.", "My answer is no."]}, "Well. My answer is no.", True),
    ("validate_choice", {"options": "('My answer is yes.', 'My answer is no.')"}, "My answer is maybe.", False),
    ("validate_choice", {"options": "yes, no"}, "I say no", True),
    ("validate_highlighted_sections", {"N": 2}, "*one* and *two*", True),
    ("validate_highlighted_sections", {"N": 2}, "*one* only", False),
    ("validate_sections", {"N": 2, "section_splitter": "Section"}, "SECTION 1\na\nSection 2\nb", True),
    ("validate_sections", {"N": 3, "section_splitter": "Section"}, "Section 1\na\nSection 2\nb", False),
    ("validate_json_format", {}, '{"a": [1, 2]}', True),
    ("validate_json_format", {}, '```json\n{"a": 1}\n```', False),  # no fence stripping in Tülu's version
    ("validate_repeat_prompt", {"original_prompt": "Say hi."}, "Say hi. Hi!", True),
    ("validate_repeat_prompt", {"original_prompt": "Say hi."}, " Say hi. Hi!", False),
    ("validate_two_responses", {}, "Answer A\n******\nAnswer B", True),
    ("validate_two_responses", {}, "Same\n******\nSame", False),
    ("validate_uppercase", {}, "ALL CAPS 123!", True),
    ("validate_uppercase", {}, "ALL CAPs", False),
    ("validate_lowercase", {}, "all lower 123!", True),
    ("validate_lowercase", {}, "not All lower", False),
    ("validate_frequency_capital_words", {"N": 2, "quantifier": "at least"}, "NASA and ESA and the UN", True),
    ("validate_frequency_capital_words", {"N": 1, "quantifier": "at most"}, "NASA and ESA", False),
    ("validate_frequency_capital_words", {"N": 10, "quantifier": "around"}, " ".join(["UP"] * 9), True),
    ("validate_end", {"end_phrase": "Is there anything else?"}, "Done. Is there anything else?", True),
    ("validate_end", {"end_phrase": "Is there anything else?"}, "Is there anything else? Bye", False),
    ("validate_quotation", {}, '"quoted"', True),
    ("validate_quotation", {}, '"quoted" ', False),
    ("validate_no_commas", {}, "no commas here", True),
    ("validate_no_commas", {}, "one, two", False),
]


def test_every_function_has_a_passing_and_a_failing_case():
    assert {c[0] for c in CASES if c[3]} == set(tulu.FUNCTIONS) == {c[0] for c in CASES if not c[3]}
    assert len(tulu.FUNCTIONS) == 25


@pytest.mark.parametrize(("func_name", "args", "response", "expected"), CASES)
def test_constraint(func_name, args, response, expected):
    assert tulu.parse(json.loads(tulu_row(func_name, **args))).check(response) is expected
    assert verify("ifeval", response, tulu_row(func_name, **args), timeout_s=None) == float(expected)


@pytest.mark.parametrize(
    ("ground_truth", "message"),
    [
        ({"func_name": "validate_nothing"}, "unknown Tülu IFEval func_name"),
        ({"func_name": "validate_word_constraint", "N": 5}, "missing"),
        ({"func_name": "validate_lowercase", "N": 5}, "unknown"),
        ({"func_name": "validate_word_constraint", "N": 5, "quantifier": "exactly"}, "quantifier"),
        ({"func_name": "verify_letter_frequency", "letter": "ab", "N": 1}, "letter"),
        ({"func_name": "validate_paragraphs", "N": 2, "first_word": "x", "i": 3}, "i must be in"),
        ({"func_name": "verify_keywords", "keyword_list": []}, "keyword_list"),
    ],
)
def test_bad_constraints_are_refused(ground_truth, message):
    with pytest.raises(ValueError, match=message):
        verify("ifeval", "response", json.dumps(ground_truth), timeout_s=None)
