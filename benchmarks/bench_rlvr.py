"""RLVR training-side benchmark: the rollout → batch program (`prepare`) and the GRPO step on one iteration's
rollout, with and without shared prompts and the sampler's old log-probs, each in its own process.

Workload (default: the toy pipeline's RLVR iteration, `configs/tiny_arith.yaml`): a Llama-shape model (hidden 128,
intermediate 384, 4 layers, 4 heads / 2 KV heads, head dim 32, the bundled tokenizer's vocabulary of 384, float32,
random init), `--prompts` 32 prompts × `--group` 8 samples, prompts of 35–55 tokens left-padded to `--prompt-width`
64, responses of 10–27 tokens in `--new` 32 columns; GRPO, β 0.01, one update per rollout. The variants:

- `whole_rows`: `rlvr.share_prompts: false`, `rlvr.reuse_sampler_logps: false` (every row's prompt in every forward;
  prepare recomputes the policy's old log-probs): how the stage ran before;
- `shared_prompts`: each group's prompt runs once in the forwards of prepare and step;
- `shared_prompts_sampler_logps`: also the sampler's log-probs as the old ones (prepare runs only the reference):
  the stage's default.

Figures: the median of `--repeats` calls after `--warmup`, seconds for prepare and for the step, rollout tokens/s =
B·(P + N) / (prepare + step), the FLOPs each program executes (2·N_tokens·params in matmuls + attention; the step
3× its forward) as GFLOP/s and MFU against the float32 4096² XLA matmul measured in the same process, peak RSS.
Appends a Markdown table to benchmarks/RESULTS.md (not with --quick unless --append).

    python benchmarks/bench_rlvr.py            # the toy pipeline's iteration, about a minute per variant
    python benchmarks/bench_rlvr.py --quick    # 4 prompts, a smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import tempfile
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_model import matmul_jax_gflops, median_seconds, peak_rss_gib, publish, subprocess_json  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
VARIANTS = {  # name: (share_prompts, reuse_sampler_logps)
    "whole_rows": (False, False),
    "shared_prompts": (True, False),
    "shared_prompts_sampler_logps": (True, True),
}
LABELS = {
    "whole_rows": "whole rows, old log-probs recomputed (before)",
    "shared_prompts": "shared prompts, old log-probs recomputed",
    "shared_prompts_sampler_logps": "shared prompts, the sampler's old log-probs (the default)",
}


@dataclasses.dataclass(frozen=True)
class RolloutShape:
    """One iteration's rollout and the model it trains."""

    prompts: int = 32
    group: int = 8
    prompt_width: int = 64
    new: int = 32
    hidden: int = 128
    intermediate: int = 384
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32
    vocab: int = 384  # the bundled tiny tokenizer's

    @property
    def rows(self) -> int:
        """Sequences in the rollout."""
        return self.prompts * self.group

    def layer_params(self) -> int:
        """Matmul parameters of the transformer blocks."""
        d, hd = self.hidden, self.head_dim
        return self.layers * (2 * d * self.heads * hd + 2 * d * self.kv_heads * hd + 3 * d * self.intermediate)

    def forward_flops(self, shared: bool) -> float:
        """One forward's FLOPs over the rollout: blocks on the tokens that run, attention over the keys each query
        sees (full squares, as the einsum computes them), the LM head on the positions whose log-probs are taken."""
        b, p, n, d, L = self.rows, self.prompt_width, self.new, self.hidden, self.layers
        if shared:
            tokens, head_positions = self.prompts * p + b * n, b * n
            attention = self.prompts * p * p + b * n * (p + n)
        else:
            tokens, head_positions = b * (p + n), b * (p + n)
            attention = b * (p + n) ** 2
        return 2 * self.layer_params() * tokens + 4 * L * d * attention + 2 * self.vocab * d * head_positions


QUICK = RolloutShape(prompts=4)


def config_overrides(shape: RolloutShape, variant: str, run_dir: str) -> list[str]:
    """`configs/tiny_rlvr.yaml` turned into the benchmark's GRPO iteration."""
    share, reuse = VARIANTS[variant]
    model = {"vocab_size": shape.vocab, "hidden_size": shape.hidden, "intermediate_size": shape.intermediate,
             "num_layers": shape.layers, "num_heads": shape.heads, "num_kv_heads": shape.kv_heads,
             "head_dim": shape.head_dim}
    return [f"model.overrides={json.dumps(model)}", "rlvr.algorithm=grpo", f"rlvr.group_size={shape.group}",
            "rlvr.kl_coef=0.01", f"rlvr.max_new_tokens={shape.new}", "rlvr.ppo_epochs=1", "rlvr.num_minibatches=1",
            f"rlvr.share_prompts={str(share).lower()}", f"rlvr.reuse_sampler_logps={str(reuse).lower()}",
            f"train.global_batch_size={shape.rows}", "optim.schedule=constant", f"output.run_dir={run_dir}"]


def rollout(shape: RolloutShape, vocab: int) -> tuple[Any, ...]:
    """A fixed host rollout: groups sharing a left-padded prompt of 35–55 tokens, responses of 10–27 tokens, and
    placeholder sampler log-probs (`run_variant` replaces them with the policy's)."""
    import numpy as np

    rng = np.random.default_rng(0)
    b, p, n = shape.rows, shape.prompt_width, shape.new
    prompt_len = np.repeat(rng.integers(min(35, p), min(56, p + 1), shape.prompts), shape.group)
    prompt_mask = np.arange(p)[None] >= (p - prompt_len)[:, None]
    prompt_ids = np.repeat(rng.integers(5, vocab, (shape.prompts, p)), shape.group, 0) * prompt_mask
    lengths = rng.integers(min(10, n), min(28, n + 1), b).astype(np.int32)
    response = rng.integers(5, vocab, (b, n)) * (np.arange(n)[None] < lengths[:, None])
    return (prompt_ids.astype(np.int32), prompt_mask, response.astype(np.int32), lengths, np.ones(b, bool),
            (rng.random(b) < 0.45).astype(np.float32), np.zeros((b, n), np.float32))


