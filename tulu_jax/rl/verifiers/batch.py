"""Reward a batch of RL responses in parallel worker processes, each response under a time limit."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from tulu_jax.errors import DataError
from tulu_jax.rl.verifiers import registry, timeout


def score_batch(
    datasets: Sequence[str],
    responses: Sequence[str],
    ground_truths: Sequence[Any],
    *,
    timeout_s: float = registry.DEFAULT_TIMEOUT_S,
    num_workers: int | None = None,
) -> tuple[np.ndarray, int]:
    """Verifier rewards for row-aligned ``datasets``/``responses``/``ground_truths``.

    Every ground truth is validated here first, so a malformed row fails before any work starts (DataError naming the
    row and field). The rows are then scored in ``num_workers`` worker processes (default: one per CPU), reused
    across calls; a response that takes longer than ``timeout_s`` seconds scores 0.

    Returns:
      rewards: float32 [N] in [0, 1].
      num_timeouts: how many rows did not finish in time (or lost their worker process).
    """
    n = len(responses)
    if not len(datasets) == len(ground_truths) == n:
        raise ValueError(f"lengths differ: {len(datasets)} datasets, {n} responses, {len(ground_truths)} ground truths")
    names = []
    for row, (dataset, response, ground_truth) in enumerate(zip(datasets, responses, ground_truths)):
        try:
            names.append(registry.get_verifier(dataset).name)
        except ValueError as e:
            raise DataError(str(e), row=row, field="dataset") from None
        try:
            registry.check_ground_truth(dataset, ground_truth)
        except ValueError as e:
            raise DataError(str(e), row=row, field="ground_truth") from None
        if not isinstance(response, str):
            raise DataError(f"response must be a string, got {type(response).__name__}", row=row, field="response")
    if n == 0:
        return np.zeros(0, np.float32), 0
    pool = timeout.shared_pool(num_workers or timeout.default_num_workers(), registry.warm_up_worker)
    results = pool.map(registry.score_in_process, list(zip(names, responses, ground_truths)), timeout_s)
    rewards = np.array([0.0 if r is None else r for r in results], np.float32)
    return rewards, sum(r is None for r in results)
