"""The ``verify`` / ``extract_answer`` entry points: dispatch, errors, time limits, robustness to any string."""

from __future__ import annotations

import concurrent.futures
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tulu_jax.rl.verifiers import check_ground_truth, extract_answer, known_datasets, verify
from tulu_jax.rl.verifiers.ifeval import instructions

LIMIT_S = 3.0

# One ground truth per family; the IFEval one asks for every instruction at once.
_KWARGS = {
    "keywords:existence": {"keywords": ["answer"]},
    "keywords:frequency": {"keyword": "the", "frequency": 2, "relation": "at least"},
    "keywords:forbidden_words": {"forbidden_words": ["never"]},
    "keywords:letter_frequency": {"letter": "a", "let_frequency": 3, "let_relation": "at least"},
    "language:response_language": {"language": "en"},
    "length_constraints:number_sentences": {"num_sentences": 3, "relation": "less than"},
    "length_constraints:number_paragraphs": {"num_paragraphs": 2},
    "length_constraints:number_words": {"num_words": 5, "relation": "at least"},
    "length_constraints:nth_paragraph_first_word": {"num_paragraphs": 2, "nth_paragraph": 1, "first_word": "so"},
    "detectable_content:number_placeholders": {"num_placeholders": 1},
    "detectable_content:postscript": {"postscript_marker": "P.S."},
    "detectable_format:number_bullet_lists": {"num_bullets": 2},
    "detectable_format:number_highlighted_sections": {"num_highlights": 1},
    "detectable_format:multiple_sections": {"section_spliter": "Section", "num_sections": 2},
    "combination:repeat_prompt": {"prompt_to_repeat": "Repeat me."},
    "startend:end_checker": {"end_phrase": "Bye."},
    "change_case:capital_word_frequency": {"capital_frequency": 2, "capital_relation": "at least"},
}


def _instructions_ground_truth(ids: list[str]) -> str:
    return json.dumps({"instruction_id": ids, "kwargs": [_KWARGS.get(i) for i in ids]})


ALL_INSTRUCTIONS = _instructions_ground_truth(sorted(instructions.INSTRUCTIONS))
# Without the NLTK tokenizers, whose speed (not correctness) puts megabyte inputs past the limit.
_NLTK_BOUND = ("change_case:capital_word_frequency", "length_constraints:number_sentences")
FAST_INSTRUCTIONS = _instructions_ground_truth([i for i in sorted(instructions.INSTRUCTIONS) if i not in _NLTK_BOUND])
GROUND_TRUTHS = {"gsm8k": "#### 5", "math": "5", "ifeval": ALL_INSTRUCTIONS}

