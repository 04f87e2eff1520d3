"""SFT step benchmark: tulu-jax's real SFT train step (padded and packed) against the same step in PyTorch.

Standard workload (benchmarks/README.md, ../shared/PEERS.md): Llama shape hidden 512, intermediate 1536, 8 layers,
8 heads / 4 KV heads, vocab 32000, RoPE θ 500000, float32, untied, random init; a batch of 8 × 512 tokens, every
target supervised; AdamW lr 1e-5 (no warmup), global-norm clip 1.0, the recipe's sum loss.

- tulu-jax: `tulu_jax.stages.sft.build_sft_step` (forward, backward, clip, AdamW update) on one CPU device:
  padded (8 rows of 512 tokens) and packed (16 rows of 256 tokens, two per sequence: same tokens, segment masks).
- PyTorch: transformers' `LlamaForCausalLM` (sdpa attention) with the same loss, `clip_grad_norm_(1.0)` and
  `torch.optim.AdamW` (fused), in a subprocess so that each side's peak memory is its own.

Every figure is the median of 5 timed steps after 2 warm-up steps. MFU = achieved FLOP/s / the float32 4096² matmul
rate measured in the same run (XLA's for tulu-jax, PyTorch's for PyTorch), FLOPs = 6·N·T + 12·L·d·S²·B.
Appends a Markdown table to benchmarks/RESULTS.md.

    python benchmarks/bench_sft.py                    # the standard workload (a few minutes)
    python benchmarks/bench_sft.py --quick            # a small smoke run (not appended unless --append)
    python benchmarks/bench_sft.py --sweep            # the padded tulu-jax step under bench_model's XLA flag sets
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
    SWEEP_FLAGS,
    matmul_jax_gflops,
    matmul_torch_gflops,
    median_seconds,
    model_config,
    peak_rss_gib,
    publish,
    subprocess_json,
)
from workload import QUICK, STANDARD, Workload  # noqa: E402


def sft_batch(w: Workload, packed: bool) -> dict[str, Any]:
    """A [B, S] batch of random tokens in the batch contract, every target supervised; packed = two rows of S/2
    per sequence (built by the library's own batcher from tokenized rows)."""
    import numpy as np

    from tulu_jax.data.batching import make_batches

    rng = np.random.default_rng(0)
    rows_per_seq = 2 if packed else 1
    length = w.sft_seq // rows_per_seq
    rows = []
    for _ in range(w.sft_batch * rows_per_seq):
        ids = rng.integers(1, w.vocab, length, dtype=np.int32)
        rows.append({"input_ids": ids, "labels": ids})
    batches = make_batches(rows, w.sft_seq, w.sft_batch, packed=packed)
    assert len(batches) == 1 and (batches[0]["segment_ids"] > 0).all()
    return batches[0]


def bench_jax(w: Workload, warmup: int, repeats: int, kinds: tuple[str, ...] = ("padded", "packed")) -> dict[str, Any]:
    """The real SFT step (padded, then packed) on one CPU device; the XLA matmul rate; peak RSS."""
    import jax
    from flax import nnx

    from tulu_jax.models import Decoder
    from tulu_jax.sharding import ShardingSpec, batch_sharding, make_mesh
    from tulu_jax.stages.sections import OptimSection
    from tulu_jax.stages.setup import variable_shardings
    from tulu_jax.stages.sft import build_sft_step
    from tulu_jax.train.batches import Batch
    from tulu_jax.train import init_train_state, shardings_of

    rules = {"vocab": None, "embed": None, "mlp": None, "heads": None, "kv_heads": None, "head_dim": None,
             "layers": None, "batch": None, "length": None}
    spec = ShardingSpec(mesh={"data": 1}, rules=rules)
    mesh = make_mesh(spec, devices=jax.devices()[:1])
    optimizer = OptimSection(lr=w.lr, warmup_ratio=0.0, clip=w.grad_clip).build(total_steps=1000)
    config = model_config(w)
    out: dict[str, Any] = {"load_before": os.getloadavg()[0]}
    for kind in kinds:
        state = init_train_state(lambda rngs: Decoder(config, rngs=rngs), optimizer, mesh,
                                 variable_shardings(mesh, spec), seed=0)
        sharding = batch_sharding(mesh, spec)
        batch = jax.device_put(Batch.from_host(sft_batch(w, packed=kind == "packed")), sharding)
        step = build_sft_step(state.graphdef, optimizer, state_shardings=shardings_of(state), batch_sharding=sharding)
        start = time.perf_counter()
        compiled = step.lower(state, batch).compile()
        compile_s = time.perf_counter() - start
        holder = {"state": state}

        def run() -> None:
            holder["state"], metrics = compiled(holder["state"], batch, None)  # no frozen model
            holder["loss"] = float(metrics["loss"])  # blocks until the step is done

        seconds = median_seconds(run, warmup, repeats)
        out[kind] = {"step_s": seconds, "compile_s": compile_s, "loss": holder["loss"],
                     "params": sum(x.size for x in jax.tree.leaves(nnx.state(holder["state"].model(), nnx.Param)))}
        holder.clear()  # free this kind's state before the next one is built
    out["rss_gib"] = peak_rss_gib()
    out["matmul"] = matmul_jax_gflops(w.matmul_n, warmup, repeats)
    out["load_after"] = os.getloadavg()[0]
    return out


def bench_torch(w: Workload, warmup: int, repeats: int) -> dict[str, Any]:
    """The same step with transformers' LlamaForCausalLM, torch AdamW (fused) and clip_grad_norm_."""
    import numpy as np
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=w.vocab, hidden_size=w.hidden, intermediate_size=w.intermediate, num_hidden_layers=w.layers,
        num_attention_heads=w.heads, num_key_value_heads=w.kv_heads, head_dim=w.head_dim,
        rope_theta=w.rope_theta, max_position_embeddings=4096, tie_word_embeddings=False, attn_implementation="sdpa",
    )
    model = transformers.LlamaForCausalLM(config).float().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=w.lr, fused=True)
    batch = sft_batch(w, packed=False)
    ids = torch.from_numpy(batch["input_ids"].astype(np.int64))
    targets = torch.from_numpy(batch["targets"].astype(np.int64))
    mask = torch.from_numpy(batch["loss_mask"])
    out: dict[str, Any] = {"load_before": os.getloadavg()[0]}

    def step() -> None:
        logits = model(input_ids=ids).logits.float()
        nll = torch.nn.functional.cross_entropy(logits.view(-1, w.vocab), targets.view(-1), reduction="none")
        loss = (nll * mask.view(-1)).sum() / w.sft_batch  # the recipe's sum loss: Σ NLL / sequences
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), w.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        out["loss"] = float(loss)

    out["step_s"] = median_seconds(step, warmup, repeats)
    out["rss_gib"] = peak_rss_gib()
    out["params"] = sum(p.numel() for p in model.parameters())
    out["matmul"] = matmul_torch_gflops(w.matmul_n, warmup, repeats)
    out["threads"] = torch.get_num_threads()
    out["load_after"] = os.getloadavg()[0]
    return out


