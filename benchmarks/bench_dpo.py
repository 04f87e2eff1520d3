"""DPO step benchmark: tulu-jax's real DPO train step against its SFT step on the same tokens, in the same run.

Standard workload (benchmarks/README.md): Llama shape hidden 512, intermediate 1536, 8 layers, 8 heads / 4 KV heads,
vocab 32000, RoPE θ 500000, float32, untied, random init; 8 preference pairs, each side a 256-token prompt (shared by
the two sides) + a 256-token response, so a step reads 16 sequences × 512 tokens; dpo_norm, β 5, cached reference
log-probs (computed by the reference pass, which is timed too); AdamW lr 5e-7, global-norm clip 1.0.

- DPO: `tulu_jax.stages.dpo.build_dpo_step` (one forward over chosen + rejected concatenated, backward, clip, AdamW),
  and the same with `concat_forward: false` (two forwards);
- reference pass: `tulu_jax.stages.reference.build_reference_fn` (no-grad forward of both sides);
- SFT: `tulu_jax.stages.sft.build_sft_step` over the same 16 × 512 tokens as 16 SFT rows (responses supervised).

Each measurement runs in its own process (its own peak RSS), on one CPU device. Figures are the median of
`--repeats` timed steps after `--warmup` untimed ones. tokens/s counts every token of both sides; MFU = achieved
FLOP/s / the float32 4096² XLA matmul rate measured in the same process, FLOPs = 6·N·T + 12·L·d·S²·B for the
train steps (2·N·T + 4·L·d·S²·B for the forward-only reference pass). Appends a Markdown table to
benchmarks/RESULTS.md.

    python benchmarks/bench_dpo.py                  # the standard workload (slow on 2 shared cores)
    python benchmarks/bench_dpo.py --quick          # a small smoke run (not appended unless --append)
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_model import (  # noqa: E402  (the measuring helpers)
    matmul_jax_gflops,
    median_seconds,
    model_config,
    peak_rss_gib,
    publish,
    subprocess_json,
)
from workload import QUICK, STANDARD, Workload  # noqa: E402

LR = 5e-7  # the recipe's DPO learning rate (the workload's lr is SFT's)
SIDES = ("dpo", "dpo_two_forwards", "reference", "sft")


def pairs(w: Workload) -> list[dict[str, Any]]:
    """`dpo_pairs` random pairs: a shared prompt of dpo_prompt tokens, two different responses of dpo_response."""
    import numpy as np

    rng = np.random.default_rng(0)
    out = []
    for _ in range(w.dpo_pairs):
        prompt = rng.integers(1, w.vocab, w.dpo_prompt, dtype=np.int32)
        pair = {}
        for side in ("chosen", "rejected"):
            ids = np.concatenate([prompt, rng.integers(1, w.vocab, w.dpo_response, dtype=np.int32)])
            pair[f"{side}_input_ids"] = ids
            pair[f"{side}_labels"] = np.where(np.arange(ids.size) >= w.dpo_prompt, ids, -100).astype(np.int32)
        out.append(pair)
    return out


def setup(w: Workload):
    """Mesh of one device with no sharding, the optimizer, the model config and a fresh state maker."""
    import jax

    from tulu_jax.models import Decoder
    from tulu_jax.sharding import ShardingSpec, make_mesh
    from tulu_jax.stages.sections import OptimSection
    from tulu_jax.stages.setup import variable_shardings
    from tulu_jax.train import init_train_state

    rules = {"vocab": None, "embed": None, "mlp": None, "heads": None, "kv_heads": None, "head_dim": None,
             "layers": None, "batch": None, "length": None}
    spec = ShardingSpec(mesh={"data": 1}, rules=rules)
    mesh = make_mesh(spec, devices=jax.devices()[:1])
    optimizer = OptimSection(lr=LR, warmup_ratio=0.0, clip=w.grad_clip).build(total_steps=1000)
    config = model_config(w)

    def fresh_state():
        return init_train_state(lambda rngs: Decoder(config, rngs=rngs), optimizer, mesh,
                                variable_shardings(mesh, spec), seed=0)

    return spec, mesh, optimizer, fresh_state


def run_side(side: str, w: Workload, warmup: int, repeats: int) -> dict[str, Any]:
    """One measurement in this process: median seconds per call, compile time, compiled temp memory, peak RSS."""
    import jax
    import numpy as np

    from tulu_jax.data.preference_batching import REF_KEYS, make_pair_batches
    from tulu_jax.sharding import batch_sharding
    from tulu_jax.stages.dpo import DPOSection, build_dpo_step
    from tulu_jax.stages.reference import build_reference_fn, compute_reference_logps
    from tulu_jax.stages.sft import build_sft_step
    from tulu_jax.train import shardings_of
    from tulu_jax.train.batches import Batch, PairBatch

    spec, mesh, optimizer, fresh_state = setup(w)
    out: dict[str, Any] = {"load_before": os.getloadavg()[0]}
    state = fresh_state()
    data = pairs(w)
    seq = w.dpo_prompt + w.dpo_response
    (host,) = make_pair_batches(data, seq, w.dpo_pairs)
    reference_fn = build_reference_fn(state.graphdef, average=True, concat_forward=True)

    if side == "reference":
        batch = jax.device_put(PairBatch.from_host(host))
        fn, args = reference_fn, (state.params, state.model_state, batch)
    elif side == "sft":
        sides = [{key: host[f"{s}_{key}"] for key in ("input_ids", "positions", "segment_ids", "targets",
                                                       "loss_mask")} for s in ("chosen", "rejected")]
        batch = jax.device_put(Batch(**{key: np.concatenate([sides[0][key], sides[1][key]]) for key in sides[0]}),
                               batch_sharding(mesh, spec))
        fn = build_sft_step(state.graphdef, optimizer, state_shardings=shardings_of(state),
                            batch_sharding=batch_sharding(mesh, spec))
        args = (state, batch, None)  # (state, batch, frozen)
    else:
        table = compute_reference_logps(reference_fn, state.params, state.model_state, [host], len(data))
        (host,) = make_pair_batches(data, seq, w.dpo_pairs, reference=table)
        shardings = PairBatch.shardings(mesh, spec, reference=True)
        batch = jax.device_put(PairBatch.from_host(host), shardings)
        dpo = DPOSection(loss_type="dpo_norm", beta=w.dpo_beta, concat_forward=side == "dpo")
        fn = build_dpo_step(state.graphdef, optimizer, dpo, state_shardings=shardings_of(state),
                            batch_shardings=shardings)
        args = (state, batch, None)  # (state, batch, frozen)

    start = time.perf_counter()
    compiled = fn.lower(*args).compile()
    out["compile_s"] = time.perf_counter() - start
    memory = compiled.memory_analysis()
    out["temp_gib"] = memory.temp_size_in_bytes / 2**30 if memory is not None else None
    holder = {"args": args}

    def call() -> None:
        if side == "reference":
            result = compiled(*holder["args"])
            out["value"] = float(result[REF_KEYS[0]][0])  # blocks until done
        else:
            state, metrics = compiled(*holder["args"])
            holder["args"] = (state, *holder["args"][1:])
            out["value"] = float(metrics["loss"])

    out["step_s"] = median_seconds(call, warmup, repeats)
    out["rss_gib"] = peak_rss_gib()
    out["matmul"] = matmul_jax_gflops(w.matmul_n, warmup, repeats)
    out["load_after"] = os.getloadavg()[0]
    return out


def table(w: Workload, results: dict[str, dict[str, Any]]) -> str:
    """A Markdown table of the four measurements."""
    seq = w.dpo_prompt + w.dpo_response
    tokens = 2 * w.dpo_pairs * seq
    train_flops = w.dpo_step_flops()
    forward_flops = train_flops / 3  # 2·N·T + 4·L·d·S²·B
    sft_tps = tokens / results["sft"]["step_s"]
    labels = {
        "dpo": "tulu-jax DPO step (dpo_norm β 5, cached reference, concat forward)",
        "dpo_two_forwards": "tulu-jax DPO step, two forwards (concat_forward: false)",
        "sft": f"tulu-jax SFT step on the same {2 * w.dpo_pairs} × {seq} tokens",
        "reference": "reference pass (no-grad forward of both sides)",
    }
    rows = []
    for side in SIDES:
        r = results[side]
        flops = forward_flops if side == "reference" else train_flops
        tps = tokens / r["step_s"]
        gflops = flops / r["step_s"] / 1e9
        temp = "—" if r["temp_gib"] is None else f"{r['temp_gib']:.2f}"
        vs_sft = "—" if side == "reference" else f"{tps / sft_tps:.2f}×"
        rows.append((labels[side], f"{tps:.0f}", f"{gflops:.0f}", f"{gflops / r['matmul']:.0%}",
                     f"{r['rss_gib']:.2f}", temp, vs_sft,
                     f"{r['step_s']:.2f} s/step, compile {r['compile_s']:.0f} s, XLA matmul {r['matmul']:.0f} "
                     f"GFLOP/s, load {r['load_before']:.1f}–{r['load_after']:.1f}"))
    head = ("| what | tokens/s | GFLOP/s | MFU | peak RSS GiB | XLA temp GiB | vs SFT | note |\n"
            "|---|---|---|---|---|---|---|---|\n")
    body = "\n".join("| " + " | ".join(row) + " |" for row in rows)
    meta = (f"{w.dpo_pairs} pairs × ({w.dpo_prompt} prompt + {w.dpo_response} response) tokens per side = "
            f"{tokens} tokens per step; N = {w.matmul_params() / 1e6:.1f} M matmul parameters, "
            f"{train_flops / 1e9:.0f} GFLOP per train step; one CPU device, each row in its own process; "
            f"XLA_FLAGS=`{os.environ.get('XLA_FLAGS') or '(none)'}` (2 shared cores: figures are noisy)")
    return f"{head}{body}\n\n{meta}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small smoke workload")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--side", choices=SIDES, help="run one measurement and print its JSON (internal)")
    parser.add_argument("--append", action="store_true", help="append to RESULTS.md even with --quick")
    args = parser.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    w = QUICK if args.quick else STANDARD
    if args.side:
        print(json.dumps(run_side(args.side, w, args.warmup, args.repeats)))
        return
    w_args = ["--warmup", str(args.warmup), "--repeats", str(args.repeats)] + (["--quick"] if args.quick else [])
    results = {}
    for side in SIDES:
        results[side] = subprocess_json(__file__, ["--side", side, *w_args])
        print(side, json.dumps(results[side]), flush=True)
    publish("DPO step, ", table(w, results), quick=args.quick, append=args.append)


if __name__ == "__main__":
    main()
