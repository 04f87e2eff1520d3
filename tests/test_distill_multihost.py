"""`tulu-jax distill-targets` on two processes over loopback (the multi-host code path, tests/test_distributed.py's
machinery): a resumed two-process run writes only the missing shard, once, with the targets one process writes."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest

from test_distributed import REPO, free_port
from tulu_jax.data.distill_targets import shard_path
from tulu_jax.stages.distill import DistillConfig
from tulu_jax.stages.distill_targets import write_targets
from tulu_jax.stages.sections import load_stage_config

CONFIG = "configs/tiny_distill.yaml"  # 240 chat rows, 64 per shard: 4 shards; a random `tiny` teacher


def run_two_processes(overrides: list[str], cwd) -> list[tuple[int, str]]:
    """`tulu-jax distill-targets` as processes 0 and 1 of one run, 4 CPU devices each; (returncode, stderr) each."""
    port, procs = free_port(), []
    sets = [arg for o in overrides for arg in ("--set", o)]
    for pid in range(2):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
               "TULU_JAX_COORDINATOR": f"127.0.0.1:{port}", "TULU_JAX_NUM_PROCESSES": "2",
               "TULU_JAX_PROCESS_ID": str(pid)}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "tulu_jax.cli", "distill-targets", "--config", str(REPO / CONFIG),
             "--sharding", str(REPO / "sharding" / "cpu-8.yaml"), *sets],
            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))
    deadline, results = time.monotonic() + 300, []
    try:
        for proc in procs:
            _, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((proc.returncode, err))
    finally:
        for proc in procs:  # a process left waiting for a dead peer must not outlive the test
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


@pytest.mark.slow
def test_a_resumed_two_process_run_writes_the_missing_shard_once(tmp_path):
    out = tmp_path / "targets"
    overrides = [f"distill.targets.path={out}"]
    written = write_targets(load_stage_config(DistillConfig, REPO / CONFIG, overrides), REPO / "sharding" / "cpu-8.yaml")
    assert written == {"written": 4, "skipped": 0}
    with np.load(shard_path(out, 2)) as f:
        reference = {key: f[key] for key in f.files}
    shard_path(out, 2).unlink()
    untouched = {s: shard_path(out, s).stat().st_mtime_ns for s in (0, 1, 3)}

    results = run_two_processes(overrides, tmp_path)
    for rc, err in results:
        assert rc == 0, err[-4000:]
    assert "1 shard(s) written, 3 already complete" in results[0][1]
    assert {s: shard_path(out, s).stat().st_mtime_ns for s in (0, 1, 3)} == untouched
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", *(shard_path(out, s).name for s in range(4))]
    with np.load(shard_path(out, 2)) as f:
        rewritten = {key: f[key] for key in f.files}
    assert rewritten.keys() == reference.keys()
    for key in reference:  # the same rows and teacher ids; the probabilities to float16 rounding
        if key == "teacher_probs":
            np.testing.assert_allclose(rewritten[key].astype(np.float32), reference[key].astype(np.float32),
                                       atol=1e-3)
        else:
            np.testing.assert_array_equal(rewritten[key], reference[key], err_msg=key)
