"""`tulu-jax compile-check --table`: the per-chip memory of every recipe stage on every pod sharding file.

Each row is one `compile_check` (the stage's real train step, AOT-compiled for the topology with libtpu from this
host): per-chip GiB against the chip's HBM, whether it fits, the compile time, the compiled program's FLOPs from
XLA's cost analysis and the best MFU its roofline allows. A config whose batch cannot be split over a file's batch
axes gets its ConfigError as the note; a state whose arguments alone exceed the HBM is reported without compiling.

The grid takes hours on a small host, so it is resumable: `--table-cells FILE` (JSONL) keeps every finished row,
a rerun compiles only the missing ones (cheap and small cells first), and `--table-doc FILE` rewrites the table
between `<!-- table:begin -->` and `<!-- table:end -->` of a markdown file after every row. Rows stream to stderr.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from tulu_jax.errors import ConfigError
from tulu_jax.stages.compile_check import compile_check
from tulu_jax.stages.paths import resolve_path

MODELS = ("8b", "70b", "405b")
STAGES = ("sft", "dpo", "rlvr", "distill")
SHARDINGS = ("v5p-64", "v5p-256", "v6e-256", "v5p-1024")
# Grid cells without a config, and why.
NO_CONFIG = {
    ("405b", "rlvr"): "no 405B RLVR config (configs/tulu3_405b_rlvr.yaml)",
    ("405b", "distill"): "no Llama 3.1 teacher larger than 405B",
}
PENDING = "not compiled for this copy of the table (time: each compile takes 5–20 min on the shared 2-core host)"
BEGIN, END = "<!-- table:begin -->", "<!-- table:end -->"
_GIB = 1024**3
_NOTE_CHARS = 200

Cell = tuple[str, str, str]


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
    best_mfu: float | None = None
    note: str = ""

    @property
    def cell(self) -> Cell:
        """(model, stage, sharding)."""
        return self.model, self.stage, self.sharding

    def markdown(self) -> str:
        """`| 8B | sft | v5p-64 | 13.4 / 95 | yes | 205 | 5.5 | 61% | |`."""
        memory = "—" if self.gib is None else f"{self.gib:.1f} / {self.hbm_gib:.0f}"
        fits = {True: "yes", False: "**no**", None: "—"}[self.fits]
        seconds = "—" if self.compile_seconds is None else f"{self.compile_seconds:.0f}"
        tflops = "—" if self.tflops is None else f"{self.tflops:,.1f}"
        mfu = "—" if self.best_mfu is None else f"{100 * self.best_mfu:.0f}%"
        return (f"| {self.model.upper()} | {self.stage} | {self.sharding} | {memory} | {fits} | {seconds} | {tflops} "
                f"| {mfu} | {self.note} |")


HEADER = ("| model | stage | sharding | GiB per chip / HBM | fits | compile s | TFLOP per chip (XLA) "
          "| best MFU (roofline) | note |\n|---|---|---|---|---|---|---|---|---|")


def table_row(model: str, stage: str, sharding: str, overrides: Sequence[str] = ()) -> TableRow:
    """Compile configs/tulu3_<model>_<stage>.yaml for sharding/<sharding>.yaml and summarize the result."""
    row = TableRow(model, stage, sharding)
    if (model, stage) in NO_CONFIG:
        row.note = f"not compiled: {NO_CONFIG[model, stage]}"
        return row
    config, sharding_path = f"configs/tulu3_{model}_{stage}.yaml", f"sharding/{sharding}.yaml"
    try:
        result = compile_check(stage, str(resolve_path(config)), str(resolve_path(sharding_path)), tuple(overrides))
    except ConfigError as e:
        row.note = f"not compiled: {str(e).split(': ', 1)[-1]}"
        return row
    row.fits = result.fits
    row.compile_seconds = result.compile_seconds or None
    row.tflops = None if result.flops is None else result.flops / 1e12
    row.best_mfu = None if result.roofline is None else result.roofline.best_mfu
    if result.report is not None:
        row.gib = result.report["total_bytes"] / _GIB
        row.hbm_gib = (result.report["hbm_bytes"] or 0) / _GIB
    else:  # the reason starts with the sharding file's path
        row.note = (result.reason or "").split(".yaml: ", 1)[-1][:_NOTE_CHARS]
    return row


def grid() -> list[Cell]:
    """Every MODELS × STAGES × SHARDINGS cell, in the table's order."""
    return [(m, s, h) for m in MODELS for s in STAGES for h in SHARDINGS]


def compile_order(cells: Iterable[Cell]) -> list[Cell]:
    """Cells without a config first, then by model size plus pod size (small, fast compiles first)."""
    return sorted(cells, key=lambda c: ((c[0], c[1]) not in NO_CONFIG, MODELS.index(c[0]) + SHARDINGS.index(c[2])))


def load_cells(path: pathlib.Path | None) -> dict[Cell, TableRow]:
    """The rows a previous run kept in the JSONL store (none without a store)."""
    if path is None or not path.is_file():
        return {}
    rows = [TableRow(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
    return {row.cell: row for row in rows}


def render(cells: Sequence[Cell], done: dict[Cell, TableRow]) -> str:
    """The markdown table of `cells`; a cell not done yet says so."""
    rows = [done.get(cell) or TableRow(*cell, note=PENDING) for cell in cells]
    return "\n".join([HEADER, *(row.markdown() for row in rows)])


def write_doc(doc: pathlib.Path, table: str) -> None:
    """Replace the table between the BEGIN and END markers of the markdown file `doc`."""
    text = doc.read_text()
    if BEGIN not in text or END not in text:
        raise ConfigError(f"{doc}: no {BEGIN} … {END} section to write the table into")
    head, rest = text.split(BEGIN, 1)
    doc.write_text(f"{head}{BEGIN}\n{table}\n{END}{rest.split(END, 1)[1]}")


def build_table(cells: Sequence[Cell], store: pathlib.Path | None = None, doc: pathlib.Path | None = None,
                log: Any = sys.stderr) -> str:
    """Compile every cell not in `store` (appending each finished row to it, rewriting `doc`'s table); the table."""
    done = load_cells(store)
    for cell in compile_order(c for c in cells if c not in done):
        try:
            done[cell] = table_row(*cell)
        except Exception as e:  # noqa: BLE001 - one broken cell is a row that says so, not a lost grid
            done[cell] = TableRow(*cell, note=f"failed: {type(e).__name__}: {str(e).splitlines()[0][:_NOTE_CHARS]}")
        print(done[cell].markdown(), file=log, flush=True)
        if store is not None:
            with store.open("a") as f:
                f.write(json.dumps(dataclasses.asdict(done[cell])) + "\n")
        if doc is not None:
            write_doc(doc, render(cells, done))
    return render(cells, done)


def main(args: Any) -> int:
    """Print the markdown table of the whole grid; exit 0."""
    store = None if args.table_cells is None else pathlib.Path(args.table_cells)
    doc = None if args.table_doc is None else pathlib.Path(args.table_doc)
    print(build_table(grid(), store, doc), file=sys.stdout)
    return 0
