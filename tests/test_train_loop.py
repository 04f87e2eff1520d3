"""The training loop: per-step metrics, resume after SIGTERM and SIGKILL reproducing the uninterrupted run, and the
metrics writer / progress helpers."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest

from test_train_helpers import train_main
from tulu_jax.train import Checkpointer, MetricsWriter, ProgressBar, batch_tokens

HELPERS = pathlib.Path(__file__).with_name("test_train_helpers.py")
NUM_STEPS, SAVE_EVERY = 9, 2


def read_losses(path: pathlib.Path) -> dict[int, float]:
    """step → loss, the last line for a step winning (a resumed run rewrites the steps after its checkpoint)."""
    losses = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        losses[row["step"]] = row["loss"]
    return losses


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """The uninterrupted run, in this process."""
    workdir = tmp_path_factory.mktemp("reference")
    state = train_main(workdir, NUM_STEPS, SAVE_EVERY)
    return workdir, state


def test_loop_logs_every_step_and_checkpoints(reference_run):
    workdir, state = reference_run
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, NUM_STEPS + 1))
    assert {"loss", "grad_norm", "lr", "nll_sum", "tokens"} <= rows[0].keys()
    assert rows[0]["lr"] == 0.0 and rows[-1]["lr"] > 0.0  # warmup starts at 0
    assert int(state.step) == NUM_STEPS
    ckpt = Checkpointer(workdir / "ckpt")
    assert ckpt.all_steps() == [8, 9]  # every 2 steps, the final one, keeping 2
    assert ckpt.restore(target=state).data_state == {"index": NUM_STEPS}
    ckpt.close()


def start(workdir: pathlib.Path, sleep_s: float) -> subprocess.Popen:
    cmd = [sys.executable, str(HELPERS), str(workdir), str(NUM_STEPS), str(SAVE_EVERY), str(sleep_s)]
    # The three runs compile the same programs: share them through JAX's persistent cache (subprocesses only).
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(workdir / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint_after(workdir: pathlib.Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> int:
    """Poll until a finalized checkpoint newer than `step` exists; returns its step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ckpt_dir = workdir / "ckpt"
        steps = [int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()] if ckpt_dir.is_dir() else []
        if steps and max(steps) > step:
            return max(steps)
        if proc.poll() is not None:
            pytest.fail(f"training exited early ({proc.returncode}): {proc.stderr.read()}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail("no new checkpoint in time")


@pytest.mark.slow
def test_sigterm_then_sigkill_then_resume_matches_uninterrupted_run(reference_run, tmp_path):
    reference = read_losses(reference_run[0] / "metrics.jsonl")

    # 1. SIGTERM after the first checkpoint: finishes its step, saves, exits 0 with a message.
    proc = start(tmp_path, sleep_s=0.3)
    wait_for_checkpoint_after(tmp_path, 0, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "SIGTERM received; saved checkpoint step" in err
    after_sigterm = Checkpointer(tmp_path / "ckpt").latest_step()
    assert 1 <= after_sigterm < NUM_STEPS

    # 2. Resume, then SIGKILL once a newer checkpoint exists: nothing gets to clean up.
    proc = start(tmp_path, sleep_s=0.3)
    killed_after = wait_for_checkpoint_after(tmp_path, after_sigterm, proc)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert f"resumed from checkpoint step {after_sigterm}" in err
    assert killed_after < NUM_STEPS

    # 3. Resume to the end.
    proc = start(tmp_path, sleep_s=0.0)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    resumed_from = Checkpointer(tmp_path / "ckpt").all_steps()
    assert "resumed from checkpoint step" in err and resumed_from[-1] == NUM_STEPS

    losses = read_losses(tmp_path / "metrics.jsonl")
    assert sorted(losses) == list(range(1, NUM_STEPS + 1))
    np.testing.assert_allclose([losses[s] for s in sorted(losses)], [reference[s] for s in sorted(reference)],
                               rtol=1e-6, atol=0)


def test_metrics_writer_jsonl_and_tensorboard(tmp_path, monkeypatch):
    scalars = []

    class FakeSummaryWriter:
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, tag, value, step):
            scalars.append((tag, value, step))

        def close(self):
            scalars.append("closed")

    monkeypatch.setitem(sys.modules, "tensorboardX", types.SimpleNamespace(SummaryWriter=FakeSummaryWriter))
    writer = MetricsWriter(tmp_path / "m.jsonl", tensorboard_dir=tmp_path / "tb")
    assert writer.tensorboard_enabled
    writer.write(3, {"loss": np.float32(1.5), "tokens": np.int32(7), "bad": float("nan")})
    assert json.loads((tmp_path / "m.jsonl").read_text()) == {"step": 3, "loss": 1.5, "tokens": 7, "bad": "nan"}
    writer.close()
    assert scalars == [("loss", 1.5, 3), ("tokens", 7, 3), "closed"]

    # Neither tensorboardX nor torch.utils.tensorboard importable: JSONL only, no error.
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    writer = MetricsWriter(tmp_path / "m.jsonl", tensorboard_dir=tmp_path / "tb")
    assert not writer.tensorboard_enabled
    writer.write(4, {"loss": 2.0})
    writer.close()
    assert [json.loads(line)["step"] for line in (tmp_path / "m.jsonl").read_text().splitlines()] == [3, 4]


def test_batch_tokens():
    mask = np.array([[1, 1, 0], [2, 0, 0]])
    assert batch_tokens({"input_ids": np.zeros((2, 3)), "segment_ids": mask}) == 3
    assert batch_tokens({"chosen_attention_mask": mask, "rejected_attention_mask": mask}) == 6
    assert batch_tokens({"input_ids": np.zeros((2, 3))}) == 6
    assert batch_tokens({"x": np.zeros(4)}) == 0


def test_progress_bar_shows_step_loss_and_throughput(capsys):
    bar = ProgressBar(10, initial=2, disable=False)
    bar.update(5, loss=1.23456, tokens_per_s=12345.6)
    bar.close()
    err = capsys.readouterr().err
    assert "5/10" in err and "loss=1.2346" in err and "tok/s=12,346" in err
