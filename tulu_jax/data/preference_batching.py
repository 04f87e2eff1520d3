"""Tokenized preference pairs → dense padded batches, and their grain pipeline (shuffle, process shares, resume).

A pair batch of B pairs holds, for each side `s` in (chosen, rejected), the five [B, T] arrays of an SFT batch
(docs/ARCHITECTURE.md, "Batches") under the keys `s_input_ids`, `s_positions`, `s_segment_ids`, `s_targets`,
`s_loss_mask` (one conversation per row, padded), plus `pair_index` int32 [B]: the pair's position in the data
(-1 for the empty pairs that complete the last batch of an epoch). With a reference table, the batch also holds
`ref_chosen_logps` and `ref_rejected_logps` float32 [B] looked up by `pair_index` (0 for padding pairs):
`with_reference` for one batch, `add_reference` for a dataset.

The plan, the shuffle and the iterator state are those of `tulu_jax.data.pipeline` (padded plan, per-epoch
permutation seeded by (seed, epoch), `{"next_index": k}` state), so a resumed run sees the same batches.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import grain
import numpy as np

from tulu_jax.data.batching import BATCH_KEYS, Batch, BatchPlan, CheckedRow, build_batch, check_row
from tulu_jax.data.pipeline import PipelineConfig, _process_index_and_count, plan_epochs
from tulu_jax.data.preference import SIDES, Pair
from tulu_jax.errors import ConfigError, DataError

PAIR_INDEX = "pair_index"
REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")
PAIR_BATCH_KEYS = tuple(f"{side}_{key}" for side in SIDES for key in BATCH_KEYS) + (PAIR_INDEX,)
CheckedPair = tuple[CheckedRow, CheckedRow]


class PairLogps(NamedTuple):
    """Sequence log-probs of every pair, by pair index: chosen and rejected float32 [N]."""

    chosen: np.ndarray
    rejected: np.ndarray


def check_pair(pair: Mapping[str, Any], *, index: int, source: str | None = None, seq_len: int | None = None
               ) -> CheckedPair:
    """Both sides of a tokenized pair checked like SFT rows (`check_row`); DataError fields name the side."""
    if not isinstance(pair, Mapping):
        raise DataError(f"expected a tokenized pair mapping, got {type(pair).__name__}", file=source, row=index)
    checked = []
    for side in SIDES:
        view = {key: pair[f"{side}_{key}"] for key in ("input_ids", "labels") if f"{side}_{key}" in pair}
        try:
            checked.append(check_row(view, index=index, source=source, seq_len=seq_len))
        except DataError as err:
            raise DataError(err.reason, file=source, row=index, field=f"{side}_{err.field or 'input_ids'}") from None
    return checked[0], checked[1]


def build_pair_batch(pairs: Sequence[tuple[int, CheckedPair] | None], seq_len: int) -> Batch:
    """Dense pair batch (module docstring) from (pair_index, checked pair) entries; None is a padding pair."""
    batch: Batch = {}
    for side_number, side in enumerate(SIDES):
        dense = build_batch([[entry[1][side_number]] if entry is not None else [] for entry in pairs], seq_len)
        batch.update({f"{side}_{key}": value for key, value in dense.items()})
    batch[PAIR_INDEX] = np.asarray([entry[0] if entry is not None else -1 for entry in pairs], np.int32)
    return batch


def with_reference(batch: Batch, reference: PairLogps) -> Batch:
    """The batch plus `ref_chosen_logps` / `ref_rejected_logps` [B] looked up by pair index (0 for padding)."""
    index = batch[PAIR_INDEX]
    real = index >= 0
    out = dict(batch)
    for key, table in zip(REF_KEYS, reference, strict=True):
        out[key] = np.where(real, np.asarray(table, np.float32)[np.maximum(index, 0)], 0.0).astype(np.float32)
    return out


def _check_reference(reference: PairLogps | None, num_pairs: int) -> None:
    if reference is None:
        return
    for name, table in zip(PairLogps._fields, reference, strict=True):
        if np.shape(table) != (num_pairs,):
            raise ConfigError(
                f"reference {name} log-probs have shape {np.shape(table)}, expected ({num_pairs},): one per pair"
            )


def _plan_batch(plan: BatchPlan, batch: int, first: int, count: int) -> list[int | None]:
    return [int(rows[0]) if len(rows) else None for rows in plan.sequence_rows(batch, first, count)]


def make_pair_batches(
    pairs: Sequence[Pair], seq_len: int, batch_size: int, *, reference: PairLogps | None = None,
    source: str | None = None,
) -> list[Batch]:
    """All pairs in order as padded pair batches of `batch_size` (the last completed with padding pairs)."""
    _check_reference(reference, len(pairs))
    checked = [check_pair(pair, index=i, source=source, seq_len=seq_len) for i, pair in enumerate(pairs)]
    batches = []
    for start in range(0, len(checked), batch_size):
        entries: list[tuple[int, CheckedPair] | None] = [
            (i, checked[i]) for i in range(start, min(start + batch_size, len(checked)))
        ]
        entries += [None] * (batch_size - len(entries))
        batch = build_pair_batch(entries, seq_len)
        batches.append(batch if reference is None else with_reference(batch, reference))
    return batches


class _BuildPairShare(grain.transforms.Map):
    """Batch index → this process's pairs of that global batch as a dense pair batch (picklable for workers)."""

    def __init__(self, pairs: Sequence[Pair], plan: BatchPlan, seq_len: int, first: int, count: int,
                 name: str | None):
        self._pairs, self._plan, self._seq_len = pairs, plan, seq_len
        self._first, self._count, self._name = first, count, name

    def map(self, element: int) -> Batch:
        entries = [
            None if r is None else (r, check_pair(self._pairs[r], index=r, source=self._name, seq_len=self._seq_len))
            for r in _plan_batch(self._plan, int(element), self._first, self._count)
        ]
        return build_pair_batch(entries, self._seq_len)