def table(w: Workload, jax_r: dict[str, Any], torch_r: dict[str, Any], flags: str) -> str:
    tokens = w.sft_batch * w.sft_seq
    flops = w.sft_step_flops()
    rows = []
    torch_tps = tokens / torch_r["step_s"]
    for kind in ("padded", "packed"):
        r = jax_r[kind]
        tps = tokens / r["step_s"]
        rows.append((f"tulu-jax SFT step, {kind}", f"{tps:.0f}", f"{flops / r['step_s'] / 1e9:.0f}",
                     f"{flops / r['step_s'] / 1e9 / jax_r['matmul']:.0%} of XLA matmul",
                     f"{jax_r['rss_gib']:.2f}", f"{tps / torch_tps:.2f}×",
                     f"{r['step_s']:.2f} s/step, compile {r['compile_s']:.0f} s, loss {r['loss']:.3f}"))
    rows.append(("PyTorch + transformers LlamaForCausalLM (sdpa, fused AdamW)", f"{torch_tps:.0f}",
                 f"{flops / torch_r['step_s'] / 1e9:.0f}",
                 f"{flops / torch_r['step_s'] / 1e9 / torch_r['matmul']:.0%} of torch matmul",
                 f"{torch_r['rss_gib']:.2f}", "1.00×",
                 f"{torch_r['step_s']:.2f} s/step, {torch_r['threads']} threads, loss {torch_r['loss']:.3f}"))
    rows.append((f"float32 {w.matmul_n}² matmul", "—", f"XLA {jax_r['matmul']:.0f} / torch {torch_r['matmul']:.0f}",
                 "the MFU denominators", "—", "—", "measured in the same run"))
    head = ("| what | tokens/s | GFLOP/s | MFU | peak RSS GiB | vs PyTorch | note |\n"
            "|---|---|---|---|---|---|---|\n")
    body = "\n".join("| " + " | ".join(row) + " |" for row in rows)
    n = w.matmul_params()
    meta = (f"batch {w.sft_batch}×{w.sft_seq}, all supervised; N = {n / 1e6:.1f} M matmul parameters "
            f"({jax_r['padded']['params'] / 1e6:.1f} M in all), {flops / 1e9:.0f} GFLOP per step; "
            f"XLA_FLAGS=`{flags or '(none)'}`; "
            f"load average jax {jax_r['load_before']:.1f}–{jax_r['load_after']:.1f}, "
            f"torch {torch_r['load_before']:.1f}–{torch_r['load_after']:.1f} (2 shared cores: figures are noisy)")
    return f"{head}{body}\n\n{meta}\n"


