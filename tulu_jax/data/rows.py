"""Reading and validating chat rows from JSONL, Parquet and saved `datasets` directories; weighted mixtures.

A row is `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...], ...}`. A malformed row raises
`DataError` naming the file, the row and the field; with `on_error="skip"` it is skipped and counted in `RowStats`
instead (up to a fraction of the rows, `check_bad_fraction`), and the caller reports the counts. Nothing is dropped
silently.

Row numbers: JSONL rows are numbered by line (1-based, as editors show them); Parquet and saved-dataset rows by
their index in the table (0-based, as `dataset[i]` takes them).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import pathlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

import numpy as np

from tulu_jax.errors import ConfigError, DataError

ROLES = ("system", "user", "assistant")
OnError = Literal["raise", "skip"]
# validate(row, file=..., row=...) raises DataError for a bad row; readers take one so that other row kinds
# (preference pairs, RLVR prompts) can reuse them.
Validator = Callable[..., None]


@dataclasses.dataclass(frozen=True)
class Row:
    """One validated row: its data, the file it came from and its row number there (see module docstring)."""

    data: dict[str, Any]
    file: str
    index: int


@dataclasses.dataclass
class RowStats:
    """What reading one source did: rows read, valid, skipped (by field), and rows a mixture selected from it."""

    source: str
    rows: int = 0
    valid: int = 0
    skipped: int = 0
    selected: int = 0
    skipped_by_field: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    examples: list[str] = dataclasses.field(default_factory=list)  # the first few skip reasons, verbatim
    skipped_rows: list[int] = dataclasses.field(default_factory=list)  # the first few skipped row numbers

    max_examples = 5

    def record_skip(self, error: DataError) -> None:
        """Counts one skipped row and keeps its message (and row number) if fewer than `max_examples` are kept."""
        self.skipped += 1
        self.skipped_by_field[error.field or "(row)"] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(str(error))
        if error.row is not None and len(self.skipped_rows) < self.max_examples:
            self.skipped_rows.append(error.row)

    def summary(self) -> str:
        """One line for logs: counts, the skip reasons by field and the first skipped row numbers."""
        line = f"{self.source}: {self.rows} rows, {self.valid} valid, {self.skipped} skipped"
        if self.skipped_by_field:
            line += " (" + ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped_by_field.items())) + ")"
        if self.skipped_rows:
            more = ", …" if self.skipped > len(self.skipped_rows) else ""
            line += " at rows " + ", ".join(map(str, self.skipped_rows)) + more
        return line + (f", {self.selected} selected" if self.selected else "")


def check_bad_fraction(stats: RowStats, max_bad_fraction: float) -> None:
    """Raises DataError when more than `max_bad_fraction` of the rows `stats` counted were skipped as malformed.

    Recipe runs skip and count a few bad rows (a 939k-row mixture has some) but stop on a broken source.
    """
    if stats.skipped > max_bad_fraction * stats.rows:
        examples = "".join(f"\n  e.g. {example}" for example in stats.examples)
        raise DataError(
            f"{stats.skipped} of {stats.rows} rows are malformed, more than data.max_bad_fraction = "
            f"{max_bad_fraction:g} of them: {stats.summary()}{examples}"
        )


def validate_messages(
    messages: Any,
    *,
    file: str | None = None,
    row: int | None = None,
    field: str = "messages",
    require_assistant: bool = True,
) -> None:
    """Raises DataError unless `messages` is a non-empty list of {role, content: str} dicts with known roles.

    With require_assistant, the conversation needs an assistant turn, and may not start with one (there would be no
    prompt to condition on, and no generation prompt to mask).
    """

    def fail(reason: str, where: str = field) -> DataError:
        return DataError(reason, file=file, row=row, field=where)

    if not isinstance(messages, list):
        raise fail(f"expected a list of messages, got {type(messages).__name__}")
    if not messages:
        raise fail("the conversation is empty")
    for i, message in enumerate(messages):
        where = f"{field}[{i}]"
        if not isinstance(message, Mapping):
            raise fail(f"expected a message object, got {type(message).__name__}", where)
        role = message.get("role")
        if role not in ROLES:
            raise fail(f"unknown role {role!r}; expected one of {ROLES}", f"{where}.role")
        content = message.get("content")
        if not isinstance(content, str):
            raise fail(f"content must be a string, got {type(content).__name__}", f"{where}.content")
    if require_assistant:
        if not any(m["role"] == "assistant" for m in messages):
            raise fail("no assistant turn: nothing to train on")
        if messages[0]["role"] == "assistant":
            raise fail("the conversation starts with an assistant turn (no prompt before it)", f"{field}[0].role")


def has_assistant_turn(messages: Any) -> bool:
    """Whether `messages` (validated or not) is a list holding an assistant message."""
    return isinstance(messages, list) and any(isinstance(m, Mapping) and m.get("role") == "assistant" for m in messages)


def validate_sft_row(data: Any, *, file: str | None = None, row: int | None = None) -> None:
    """Raises DataError unless `data` is an object whose `messages` pass `validate_messages`.

    A well-formed conversation without an assistant turn is valid here: it has nothing to train on, so the SFT data
    path drops and counts it (as open-instruct trains on nothing from it) instead of failing the run.
    """
    if not isinstance(data, Mapping):
        raise DataError(f"expected a JSON object, got {type(data).__name__}", file=file, row=row)
    if "messages" not in data:
        raise DataError("missing field", file=file, row=row, field="messages")
    validate_messages(data["messages"], file=file, row=row, require_assistant=has_assistant_turn(data["messages"]))


def validate_text_row(data: Any, *, file: str | None = None, row: int | None = None) -> None:
    """Raises DataError unless `data` is an object with a non-empty string `text` (a plain-text document)."""
    if not isinstance(data, Mapping):
        raise DataError(f"expected a JSON object, got {type(data).__name__}", file=file, row=row)
    if "text" not in data:
        raise DataError("missing field", file=file, row=row, field="text")
    if not isinstance(data["text"], str):
        raise DataError(f"expected a string, got {type(data['text']).__name__}", file=file, row=row, field="text")
    if not data["text"].strip():
        raise DataError("empty document", file=file, row=row, field="text")


class _Unreadable:
    """A raw record that could not be decoded (bad JSON or bad UTF-8): reported as a row error."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _jsonl_records(path: pathlib.Path) -> Iterator[tuple[str, int, Any]]:
    with path.open("rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            if not raw.strip():  # blank lines (e.g. a trailing one) are not rows
                continue
            try:
                yield str(path), lineno, json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as err:
                yield str(path), lineno, _Unreadable(f"not valid UTF-8: {err}")
            except json.JSONDecodeError as err:
                yield str(path), lineno, _Unreadable(f"not valid JSON: {err}")


def _parquet_records(path: pathlib.Path) -> Iterator[tuple[str, int, Any]]:
    import pyarrow.parquet as pq

    index = 0
    # Streamed by record batch: a large file never has to fit in memory as Python objects.
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            yield str(path), index, record
            index += 1


def _saved_dataset_records(path: pathlib.Path, split: str) -> Iterator[tuple[str, int, Any]]:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"no split {split!r} in the saved dataset (it has {sorted(loaded)})", file=str(path))
        loaded = loaded[split]
    for index, record in enumerate(loaded):
        yield str(path), index, record


