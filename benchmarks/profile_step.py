"""Where a standard-workload train step spends its time: one `jax.profiler` trace of the compiled step, read back.

    python benchmarks/profile_step.py [--parts sft,dpo,dpo_two] [--tiny]

For each part (the same compiled steps as `benchmarks/standard.py`) it warms the step up, traces one call and
prints one JSON line: the step's wall time, the time XLA's worker threads spent in each kind of HLO op (matmul
fusions `ynn_fusion*` / `dot*`, layout copies, broadcasts, ...), and the wall time during which at least one
matmul ran (the union of their intervals). That union bounds the step from below for this program on this
machine: were everything but the matmuls free, the step would still take that long, so `matmul_bound_tokens_per_s`
is the most any change outside the matmuls can reach, and `matmul_gflops` says how fast the matmuls themselves run.
A generic (Eigen) `dot*` op shows only its dispatch: its work runs in the thread pool outside any op event, so it
lands in `no_op_wall_s` (the wall time with no op event open, which also holds the runtime's own overhead); a step
whose matmuls all run as library fusions leaves little there. The figures are for one traced call (tracing adds a
few percent); compare parts only within one run.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import pathlib
import sys
import tempfile
import time
from collections.abc import Iterable
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from workload import STANDARD, TINY, Workload  # noqa: E402

MATMUL_PREFIXES = ("ynn_fusion", "xnn_fusion", "onednn", "dot")


def interval_union(intervals: Iterable[tuple[float, float]]) -> float:
    """Total length covered by a set of [start, end) intervals."""
    total, end = 0.0, float("-inf")
    for lo, hi in sorted(intervals):
        if hi > end:
            total += hi - max(lo, end)
            end = hi
    return total


def op_category(name: str) -> str:
    """An HLO op's kind: its name up to the first '.' (`copy_bitcast_fusion.9` → `copy_bitcast_fusion`)."""
    return name.split(".")[0]


def read_trace(trace_dir: str) -> list[dict[str, Any]]:
    """The HLO-op events (complete events naming an `hlo_op`) of the Perfetto trace `jax.profiler` wrote."""
    (path,) = pathlib.Path(trace_dir).rglob("perfetto_trace.json.gz")
    data = json.load(gzip.open(path))
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X" and "hlo_op" in e.get("args", {})]


def summarize(events: list[dict[str, Any]], wall_s: float, flops: float, tokens: int) -> dict[str, Any]:
    """Thread seconds per op kind, the matmuls' wall-time union and the bounds it implies."""
    seconds = collections.Counter()
    for e in events:
        seconds[op_category(e["name"])] += e["dur"] / 1e6
    spans = [(e["ts"] / 1e6, (e["ts"] + e["dur"]) / 1e6) for e in events]
    matmul = [span for span, e in zip(spans, events) if e["name"].startswith(MATMUL_PREFIXES)]
    matmul_wall = interval_union(matmul)
    any_op = interval_union(spans)
    return {"step_wall_s": wall_s, "tokens_per_s": tokens / wall_s, "any_op_wall_s": any_op,
            "no_op_wall_s": wall_s - any_op, "matmul_wall_s": matmul_wall,
            "matmul_gflops": flops / matmul_wall / 1e9, "matmul_bound_tokens_per_s": tokens / matmul_wall,
            "thread_s_by_op": {k: round(v, 4) for k, v in seconds.most_common(12)}}


def profile(compiled: Any, state: Any, batch: Any) -> tuple[list[dict[str, Any]], float]:
    """Warm the step up, then trace one call: (its XLA events, its wall seconds)."""
    import jax

    state, metrics = compiled(state, batch, None)
    float(metrics["loss"])
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        start = time.perf_counter()
        state, metrics = compiled(state, batch, None)
        float(metrics["loss"])  # blocks until the step is done
        wall = time.perf_counter() - start
        jax.profiler.stop_trace()
        return read_trace(trace_dir), wall


def part(w: Workload, name: str) -> dict[str, Any]:
    from standard import build_dpo, build_sft

    if name == "sft":
        compiled, state, batch, _ = build_sft(w)
        flops, tokens = w.sft_step_flops(), w.sft_batch * w.sft_seq
    else:
        compiled, state, batch, _, _ = build_dpo(w, concat=name == "dpo")
        flops, tokens = w.dpo_step_flops(), 2 * w.dpo_pairs * (w.dpo_prompt + w.dpo_response)
    events, wall = profile(compiled, state, batch)
    return summarize(events, wall, flops, tokens)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="sft,dpo,dpo_two")
    ap.add_argument("--tiny", action="store_true", help="a tiny model and workload (smoke test)")
    args = ap.parse_args(argv)
    unknown = [p for p in args.parts.split(",") if p not in ("sft", "dpo", "dpo_two")]
    if unknown:
        ap.error(f"unknown part(s) {unknown}; choose from sft, dpo, dpo_two")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from bench_model import matmul_jax_gflops

    w = TINY if args.tiny else STANDARD
    result: dict[str, Any] = {"bench": "profile_step", "tiny": args.tiny, "load_before": os.getloadavg()[0],
                              "ceiling_gflops": matmul_jax_gflops(w.matmul_n, 1, 9)}
    for name in args.parts.split(","):
        result[name] = part(w, name)
        result[name]["matmul_fraction_of_ceiling"] = result[name]["matmul_gflops"] / result["ceiling_gflops"]
    result["load_after"] = os.getloadavg()[0]
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
