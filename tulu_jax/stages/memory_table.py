"""`tulu-jax compile-check --table`: the per-chip memory of every recipe config on every pod sharding file.

Each row is one `compile_check` (the stage's real train step, AOT-compiled for the topology with libtpu from this
host): per-chip GiB against the chip's HBM, whether it fits, the compile time and the compiled program's FLOPs
from XLA's cost analysis. A config whose batch cannot be split over a file's batch axes gets its ConfigError as
the note; a state whose arguments alone exceed the HBM is reported without compiling. The output is markdown
(docs/memory.md holds a copy); rows stream to stderr as they finish because the whole table takes a while.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from tulu_jax.errors import ConfigError
from tulu_jax.stages.compile_check import compile_check
from tulu_jax.stages.paths import resolve_path

MODELS = ("8b", "70b", "405b")
STAGES = ("sft", "dpo")
SHARDINGS = ("v5p-64", "v5p-256", "v6e-256", "v5p-1024")
_GIB = 1024**3
_NOTE_CHARS = 200


@dataclasses.dataclass
class TableRow:
    """One cell of the grid: what was compiled and what XLA said."""

    model: str
    stage: str
    sharding: str
    gib: float | None = None
    hbm_gib: float | None = None
    fits: bool | None = None
    compile_seconds: float | None = None
    tflops: float | None = None
    note: str = ""

    def markdown(self) -> str:
        """`| 8B | sft | v5p-64 | 13.4 / 95 | yes | 205 | 1234.5 | |`."""
        memory = "—" if self.gib is None else f"{self.gib:.1f} / {self.hbm_gib:.0f}"
        fits = {True: "yes", False: "**no**", None: "—"}[self.fits]
        seconds = "—" if self.compile_seconds is None else f"{self.compile_seconds:.0f}"
        tflops = "—" if self.tflops is None else f"{self.tflops:,.1f}"
        return (f"| {self.model.upper()} | {self.stage} | {self.sharding} | {memory} | {fits} | {seconds} | {tflops} "
                f"| {self.note} |")


HEADER = ("| model | stage | sharding | GiB per chip / HBM | fits | compile s | TFLOP per chip per step (XLA) "
          "| note |\n|---|---|---|---|---|---|---|---|")


def table_row(model: str, stage: str, sharding: str, overrides: Sequence[str] = ()) -> TableRow:
    """Compile configs/tulu3_<model>_<stage>.yaml for sharding/<sharding>.yaml and summarize the result."""
    row = TableRow(model, stage, sharding)
    config, sharding_path = f"configs/tulu3_{model}_{stage}.yaml", f"sharding/{sharding}.yaml"
    try:
        result = compile_check(stage, str(resolve_path(config)), str(resolve_path(sharding_path)), tuple(overrides))
    except ConfigError as e:
        row.note = f"not compiled: {str(e).split(': ', 1)[-1]}"
        return row
    row.fits = result.fits
    row.compile_seconds = result.compile_seconds or None
    row.tflops = None if result.flops is None else result.flops / 1e12
    if result.report is not None:
        row.gib = result.report["total_bytes"] / _GIB
        row.hbm_gib = (result.report["hbm_bytes"] or 0) / _GIB
    else:  # the reason starts with the sharding file's path
        row.note = (result.reason or "").split(".yaml: ", 1)[-1][:_NOTE_CHARS]
    return row


def build_table(cells: Iterable[tuple[str, str, str]], log: Any = sys.stderr) -> list[TableRow]:
    """Compile every (model, stage, sharding) cell in order; each finished row is also written to `log`."""
    rows = []
    for model, stage, sharding in cells:
        rows.append(table_row(model, stage, sharding))
        print(rows[-1].markdown(), file=log, flush=True)
    return rows


def main(args: Any) -> int:
    """Print the markdown table of every MODELS × STAGES × SHARDINGS cell; exit 0."""
    rows = build_table((m, s, h) for m in MODELS for s in STAGES for h in SHARDINGS)
    print("\n".join([HEADER, *(row.markdown() for row in rows)]), file=sys.stdout)
    return 0
