"""Model benchmark on this machine: matmul peak, memory bandwidth, forward+backward throughput, KV-cache sampling.

Standard workload (workload.py's STANDARD; `--quick` runs its QUICK): a Llama-shaped decoder, hidden 512,
intermediate 1536, 8 layers, 8 heads / 4 KV heads, vocab 32000, RoPE θ 500000, float32, untied, random init. Every
figure is the median of `--repeats` timed runs after `--warmup` untimed ones. Prints a Markdown table and appends
it to benchmarks/RESULTS.md.

    python benchmarks/bench_model.py            # the full run (a few minutes)
    python benchmarks/bench_model.py --quick    # a small smoke run (seconds; not appended unless --append)
    python benchmarks/bench_model.py --sweep    # the matmul / fwd+bwd / decode figures under several XLA_FLAGS
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from workload import QUICK, STANDARD, Workload

RESULTS = pathlib.Path(__file__).resolve().parent / "RESULTS.md"

# XLA:CPU flag sets tried by --sweep (jaxlib 0.10.2). Dots go to YNNPACK by default; the alternatives hand them to
# Eigen (YNN off) or to oneDNN / XNNPACK library fusions.
SWEEP_FLAGS = {
    "default": "",
    "ynn off (Eigen dots)": "--xla_cpu_experimental_ynn_fusion_type=",
    "ynn off + onednn dot": "--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_experimental_onednn_fusion_type=dot",
    "ynn off + xnn dot": "--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_experimental_xnn_fusion_type=dot",
    "fast math": "--xla_cpu_enable_fast_math=true",
}


def median_seconds(fn: Callable[[], Any], warmup: int, repeats: int) -> float:
    """Median wall time of `fn()` over `repeats` calls after `warmup` untimed calls (fn must block until done)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def subprocess_json(script: str, args: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run the benchmark `script` with `args` in a fresh process (its own peak RSS, its own XLA flags); its last
    stdout line is the JSON result."""
    proc = subprocess.run([sys.executable, script, *args], env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
        name = pathlib.Path(script).name
        raise RuntimeError(f"{name} {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ machine figures
def matmul_jax_gflops(n: int, warmup: int, repeats: int) -> float:
    """float32 n×n @ n×n through XLA (jitted), GFLOP/s."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    return 2 * n**3 / median_seconds(lambda: matmul(a, b).block_until_ready(), warmup, repeats) / 1e9


def matmul_torch_gflops(n: int, warmup: int, repeats: int) -> float:
    """float32 n×n @ n×n through PyTorch (oneDNN/MKL on CPU), GFLOP/s."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / median_seconds(lambda: a @ b, warmup, repeats) / 1e9


def bandwidth_gbs(mib: int, warmup: int, repeats: int) -> dict[str, float]:
    """Memory bandwidth, GB/s: XLA read-only (sum), XLA read+write in place (a donated buffer scaled, so no page
    faults from fresh allocations), NumPy copy (one thread, read + write)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    n = mib * 2**20 // 4
    nbytes = n * 4
    x = jnp.ones((n,), jnp.float32)
    total = jax.jit(jnp.sum)
    scale = jax.jit(lambda v: v * 1.0001, donate_argnums=0)
    buffer = {"x": jnp.ones((n,), jnp.float32)}

    def scale_in_place() -> None:
        buffer["x"] = scale(buffer["x"])
        buffer["x"].block_until_ready()

    src, dst = np.ones(n, np.float32), np.empty(n, np.float32)
    return {
        "xla_read": nbytes / median_seconds(lambda: total(x).block_until_ready(), warmup, repeats) / 1e9,
        "xla_read_write": 2 * nbytes / median_seconds(scale_in_place, warmup, repeats) / 1e9,
        "numpy_copy": 2 * nbytes / median_seconds(lambda: np.copyto(dst, src), warmup, repeats) / 1e9,
    }


# ---------------------------------------------------------------------------------------------------- the model
def model_config(w: Workload) -> Any:
    """The workload's ModelConfig: Llama-shaped, untied, float32."""
    from tulu_jax.models import ModelConfig

    return ModelConfig(vocab_size=w.vocab, hidden_size=w.hidden, intermediate_size=w.intermediate,
                       num_layers=w.layers, num_heads=w.heads, num_kv_heads=w.kv_heads, head_dim=w.head_dim,
                       rope_theta=w.rope_theta, tie_word_embeddings=False, max_position_embeddings=4096)


def build_model(w: Workload) -> Any:
    """The workload's Decoder, random init (std 0.02) on one device."""
    from flax import nnx

    from tulu_jax.models import Decoder

    return Decoder(model_config(w), rngs=nnx.Rngs(0))


def bench_train(model, w: Workload, warmup: int, repeats: int) -> dict[str, float]:
    """Jitted jax.value_and_grad of the mean token NLL over a random [B, S] batch."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from tulu_jax.losses import token_logps

    graphdef, params = nnx.split(model)
    ids = jax.random.randint(jax.random.key(1), (w.sft_batch, w.sft_seq + 1), 0, w.vocab, jnp.int32)
    inputs, targets = ids[:, :-1], ids[:, 1:]

    @jax.jit
    def step(params, inputs, targets):
        def loss_fn(params):
            return -jnp.mean(token_logps(nnx.merge(graphdef, params)(inputs), targets))

        return jax.value_and_grad(loss_fn)(params)

    seconds = median_seconds(lambda: jax.block_until_ready(step(params, inputs, targets)), warmup, repeats)
    flops = w.sft_step_flops()
    return {"step_s": seconds, "tokens_per_s": w.sft_batch * w.sft_seq / seconds, "gflops": flops / seconds / 1e9}


def random_prompts(w: Workload) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(0)
    return [list(map(int, rng.integers(1, w.vocab, w.gen_prompt))) for _ in range(w.gen_batch)]


def bench_sampler(model, w: Workload, warmup: int, repeats: int) -> dict[str, Any]:
    """Greedy generate: end-to-end new tokens/s, prefill time, and per-step decode time."""
    from tulu_jax.models.sampler import generate

    prompts = random_prompts(w)
    result = {}

    def run(n):
        result["last"] = generate(model, prompts, max_new_tokens=n)

    seconds = median_seconds(lambda: run(w.gen_new), warmup, repeats)
    tokens = result["last"].tokens
    prefill = median_seconds(lambda: run(1), warmup, repeats)
    return {"seconds": seconds, "new_tokens_per_s": w.gen_batch * w.gen_new / seconds, "prefill_s": prefill,
            "decode_step_s": (seconds - prefill) / (w.gen_new - 1), "tokens": tokens}


def decode_bytes_per_step(w: Workload) -> int:
    """Bytes one decode step must read: every weight used in a matmul plus the whole KV cache (float32)."""
    from tulu_jax.models.sampler import bucket_length

    slots = bucket_length(w.gen_prompt) + bucket_length(w.gen_new)
    kv = 2 * w.layers * w.gen_batch * slots * w.kv_heads * w.head_dim
    return 4 * (w.matmul_params() + kv)


def bench_hf_generate(model, w: Workload, warmup: int, repeats: int) -> dict[str, Any]:
    """transformers' generate (greedy, KV cache) on the same weights, exported through save_hf_checkpoint."""
    import numpy as np
    import torch
    import transformers

    from tulu_jax.models import save_hf_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        save_hf_checkpoint(model, tmp)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    ids = torch.tensor(random_prompts(w))
    result = {}

    def run():
        with torch.inference_mode():
            result["out"] = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                        max_new_tokens=w.gen_new, min_new_tokens=w.gen_new,
                                        eos_token_id=None, pad_token_id=0)

    seconds = median_seconds(run, warmup, repeats)
    tokens = result["out"][:, w.gen_prompt:].numpy().astype(np.int32)
    return {"seconds": seconds, "new_tokens_per_s": w.gen_batch * w.gen_new / seconds, "tokens": tokens}


