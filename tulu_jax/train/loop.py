"""The generic training loop: steps, metrics, periodic/final/SIGTERM checkpoints, and resume.

Resume: when the checkpointer holds a finalized checkpoint, the loop restores the TrainState into the shardings
of the `state` it was given and the data iterator's position (`batches.set_state`), then continues from that
step; with a deterministic iterator the resumed run reproduces the uninterrupted one step for step.

Metrics stay on device and are fetched every `log_every` steps (and before every checkpoint), so the host does
not wait on each step; every step's exact metrics are still written, one JSONL line per step.

Non-finite steps: the train step skips an update whose loss or gradient is not finite and reports
`skipped_nonfinite` (see `train.guard`); the loop counts consecutive skipped steps as it fetches metrics and, after
`max_nonfinite_steps` of them, raises TrainingError naming the step and the newest checkpoint (all finite).

SIGTERM (a preemption notice): the current step finishes, a checkpoint is written and waited for, and the
process exits with status 0 and a message on stderr. On a pod the signal reaches the hosts at different steps, and
a host that saved alone would wait forever in the save's collectives: so after every step the processes agree
(`stop_requested`, one tiny all-gather) and all of them save the same step and exit.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from typing import Any, Callable, Protocol

import jax
import numpy as np

from tulu_jax.train.checkpoint import Checkpointer, set_data_state
from tulu_jax.train.guard import NonfiniteCounter
from tulu_jax.train.metrics import MetricsWriter, ProgressBar
from tulu_jax.train.state import TrainState

PyTree = Any


class StatefulIterator(Protocol):
    """A batch iterator whose position can be saved and restored (grain iterators are)."""

    def __next__(self) -> PyTree: ...

    def get_state(self) -> dict | bytes: ...

    def set_state(self, state: dict | bytes) -> None: ...


def batch_tokens(batch: PyTree) -> int:
    """Tokens in a host batch, for throughput: non-zero `*segment_ids`/`*attention_mask` entries, else the size
    of `*input_ids` leaves, else 0. Only host (NumPy) arrays are counted exactly; device arrays count by size."""

    def leaves(suffix: str) -> list[Any]:
        flat = jax.tree_util.tree_flatten_with_path(batch)[0]
        return [x for path, x in flat if path and str(getattr(path[-1], "key", "")).endswith(suffix)]

    masks = leaves("segment_ids") or leaves("attention_mask")
    if masks:
        return int(sum(np.count_nonzero(x) if isinstance(x, np.ndarray) else x.size for x in masks))
    return int(sum(x.size for x in leaves("input_ids")))


class _SigtermFlag:
    """Records SIGTERM instead of dying, while installed (only possible from the main thread)."""

    def __init__(self) -> None:
        self.received = False
        self._previous: Any = None

    def __enter__(self) -> "_SigtermFlag":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = True

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def stop_requested(local: bool) -> bool:
    """Whether any process has `local` set; the same answer in every process (all must call it at the same step).

    One process: `local` itself, at no cost. Several: an all-gather of one int32 per process, which also waits
    for the step just dispatched (each step already ends in collectives, so this costs the dispatch overlap).
    """
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.int32(local))))


def run_training(
    state: TrainState,
    train_step: Callable[[TrainState, PyTree], tuple[TrainState, dict[str, jax.Array]]],
    batches: StatefulIterator,
    *,
    num_steps: int,
    checkpointer: Checkpointer | None,
    save_every: int | None,
    metrics_writer: MetricsWriter | None,
    on_step: Callable[[int, TrainState, dict[str, jax.Array]], None] | None = None,
    log_every: int = 10,
    metadata: dict | None = None,
    prepare_batch: Callable[[PyTree], PyTree] | None = None,
    progress: bool = True,
    max_nonfinite_steps: int = 3,
    strict_resume: bool = False,
) -> TrainState:
    """Train until `state.step == num_steps`; returns the final state.

    Args:
      state: the initial (sharded) state; also the restore target (shapes, dtypes, shardings) when resuming.
      train_step: `(state, batch) -> (state, metrics)`, e.g. from `build_train_step`.
      batches: iterator of batches with `get_state()`/`set_state()`.
      num_steps: total optimizer steps of the run (not the steps of this invocation).
      checkpointer: where to save and resume from (None: neither).
      save_every: checkpoint every this many steps (None: only at the end and on SIGTERM).
      metrics_writer: receives every step's metrics (None: not written).
      on_step: `on_step(step, state, metrics)` after each step (metrics are still on device).
      log_every: fetch metrics to host every this many steps.
      metadata: JSON-able dict stored with each checkpoint (e.g. the run config).
      prepare_batch: applied to each batch before the step (e.g. host → global array assembly).
      progress: show a progress bar.
      max_nonfinite_steps: stop (TrainingError) after this many consecutive steps skipped as non-finite.
      strict_resume: a corrupt newest checkpoint is an error instead of falling back to an older one.
    """
    if checkpointer is not None and checkpointer.latest_step() is not None:
        restored = checkpointer.restore_intact(target=state, strict=strict_resume)
        state = restored.state
        if restored.data_state is not None:
            set_data_state(batches, restored.data_state, f"{checkpointer.directory}/{restored.step}")
        print(f"tulu-jax: resumed from checkpoint step {restored.step} in {checkpointer.directory}", file=sys.stderr)
    step = int(jax.device_get(state.step))
    last_saved = step if checkpointer is not None and checkpointer.latest_step() == step else None
    bar = ProgressBar(num_steps, initial=step, disable=None if progress else True)
    pending: list[tuple[int, dict[str, jax.Array]]] = []
    tokens, clock = 0, time.perf_counter()
    nonfinite = NonfiniteCounter(max_nonfinite_steps, checkpointer)

    def flush() -> None:
        nonlocal tokens, clock
        if not pending:
            return
        host = jax.device_get([metrics for _, metrics in pending])
        for (logged_step, _), metrics in zip(pending, host):
            if metrics_writer is not None:
                metrics_writer.write(logged_step, metrics)
            nonfinite.record(logged_step, metrics)
        now = time.perf_counter()
        bar.update(pending[-1][0], loss=float(host[-1]["loss"]), tokens_per_s=tokens / max(now - clock, 1e-9))
        pending.clear()
        tokens, clock = 0, now

    def save() -> None:
        nonlocal last_saved
        if checkpointer is None or last_saved == step:
            return
        flush()
        checkpointer.save(step, state, data_state=batches.get_state(), metadata=metadata, force=True)
        last_saved = step

    def finish() -> None:
        save()
        flush()
        if checkpointer is not None:
            checkpointer.wait()

    try:
        with _SigtermFlag() as sigterm:
            while step < num_steps:
                try:
                    batch = next(batches)
                except StopIteration:
                    print(f"tulu-jax: data exhausted after {step} of {num_steps} steps", file=sys.stderr)
                    break
                tokens += batch_tokens(batch)
                if prepare_batch is not None:
                    batch = prepare_batch(batch)
                state, metrics = train_step(state, batch)
                step += 1
                pending.append((step, metrics))
                if on_step is not None:
                    on_step(step, state, metrics)
                if step % log_every == 0:
                    flush()
                if save_every and step % save_every == 0:
                    save()
                if stop_requested(sigterm.received):
                    finish()
                    where = f"saved checkpoint step {step} in {checkpointer.directory}" if checkpointer else "no save"
                    who = "" if sigterm.received else " by another process"
                    print(f"tulu-jax: SIGTERM received{who}; {where}; exiting", file=sys.stderr)
                    raise SystemExit(0)
            finish()
    finally:
        bar.close()
    return state
