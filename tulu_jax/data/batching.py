"""Tokenized rows → dense [B, T] batches (docs/ARCHITECTURE.md, "Batches"), padded or packed.

A row is HF-style: `input_ids` [n] and `labels` [n] (= input_ids where supervised, else -100). A batch holds
`input_ids`, `positions`, `segment_ids` (0 = padding), `targets` (next token within the same segment, 0 elsewhere)
and `loss_mask` (the target is supervised), all [B, T]. Every sequence (batch row) holds one or more whole rows:
padded = one row per sequence, packed = greedy first-fit of rows into sequences. Which rows go where is a
`BatchPlan`, computed from row lengths alone so that it is cheap, deterministic and identical on every process.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tulu_jax.errors import DataError

IGNORE_INDEX = -100
BATCH_KEYS = ("input_ids", "positions", "segment_ids", "targets", "loss_mask")
Batch = dict[str, np.ndarray]
CheckedRow = tuple[np.ndarray, np.ndarray]


def _int_field(row: Mapping[str, Any], field: str, index: int, source: str | None) -> np.ndarray:
    if field not in row:
        raise DataError(f"missing field (row has {sorted(row)})", file=source, row=index, field=field)
    values = np.asarray(row[field])
    if values.ndim != 1 or not (np.issubdtype(values.dtype, np.integer) or values.size == 0):
        raise DataError(
            f"expected a 1-D list of ints, got shape {values.shape} dtype {values.dtype}",
            file=source,
            row=index,
            field=field,
        )
    return values


def check_row(
    row: Mapping[str, Any], *, index: int, source: str | None = None, seq_len: int | None = None
) -> CheckedRow:
    """Validates one tokenized row and returns (input_ids, labels) as int32 arrays.

    Raises DataError naming `source`, the row `index` and the field when: a field is missing or not a 1-D int
    list, the row is empty, the two lengths differ, the row is longer than `seq_len` (truncation happens
    upstream), an id is outside [0, 2^31), or a label is neither -100 nor the token at its position.
    """
    if not isinstance(row, Mapping):
        raise DataError(
            f"expected a mapping with input_ids and labels, got {type(row).__name__}", file=source, row=index
        )
    ids = _int_field(row, "input_ids", index, source)
    labels = _int_field(row, "labels", index, source)
    if ids.size == 0:
        raise DataError("empty row", file=source, row=index, field="input_ids")
    if labels.shape != ids.shape:
        raise DataError(f"length {labels.size} != len(input_ids) {ids.size}", file=source, row=index, field="labels")
    if seq_len is not None and ids.size > seq_len:
        raise DataError(
            f"row has {ids.size} tokens, more than the sequence length {seq_len} (truncate upstream)",
            file=source,
            row=index,
            field="input_ids",
        )
    if ids.min() < 0 or ids.max() >= 2**31:
        raise DataError(
            f"token id out of range: min {ids.min()}, max {ids.max()}", file=source, row=index, field="input_ids"
        )
    bad = np.flatnonzero((labels != IGNORE_INDEX) & (labels != ids))
    if bad.size:
        t = int(bad[0])
        raise DataError(
            f"label {labels[t]} at position {t} is neither {IGNORE_INDEX} nor the input id {ids[t]}",
            file=source,
            row=index,
            field="labels",
        )
    return ids.astype(np.int32), labels.astype(np.int32)


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """Row placement: sequence s holds rows[seq_starts[s]:seq_starts[s + 1]] (in order; empty = all padding);
    batch k holds sequences [k·batch_size, (k+1)·batch_size)."""

    rows: np.ndarray
    seq_starts: np.ndarray
    batch_size: int

    @property
    def num_batches(self) -> int:
        """Number of batches in the plan."""
        return (len(self.seq_starts) - 1) // self.batch_size

    def sequence_rows(self, batch: int, first: int = 0, count: int | None = None) -> list[np.ndarray]:
        """Row indices of sequences [first, first + count) of batch `batch` (count defaults to the rest)."""
        if not 0 <= batch < self.num_batches:
            raise IndexError(f"batch {batch} out of range for a plan of {self.num_batches} batches")
        count = self.batch_size - first if count is None else count
        start = batch * self.batch_size + first
        bounds = self.seq_starts[start : start + count + 1]
        return [self.rows[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    @classmethod
    def concatenate(cls, plans: Sequence[BatchPlan]) -> BatchPlan:
        """The batches of `plans` one after the other (e.g. one plan per epoch)."""
        if not plans or len({p.batch_size for p in plans}) != 1:
            raise ValueError("concatenate needs at least one plan, all with the same batch_size")
        offsets = np.cumsum([0] + [len(p.rows) for p in plans[:-1]])
        starts = [plans[0].seq_starts[:1]] + [p.seq_starts[1:] + o for p, o in zip(plans, offsets, strict=True)]
        return cls(np.concatenate([p.rows for p in plans]), np.concatenate(starts), plans[0].batch_size)


def _plan_from_sequences(sequences: list[list[int]], batch_size: int) -> BatchPlan:
    sequences = sequences + [[]] * (-len(sequences) % batch_size)  # fill the last batch with empty sequences
    seq_starts = np.cumsum([0] + [len(s) for s in sequences], dtype=np.int64)
    rows = np.fromiter((r for s in sequences for r in s), dtype=np.int64, count=int(seq_starts[-1]))
    return BatchPlan(rows, seq_starts, batch_size)


def plan_padded(order: Sequence[int] | np.ndarray, batch_size: int) -> BatchPlan:
    """One row per sequence in `order`; the last batch is completed with empty (all-padding) sequences."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return _plan_from_sequences([[int(r)] for r in order], batch_size)


