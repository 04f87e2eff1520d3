"""grain input pipeline: tokenized rows → this process's share of each global batch, padded or packed.

Every process computes the same `BatchPlan` from row lengths (a deterministic shuffle per (seed, epoch), then
padding or first-fit packing into global batches of `global_batch_size` sequences) and reads only the rows of its
own contiguous share of each batch. So all processes see the same number of batches (the schedule's step count
is `len(dataset)`), the shares are disjoint and cover every row once per epoch, and a batch is a pure function of
its index: the iterator state is grain's `{"next_index": k}`, restorable in a new process (`get_state` /
`set_state`, or orbax through `grain.checkpoint.CheckpointSave` / `CheckpointRestore`).
Batches never straddle epochs; the last batch of an epoch is completed with empty (all-padding) sequences, which
add nothing to the loss because the denominators count real sequences and tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np
from absl import flags as absl_flags

from tulu_jax.data.batching import Batch, BatchPlan, build_batch, check_row, plan_packed, plan_padded
from tulu_jax.errors import ConfigError

RowSource = Sequence[Mapping[str, Any]] | grain.sources.RandomAccessDataSource | grain.MapDataset


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """What the pipeline produces and how it reads.

    seq_len: T of every batch. global_batch_size: sequences per optimizer step over all processes.
    packed: first-fit packing (else one row per sequence). seed / shuffle: the per-epoch permutation.
    num_epochs: passes over the data. num_threads / prefetch_buffer_size: grain reader threads and read-ahead
    batches in this process. worker_count: grain worker processes (0 = none; each costs a Python process).
    """

    seq_len: int
    global_batch_size: int
    packed: bool = False
    seed: int = 0
    num_epochs: int = 1
    shuffle: bool = True
    num_threads: int = 2
    prefetch_buffer_size: int = 4
    worker_count: int = 0

    def __post_init__(self) -> None:
        for name in ("seq_len", "global_batch_size", "num_epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("seed", "num_threads", "prefetch_buffer_size", "worker_count"):
            if getattr(self, name) < 0:
                raise ConfigError(f"data.{name} must be >= 0, got {getattr(self, name)}")


def epoch_order(num_rows: int, *, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The order in which epoch `epoch` visits rows 0..num_rows-1: a permutation seeded by (seed, epoch)."""
    if not shuffle:
        return np.arange(num_rows, dtype=np.int64)
    return np.random.default_rng([seed, epoch]).permutation(num_rows)


def plan_epochs(lengths: Sequence[int] | np.ndarray, config: PipelineConfig) -> BatchPlan:
    """The global batches of all epochs, one epoch after the other."""
    plans = []
    for epoch in range(config.num_epochs):
        order = epoch_order(len(lengths), seed=config.seed, epoch=epoch, shuffle=config.shuffle)
        if config.packed:
            plans.append(plan_packed(order, lengths, config.seq_len, config.global_batch_size))
        else:
            plans.append(plan_padded(order, config.global_batch_size))
    return BatchPlan.concatenate(plans)


class _BuildShare(grain.transforms.Map):
    """Batch index → this process's rows of that global batch as dense arrays (picklable for grain workers)."""

    def __init__(self, source: RowSource, plan: BatchPlan, seq_len: int, first: int, count: int, name: str | None):
        self._source, self._plan, self._seq_len = source, plan, seq_len
        self._first, self._count, self._name = first, count, name

    def map(self, element: int) -> Batch:
        sequences = self._plan.sequence_rows(int(element), self._first, self._count)
        checked = [
            [check_row(self._source[int(r)], index=int(r), source=self._name, seq_len=self._seq_len) for r in seq]
            for seq in sequences
        ]
        return build_batch(checked, self._seq_len)


def _process_index_and_count(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # only when not given: keeps grain worker processes free of jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ConfigError(f"process_index {process_index} is not in [0, process_count={process_count})")
    return process_index, process_count


def batch_dataset(
    rows: RowSource,
    config: PipelineConfig,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    source_name: str | None = None,
) -> grain.MapDataset:
    """A grain MapDataset whose k-th element is this process's share of global batch k.

    Args:
      rows: tokenized rows ({input_ids, labels}), random access; every row is validated here, up front, so a bad
        row fails before training (DataError naming `source_name`, the row and the field).
      config: the pipeline settings.
      process_index, process_count: this process and how many read the data (default: jax's); the global batch
        is split into `process_count` contiguous shares of global_batch_size / process_count sequences.
      source_name: the file the rows came from, for error messages.

    Returns:
      MapDataset of dicts of [global_batch_size / process_count, seq_len] numpy arrays (docs/ARCHITECTURE.md,
      "Batches"); `len()` is the number of optimizer steps, the same on every process.
    """
    index, count = _process_index_and_count(process_index, process_count)
    if config.global_batch_size % count:
        raise ConfigError(
            f"data.global_batch_size {config.global_batch_size} is not divisible by the {count} data processes"
        )
    if len(rows) == 0:
        raise ConfigError(f"no rows to train on in {source_name or 'the data source'}")
    lengths = np.fromiter(
        (len(check_row(rows[i], index=i, source=source_name, seq_len=config.seq_len)[0]) for i in range(len(rows))),
        dtype=np.int64,
        count=len(rows),
    )
    plan = plan_epochs(lengths, config)
    share = config.global_batch_size // count
    build = _BuildShare(rows, plan, config.seq_len, index * share, share, source_name)
    return grain.MapDataset.range(plan.num_batches).map(build)


def batch_iterator(dataset: grain.MapDataset, config: PipelineConfig) -> grain.DatasetIterator:
    """A checkpointable iterator over `dataset` with thread (and optionally process) prefetching.

    Save with `iterator.get_state()` (a JSON-serializable dict) and resume with `set_state` on a new iterator of
    the same dataset: the resumed run sees exactly the batches the original would have seen.
    """
    read_options = grain.ReadOptions(num_threads=config.num_threads, prefetch_buffer_size=config.prefetch_buffer_size)
    ds = dataset.to_iter_dataset(read_options)
    if config.worker_count:
        # grain reads absl flags when starting workers; outside absl.app they are unparsed: keep their defaults.
        if not absl_flags.FLAGS.is_parsed():
            absl_flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.worker_count))
    return iter(ds)
