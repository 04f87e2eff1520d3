"""The standard workload on tulu-jax's public step builders and sampler: one JSON line, the keys of the shared
harness's `tunix_bench.py`, so `bash ../shared/bench/run_all.sh` compares the three stacks in one run.

    python benchmarks/standard.py --json [--parts sft,sft_packed,dpo,dpo_two,gen] [--warmup 2] [--steps 5] [--tiny]

Parts (workload in benchmarks/workload.py; one CPU device, no sharding):
- sft / sft_packed: `tulu_jax.stages.sft.build_sft_step` (what `tulu-jax sft` runs) on 8 × 512 supervised tokens,
  padded rows or two 256-token rows packed per sequence;
- dpo / dpo_two: `tulu_jax.stages.dpo.build_dpo_step` (what `tulu-jax dpo` runs), dpo_norm β 5 with cached
  reference log-probs from `tulu_jax.stages.reference`, one concatenated forward or two forwards;
- gen: `tulu_jax.models.sampler.generate`, greedy, no stop id, no log-probs (nothing asks for them), 8 prompts ×
  128 tokens + 128 new tokens; also the prefill alone, the decode step's time and the fraction of the measured
  memory bandwidth it reaches (bytes per decode step = every matmul weight + the whole KV cache, float32).
Per part: step_s_median, step_s_all, tokens_per_s, achieved_gflops (gen: gen_s_median, gen_s_all,
new_tokens_per_s), mfu = achieved / the float32 matmul rate XLA reaches in this process (`ceiling`); top level:
peak_rss_gib. `--tiny` runs the same code on a tiny model (a smoke test; its figures mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_dpo import pairs  # noqa: E402
from bench_model import (  # noqa: E402
    bandwidth_gbs,
    decode_bytes_per_step,
    matmul_jax_gflops,
    model_config,
    peak_rss_gib,
)
from workload import STANDARD, TINY, TIMED_STEPS, WARMUP_STEPS, Workload  # noqa: E402


def log(*parts: Any) -> None:
    print("[standard]", *parts, file=sys.stderr, flush=True)


def timed(fn: Callable[[], None], warmup: int, steps: int) -> list[float]:
    """Wall seconds of each of `steps` calls after `warmup` untimed ones (fn blocks until its work is done)."""
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        fn()
        dt = time.perf_counter() - start
        log(f"  call {i} {'warmup' if i < warmup else 'timed'} {dt:.3f}s")
        if i >= warmup:
            times.append(dt)
    return times


def summary(times: list[float], tokens: int, flops: float, ceiling: float, key: str = "step_s") -> dict[str, Any]:
    med = statistics.median(times)
    rate = "new_tokens_per_s" if key == "gen_s" else "tokens_per_s"
    return {f"{key}_median": med, f"{key}_all": [round(t, 4) for t in times], rate: tokens / med,
            "achieved_gflops": flops / med / 1e9, "mfu": flops / med / 1e9 / ceiling}


def setup(w: Workload) -> tuple[Any, Any, Any, Callable[[], Any]]:
    """One-device mesh with no sharding rules, the stage optimizer (AdamW, clip), and a fresh train-state maker."""
    import jax

    from tulu_jax.models import Decoder
    from tulu_jax.sharding import ShardingSpec, make_mesh
    from tulu_jax.stages.sections import OptimSection
    from tulu_jax.stages.setup import variable_shardings
    from tulu_jax.train import init_train_state

    rules = dict.fromkeys(("vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "layers", "batch", "length"))
    spec = ShardingSpec(mesh={"data": 1}, rules=rules)
    mesh = make_mesh(spec, devices=jax.devices()[:1])
    optimizer = OptimSection(lr=w.lr, warmup_ratio=0.0, clip=w.grad_clip).build(total_steps=1000)
    config = model_config(w)

    def fresh() -> Any:
        return init_train_state(lambda rngs: Decoder(config, rngs=rngs), optimizer, mesh,
                                variable_shardings(mesh, spec), seed=0)

    return spec, mesh, optimizer, fresh


def run_step(compiled: Any, state: Any, batch: Any, w: Workload, args: argparse.Namespace) -> tuple[list, float]:
    """Time the compiled train step (state threaded through); returns (times, last loss)."""
    holder = {"state": state}

    def call() -> None:
        holder["state"], metrics = compiled(holder["state"], batch, None)  # no frozen model
        holder["loss"] = float(metrics["loss"])  # blocks until the step is done
    return timed(call, args.warmup, args.steps), holder["loss"]


def build_sft(w: Workload, packed: bool = False) -> tuple[Any, Any, Any, float]:
    """The compiled SFT train step on the standard SFT batch: (compiled, state, batch, compile seconds)."""
    import jax
    import numpy as np

    from tulu_jax.data.batching import make_batches
    from tulu_jax.sharding import batch_sharding
    from tulu_jax.stages.sft import build_sft_step
    from tulu_jax.train import shardings_of
    from tulu_jax.train.batches import Batch

    spec, mesh, optimizer, fresh = setup(w)
    state = fresh()
    rng = np.random.default_rng(0)
    per = 2 if packed else 1
    rows = [{"input_ids": ids, "labels": ids}
            for ids in (rng.integers(1, w.vocab, w.sft_seq // per, dtype=np.int32) for _ in range(w.sft_batch * per))]
    (host,) = make_batches(rows, w.sft_seq, w.sft_batch, packed=packed)
    sharding = batch_sharding(mesh, spec)
    batch = jax.device_put(Batch.from_host(host), sharding)
    step = build_sft_step(state.graphdef, optimizer, state_shardings=shardings_of(state), batch_sharding=sharding)
    start = time.perf_counter()
    compiled = step.lower(state, batch, None).compile()
    return compiled, state, batch, time.perf_counter() - start


def part_sft(w: Workload, args: argparse.Namespace, packed: bool = False) -> dict[str, Any]:
    compiled, state, batch, compile_s = build_sft(w, packed)
    times, loss = run_step(compiled, state, batch, w, args)
    out = summary(times, w.sft_batch * w.sft_seq, w.sft_step_flops(), args.ceiling)
    out.update(compile_s=compile_s, loss_last=loss,
               impl="stages.sft.build_sft_step " + ("packed" if packed else "padded"))
    return out


def part_sft_packed(w: Workload, args: argparse.Namespace) -> dict[str, Any]:
    return part_sft(w, args, packed=True)


def build_dpo(w: Workload, concat: bool = True) -> tuple[Any, Any, Any, float, float]:
    """The compiled DPO train step (dpo_norm, cached reference log-probs) on the standard pairs:
    (compiled, state, batch, compile seconds, reference precompute seconds)."""
    import jax

    from tulu_jax.data.preference_batching import make_pair_batches
    from tulu_jax.stages.dpo import DPOSection, build_dpo_step
    from tulu_jax.stages.reference import build_reference_fn, compute_reference_logps
    from tulu_jax.train import shardings_of
    from tulu_jax.train.batches import PairBatch

    spec, mesh, optimizer, fresh = setup(w)
    state = fresh()
    data = pairs(w)  # a shared prompt, two different responses; only responses labelled
    seq = w.dpo_prompt + w.dpo_response
    (host,) = make_pair_batches(data, seq, w.dpo_pairs)
    start = time.perf_counter()
    reference_fn = build_reference_fn(state.graphdef, average=True, concat_forward=True)
    table = compute_reference_logps(reference_fn, state.params, state.model_state, [host], len(data))
    ref_s = time.perf_counter() - start
    (host,) = make_pair_batches(data, seq, w.dpo_pairs, reference=table)
    shardings = PairBatch.shardings(mesh, spec, reference=True)
    batch = jax.device_put(PairBatch.from_host(host), shardings)
    dpo = DPOSection(loss_type="dpo_norm", beta=w.dpo_beta, concat_forward=concat)
    step = build_dpo_step(state.graphdef, optimizer, dpo, state_shardings=shardings_of(state),
                          batch_shardings=shardings)
    start = time.perf_counter()
    compiled = step.lower(state, batch, None).compile()
    return compiled, state, batch, time.perf_counter() - start, ref_s


def part_dpo(w: Workload, args: argparse.Namespace, concat: bool = True) -> dict[str, Any]:
    compiled, state, batch, compile_s, ref_s = build_dpo(w, concat)
    times, loss = run_step(compiled, state, batch, w, args)
    seq = w.dpo_prompt + w.dpo_response
    out = summary(times, 2 * w.dpo_pairs * seq, w.dpo_step_flops(), args.ceiling)
    out.update(compile_s=compile_s, ref_precompute_s=ref_s, loss_last=loss,
               impl="stages.dpo.build_dpo_step dpo_norm " + ("concat" if concat else "two forwards"))
    return out


def part_dpo_two(w: Workload, args: argparse.Namespace) -> dict[str, Any]:
    return part_dpo(w, args, concat=False)


def part_gen(w: Workload, args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    from flax import nnx

    from tulu_jax.models import Decoder
    from tulu_jax.models.sampler import generate

    model = Decoder(model_config(w), rngs=nnx.Rngs(0))
    prompts = np.random.default_rng(5).integers(1, w.vocab, (w.gen_batch, w.gen_prompt), dtype=np.int32)

    def run(new: int) -> Callable[[], None]:
        return lambda: np.asarray(generate(model, prompts, max_new_tokens=new, logprobs=False).tokens)
    first = time.perf_counter()
    run(w.gen_new)()  # the first call compiles
    first = time.perf_counter() - first
    times = timed(run(w.gen_new), max(0, args.warmup - 1), args.steps)
    out = summary(times, w.gen_batch * w.gen_new, w.gen_flops(), args.ceiling, key="gen_s")
    prefill = statistics.median(timed(run(1), 1, args.steps))
    decode = (out["gen_s_median"] - prefill) / (w.gen_new - 1)
    bandwidth = bandwidth_gbs(w.bandwidth_mib, 1, 3)
    best = max(bandwidth.values())
    gbs = decode_bytes_per_step(w) / max(decode, 1e-9) / 1e9
    out.update(first_calls_s=[round(first, 3)], prefill_s=prefill, decode_step_s=decode,
               decode_bytes=decode_bytes_per_step(w), decode_gb_per_s=gbs, bandwidth_gb_per_s=bandwidth,
               bandwidth_fraction=gbs / best, impl="models.sampler.generate greedy, no stop id, no log-probs")
    return out


PARTS = {"sft": part_sft, "sft_packed": part_sft_packed, "dpo": part_dpo, "dpo_two": part_dpo_two, "gen": part_gen}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="sft,sft_packed,dpo,dpo_two,gen")
    ap.add_argument("--warmup", type=int, default=WARMUP_STEPS)
    ap.add_argument("--steps", type=int, default=TIMED_STEPS)
    ap.add_argument("--tiny", action="store_true", help="a tiny model and workload (smoke test)")
    ap.add_argument("--json", action="store_true", help="accepted for the harness; the output is always one JSON line")
    args = ap.parse_args(argv)
    unknown = [p for p in args.parts.split(",") if p not in PARTS]
    if unknown:
        ap.error(f"unknown part(s) {unknown}; choose from {sorted(PARTS)}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import flax
    import jax

    w = TINY if args.tiny else STANDARD
    args.ceiling = matmul_jax_gflops(w.matmul_n, 1, 9)
    result: dict[str, Any] = {"bench": "tulu_jax", "script": "benchmarks/standard.py", "tiny": args.tiny,
                              "python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
                              "devices": str(jax.devices()), "warmup": args.warmup, "steps": args.steps,
                              "load_before": os.getloadavg()[0], "ceiling_gflops": args.ceiling}
    for name in args.parts.split(","):
        log(f"part {name}")
        start = time.perf_counter()
        try:
            result[name] = PARTS[name](w, args)
        except Exception as e:  # one broken part must not hide the others' figures
            traceback.print_exc()
            result[name] = {"error": f"{type(e).__name__}: {e}"}
        result[name]["part_wall_s"] = time.perf_counter() - start
    result.update(ceiling_after_gflops=matmul_jax_gflops(w.matmul_n, 1, 9), peak_rss_gib=peak_rss_gib(),
                  load_after=os.getloadavg()[0])
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
