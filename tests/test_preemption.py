"""Multi-host preemption: two real processes (jax.distributed over loopback, gloo collectives) train a tiny SFT;
SIGTERM reaches only one of them. Both must agree on the stop step, save that same checkpoint and exit 0 (a
process that saved alone would hang in the save's collectives), and a resumed two-process run must reproduce the
losses of an uninterrupted one step for step."""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.test_distributed import free_port

REPO = pathlib.Path(__file__).resolve().parent.parent
STEPS = 12


def _launch(run_dir: pathlib.Path, *, resume: bool = False) -> list[subprocess.Popen]:
    port = free_port()
    argv = [sys.executable, "-m", "tulu_jax.cli", "sft", "--config", str(REPO / "configs" / "tiny_sft.yaml"),
            "--sharding", str(REPO / "sharding" / "cpu-8.yaml"), "--set", f"output.run_dir={run_dir}",
            "--set", f"train.max_steps={STEPS}", "--set", "output.save_every=2", "--set", "output.log_every=1",
            "--set", "output.export_hf=false", *(["--resume"] if resume else [])]
    procs = []
    for pid in range(2):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
               "TULU_JAX_COORDINATOR": f"127.0.0.1:{port}", "TULU_JAX_NUM_PROCESSES": "2",
               "TULU_JAX_PROCESS_ID": str(pid)}
        procs.append(subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    return procs


def _finish(procs: list[subprocess.Popen], timeout: float = 600) -> list[str]:
    """Wait for both; every process must exit 0. Returns their stderr."""
    deadline = time.monotonic() + timeout
    errs = []
    try:
        for proc in procs:
            _, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            errs.append(err)
    finally:
        for proc in procs:  # a process stuck in a collective with a dead (or diverged) peer must not outlive us
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, err in zip(procs, errs):
        assert proc.returncode == 0, f"process exited {proc.returncode}:\n{err[-4000:]}"
    return errs


def _losses(run_dir: pathlib.Path) -> dict[int, float]:
    """step → loss; after a resume the later line of a repeated step counts."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows}


@pytest.mark.slow
def test_sigterm_on_one_host_stops_both_at_the_same_step_and_resume_reproduces_the_run(tmp_path):
    straight = tmp_path / "straight"
    _finish(_launch(straight))
    want = _losses(straight)
    assert sorted(want) == list(range(1, STEPS + 1))

    preempted = tmp_path / "preempted"
    procs = _launch(preempted)
    deadline = time.monotonic() + 600
    while not (preempted / "checkpoints" / "2").exists():  # both processes are training
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "training never started"
        time.sleep(0.02)
    # Pause process 0 so that the run cannot finish before the signal lands (process 1 waits in the next step's
    # collectives), preempt only process 1, then let process 0 go on: it has no signal of its own.
    procs[0].send_signal(signal.SIGSTOP)
    procs[1].send_signal(signal.SIGTERM)
    time.sleep(0.5)
    procs[0].send_signal(signal.SIGCONT)
    errs = _finish(procs)
    saved = [re.findall(r"saved checkpoint step (\d+)", err) for err in errs]
    assert len(saved[0]) == len(saved[1]) == 1 and saved[0] == saved[1], errs
    stop = int(saved[0][0])
    assert 2 <= stop < STEPS
    assert "SIGTERM received by another process;" in errs[0] and "SIGTERM received;" in errs[1]

    errs = _finish(_launch(preempted, resume=True))
    assert all(f"resumed from checkpoint step {stop}" in err for err in errs)
    got = _losses(preempted)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == want  # the same losses, bit for bit: same data order, same restored state