def sweep(args: argparse.Namespace, w_args: list[str]) -> str:
    """The padded tulu-jax step under each of bench_model's XLA flag sets, one subprocess per set."""
    lines = ["| XLA_FLAGS | padded tokens/s | s/step | XLA matmul GFLOP/s | load |", "|---|---|---|---|---|"]
    w = QUICK if args.quick else STANDARD
    tokens = w.sft_batch * w.sft_seq
    for name, flags in SWEEP_FLAGS.items():
        env = dict(os.environ, XLA_FLAGS=flags)
        try:
            r = subprocess_json(__file__, ["--side", "jax", "--kinds", "padded", *w_args], env)
        except RuntimeError as e:
            lines.append(f"| {name}: `{flags}` | failed: {str(e).splitlines()[-1][:100]} | | | |")
            continue
        step_s = r["padded"]["step_s"]
        lines.append(f"| {name}: `{flags or '(none)'}` | {tokens / step_s:.0f} | {step_s:.1f} | {r['matmul']:.0f} | "
                     f"{r['load_before']:.1f}–{r['load_after']:.1f} |")
        print(lines[-1], flush=True)
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small smoke workload")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--side", choices=("jax", "torch"), help="run one side only and print its JSON (internal)")
    parser.add_argument("--sweep", action="store_true", help="the padded tulu-jax step under each XLA flag set")
    parser.add_argument("--kinds", default="padded,packed", help="tulu-jax batch kinds for --side jax (internal)")
    parser.add_argument("--append", action="store_true", help="append to RESULTS.md even with --quick")
    args = parser.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    w = QUICK if args.quick else STANDARD
    w_args = ["--warmup", str(args.warmup), "--repeats", str(args.repeats)] + (["--quick"] if args.quick else [])
    if args.side == "jax":
        print(json.dumps(bench_jax(w, args.warmup, args.repeats, tuple(args.kinds.split(",")))))
        return
    if args.side == "torch":
        print(json.dumps(bench_torch(w, args.warmup, args.repeats)))
        return
    if args.sweep:
        text = "tulu-jax SFT step under XLA flag sets\n\n" + sweep(args, w_args)
    else:
        # Each side in its own process (its own peak memory); PyTorch first, then tulu-jax.
        torch_r = subprocess_json(__file__, ["--side", "torch", *w_args])
        jax_r = subprocess_json(__file__, ["--side", "jax", *w_args])
        text = table(w, jax_r, torch_r, os.environ.get("XLA_FLAGS", ""))

    publish("SFT step, ", text, quick=args.quick, append=args.append, sweep=args.sweep)


if __name__ == "__main__":
    main()