def _records(path: pathlib.Path, split: str) -> Iterator[tuple[str, int, Any]]:
    if not path.exists():
        raise DataError("no such file or directory", file=str(path))
    if path.is_dir():
        if any((path / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json")):
            yield from _saved_dataset_records(path, split)
            return
        parquet_files = sorted(path.glob("*.parquet"))
        if not parquet_files:
            raise DataError("directory is neither a saved `datasets` dataset nor holds *.parquet files", file=str(path))
        for file in parquet_files:
            yield from _parquet_records(file)
    elif path.suffix in (".jsonl", ".json"):
        yield from _jsonl_records(path)
    elif path.suffix == ".parquet":
        yield from _parquet_records(path)
    else:
        raise DataError(
            "unsupported data source: expected .jsonl/.json (JSON lines), .parquet, a directory of .parquet files or "
            "a directory saved with datasets' save_to_disk",
            file=str(path),
        )


def _check_on_error(on_error: str) -> None:
    if on_error not in ("raise", "skip"):
        raise ConfigError(f"on_error must be 'raise' or 'skip', got {on_error!r}")


def iter_rows(
    path: str | os.PathLike[str],
    stats: RowStats,
    *,
    on_error: OnError = "raise",
    validate: Validator = validate_sft_row,
    split: str = "train",
) -> Iterator[Row]:
    """The valid rows of one source (JSONL, Parquet file or folder, saved dataset), counting into `stats`.

    A bad row raises DataError (on_error="raise") or is skipped and counted (on_error="skip").
    `split` picks the split of a saved DatasetDict.
    """
    return validated_rows(_records(pathlib.Path(path), split), stats, on_error=on_error, validate=validate)


def validated_rows(
    records: Iterable[tuple[str, int, Any]], stats: RowStats, *, on_error: OnError = "raise",
    validate: Validator = validate_sft_row,
) -> Iterator[Row]:
    """The valid rows among (file, row index, record) triples, counting into `stats` (see `iter_rows`)."""
    _check_on_error(on_error)
    for file, index, record in records:
        stats.rows += 1
        try:
            if isinstance(record, _Unreadable):
                raise DataError(record.reason, file=file, row=index)
            validate(record, file=file, row=index)
        except DataError as err:
            if on_error == "raise":
                raise
            stats.record_skip(err)
            continue
        stats.valid += 1
        yield Row(record, file, index)


def read_rows(
    path: str | os.PathLike[str],
    *,
    on_error: OnError = "raise",
    validate: Validator = validate_sft_row,
    split: str = "train",
) -> tuple[list[Row], RowStats]:
    """All valid rows of one source and the counts (see `iter_rows`)."""
    stats = RowStats(str(path))
    return list(iter_rows(path, stats, on_error=on_error, validate=validate, split=split)), stats


@dataclasses.dataclass(frozen=True)
class Source:
    """One source of a mixture: a path plus either `weight` (the fraction of its valid rows to take, as in
    open-instruct's dataset_mixer; above 1 repeats rows) or `rows` (an exact count; above the row count repeats rows).
    Neither means all rows once."""

    path: str
    weight: float | None = None
    rows: int | None = None
    split: str = "train"

    def __post_init__(self) -> None:
        if self.weight is not None and self.rows is not None:
            raise ConfigError(f"source {self.path}: give weight or rows, not both")
        if self.weight is not None and not (math.isfinite(self.weight) and self.weight >= 0):
            raise ConfigError(f"source {self.path}: weight must be a finite number >= 0, got {self.weight!r}")
        if self.rows is not None and (isinstance(self.rows, bool) or not isinstance(self.rows, int) or self.rows < 0):
            raise ConfigError(f"source {self.path}: rows must be an integer >= 0, got {self.rows!r}")

    def target(self, available: int) -> int:
        """How many rows to take from a source with `available` valid rows."""
        if self.rows is not None:
            return self.rows
        return round((1.0 if self.weight is None else self.weight) * available)


def _pick(count: int, available: int, rng: np.random.Generator) -> np.ndarray:
    """`count` row indices out of `available`: whole passes over all rows, then a random subset for the rest."""
    whole, rest = divmod(count, available)
    return np.concatenate([np.tile(np.arange(available), whole), np.sort(rng.permutation(available)[:rest])])


def mix_sources(
    sources: Sequence[Source],
    *,
    seed: int,
    on_error: OnError = "raise",
    validate: Validator = validate_sft_row,
    shuffle: bool = True,
    max_bad_fraction: float = 1.0,
) -> tuple[list[Row], list[RowStats]]:
    """A weighted mixture of several sources, deterministic in `seed`; also the per-source counts.

    With on_error="skip", a source more than `max_bad_fraction` of whose rows are malformed raises DataError.

    Each source's subset is drawn with its own generator seeded by (seed, source position), so changing one source
    does not reshuffle the others; with `shuffle`, the concatenated mixture is then permuted by `seed`.
    """
    if not sources:
        raise ConfigError("a data mixture needs at least one source")
    mixture: list[Row] = []
    all_stats = []
    for position, source in enumerate(sources):
        rows, stats = read_rows(source.path, on_error=on_error, validate=validate, split=source.split)
        check_bad_fraction(stats, max_bad_fraction)
        count = source.target(len(rows))
        if count and not rows:
            raise DataError(f"{count} rows requested but the source has no valid rows", file=source.path)
        if count:
            chosen = _pick(count, len(rows), np.random.default_rng([seed, position]))
            mixture.extend(rows[i] for i in chosen)
        stats.selected = count
        all_stats.append(stats)
    if shuffle:
        order = np.random.default_rng([seed, len(sources)]).permutation(len(mixture))
        mixture = [mixture[i] for i in order]
    return mixture, all_stats
