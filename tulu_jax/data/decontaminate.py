"""Decontamination: which training rows overlap an evaluation item (n-gram matching), and filtered copies without them.

    tulu-jax decontaminate --train DATA... --eval DATA... [--ngram 8] [--threshold 0.5] [--out DIR]

Tülu 3 checked every training prompt against its evaluation suite with 8-gram matching: a token of an eval item
counts as matched when an 8-gram containing it also occurs in the training row, and the row overlaps the item when
at least half of the item's tokens are matched. Here likewise, on normalized text (`normalize`: NFKC, lower case,
every run of non-alphanumeric characters a word boundary):

- the eval items' n-grams go into an inverted index (n-gram → (item, position)), so each training row costs one
  look-up per n-gram of its own, whatever the size of the eval suite: it scales to the 939k-row SFT mixture;
- an eval item with fewer than `ngram` words has no n-gram: it is counted as unchecked, never silently matched;
- a row's text is its prompt: the user turns of `messages` (or of `prompt`, or of `chosen` for a preference pair
  without one), else a `prompt`/`question`/`problem`/`text` string. A row with none of these is a DataError.

Written to `--out`: `<train name>.jsonl`, each train set without its overlapping rows (JSON lines, whatever the
input format); `matches.jsonl`, one line per (training row, eval item) overlap; `report.json`, the counts per
(train set, eval set). Rows are numbered as `tulu_jax.data.rows` numbers them (JSONL lines from 1, tables from 0).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import pathlib
import re
import sys
import time
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from tulu_jax.data.rows import Row, RowStats, iter_rows
from tulu_jax.errors import ConfigError, DataError

NGRAM = 8
THRESHOLD = 0.5
_NON_WORD = re.compile(r"[\W_]+")
_TEXT_FIELDS = ("prompt", "question", "problem", "text")


def normalize(text: str) -> list[str]:
    """The words n-grams are made of: NFKC, lower case, split at every run of non-alphanumeric characters."""
    return _NON_WORD.sub(" ", unicodedata.normalize("NFKC", text).lower()).split()


def _ngrams(words: Sequence[str], n: int) -> Iterator[tuple[str, ...]]:
    return zip(*(words[i:] for i in range(n)), strict=False)


def _user_text(messages: Any) -> str | None:
    if not isinstance(messages, list):
        return None
    turns = [m.get("content") for m in messages if isinstance(m, Mapping) and m.get("role") == "user"]
    return "\n".join(t for t in turns if isinstance(t, str)) if turns else None


def row_text(data: Any, *, file: str | None = None, row: int | None = None) -> str:
    """The prompt text of a row (see the module docstring); DataError naming file and row if it has none."""
    if isinstance(data, Mapping):
        for field in ("messages", "prompt", "chosen"):
            text = _user_text(data.get(field))
            if text is not None:
                return text
        for field in _TEXT_FIELDS:
            if isinstance(data.get(field), str):
                return data[field]
    raise DataError(
        "no prompt text: expected user turns in messages/prompt/chosen, or a string prompt/question/problem/text",
        file=file, row=row,
    )


def validate_row(data: Any, *, file: str | None = None, row: int | None = None) -> None:
    """A `tulu_jax.data.rows` validator: the row has prompt text."""
    row_text(data, file=file, row=row)


@dataclasses.dataclass(frozen=True)
class EvalItem:
    """One indexed eval item: its file, row number and length in normalized words."""

    file: str
    row: int
    words: int


@dataclasses.dataclass(frozen=True)
class Match:
    """A training row that overlaps an eval item: the fraction of the item's words matched, and one shared n-gram."""

    item: EvalItem
    overlap: float
    ngram: str


class EvalIndex:
    """An inverted index of the eval items' n-grams: n-gram → [(item id, start position)]."""

    def __init__(self, ngram: int = NGRAM) -> None:
        if ngram < 1:
            raise ConfigError(f"--ngram must be >= 1, got {ngram}")
        self.ngram = ngram
        self.items: list[EvalItem] = []
        self.postings: dict[tuple[str, ...], list[tuple[int, int]]] = {}
        self.too_short: collections.Counter[str] = collections.Counter()

    def add(self, text: str, *, file: str, row: int) -> None:
        """Index one eval item (or count it as too short to have an n-gram)."""
        words = normalize(text)
        if len(words) < self.ngram:
            self.too_short[file] += 1
            return
        item = len(self.items)
        self.items.append(EvalItem(file, row, len(words)))
        for position, gram in enumerate(_ngrams(words, self.ngram)):
            self.postings.setdefault(gram, []).append((item, position))

    def matches(self, text: str, threshold: float) -> list[Match]:
        """The eval items that `text` overlaps: at least `threshold` of their words in n-grams shared with it."""
        hits: dict[int, set[int]] = {}
        shared: dict[int, tuple[str, ...]] = {}
        for gram in _ngrams(normalize(text), self.ngram):
            for item, position in self.postings.get(gram, ()):
                hits.setdefault(item, set()).add(position)
                shared.setdefault(item, gram)
        found = []
        for item, starts in hits.items():
            overlap = _covered(starts, self.ngram) / self.items[item].words
            if overlap >= threshold:
                found.append(Match(self.items[item], overlap, " ".join(shared[item])))
        return found


