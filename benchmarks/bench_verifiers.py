"""Throughput of the verifiers on the oracle data: rows/s per family, in one process and through ``score_batch``.

    python benchmarks/bench_verifiers.py [--oracles tests/fixtures/oracles] [--workers N]

Rows: GSM8K's 5,276 labelled model solutions; MATH-500's solutions against their own answer and against another
problem's (so half need the symbolic check); IFEval's 540 GPT-4 responses (strict, then loose, in one process).
"""

from __future__ import annotations

import argparse
import json
import lzma
import pathlib
import time

from tulu_jax.rl.verifiers import ifeval, registry, score_batch, timeout

MODELS = ("6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification")


def _jsonl(path: pathlib.Path) -> list[dict]:
    """Rows of ``path``, or of its xz-compressed copy ``path.xz`` (as vendored in tests/fixtures/oracles)."""
    compressed = path.with_name(path.name + ".xz")
    with (lzma.open(compressed, "rt") if compressed.exists() else open(path)) as f:
        return [json.loads(line) for line in f]


def load_rows(oracles: pathlib.Path) -> dict[str, list[tuple[str, str, str]]]:
    """Per family, (dataset, response, ground truth) rows built from the oracle files."""
    references = {r["question"]: r["answer"] for r in _jsonl(oracles / "gsm8k" / "test.jsonl")}
    gsm8k = [("gsm8k", r[m]["solution"], references[r["question"]])
             for r in _jsonl(oracles / "gsm8k" / "example_model_solutions.jsonl") for m in MODELS]
    math500 = _jsonl(oracles / "math" / "test.jsonl")
    math = [("math", r["solution"], r["answer"]) for r in math500]
    math += [("math", r["solution"], math500[(i + 7) % len(math500)]["answer"]) for i, r in enumerate(math500)]
    responses = {r["prompt"]: r["response"]
                 for r in _jsonl(oracles / "ifeval" / "input_response_data_gpt4_20231107_145030.jsonl")}
    ifeval_rows = [("ifeval", responses[r["prompt"]],
                    json.dumps({"instruction_id": r["instruction_id_list"], "kwargs": r["kwargs"]}))
                   for r in _jsonl(oracles / "ifeval" / "input_data.jsonl") if r["prompt"] in responses]
    return {"gsm8k": gsm8k, "math": math, "ifeval": ifeval_rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_oracles = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "oracles"
    parser.add_argument("--oracles", type=pathlib.Path, default=default_oracles)
    parser.add_argument("--workers", type=int, default=timeout.default_num_workers())
    args = parser.parse_args()
    families = load_rows(args.oracles)

    registry.warm_up_worker()  # imports and models, so that the first family is not charged for them
    print(f"{'family':<14}{'rows':>7}{'in-process rows/s':>20}{f'score_batch x{args.workers} rows/s':>26}")
    for name, rows in families.items():
        start = time.perf_counter()
        for dataset, response, ground_truth in rows:
            registry.score_in_process(dataset, response, ground_truth)
        serial = len(rows) / (time.perf_counter() - start)
        datasets, responses, ground_truths = zip(*rows)
        score_batch(datasets[:1], responses[:1], ground_truths[:1], num_workers=args.workers)  # start the workers
        start = time.perf_counter()
        _, num_timeouts = score_batch(datasets, responses, ground_truths, num_workers=args.workers)
        parallel = len(rows) / (time.perf_counter() - start)
        note = f"  ({num_timeouts} timeouts)" if num_timeouts else ""
        print(f"{name:<14}{len(rows):>7}{serial:>20.0f}{parallel:>26.0f}{note}")
    rows = families["ifeval"]
    start = time.perf_counter()
    for _, response, ground_truth in rows:
        ifeval.score(response, ground_truth, loose=True)
    print(f"{'ifeval loose':<14}{len(rows):>7}{len(rows) / (time.perf_counter() - start):>20.0f}")


if __name__ == "__main__":
    main()