# ---------------------------------------------------------------------------------------------------- reporting
def publish(kind: str, text: str, *, quick: bool, append: bool, sweep: bool = False,
            workload: str = "standard") -> None:
    """Print a dated report (versions, CPUs, `text`) and append it to RESULTS.md unless it is a quick run."""
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    title = f"## {stamp} — {kind}{'quick' if quick else workload} workload{' sweep' if sweep else ''}"
    report = f"{title}\n\n{versions()}; {os.cpu_count()} CPUs\n\n{text}"
    print(report)
    if append or not quick:
        with open(RESULTS, "a", encoding="utf-8") as f:
            f.write("\n" + report)


def versions() -> str:
    import jax
    import jaxlib
    import torch
    import transformers

    return (f"jax {jax.__version__}, jaxlib {jaxlib.__version__}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, python {platform.python_version()}")


def run_sections(w: Workload, sections: set[str], warmup: int, repeats: int) -> dict[str, Any]:
    """Run the chosen sections in this process; returns the raw figures."""
    import numpy as np

    out: dict[str, Any] = {"load_before": os.getloadavg()[0]}
    if "matmul" in sections:
        out["matmul_jax"] = matmul_jax_gflops(w.matmul_n, warmup, repeats)
        out["matmul_torch"] = matmul_torch_gflops(w.matmul_n, warmup, repeats)
    if "bandwidth" in sections:
        out["bandwidth"] = bandwidth_gbs(w.bandwidth_mib, warmup, repeats)
    model = build_model(w) if sections & {"train", "sampler"} else None
    if "train" in sections:
        out["train"] = bench_train(model, w, warmup, repeats)
        out["train_rss_gib"] = peak_rss_gib()  # measured before the sampler and torch allocate anything
    if "sampler" in sections:
        sampled = bench_sampler(model, w, warmup, repeats)
        out["sampler"] = {k: v for k, v in sampled.items() if k != "tokens"}
        if "hf" in sections:
            hf = bench_hf_generate(model, w, warmup, repeats)
            out["hf_generate"] = {k: v for k, v in hf.items() if k != "tokens"}
            # Sanity check, not a test: random-init logits are nearly flat, so late near-ties may diverge.
            out["greedy_agreement"] = float(np.mean(sampled["tokens"] == hf["tokens"]))
    out["load_after"] = os.getloadavg()[0]
    return out


