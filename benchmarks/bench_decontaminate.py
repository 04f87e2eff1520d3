"""Throughput of `tulu-jax decontaminate` (tulu_jax.data.decontaminate) on synthetic data: training rows/s.

    python benchmarks/bench_decontaminate.py [--rows 100000] [--eval-items 10000] [--ngram 8]

Training rows: chat rows whose user prompt is 20-300 words (mean 160) drawn from a 50,000-word Zipf vocabulary
(exponent 1.1, like English text), plus a 100-word answer that is not scanned. Eval suite: `--eval-items` prompts
of 20-200 words made the same way. 1% of the training rows hold an eval prompt inside their own, so the match path is
timed too, and every planted row must be found. Timed: the whole `decontaminate` call (reading the JSONL files, indexing
the eval suite, scanning, writing the filtered copy and the matches), one process; the index build is also reported
alone. The load average before and after is printed: the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import tempfile
import time

import numpy as np

from tulu_jax.data.decontaminate import EvalIndex, decontaminate


def _texts(rng: np.random.Generator, vocab: np.ndarray, count: int, low: int, high: int) -> list[str]:
    lengths = rng.integers(low, high + 1, count)
    ranks = rng.zipf(1.1, int(lengths.sum())) - 1
    words = vocab[np.minimum(ranks, len(vocab) - 1)]
    return [" ".join(chunk) for chunk in np.split(words, np.cumsum(lengths)[:-1])]


def write_data(directory: pathlib.Path, rows: int, eval_items: int, seed: int = 0) -> tuple[str, str, set[int]]:
    """(train path, eval path, the planted rows' line numbers)."""
    rng = np.random.default_rng(seed)
    vocab = np.asarray([f"w{i}" for i in range(50_000)])
    evals = _texts(rng, vocab, eval_items, 20, 200)
    prompts = _texts(rng, vocab, rows, 20, 300)
    answer = " ".join(vocab[:100])
    planted = rng.choice(rows, rows // 100, replace=False)
    for i in planted:
        prompts[i] = f"{prompts[i]} {evals[rng.integers(eval_items)]}"
    train_path, eval_path = directory / "train.jsonl", directory / "eval.jsonl"
    with open(train_path, "w") as f:
        for p in prompts:
            f.write(json.dumps({"messages": [{"role": "user", "content": p},
                                             {"role": "assistant", "content": answer}]}) + "\n")
    with open(eval_path, "w") as f:
        f.writelines(json.dumps({"question": q}) + "\n" for q in evals)
    return str(train_path), str(eval_path), {int(i) + 1 for i in planted}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--eval-items", type=int, default=10_000)
    parser.add_argument("--ngram", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory = pathlib.Path(tmp)
        train, evals, planted = write_data(directory, args.rows, args.eval_items)
        load_before = os.getloadavg()
        start = time.perf_counter()
        index = EvalIndex(args.ngram)
        with open(evals) as f:
            for i, line in enumerate(f):
                index.add(json.loads(line)["question"], file=evals, row=i)
        index_s = time.perf_counter() - start
        start = time.perf_counter()
        report = decontaminate([train], [evals], directory / "out", ngram=args.ngram)
        total_s = time.perf_counter() - start
        load_after = os.getloadavg()
        with open(directory / "out" / "matches.jsonl") as f:
            found = {json.loads(line)["train_row"] for line in f}
    missed = planted - found
    assert not missed, f"{len(missed)} planted rows not found, e.g. {sorted(missed)[:5]}"
    removed = report["train"][0]["removed"]
    print(f"eval suite: {args.eval_items} items, {len(index.postings)} distinct {args.ngram}-grams, "
          f"indexed in {index_s:.2f} s")
    print(f"train: {args.rows} rows, {removed} overlapping found ({len(planted)} planted, all found; the rest share "
          f"frequent-word {args.ngram}-grams by chance) in {total_s:.1f} s: "
          f"{args.rows / total_s:,.0f} rows/s end to end (read, index, scan, write)")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1 min); {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
