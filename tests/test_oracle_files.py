"""The vendored oracle files: the README's table covers exactly the files present, and a changed file is refused."""

from __future__ import annotations

import lzma
import shutil

import pytest

from oracle_files import ORACLES, checksums, decompress_verified

# Row counts of the originals (their README), counted here independently of the checksums.
ROWS = {
    "ifeval/input_data.jsonl": 541,
    "ifeval/input_response_data_gpt4_20231107_145030.jsonl": 541,
    "ifeval/eval_results_strict.jsonl": 540,
    "ifeval/eval_results_loose.jsonl": 540,
    "gsm8k/test.jsonl": 1319,
    "gsm8k/example_model_solutions.jsonl": 1319,
    "math/test.jsonl": 500,
}


def test_checksum_table_lists_every_vendored_file():
    present = {str(p.relative_to(ORACLES))[: -len(".xz")] for p in ORACLES.rglob("*.xz")}
    assert set(checksums()) == present == set(ROWS)


def test_decompressed_files_have_the_original_row_counts(oracles_dir):
    for relative, rows in ROWS.items():
        assert len((oracles_dir / relative).read_text().splitlines()) == rows, relative


def test_a_changed_file_is_refused(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(ORACLES, source)
    target = source / "math" / "test.jsonl.xz"
    target.write_bytes(lzma.compress(lzma.decompress(target.read_bytes()).replace(b"\\boxed", b"\\fbox", 1)))
    with pytest.raises(ValueError, match=r"math/test\.jsonl\.xz: sha256"):
        decompress_verified(tmp_path / "out", source)
