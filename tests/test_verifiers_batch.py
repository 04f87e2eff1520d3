"""Batch scoring in worker processes: per-item time limits, counted timeouts, early row errors, worker failures."""

from __future__ import annotations

import json
import operator
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tulu_jax.errors import DataError
from tulu_jax.rl.verifiers import score_batch
from tulu_jax.rl.verifiers.timeout import WorkerPool

# A ground-truth keyword with catastrophic backtracking: the regex engine never returns on "aaaa…b".
PATHOLOGICAL_GT = json.dumps({"instruction_id": ["keywords:existence"], "kwargs": [{"keywords": ["(a|aa)+$"]}]})
LOWERCASE_GT = json.dumps({"func_name": "validate_lowercase"})


def test_pathological_item_times_out_is_counted_and_the_rest_are_scored():
    datasets = ["gsm8k", "ifeval", "math", "ifeval", "gsm8k", "math"]
    responses = ["so 18", "a" * 64 + "b", "$\\boxed{\\frac{1}{2}}$", "all lower case", "so 17", "\\boxed{3}"]
    ground_truths = ["#### 18", PATHOLOGICAL_GT, "0.5", LOWERCASE_GT, "#### 18", "4"]
    start = time.monotonic()
    rewards, num_timeouts = score_batch(datasets, responses, ground_truths, timeout_s=2.0, num_workers=2)
    assert time.monotonic() - start < 60  # worker start-up on a busy machine included; the item itself is cut at 2 s
    assert rewards.dtype == np.float32 and rewards.shape == (6,)
    np.testing.assert_array_equal(rewards, [1, 0, 1, 1, 0, 0])
    assert num_timeouts == 1
    # The killed worker was replaced: the pool keeps serving.
    rewards, num_timeouts = score_batch(["ifeval"] * 2, ["aaa", "bbb"], [PATHOLOGICAL_GT] * 2, num_workers=2)
    np.testing.assert_array_equal(rewards, [1, 0])
    assert num_timeouts == 0


def test_bad_rows_fail_early_with_row_and_field():
    with pytest.raises(DataError, match=r"row 1, field 'ground_truth'.*GSM8K ground truth"):
        score_batch(["gsm8k", "gsm8k"], ["1", "2"], ["#### 1", "#### two"])
    with pytest.raises(DataError, match=r"row 0, field 'dataset'.*'poetry'"):
        score_batch(["poetry"], ["x"], ["y"])
    with pytest.raises(DataError, match=r"row 0, field 'response'"):
        score_batch(["math"], [None], ["1"])
    with pytest.raises(ValueError, match="lengths differ"):
        score_batch(["math"], ["1", "2"], ["1"])
    rewards, num_timeouts = score_batch([], [], [])
    assert rewards.shape == (0,) and rewards.dtype == np.float32 and num_timeouts == 0


@pytest.fixture(scope="module")
def bare_pool():
    pool = WorkerPool(2, warm_up=None)
    yield pool
    pool.close()


def test_pool_cuts_only_the_slow_item(bare_pool):
    """The middle item backtracks forever inside the regex engine (C code that no signal interrupts)."""
    items = [("a", "b", "aaa"), ("(a|aa)+$", "", "a" * 64 + "b"), ("x", "y", "xx")]
    start = time.monotonic()
    assert bare_pool.map(re.sub, items, timeout_s=1.0) == ["bbb", None, "yy"]
    assert time.monotonic() - start < 30  # start-up of two bare workers on a busy machine included
    assert bare_pool.map(re.sub, [("a", "c", "a")], timeout_s=5.0) == ["c"]  # replaced, still serving


def test_pool_reports_a_dead_worker_as_a_missing_result(bare_pool):
    results = bare_pool.map(os._exit, [(3,)], timeout_s=5.0)
    assert results == [None]
    assert bare_pool.map(operator.mul, [(6, 7)], timeout_s=5.0) == [42]


def test_pool_reraises_a_function_error_with_its_traceback(bare_pool):
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        bare_pool.map(operator.truediv, [(1, 0)], timeout_s=5.0)
    assert bare_pool.map(operator.truediv, [(1, 4)], timeout_s=5.0) == [0.25]


def test_an_orphaned_worker_is_ended_by_its_cpu_limit():
    """If the parent dies, the kernel still ends a worker stuck in C code: SIGXCPU once the item's CPU is used up."""
    spin = (
        "from tulu_jax.rl.verifiers.timeout import _limit_cpu; _limit_cpu(1); "
        "import re; re.match('(a|aa)+$', 'a' * 64 + 'b')"
    )
    process = subprocess.run([sys.executable, "-c", spin], timeout=60)
    assert process.returncode == -signal.SIGXCPU


def test_pool_refuses_functions_a_worker_cannot_import(bare_pool):
    with pytest.raises(ValueError, match="module-level function"):
        bare_pool.map(lambda x: x, [(1,)], timeout_s=1.0)
