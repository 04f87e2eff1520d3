"""Per-step metrics: a JSONL file (one flushed JSON object per step), TensorBoard if installed, a progress bar, and
the step-time / tokens-per-second front (`ThroughputWriter`)."""

from __future__ import annotations

import json
import math
import pathlib
import sys
import time
from typing import Any, Mapping

import jax
import numpy as np
from tqdm import tqdm


def _tensorboard_writer(log_dir: str) -> Any | None:
    """A SummaryWriter from tensorboardX or torch.utils.tensorboard, or None when neither is importable."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None
    return SummaryWriter(log_dir)


def _to_python(value: Any) -> Any:
    """Host scalars/arrays → JSON-able Python values (NaN/inf become strings, which strict JSON lacks)."""
    array = np.asarray(value)
    if array.ndim:
        return [_to_python(v) for v in array]
    item = array.item()
    if isinstance(item, float) and not math.isfinite(item):
        return str(item)
    return item


class MetricsWriter:
    """Appends `{"step": s, **metrics}` lines to `jsonl_path` (flushed each write) and, optionally, scalars to
    TensorBoard under `tensorboard_dir` (skipped quietly when no TensorBoard writer is installed).

    Only process 0 writes in a multi-process run. After a resume the steps following the restored checkpoint
    appear a second time; the later line is the one that counts.
    """

    def __init__(self, jsonl_path: str | pathlib.Path, tensorboard_dir: str | pathlib.Path | None = None):
        self.jsonl_path = pathlib.Path(jsonl_path)
        self._enabled = jax.process_index() == 0
        self._file = None
        self._tensorboard = None
        if self._enabled:
            self.jsonl_path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.jsonl_path.open("a", encoding="utf-8")
            if tensorboard_dir is not None:
                self._tensorboard = _tensorboard_writer(str(tensorboard_dir))

    @property
    def tensorboard_enabled(self) -> bool:
        """Whether scalars also go to TensorBoard."""
        return self._tensorboard is not None

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record one step's metrics (host values or device arrays, which are fetched)."""
        if not self._enabled:
            return
        row = {"step": int(step), **{k: _to_python(v) for k, v in jax.device_get(dict(metrics)).items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tensorboard is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tensorboard.add_scalar(key, value, int(step))

    def close(self) -> None:
        """Flush and close the outputs."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None


class ProgressBar:
    """A tqdm bar over optimizer steps showing the latest loss and the throughput in tokens/s."""

    def __init__(self, total: int, initial: int = 0, *, disable: bool | None = None):
        if disable is None:
            disable = jax.process_index() != 0
        self._bar = tqdm(total=total, initial=initial, desc="train", unit="step", disable=disable, file=sys.stderr)

    def update(self, step: int, *, loss: float, tokens_per_s: float | None = None) -> None:
        """Move the bar to `step` and show `loss` and `tokens_per_s`."""
        postfix = {"loss": f"{loss:.4f}"}
        if tokens_per_s is not None:
            postfix["tok/s"] = f"{tokens_per_s:,.0f}"
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(step - self._bar.n)

    def close(self) -> None:
        """Close the bar."""
        self._bar.close()


class ThroughputWriter:
    """A MetricsWriter front that adds `step_time_s`, `tokens_per_s` and (for token-level losses, whose rows carry
    `nll_sum` and `supervised_tokens`) `loss_per_token` to every step's row.

    The loop fetches metrics in windows (every `log_every` steps, before a checkpoint, at the end), so the
    wall time of a window is only known when it is fetched: every step of a window gets the window's mean step
    time, and `tokens_per_s` = the step's `tokens` metric (non-padding tokens of the global batch) / that time.
    The first window includes compilation. Wire it as `run_training(..., metrics_writer=w, on_step=w.on_step)`.
    """

    def __init__(self, writer: MetricsWriter | None):
        self._writer = writer
        self._dispatched = 0
        self._window_end = -1
        self._clock = time.perf_counter()
        self._step_time = float("nan")

    def on_step(self, step: int, state: Any, metrics: Mapping[str, jax.Array]) -> None:
        """Record that `step` was dispatched (run_training's on_step hook)."""
        self._dispatched = step

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Write one step's row; the first row of a new window measures the window."""
        if step > self._window_end:
            now = time.perf_counter()
            self._window_end = max(self._dispatched, step)
            self._step_time = (now - self._clock) / (self._window_end - step + 1)
            self._clock = now
        if self._writer is None:
            return
        row = dict(jax.device_get(dict(metrics)))
        row["step_time_s"] = self._step_time
        if "nll_sum" in row and "supervised_tokens" in row:  # comparable across batch shapes, unlike a sum loss
            row["loss_per_token"] = float(row["nll_sum"]) / max(float(row["supervised_tokens"]), 1.0)
        if "tokens" in row:
            row["tokens_per_s"] = float(row["tokens"]) / max(self._step_time, 1e-12)
        self._writer.write(step, row)

    def close(self) -> None:
        """Close the underlying writer."""
        if self._writer is not None:
            self._writer.close()
