"""Exceptions raised on bad input: each names the file, row and field it is about."""

from __future__ import annotations


class TuluJaxError(Exception):
    """Base class for every error tulu-jax raises on bad input."""


class ConfigError(TuluJaxError):
    """An unknown key, a wrong type or a missing field in a config file or override."""


class DataError(TuluJaxError):
    """A malformed data row; the message names file, row number and field."""

    def __init__(self, reason: str, *, file: str | None = None, row: int | None = None, field: str | None = None):
        self.reason, self.file, self.row, self.field = reason, file, row, field
        where = ", ".join(
            part
            for part in (
                f"file {file}" if file is not None else "",
                f"row {row}" if row is not None else "",
                f"field {field!r}" if field is not None else "",
            )
            if part
        )
        super().__init__(f"{where}: {reason}" if where else reason)


class CheckpointError(TuluJaxError):
    """A checkpoint or HF model directory that does not fit the model it is loaded into."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint whose files are unreadable or whose arrays fail their integrity check (resume falls back)."""


class TrainingError(TuluJaxError):
    """A run that cannot go on, e.g. too many consecutive non-finite steps; names the step and the checkpoint."""
