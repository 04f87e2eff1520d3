"""Golden activation shardings: the 8B SFT step (2 layers, 256 sequences) traced on the mesh of every
sharding/*.yaml, each constrained activation with the PartitionSpec it gets. A change that silently replicates an activation (a lost
`constrain`, a changed rule) changes the file. After an intended change, regenerate with
`TULU_JAX_UPDATE_GOLDEN=1 python -m pytest tests/test_activation_golden.py` and review the diff."""

from __future__ import annotations

import os
import pathlib

import pytest

from tulu_jax import cli
from tulu_jax.stages.compile_check import format_constraints, trace_constraints

REPO = pathlib.Path(__file__).resolve().parent.parent
GOLDEN = REPO / "tests" / "golden" / "activation_shardings"
FILES = sorted(path.stem for path in (REPO / "sharding").glob("*.yaml"))
# Two layers trace as fast as 32 (scan); 256 sequences split over every file's batch axes (v6e-256 has 256).
OVERRIDES = ("model.overrides={num_layers: 2}", "train.global_batch_size=256")


@pytest.mark.parametrize("name", FILES)
def test_activation_shardings_of_the_8b_sft_step_match_the_golden_file(name, monkeypatch):
    for key, value in cli.QUIET_LIBTPU.items():
        monkeypatch.setenv(key, value)
    records = trace_constraints("sft", str(REPO / "configs" / "tulu3_8b_sft.yaml"),
                                str(REPO / "sharding" / f"{name}.yaml"), OVERRIDES)
    got = format_constraints(records) + "\n"
    golden = GOLDEN / f"{name}.txt"
    if os.environ.get("TULU_JAX_UPDATE_GOLDEN"):
        golden.write_text(got)
    assert golden.is_file(), f"{golden} is missing: run with TULU_JAX_UPDATE_GOLDEN=1"
    assert got == golden.read_text()
    # every activation the model names is constrained (none of the kinds disappeared)
    for axes in ("(batch, length, act_embed)", "(batch, length, act_heads, -)", "(batch, length, act_kv_heads, -)",
                 "(batch, length, act_mlp)", "(batch, length, act_vocab)", "(batch, length) "):
        assert axes in got
