"""GSM8K: agreement with OpenAI's labels on 5,276 model solutions, reference self-consistency, sign and comma rules."""

from __future__ import annotations

import json

import pytest

from tulu_jax.rl.verifiers import gsm8k

MODELS = ("6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification")


@pytest.fixture(scope="module")
def references(oracles_dir):
    with open(oracles_dir / "gsm8k" / "test.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 1319
    return {r["question"]: r["answer"] for r in rows}


def test_every_reference_solution_verifies_against_itself(references):
    assert all(gsm8k.score(solution, solution) == 1.0 for solution in references.values())
    assert sum("," in gsm8k_answer.split("####")[-1] for gsm8k_answer in references.values()) == 14


def test_agreement_with_openai_labels(oracles_dir, references):
    """Each solution ends with "A: <answer>"; a grader takes its last number and compares it with the reference."""
    with open(oracles_dir / "gsm8k" / "example_model_solutions.jsonl") as f:
        rows = [json.loads(line) for line in f]
    labelled = [(r[m]["solution"], references[r["question"]], r[m]["is_correct"]) for r in rows for m in MODELS]
    assert len(labelled) == 5276
    disagreements = [(s[-80:], gt[-20:], label) for s, gt, label in labelled if (gsm8k.score(s, gt) == 1.0) != label]
    assert len(disagreements) / len(labelled) <= 0.001, disagreements


@pytest.mark.parametrize(
    ("response", "ground_truth", "expected"),
    [
        ("The total is $3.50.", "#### 3.5", 1.0),
        ("So 18.", "18", 1.0),  # bare ground truth
        ("It costs 2,125 dollars.", "#### 2,125", 1.0),  # thousands commas on both sides
        ("It costs 2125 dollars.", "#### 2,125", 1.0),
        ("1,234,567 people", "#### 1234567", 1.0),
        ("The profit is -3.", "#### 3", 0.0),  # a sign is part of the number
        ("The profit is 3.", "#### -3", 0.0),
        ("The change is \u22123", "#### -3", 1.0),  # unicode minus
        ("20-18 = 2, so 20-18", "#### 18", 1.0),  # a minus after a digit is a subtraction
        ("Pick 1,2,3", "#### 3", 1.0),  # a list, not a thousands separator
        ("I don't know", "#### 7", 0.0),
        ("7 apples, then 8", "#### 7", 0.0),  # the last number counts
        ("", "#### 0", 0.0),
        ("9" * 5000, "#### 9", 0.0),  # too long to be a number we compare, never an error
        ("Each costs .5 dollars.", "#### 0.5", 1.0),  # a leading decimal point: .5 is 0.5 (as in the reference)
        ("Each costs .5 dollars.", "#### 5", 0.0),
        ("The change is -.25", "#### -0.25", 1.0),
        ("So it is 18.0", "#### .5", 0.0),
        ("Half: .5", "#### .5", 1.0),
        ("+5", "#### 5", 1.0),  # an explicit plus sign is the same number
    ],
)
def test_score(response, ground_truth, expected):
    assert gsm8k.score(response, ground_truth) == expected


def test_extract_answer():
    assert gsm8k.extract_answer("a 1,000 b -2.50 c") == "-2.50"
    assert gsm8k.extract_answer("no digits") is None


@pytest.mark.parametrize("ground_truth", ["#### eighteen", "#### 1 or 2", "", "#### 5 apples"])
def test_malformed_reference_is_an_error(ground_truth):
    with pytest.raises(ValueError, match="GSM8K ground truth"):
        gsm8k.score("5", ground_truth)
