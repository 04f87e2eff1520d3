"""MATH ("flex"): MATH-500 reference solutions, a derangement of answers, hand-written (non-)equivalences."""

from __future__ import annotations

import json
import re
import threading

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tulu_jax.rl.verifiers import math as math_answers
from tulu_jax.rl.verifiers import score_batch


@pytest.fixture(scope="module")
def math500(oracles_dir):
    with open(oracles_dir / "math" / "test.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 500
    return rows


def test_every_reference_solution_matches_its_answer(math500):
    assert [r["unique_id"] for r in math500 if math_answers.score(r["solution"], r["answer"]) != 1.0] == []
    assert all(math_answers.extract_answer(r["solution"]) == r["answer"] for r in math500)


def test_another_problems_answer_is_judged_wrong(math500):
    """Derangement: solution i against the answer of problem i+7 (pairs whose answers are the same text skipped).

    Scored through ``score_batch`` (the RL path), in parallel worker processes.
    """
    pairs = [(r["solution"], math500[(i + 7) % 500]["answer"]) for i, r in enumerate(math500)]
    pairs = [(s, a) for s, a in pairs if math_answers.extract_answer(s) != a]
    rewards, num_timeouts = score_batch(["MATH"] * len(pairs), *zip(*pairs), num_workers=2)
    assert num_timeouts == 0
    assert len(pairs) >= 490 and (rewards == 0.0).mean() >= 0.99


EQUIVALENT = [
    ("\\frac{1}{2}", "0.5"),
    ("\\frac{3}{4}", "0.75"),
    ("\\dfrac{3}{4}", "\\frac34"),
    ("\\tfrac{1}{3}", "1/3"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
    ("5\\text{ cm}", "5"),
    ("12 \\text{ inches}", "12"),
    ("90^\\circ", "90"),
    ("90^{\\circ}", "90"),
    ("[1,2)", "[1, 2)"),
    ("(-\\infty, 3]", "(-\\infty,3]"),
    ("\\{1,2,3\\}", "\\{3,2,1\\}"),
    ("1, -2", "-2, 1"),
    ("x^2+2x+1", "(x+1)^2"),
    ("2\\sqrt{2}", "\\sqrt{8}"),
    ("\\sqrt2", "\\sqrt{2}"),
    ("x=5", "5"),
    ("10\\%", "10"),
    ("\\$18.00", "18"),
    ("1,000,000", "1000000"),
    ("\\text{(C)}", "(C)"),
    ("\\pi", "\\pi"),
    ("-\\frac{\\pi}{6}", "-\\pi/6"),
]

NOT_EQUIVALENT = [
    ("\\frac{1}{2}", "0.6"),
    ("3", "-3"),
    ("(1,2)", "(2,1)"),  # ordered pairs keep their order
    ("[1,2)", "[1,2]"),
    ("(1, 2)", "[1, 2]"),
    ("x^2+1", "(x+1)^2"),
    ("\\sqrt{2}", "2"),
    ("\\{1,2\\}", "\\{1,2,3\\}"),
    ("5\\text{ cm}", "6"),
    ("\\text{Evelyn}", "\\text{Bob}"),
    ("10^{10^{10}}", "5"),  # too big to evaluate, and not equal either way
]


@pytest.mark.parametrize(("candidate", "reference"), EQUIVALENT)
def test_equivalent_answers(candidate, reference):
    assert math_answers.score(f"So the answer is $\\boxed{{{candidate}}}$.", reference) == 1.0


@pytest.mark.parametrize(("candidate", "reference"), NOT_EQUIVALENT)
def test_non_equivalent_answers(candidate, reference):
    assert math_answers.score(f"So the answer is $\\boxed{{{candidate}}}$.", reference) == 0.0


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("so \\boxed{\\frac{a}{\\{b\\}}} and \\boxed{7}", "7"),  # the last box
        ("\\boxed{\\frac{1}{2}} \\fbox{3}", "\\frac{1}{2}"),  # \boxed wins over a later \fbox (the reference)
        ("\\fbox{3} or \\fbox{4}", "4"),  # \fbox only without any \boxed
        ("\\boxed{\\text{a {nested} b}}", "\\text{a {nested} b}"),
        ("we get $\\boxed 42$.", "42"),
        ("Final Answer: The final answer is $\\frac{2}{3}$. I hope it is correct.", "\\frac{2}{3}"),
        ("Final Answer: The final answer is 12 inches. I hope it is correct", "12"),  # Minerva normalization
        ("hence $x = 4$ and so $y=5$", "5"),  # the last $…$ pair, normalized
        # Nothing boxed, no Minerva answer, no $…$: the whole response, Minerva-normalized (the reference's fallback).
        ("\\boxed{unbalanced {", "\\boxed{unbalanced{"),
        ("no answer here", "noanswerhere"),
        ("so x = 12 inches", "12"),
        ("x" * (math_answers.MAX_ANSWER_CHARS + 1), None),  # too long to be an answer
        ("\\boxed{}", None),
    ],
)
def test_extract_answer(response, expected):
    assert math_answers.extract_answer(response) == expected


@pytest.mark.parametrize(
    ("response", "reference", "expected"),
    [
        ("x = 5", "5", 1.0),  # whole-response fallback
        ("3/4", "\\frac{3}{4}", 1.0),
        ("-2", "2", 0.0),  # sign kept
        ("\\boxed{2} but \\fbox{3}", "2", 1.0),
        ("\\boxed{2} but \\fbox{3}", "3", 0.0),
    ],
)
def test_flex_fallbacks(response, reference, expected):
    assert math_answers.score(response, reference) == expected


def test_boxed_answer_and_minerva_answer_are_both_tried():
    response = "\\boxed{7}\nFinal Answer: The final answer is 8. I hope it is correct."
    assert math_answers.candidates(response) == ["7", "8"]
    assert math_answers.score(response, "8") == 1.0


_MINERVA = re.compile(r"Final Answer: The final answer is(.*?). I hope it is correct.")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["Final Answer: The final answer is", " I hope it is correct", ".", "\n", " 5", "x"]),
                max_size=8).map("".join))
@example("Final Answer: The final answer is 5 I hope it is correct")
@example("Final Answer: The final answer is. I hope it is correct.")
def test_linear_minerva_extraction_equals_the_reference_regex(text):
    match = _MINERVA.search(text + math_answers._MINERVA_END)
    assert math_answers.minerva_answer(text) == (match.group(1).strip() if match else None)


def test_symbolic_check_works_off_the_main_thread():
    """math-verify's signal-based timeout would raise there; we disable it and rely on the worker's limit."""
    results = []
    thread = threading.Thread(target=lambda: results.append(math_answers.symbolic_equal("\\frac{3}{4}", "0.75")))
    thread.start()
    thread.join()
    assert results == [True]


def test_reference_must_be_a_plausible_answer():
    for bad in ["", "   ", "x" * (math_answers.MAX_ANSWER_CHARS + 1)]:
        with pytest.raises(ValueError, match="MATH ground truth"):
            math_answers.score("\\boxed{1}", bad)