class _AddReference(grain.transforms.Map):
    """Pair batch → the same batch with its pairs' reference log-probs (picklable for workers)."""

    def __init__(self, reference: PairLogps):
        self._reference = reference

    def map(self, element: Batch) -> Batch:
        return with_reference(element, self._reference)


def preference_dataset(
    pairs: Sequence[Pair],
    config: PipelineConfig,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    source_name: str | None = None,
) -> grain.MapDataset:
    """A grain MapDataset whose k-th element is this process's share of global pair batch k.

    Args:
      pairs: tokenized pairs (`load_preference_pairs`); all are checked here, up front, so a bad one fails before
        training (DataError naming `source_name`, the pair and the side's field).
      config: the pipeline settings; `packed` must be False (pairs are padded, one conversation per row).
      process_index, process_count: this process and how many read (default: jax's); each reads a contiguous share
        of global_batch_size / process_count pairs of every batch.
      source_name: for error messages.

    Returns:
      MapDataset of pair batches [global_batch_size / process_count, ...] (module docstring); `len()` is the number
      of optimizer steps. Add reference log-probs with `add_reference`; iterate with
      `tulu_jax.data.pipeline.batch_iterator` (checkpointable state).
    """
    if config.packed:
        raise ConfigError("preference pairs are padded, one conversation per row: set data.packing to false")
    index, count = _process_index_and_count(process_index, process_count)
    if config.global_batch_size % count:
        raise ConfigError(
            f"data.global_batch_size {config.global_batch_size} is not divisible by the {count} data processes"
        )
    if not pairs:
        raise ConfigError(f"no preference pairs to train on in {source_name or 'the data source'}")
    lengths = np.asarray(
        [max(len(side[0]) for side in check_pair(p, index=i, source=source_name, seq_len=config.seq_len))
         for i, p in enumerate(pairs)],
        np.int64,
    )
    plan = plan_epochs(lengths, config)
    share = config.global_batch_size // count
    build = _BuildPairShare(pairs, plan, config.seq_len, index * share, share, source_name)
    return grain.MapDataset.range(plan.num_batches).map(build)


def add_reference(dataset: grain.MapDataset, reference: PairLogps, num_pairs: int) -> grain.MapDataset:
    """`dataset` (from `preference_dataset` over `num_pairs` pairs) with reference log-probs in every batch."""
    _check_reference(reference, num_pairs)
    return dataset.map(_AddReference(reference))