def plan_packed(
    order: Sequence[int] | np.ndarray, lengths: Sequence[int] | np.ndarray, seq_len: int, batch_size: int
) -> BatchPlan:
    """Greedy first-fit of rows (taken in `order`) into the `batch_size` sequences of the current batch.

    Each row goes into the first sequence with room for it; a row that fits in none closes the batch and opens
    the next one. Every row is placed exactly once; the result depends only on (order, lengths, seq_len,
    batch_size). A row longer than `seq_len` raises DataError naming the row.
    """
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")
    lengths = np.asarray(lengths, dtype=np.int64)
    sequences: list[list[int]] = []
    bins: list[list[int]] = [[] for _ in range(batch_size)]
    room = np.full(batch_size, seq_len, dtype=np.int64)
    for r in order:
        r = int(r)
        n = int(lengths[r])
        if not 1 <= n <= seq_len:
            raise DataError(f"row has {n} tokens; packing needs 1..{seq_len} (truncate upstream)", row=r)
        i = int(np.argmax(room >= n))
        if room[i] < n:  # fits nowhere: close this batch
            sequences.extend(bins)
            bins = [[] for _ in range(batch_size)]
            room[:] = seq_len
            i = 0
        bins[i].append(r)
        room[i] -= n
    if any(bins):
        sequences.extend(bins)
    return _plan_from_sequences(sequences, batch_size)


def build_batch(sequences: Sequence[Sequence[CheckedRow]], seq_len: int) -> Batch:
    """Dense batch arrays from checked rows grouped by sequence (one inner list per batch row, in order)."""
    num = len(sequences)
    batch = {key: np.zeros((num, seq_len), np.int32) for key in BATCH_KEYS[:-1]}
    batch["loss_mask"] = np.zeros((num, seq_len), bool)
    for b, rows in enumerate(sequences):
        offset = 0
        for segment, (ids, labels) in enumerate(rows, start=1):
            n = len(ids)
            if offset + n > seq_len:
                raise ValueError(f"sequence {b} holds {offset + n} tokens, more than seq_len {seq_len}")
            span = slice(offset, offset + n)
            batch["input_ids"][b, span] = ids
            batch["positions"][b, span] = np.arange(n, dtype=np.int32)
            batch["segment_ids"][b, span] = segment
            # The last token of a segment has no next token inside it: target 0, unsupervised.
            batch["targets"][b, offset : offset + n - 1] = ids[1:]
            batch["loss_mask"][b, offset : offset + n - 1] = labels[1:] != IGNORE_INDEX
            offset += n
    return batch


def make_batches(
    rows: Sequence[Mapping[str, Any]], seq_len: int, batch_size: int, *, packed: bool, source: str | None = None
) -> list[Batch]:
    """All `rows`, in order, as padded (one row per sequence) or packed (first-fit) batches of `batch_size`."""
    checked = [check_row(row, index=i, source=source, seq_len=seq_len) for i, row in enumerate(rows)]
    order = np.arange(len(checked))
    if packed:
        plan = plan_packed(order, [len(ids) for ids, _ in checked], seq_len, batch_size)
    else:
        plan = plan_padded(order, batch_size)
    return [
        build_batch([[checked[r] for r in seq] for seq in plan.sequence_rows(k)], seq_len)
        for k in range(plan.num_batches)
    ]