def run_variant(variant: str, shape: RolloutShape, warmup: int, repeats: int) -> dict[str, Any]:
    """Prepare and step of one variant in this process: median seconds, peak RSS, the XLA matmul rate."""
    import jax

    from tulu_jax.rl.ppo_step import POLICY
    from tulu_jax.stages.rlvr import STAGE, RLVRConfig
    from tulu_jax.stages.sections import load_stage_config

    os.chdir(REPO)  # the config's tokenizer and data paths are the repository's
    out: dict[str, Any] = {"load_before": os.getloadavg()[0]}
    config = load_stage_config(RLVRConfig, "configs/tiny_rlvr.yaml",
                               config_overrides(shape, variant, tempfile.mkdtemp()))
    setup = STAGE.setup(config, "sharding/cpu-1.yaml")
    policy = setup.state.models[POLICY]
    prepare, step = STAGE.build_prepare(setup), STAGE.build_step(setup)
    *args, _ = rollout(shape, setup.model_config.vocab_size)
    # The "sampler's" log-probs are the policy's own (a recomputing prepare, untimed), as a real rollout's are:
    # every variant then trains on the same batch and reports the same loss.
    recompute = STAGE.build_prepare(setup, dataclasses.replace(config.rlvr, reuse_sampler_logps=False))
    batch, _ = recompute({POLICY: (policy.params, policy.model_state)}, setup.frozen, *args, _)
    args.append(batch.old_logps[:, shape.prompt_width:])
    holder = {"state": setup.state}

    def call_prepare() -> None:
        models = {POLICY: (holder["state"].models[POLICY].params, holder["state"].models[POLICY].model_state)}
        holder["batch"], metrics = prepare(models, setup.frozen, *args)
        jax.block_until_ready((holder["batch"], metrics))

    def call_step() -> None:
        holder["state"], metrics = step(holder["state"], holder["batch"], setup.frozen)
        out["loss"] = float(metrics["loss"])  # blocks until done

    out["prepare_s"] = median_seconds(call_prepare, warmup, repeats)
    out["step_s"] = median_seconds(call_step, warmup, repeats)
    out["rss_gib"] = peak_rss_gib()
    out["matmul"] = matmul_jax_gflops(4096, 1, 3)
    out["load_after"] = os.getloadavg()[0]
    return out


def table(shape: RolloutShape, results: dict[str, dict[str, Any]]) -> str:
    """A Markdown table of the variants, the speed-up against whole rows."""
    tokens = shape.rows * (shape.prompt_width + shape.new)
    base = results["whole_rows"]
    base_s = base["prepare_s"] + base["step_s"]
    rows = []
    for variant, r in results.items():
        share, reuse = VARIANTS[variant]
        forward = shape.forward_flops(share)
        flops = 3 * forward + forward * (1 if reuse else 2)  # the step's forward + backward; prepare's forwards
        seconds = r["prepare_s"] + r["step_s"]
        gflops = flops / seconds / 1e9
        rows.append((LABELS[variant], f"{r['prepare_s']:.3f}", f"{r['step_s']:.3f}", f"{tokens / seconds:.0f}",
                     f"{base_s / seconds:.2f}×", f"{gflops:.0f}", f"{gflops / r['matmul']:.0%}",
                     f"{r['rss_gib']:.2f}", f"loss {r['loss']:.6f}, XLA matmul {r['matmul']:.0f} GFLOP/s, load "
                     f"{r['load_before']:.1f}–{r['load_after']:.1f}"))
    head = ("| variant | prepare s | step s | rollout tokens/s | speed-up | GFLOP/s executed | MFU | peak RSS GiB | "
            "note |\n|---|---|---|---|---|---|---|---|---|\n")
    body = "\n".join("| " + " | ".join(row) + " |" for row in rows)
    meta = (f"{shape.prompts} prompts × {shape.group} samples = {shape.rows} rows × ({shape.prompt_width} prompt + "
            f"{shape.new} response) columns = {tokens} rollout tokens; model hidden {shape.hidden}, "
            f"{shape.layers} layers, vocab {shape.vocab}, float32; GRPO, one update per rollout; one CPU device, "
            f"each variant in its own process; XLA_FLAGS=`{os.environ.get('XLA_FLAGS') or '(none)'}`")
    return f"{head}{body}\n\n{meta}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 prompts: a smoke run")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variant", choices=VARIANTS, help="run one variant and print its JSON (internal)")
    parser.add_argument("--append", action="store_true", help="append to RESULTS.md even with --quick")
    args = parser.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    shape = QUICK if args.quick else RolloutShape()
    if args.variant:
        print(json.dumps(run_variant(args.variant, shape, args.warmup, args.repeats)))
        return
    common = ["--warmup", str(args.warmup), "--repeats", str(args.repeats)] + (["--quick"] if args.quick else [])
    results = {}
    for variant in VARIANTS:
        results[variant] = subprocess_json(__file__, ["--variant", variant, *common])
        print(variant, json.dumps(results[variant]), flush=True)
    publish("RLVR iteration (training side), ", table(shape, results), quick=args.quick, append=args.append,
            workload="toy pipeline RLVR")


if __name__ == "__main__":
    main()
