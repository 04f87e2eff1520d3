"""`compile-check --table`: the rows that need no compilation (a batch that does not split over the file's batch
axes; a state too large for the chip), checked against the Llama 3.1 405B parameter count worked out by hand."""

from __future__ import annotations

import pytest

from tulu_jax import cli
from tulu_jax.stages.memory_table import HEADER, TableRow, table_row


@pytest.fixture(autouse=True)
def quiet_libtpu(monkeypatch):
    for key, value in cli.QUIET_LIBTPU.items():
        monkeypatch.setenv(key, value)


def test_a_state_larger_than_the_chip_is_reported_without_compiling():
    row = table_row("405b", "sft", "v5p-64")
    # Llama 3.1 405B: embedding + LM head, per layer q/o (h × 128·128), k/v (h × 8·128), 3 MLP matrices, 2 norms.
    h, i, layers, vocab = 16384, 53248, 126, 128256
    params = 2 * vocab * h + layers * (2 * h * 128 * 128 + 2 * h * 8 * 128 + 3 * h * i + 2 * h) + h
    state_gib = 12 * params / 32 / 2**30  # float32 weights + Adam's two moments, over 32 chips
    batch_gib = 256 // 32 * 4096 * (4 * 4 + 1) / 2**30  # this chip's rows: 4 int32 keys and a bool mask
    assert row.fits is False and row.gib is None and row.compile_seconds is None
    assert f"alone need {state_gib + batch_gib:.1f} GiB per chip of 95 GiB (not compiled)" in row.note


def test_a_batch_that_does_not_split_over_the_batch_axes_is_a_note():
    row = table_row("8b", "sft", "v6e-256")
    assert row.fits is None
    assert row.note.startswith("not compiled: train.global_batch_size 128 is not a multiple of")


def test_markdown_rows_match_the_header():
    done = TableRow("8b", "sft", "v5p-64", gib=13.46, hbm_gib=95, fits=True, compile_seconds=41.6, tflops=5.52,
                    best_mfu=0.614)
    assert done.markdown() == "| 8B | sft | v5p-64 | 13.5 / 95 | yes | 42 | 5.5 | 61% |  |"
    assert TableRow("70b", "dpo", "v6e-256", note="why").markdown() == (
        "| 70B | dpo | v6e-256 | — | — | — | — | — | why |")
    assert done.markdown().count("|") == HEADER.splitlines()[0].count("|")