def table(w: Workload, r: dict[str, Any], flags: str) -> str:
    """A Markdown table of one run's figures."""
    rows = []
    peak = r.get("matmul_jax")
    if peak is not None:
        rows.append((f"float32 {w.matmul_n}² matmul, XLA", "—", f"{peak:.0f}", "the MFU denominator"))
        rows.append((f"float32 {w.matmul_n}² matmul, PyTorch", "—", f"{r['matmul_torch']:.0f}", "reference"))
    bw = r.get("bandwidth")
    if bw:
        rows.append(("memory bandwidth, GB/s", "—", "—",
                     f"XLA read {bw['xla_read']:.1f}, XLA read+write in place {bw['xla_read_write']:.1f}, "
                     f"NumPy copy {bw['numpy_copy']:.1f}"))
    if "train" in r:
        t = r["train"]
        mfu = f", MFU {t['gflops'] / peak:.0%} of the XLA matmul" if peak else ""
        rows.append((f"fwd+bwd, batch {w.sft_batch}×{w.sft_seq}", f"{t['tokens_per_s']:.0f}",
                     f"{t['gflops']:.0f}", f"{t['step_s']:.2f} s/step{mfu}; peak RSS {r['train_rss_gib']:.2f} GiB"))
    if "sampler" in r:
        s = r["sampler"]
        machine_bw = max(bw.values()) if bw else None
        step_bw = decode_bytes_per_step(w) / s["decode_step_s"] / 1e9
        frac = f" = {step_bw / machine_bw:.0%} of {machine_bw:.1f}" if machine_bw else ""
        rows.append((f"generate, tulu-jax, {w.gen_batch}×{w.gen_prompt} + {w.gen_new} greedy",
                     f"{s['new_tokens_per_s']:.0f} new", "—",
                     f"{s['seconds']:.2f} s; prefill {s['prefill_s'] * 1e3:.0f} ms; decode "
                     f"{s['decode_step_s'] * 1e3:.1f} ms/step reads {step_bw:.1f} GB/s{frac}"))
    if "hf_generate" in r:
        h = r["hf_generate"]
        ratio = r["sampler"]["new_tokens_per_s"] / h["new_tokens_per_s"]
        rows.append(("generate, transformers (same weights)", f"{h['new_tokens_per_s']:.0f} new", "—",
                     f"{h['seconds']:.2f} s; tulu-jax is {ratio:.2f}×; greedy tokens agree "
                     f"{r['greedy_agreement']:.0%}"))
    head = "| what | tokens/s | GFLOP/s | note |\n|---|---|---|---|\n"
    body = "\n".join("| " + " | ".join(row) + " |" for row in rows)
    meta = (f"XLA_FLAGS=`{flags or '(none)'}`; load average {r['load_before']:.1f} before, "
            f"{r['load_after']:.1f} after (2 cores shared: figures are noisy)")
    return f"{head}{body}\n\n{meta}\n"


