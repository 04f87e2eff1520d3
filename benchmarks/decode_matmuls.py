"""A decode step's matmuls alone: the floor under any XLA:CPU sampler of the standard model.

    python benchmarks/decode_matmuls.py [--rows 8,16] [--tiny]

One jitted function applies every layer's q, k, v, o, gate, up and down projection and the LM head to `rows`
one-token activations (distinct weights, layers unrolled, float32), nothing else: no attention, cache or sampling.
Its time is what one decode step spends in XLA:CPU's dots at that batch; with the prefill, it bounds a generate call
from below (`benchmarks/RESULTS.md`). Prints one JSON line: per row count, ms per step, the weights' bytes and the
rate they are read at, GFLOP/s.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from workload import STANDARD, TINY, Workload  # noqa: E402


def measure(w: Workload, rows: int, calls: int = 30) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    d, f, hd = w.hidden, w.intermediate, w.head_dim
    shapes = {"q": (d, w.heads * hd), "k": (d, w.kv_heads * hd), "v": (d, w.kv_heads * hd), "o": (w.heads * hd, d),
              "gate": (d, f), "up": (d, f), "down": (f, d)}
    keys = iter(jax.random.split(jax.random.key(0), w.layers * len(shapes) + 1))
    layers = [{n: jax.random.normal(next(keys), s) * 0.02 for n, s in shapes.items()} for _ in range(w.layers)]
    head = jax.random.normal(next(keys), (d, w.vocab)) * 0.02

    @jax.jit
    def step(x: jax.Array, layers: list[dict[str, jax.Array]], head: jax.Array) -> jax.Array:
        h = x
        for p in layers:
            q, k, v = h @ p["q"], h @ p["k"], h @ p["v"]
            keep = 0.0 * (jnp.sum(k) + jnp.sum(v))  # k and v are used, as a cache write would use them
            h = h + q @ p["o"] + ((h @ p["gate"]) * (h @ p["up"])) @ p["down"] + keep
        return h @ head

    x = jnp.ones((rows, d))
    step(x, layers, head).block_until_ready()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        step(x, layers, head).block_until_ready()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    weight_bytes = 4 * (sum(a.size for p in layers for a in p.values()) + head.size)
    return {"ms_per_step": seconds * 1e3, "weight_bytes": weight_bytes,
            "weights_gb_per_s": weight_bytes / seconds / 1e9,
            "gflops": 2 * rows * weight_bytes / 4 / seconds / 1e9}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="8,16", help="batch rows (the generation workload's 8, the engine's 16 slots)")
    ap.add_argument("--tiny", action="store_true", help="a tiny model (smoke test)")
    args = ap.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    w = TINY if args.tiny else STANDARD
    result = {"bench": "decode_matmuls", "tiny": args.tiny, "load_before": os.getloadavg()[0]}
    result.update({f"rows_{r}": measure(w, int(r)) for r in args.rows.split(",")})
    result["load_after"] = os.getloadavg()[0]
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
