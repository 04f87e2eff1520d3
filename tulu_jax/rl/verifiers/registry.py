"""Verifiers by the RLVR row's ``dataset`` field, and the ``verify`` / ``extract_answer`` entry points."""

from __future__ import annotations

import math as _math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tulu_jax.rl.verifiers import gsm8k, ifeval, timeout
from tulu_jax.rl.verifiers import math as math_answers

DEFAULT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Verifier:
    """One family of verifiable rewards.

    Attributes:
      name: the ``dataset`` value it serves (lower case).
      score: in-process scorer ``(response, ground_truth) -> float in [0, 1]``, without a time limit.
      check_ground_truth: parses a ground truth, raising ValueError when it is malformed.
      extract: the answer a grader would compare, or None (instruction following has none).
    """

    name: str
    score: Callable[[str, Any], float]
    check_ground_truth: Callable[[Any], object]
    extract: Callable[[str], str | None]


def _text(parse: Callable[[str], object]) -> Callable[[Any], object]:
    def check(ground_truth: Any) -> object:
        if not isinstance(ground_truth, str):
            raise ValueError(f"ground truth must be a string, got {type(ground_truth).__name__}")
        return parse(ground_truth)

    return check


_VERIFIERS = {
    v.name: v
    for v in (
        Verifier("gsm8k", gsm8k.score, _text(gsm8k.reference_answer), gsm8k.extract_answer),
        Verifier("math", math_answers.score, _text(math_answers.check_reference), math_answers.extract_answer),
        Verifier("ifeval", ifeval.score, ifeval.parse_ground_truth, lambda response: None),
    )
}


def known_datasets() -> list[str]:
    """The ``dataset`` values that have a verifier."""
    return sorted(_VERIFIERS)


def get_verifier(dataset: str) -> Verifier:
    """The verifier for ``dataset`` (case-insensitive); ValueError naming it and the known ones otherwise."""
    verifier = _VERIFIERS.get(dataset.lower()) if isinstance(dataset, str) else None
    if verifier is None:
        raise ValueError(f"no verifier for dataset {dataset!r}; known datasets: {', '.join(known_datasets())}")
    return verifier


def check_ground_truth(dataset: str, ground_truth: Any) -> None:
    """Raise ValueError naming ``dataset`` if ``ground_truth`` is not a valid reference for it (for early row
    validation); whatever the parser hits (deep nesting, wrong types) is reported that way, never passed through."""
    verifier = get_verifier(dataset)
    try:
        verifier.check_ground_truth(ground_truth)
    except ValueError as e:
        raise ValueError(f"bad {verifier.name} ground truth: {e}") from None
    except Exception as e:  # noqa: BLE001 — RecursionError, TypeError …: still a bad ground truth
        raise ValueError(f"bad {verifier.name} ground truth ({type(e).__name__}: {str(e)[:200]})") from None


def score_in_process(dataset: str, response: str, ground_truth: Any) -> float:
    """Score in this process with no time limit; any failure caused by the response scores 0.0.

    The ground truth must have been validated (``check_ground_truth``): here its errors also score 0.0.
    """
    try:
        value = float(get_verifier(dataset).score(response, ground_truth))
    except Exception:  # garbage in a response (deep nesting, huge numbers …) is a wrong answer, not a crash
        return 0.0
    return min(max(value, 0.0), 1.0) if _math.isfinite(value) else 0.0


def warm_up_worker() -> None:
    """Import and initialize every family (tokenizers, language profiles, sympy) before a worker takes items."""
    ifeval.util.warm_up()
    math_answers.symbolic_equal("1/2", "0.5")


def verify(dataset: str, response: str, ground_truth: Any, *, timeout_s: float | None = DEFAULT_TIMEOUT_S) -> float:
    """Reward in [0, 1] for ``response`` against ``ground_truth`` under the verifier of ``dataset``.

    Never raises for any response string: garbage scores 0.0, and so does a response whose check takes longer than
    ``timeout_s`` seconds (it runs in a killable worker process shared by later calls, and by calls from other
    threads, one at a time: use ``score_batch`` for throughput). The call returns within ``timeout_s`` (plus
    scheduling slack), except that the very first call also waits for the workers' one-time start-up.
    ``timeout_s=None`` scores in this process without a limit. Raises ValueError naming the dataset for an unknown
    dataset or a malformed ground truth and TypeError if ``response`` is not a string.
    """
    check_ground_truth(dataset, ground_truth)
    if not isinstance(response, str):
        raise TypeError(f"response must be a string, got {type(response).__name__}")
    if timeout_s is None:
        return score_in_process(dataset, response, ground_truth)
    # A spare warm worker takes the next call while a killed one's replacement warms up.
    pool = timeout.shared_pool(2, warm_up_worker)
    [reward] = pool.map(score_in_process, [(dataset, response, ground_truth)], timeout_s, max_wait_s=timeout_s)
    return 0.0 if reward is None else reward


def extract_answer(dataset: str, response: str) -> str | None:
    """The answer the ``dataset`` grader would compare (GSM8K: last number; MATH: boxed/Minerva/``$``), or None.

    Instruction following (``ifeval``) has no single answer: always None. Never raises for any string.
    """
    verifier = get_verifier(dataset)
    try:
        return verifier.extract(response)
    except Exception:  # extraction is linear-time string work; a failure means "no answer"
        return None