def _covered(starts: set[int], n: int) -> int:
    """How many positions the n-grams starting at `starts` cover together."""
    total, end = 0, 0
    for start in sorted(starts):
        total += start + n - max(start, end)
        end = start + n
    return total


@dataclasses.dataclass
class TrainReport:
    """One train set: rows read, kept and removed; per eval set, how many of its rows overlap that set."""

    file: str
    filtered_copy: str
    rows: int = 0
    kept: int = 0
    removed: int = 0
    overlapping_rows: dict[str, int] = dataclasses.field(default_factory=dict)


def _rows(path: str) -> Iterator[Row]:
    return iter_rows(path, RowStats(path), validate=validate_row)


def _copy_names(train: Sequence[str]) -> list[str]:
    names = [pathlib.Path(p).name.split(".")[0] + ".jsonl" for p in train]
    repeated = sorted(n for n, c in collections.Counter(names).items() if c > 1)
    if repeated or "matches.jsonl" in names:
        raise ConfigError(f"train sets must have distinct names that are not 'matches' (got {names})")
    return names


def decontaminate(
    train: Sequence[str], eval_sets: Sequence[str], out_dir: str | pathlib.Path, *, ngram: int = NGRAM,
    threshold: float = THRESHOLD,
) -> dict[str, Any]:
    """Index `eval_sets`, scan every row of each `train` set, write the filtered copies, `matches.jsonl` and
    `report.json` into `out_dir`; returns the report (see the module docstring)."""
    if not train or not eval_sets:
        raise ConfigError("decontaminate needs at least one --train and one --eval data set")
    if not 0.0 < threshold <= 1.0:
        raise ConfigError(f"--threshold must be in (0, 1], got {threshold}")
    names = _copy_names(train)
    index = EvalIndex(ngram)
    eval_rows = collections.Counter()
    for path in eval_sets:
        for item in _rows(path):
            index.add(row_text(item.data), file=path, row=item.index)
            eval_rows[path] += 1
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reports = []
    with (out / "matches.jsonl").open("w", encoding="utf-8") as matches_file:
        for path, name in zip(train, names, strict=True):
            report = TrainReport(path, str(out / name), overlapping_rows=dict.fromkeys(eval_sets, 0))
            with (out / name).open("w", encoding="utf-8") as copy:
                for row in _rows(path):
                    report.rows += 1
                    found = index.matches(row_text(row.data), threshold)
                    if not found:
                        report.kept += 1
                        copy.write(json.dumps(row.data, ensure_ascii=False) + "\n")
                        continue
                    report.removed += 1
                    for eval_file in {m.item.file for m in found}:
                        report.overlapping_rows[eval_file] += 1
                    for m in found:
                        matches_file.write(json.dumps({
                            "train_file": path, "train_row": row.index, "eval_file": m.item.file,
                            "eval_row": m.item.row, "overlap": round(m.overlap, 4), "ngram": m.ngram,
                        }) + "\n")
            reports.append(dataclasses.asdict(report))
    result = {
        "ngram": ngram,
        "threshold": threshold,
        "eval": [{"file": p, "rows": eval_rows[p], "too_short_to_check": index.too_short[p]} for p in eval_sets],
        "train": reports,
    }
    (out / "report.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def format_report(report: Mapping[str, Any]) -> str:
    """The report as lines: per train set, rows kept/removed and the overlapping rows per eval set."""
    lines = []
    for e in report["eval"]:
        lines.append(f"eval {e['file']}: {e['rows']} rows, {e['too_short_to_check']} shorter than "
                     f"{report['ngram']} words (unchecked)")
    for t in report["train"]:
        lines.append(f"train {t['file']}: {t['rows']} rows, {t['removed']} removed, {t['kept']} kept "
                     f"-> {t['filtered_copy']}")
        lines.extend(f"  overlaps {e}: {n} rows" for e, n in t["overlapping_rows"].items())
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`tulu-jax decontaminate` flags."""
    parser.add_argument("--train", nargs="+", required=True, help="training data sets (JSONL, Parquet, saved dataset)")
    parser.add_argument("--eval", nargs="+", required=True, help="evaluation data sets to check against")
    parser.add_argument("--ngram", type=int, default=NGRAM, help=f"n-gram length in words (default {NGRAM})")
    parser.add_argument("--threshold", type=float, default=THRESHOLD,
                        help=f"fraction of an eval item's words that must be matched (default {THRESHOLD})")
    parser.add_argument("--out", default="decontaminated", help="output directory (default: ./decontaminated)")


def main(args: argparse.Namespace) -> int:
    """`tulu-jax decontaminate`: run, print the counts; exit status 0."""
    start = time.perf_counter()
    report = decontaminate(args.train, args.eval, args.out, ngram=args.ngram, threshold=args.threshold)
    rows = sum(t["rows"] for t in report["train"])
    print(format_report(report))
    print(f"tulu-jax decontaminate: {rows} training rows in {time.perf_counter() - start:.1f} s; "
          f"matches in {pathlib.Path(args.out) / 'matches.jsonl'}", file=sys.stderr)
    return 0
