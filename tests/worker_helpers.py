"""Functions the verifier worker processes of the tests import by name (kept free of JAX and test fixtures)."""

import os
import time


def slow_warm_up() -> None:
    """Sleep $TULU_TEST_WARM_UP_S seconds (default 0): a worker that takes long to warm up."""
    time.sleep(float(os.environ.get("TULU_TEST_WARM_UP_S", "0")))
