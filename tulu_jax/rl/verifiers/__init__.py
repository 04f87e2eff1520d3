"""Verifiable rewards for RLVR: GSM8K, MATH and IFEval, keyed by the row's ``dataset`` field.

``verify`` scores one response (time-limited, never raises for any response); ``score_batch`` scores a batch in
parallel worker processes; ``extract_answer`` gives the answer a grader compares. Importing this package is cheap:
heavy dependencies (sympy, nltk, langdetect) load on first use.
"""

from tulu_jax.rl.verifiers.batch import score_batch
from tulu_jax.rl.verifiers.registry import (
    DEFAULT_TIMEOUT_S,
    check_ground_truth,
    extract_answer,
    known_datasets,
    verify,
)

__all__ = ["DEFAULT_TIMEOUT_S", "check_ground_truth", "extract_answer", "known_datasets", "score_batch", "verify"]