MB = 1 << 20
ADVERSARIAL = {
    "megabyte of letters": "a" * MB,
    "megabyte of newlines": "\n" * MB,
    "megabyte of digits": "9" * MB,
    "unbalanced braces": "{" * 100_000 + "\\boxed{" + "{" * 100_000,
    "deep nesting": "\\boxed{" + "{" * 50_000 + "5" + "}" * 50_000 + "}",
    "power tower": "The answer is $\\boxed{10^{10^{10}}}$.",
    "NUL bytes": "\x00" * 100_000 + "5\x00",
    "open brackets": "[" * MB,
    "open titles": "<<" * (MB // 2),
    "many Minerva prefixes": "Final Answer: The final answer is " * 30_000,
    "deep JSON": "[" * 100_000 + "]" * 100_000,
}


def _warm() -> None:
    """Wait for the shared worker to be up (a previous timeout restarts it) so that a timing measures one check."""
    assert verify("gsm8k", "5", "5") == 1.0


def _timed_verify(dataset: str, response: str, ground_truth: str, timeout_s: float = LIMIT_S) -> float:
    # No wall-clock assertion (the 2-core CI machine is shared): the limit itself is enforced by the worker pool and
    # tested deterministically in tests/test_faults.py; here every input must come back as a reward in [0, 1].
    _warm()
    reward = verify(dataset, response, ground_truth, timeout_s=timeout_s)
    assert isinstance(reward, float) and 0.0 <= reward <= 1.0
    return reward


def test_dispatch_is_case_insensitive_and_unknown_datasets_are_named():
    assert known_datasets() == ["gsm8k", "ifeval", "math"]
    assert verify("GSM8K", "so 18", "#### 18", timeout_s=None) == 1.0
    assert verify("MATH", "\\boxed{\\dfrac12}", "\\frac{1}{2}", timeout_s=None) == 1.0
    with pytest.raises(ValueError, match=r"'gsm8k_hard'.*gsm8k, ifeval, math"):
        verify("gsm8k_hard", "1", "1")
    with pytest.raises(ValueError, match="known datasets"):
        extract_answer("code", "x")


def test_malformed_ground_truth_and_non_string_response_are_errors():
    with pytest.raises(ValueError, match="GSM8K ground truth"):
        check_ground_truth("gsm8k", "#### many")
    with pytest.raises(ValueError, match="ground truth must be a string"):
        verify("math", "\\boxed{1}", 1)
    with pytest.raises(ValueError, match="IFEval"):
        verify("ifeval", "text", "{}")
    with pytest.raises(TypeError, match="response must be a string"):
        verify("gsm8k", None, "1")


def test_extract_answer_per_family():
    assert extract_answer("gsm8k", "3 apples and 1,200 pears") == "1200"
    assert extract_answer("math", "thus $\\boxed{\\frac{1}{2}}$") == "\\frac{1}{2}"
    assert extract_answer("ifeval", "anything") is None
    assert extract_answer("math", "\x00{" * 1000) is None


def test_worker_and_in_process_scores_agree():
    cases = [("gsm8k", "so -3", "#### -3"), ("math", "$\\boxed{0.75}$", "\\frac34"),
             ("ifeval", "Repeat me. So the answer. P.S. no", ALL_INSTRUCTIONS), ("math", "\\boxed{4}", "5")]
    for case in cases:
        assert verify(*case) == verify(*case, timeout_s=None)


def test_verify_from_threads():
    """No signal handling in the caller: worker threads (as in an async RL loop) can verify."""
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        rewards = list(pool.map(lambda a: verify("math", f"\\boxed{{{a}}}", "0.75"), ["\\frac34", "3/4", "0.7", "1"]))
    assert rewards == [1.0, 1.0, 0.0, 0.0]


def test_a_check_that_never_ends_is_cut_at_the_limit():
    """A ground-truth keyword with catastrophic backtracking runs in C (no signal can stop it): the worker is killed."""
    gt = json.dumps({"instruction_id": ["keywords:existence"], "kwargs": [{"keywords": ["(a|aa)+$"]}]})
    assert _timed_verify("ifeval", "a" * 64 + "b", gt, timeout_s=1.0) == 0.0
    assert verify("ifeval", "aaa", gt) == 1.0  # the replacement worker serves the next call


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_adversarial_inputs_score_in_time(name):
    response = ADVERSARIAL[name]
    for dataset, ground_truth in (("gsm8k", "#### 5"), ("math", "5"), ("ifeval", FAST_INSTRUCTIONS)):
        _timed_verify(dataset, response, ground_truth)


def test_megabyte_with_every_instruction_is_bounded_by_the_limit():
    _timed_verify("ifeval", "word. " * 200_000, ALL_INSTRUCTIONS)


_FRAGMENTS = st.sampled_from([
    "\\boxed{", "\\fbox{", "{", "}", "$", "\\$", "####", "-", ",", ".", "5", "3.50", "10^{10^{10}}", "\\frac",
    "\\left(",
    "Final Answer: The final answer is", " I hope it is correct.", "<<", ">>", "[", "]", "*", "***", "******", "\n",
    "\n\n", "P.S.", "Section 1", '"', "```json", "\x00", "é", "漢", " ",
])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=300), st.lists(_FRAGMENTS, max_size=60).map("".join)))
def test_any_string_scores_a_float_in_unit_interval_in_time(response):
    for dataset, ground_truth in GROUND_TRUTHS.items():
        _timed_verify(dataset, response, ground_truth)
        answer = extract_answer(dataset, response)
        assert answer is None or isinstance(answer, str)
