"""Offline sparse distillation targets on disk, and the grain pipeline that streams them back with their token rows.

A target directory holds `manifest.json` (teacher, tokenizer hash, K, mode, rows per shard, row count) and shards
`shard_00000.npz`, ... Each shard stores its token rows (ragged `input_ids` / `labels`, concatenated, with offsets)
and, for every DISTILLED position of every row (position t whose next token is supervised: labels[t + 1] != -100,
the same positions as a batch's `loss_mask`), the teacher's K token ids (int32) and probabilities (float16). A
shard is written to a temporary name and renamed, so a file under its final name is complete: a resumed or
multi-host run writes each shard once.

`distill_dataset` plans batches exactly like `tulu_jax.data.pipeline.batch_dataset` (padded or packed, per-epoch
shuffle, this process's share) and adds `teacher_ids` / `teacher_probs` [B, T, K] aligned with the batch positions
(zeros where nothing is distilled).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from tulu_jax.data.batching import IGNORE_INDEX, build_batch, check_row
from tulu_jax.data.pipeline import PipelineConfig, _process_index_and_count, plan_epochs
from tulu_jax.errors import ConfigError, DataError

MANIFEST = "manifest.json"
MODES = ("top_k", "sampled")


@dataclasses.dataclass(frozen=True)
class TargetsManifest:
    """What a target directory holds: the teacher (path or preset), its tokenizer's vocabulary hash, K, the mode
    (top_k | sampled), rows per shard, the row count and the data format (chat | text)."""

    teacher: str
    tokenizer_hash: str
    k: int
    mode: str
    rows_per_shard: int
    num_rows: int
    format: str

    @property
    def num_shards(self) -> int:
        """Shards of the full row set (the last one may be short)."""
        return -(-self.num_rows // self.rows_per_shard)

    def save(self, directory: pathlib.Path) -> None:
        """Write manifest.json atomically."""
        _atomic_write(directory / MANIFEST, lambda f: f.write(json.dumps(dataclasses.asdict(self), indent=2).encode()))

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> TargetsManifest:
        """Read `directory`/manifest.json; DataError naming the file when it is missing or malformed."""
        path = pathlib.Path(directory) / MANIFEST
        if not path.is_file():
            raise DataError("no distillation targets here (run `tulu-jax distill-targets` first)", file=str(path))
        try:
            return cls(**json.loads(path.read_text()))
        except (TypeError, ValueError) as e:
            raise DataError(f"malformed manifest: {e}", file=str(path)) from None


def shard_path(directory: str | os.PathLike[str], index: int) -> pathlib.Path:
    """The final name of shard `index`."""
    return pathlib.Path(directory) / f"shard_{index:05d}.npz"


def _atomic_write(path: pathlib.Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)  # a reader sees the whole file or none


def distilled_positions(labels: np.ndarray) -> np.ndarray:
    """Row positions t whose next token is supervised (labels[t + 1] != -100): where a teacher target is stored."""
    return np.flatnonzero(np.asarray(labels)[1:] != IGNORE_INDEX)


def write_shard(directory: str | os.PathLike[str], index: int, rows: Sequence[Mapping[str, np.ndarray]]) -> None:
    """Write shard `index` atomically. Each row: input_ids [n], labels [n], teacher_ids / teacher_probs
    [len(distilled_positions(labels)), K]."""
    lengths = np.array([len(r["input_ids"]) for r in rows], np.int64)
    counts = np.array([len(r["teacher_ids"]) for r in rows], np.int64)
    arrays = {
        "input_ids": np.concatenate([r["input_ids"] for r in rows]).astype(np.int32),
        "labels": np.concatenate([r["labels"] for r in rows]).astype(np.int32),
        "row_offsets": np.concatenate([[0], np.cumsum(lengths)]),
        "target_offsets": np.concatenate([[0], np.cumsum(counts)]),
        "teacher_ids": np.concatenate([r["teacher_ids"] for r in rows]).astype(np.int32),
        "teacher_probs": np.concatenate([r["teacher_probs"] for r in rows]).astype(np.float16),
    }
    _atomic_write(shard_path(directory, index), lambda f: np.savez(f, **arrays))


class TargetRows:
    """Random access over the rows of a target directory: row i → {input_ids, labels, teacher_ids, teacher_probs}
    (a grain data source; shards are opened on demand, the last few kept)."""

    def __init__(self, directory: str | os.PathLike[str], *, cache_shards: int = 2):
        self.directory = pathlib.Path(directory)
        self.manifest = TargetsManifest.load(self.directory)
        missing = [i for i in range(self.manifest.num_shards) if not shard_path(self.directory, i).is_file()]
        if missing:
            raise DataError(f"{len(missing)} of {self.manifest.num_shards} target shards are missing (first: "
                            f"{shard_path(self.directory, missing[0]).name}); finish `tulu-jax distill-targets`",
                            file=str(self.directory))
        self._cache: dict[int, dict[str, np.ndarray]] = {}
        self._cache_shards = cache_shards

    def __len__(self) -> int:
        return self.manifest.num_rows

    def _shard(self, index: int) -> dict[str, np.ndarray]:
        if index not in self._cache:
            with np.load(shard_path(self.directory, index)) as f:
                shard = {key: f[key] for key in f.files}
            while len(self._cache) >= self._cache_shards:
                self._cache.pop(next(iter(self._cache)))
            self._cache[index] = shard
        return self._cache[index]

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        shard_index, j = divmod(int(i), self.manifest.rows_per_shard)
        shard = self._shard(shard_index)
        rows, targets = shard["row_offsets"], shard["target_offsets"]
        row = slice(rows[j], rows[j + 1])
        target = slice(targets[j], targets[j + 1])
        out = {"input_ids": shard["input_ids"][row], "labels": shard["labels"][row],
               "teacher_ids": shard["teacher_ids"][target], "teacher_probs": shard["teacher_probs"][target]}
        if len(out["teacher_ids"]) != len(distilled_positions(out["labels"])):
            raise DataError("teacher targets do not match the row's supervised tokens",
                            file=str(shard_path(self.directory, shard_index)), row=j, field="teacher_ids")
        return out


def build_distill_batch(sequences: Sequence[Sequence[Mapping[str, np.ndarray]]], seq_len: int, k: int) -> dict:
    """A dense LM batch (`tulu_jax.data.batching.build_batch`) plus teacher_ids int32 / teacher_probs float16
    [B, T, K] at the distilled positions of each row (same offsets as the batch's segments)."""
    checked = [[check_row(row, index=0, seq_len=seq_len) for row in rows] for rows in sequences]
    batch = build_batch(checked, seq_len)
    ids = np.zeros((len(sequences), seq_len, k), np.int32)
    probs = np.zeros((len(sequences), seq_len, k), np.float16)
    for b, rows in enumerate(sequences):
        offset = 0
        for row in rows:
            where = offset + distilled_positions(row["labels"])
            ids[b, where], probs[b, where] = row["teacher_ids"], row["teacher_probs"]
            offset += len(row["input_ids"])
    batch["teacher_ids"], batch["teacher_probs"] = ids, probs
    return batch


class _BuildDistillShare(grain.transforms.Map):
    """Batch index → this process's share of that global batch with its teacher targets."""

    def __init__(self, source: TargetRows, plan: Any, seq_len: int, first: int, count: int):
        self._source, self._plan, self._seq_len, self._first, self._count = source, plan, seq_len, first, count

    def map(self, element: int) -> dict:
        sequences = self._plan.sequence_rows(int(element), self._first, self._count)
        rows = [[self._source[int(r)] for r in seq] for seq in sequences]
        return build_distill_batch(rows, self._seq_len, self._source.manifest.k)


def distill_dataset(source: TargetRows, config: PipelineConfig, *, process_index: int | None = None,
                    process_count: int | None = None) -> grain.MapDataset:
    """A grain MapDataset whose k-th element is this process's share of global batch k (LM batch fields plus
    teacher_ids / teacher_probs); `len()` is the number of optimizer steps."""
    index, count = _process_index_and_count(process_index, process_count)
    if config.global_batch_size % count:
        raise ConfigError(f"global_batch_size {config.global_batch_size} does not split over {count} processes")
    lengths = np.array([len(source[i]["input_ids"]) for i in range(len(source))], np.int64)
    if lengths.size and lengths.max() > config.seq_len:
        raise ConfigError(f"{source.directory}: rows of up to {lengths.max()} tokens exceed data.max_seq_len "
                          f"{config.seq_len} (write the targets with the same max_seq_len)")
    plan = plan_epochs(lengths, config)
    share = config.global_batch_size // count
    return grain.MapDataset.range(plan.num_batches).map(
        _BuildDistillShare(source, plan, config.seq_len, index * share, share))