def sweep(args: argparse.Namespace) -> str:
    """Re-run this script per XLA flag set (flags only take effect before JAX starts); a comparison table."""
    lines = ["| XLA_FLAGS | matmul GFLOP/s | fwd+bwd tokens/s | fwd+bwd GFLOP/s | decode ms/step | load |",
             "|---|---|---|---|---|---|"]
    for name, flags in SWEEP_FLAGS.items():
        env = dict(os.environ, XLA_FLAGS=flags)
        cmd = [sys.executable, __file__, "--json", "--sections", "matmul,train,sampler",
               "--warmup", str(args.warmup), "--repeats", str(args.repeats)] + (["--quick"] if args.quick else [])
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if proc.returncode:
            lines.append(f"| {name}: `{flags}` | failed: {proc.stderr.strip().splitlines()[-1][:120]} | | | | |")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        lines.append(f"| {name}: `{flags or '(none)'}` | {r['matmul_jax']:.0f} | {r['train']['tokens_per_s']:.0f} | "
                     f"{r['train']['gflops']:.0f} | {r['sampler']['decode_step_s'] * 1e3:.1f} | "
                     f"{r['load_before']:.1f}–{r['load_after']:.1f} |")
        print(lines[-1], flush=True)
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small smoke workload")
    parser.add_argument("--sections", default="matmul,bandwidth,train,sampler,hf",
                        help="comma list of matmul, bandwidth, train, sampler, hf")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sweep", action="store_true", help="compare XLA flag sets (one subprocess each)")
    parser.add_argument("--json", action="store_true", help="print the raw figures as one JSON line (no table)")
    parser.add_argument("--append", action="store_true", help="append to RESULTS.md even with --quick")
    args = parser.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a libtpu install would otherwise probe for TPUs
    w = QUICK if args.quick else STANDARD

    if args.sweep:
        text = "XLA flag sweep (" + ("quick" if args.quick else "standard") + " workload)\n\n" + sweep(args)
    else:
        r = run_sections(w, set(args.sections.split(",")), args.warmup, args.repeats)
        if args.json:
            print(json.dumps(r))
            return
        text = table(w, r, os.environ.get("XLA_FLAGS", ""))
    publish("", text, quick=args.quick, append=args.append, sweep=args.sweep)


if __name__ == "__main__":
    main()
