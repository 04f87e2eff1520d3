"""Rollout throughput on varied-length responses: the continuous-batching engine (tulu_jax.rl.engine) against the
static sampler (tulu_jax.models.sampler.generate, batches of `--slots` prompts, each decoding until its longest row
stops) and transformers' generate with the same stopping, on the same weights.

Workload: `--prompts` random prompts of uniform length in [16, `--max-prompt`], temperature-1 sampling (no top-k /
top-p), responses stop at a sampled stop id: a set of vocab/`--mean-len` ids, so on the near-flat random-init
distribution a response's length is roughly geometric with mean `--mean-len`, capped at `--max-new`. Generated
tokens/s = tokens produced (stop included) / wall time of the whole workload; the JAX stacks run it once untimed
(compiles) and once timed, PyTorch once. Prints one JSON line.

    python benchmarks/bench_rollout.py [--model standard|small] [--prompts 256] [--max-new 512] [--slots 16]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_model import model_config  # noqa: E402
from workload import STANDARD  # noqa: E402

SMALL = dataclasses.replace(STANDARD, vocab=8000, hidden=256, intermediate=768, layers=4)


def workload(args: argparse.Namespace, vocab: int) -> tuple[list[list[int]], list[int]]:
    import numpy as np

    rng = np.random.default_rng(0)
    prompts = [list(map(int, rng.integers(1, vocab, n))) for n in rng.integers(16, args.max_prompt + 1, args.prompts)]
    stops = sorted(map(int, rng.choice(np.arange(1, vocab), vocab // args.mean_len, replace=False)))
    return prompts, stops


def twice(fn: Any) -> tuple[float, Any]:
    """Run once untimed (compiles), then once timed: (seconds, result of the timed run)."""
    fn()
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def bench_static(model: Any, prompts: list, stops: list, args: argparse.Namespace) -> dict[str, Any]:
    import jax
    import numpy as np

    from tulu_jax.models.sampler import generate

    def run() -> int:
        produced = 0
        for i, start in enumerate(range(0, len(prompts), args.slots)):
            out = generate(model, prompts[start:start + args.slots], max_new_tokens=args.max_new, temperature=1.0,
                           stop_ids=stops, rng=jax.random.fold_in(jax.random.key(1), i), logprobs=False)
            produced += int(np.sum(out.lengths))
        return produced
    seconds, produced = twice(run)
    return {"seconds": seconds, "tokens": produced, "tokens_per_s": produced / seconds}


def bench_engine(model: Any, prompts: list, stops: list, args: argparse.Namespace) -> dict[str, Any]:
    import jax
    import numpy as np
    from flax import nnx

    from tulu_jax.rl.engine import RolloutEngine

    graphdef, state = nnx.split(model)
    engine = RolloutEngine(graphdef, model.config, slots=args.slots, max_prompt_len=args.max_prompt,
                           max_new_tokens=args.max_new, temperature=1.0, logprobs=False,
                           refill_every=args.refill_every)
    seconds, out = twice(lambda: engine.run((state,), prompts, jax.random.key(1), stop_ids=stops))
    lengths = out.lengths
    return {"seconds": seconds, "tokens": int(lengths.sum()), "tokens_per_s": float(lengths.sum()) / seconds,
            "refills": out.refills, "decode_steps": out.decode_steps,
            "length_quantiles": [int(np.quantile(lengths, q)) for q in (0.1, 0.5, 0.9, 1.0)]}


def bench_hf(model: Any, prompts: list, stops: list, args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers

    from tulu_jax.models import save_hf_checkpoint

    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        save_hf_checkpoint(model, tmp)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()

    def run() -> int:
        torch.manual_seed(1)
        produced = 0
        for start in range(0, len(prompts), args.slots):
            batch = prompts[start:start + args.slots]
            width = max(map(len, batch))
            ids = torch.tensor([[0] * (width - len(p)) + p for p in batch])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
            with torch.inference_mode():
                out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                                  top_p=1.0, max_new_tokens=args.max_new, eos_token_id=stops, pad_token_id=0)
            new = out[:, width:]
            stopped = torch.isin(new, torch.tensor(stops))
            # length = up to and including the first stop id, else everything generated
            first = torch.where(stopped.any(1), stopped.float().argmax(1) + 1, torch.full((len(batch),), new.shape[1]))
            produced += int(first.sum())
        return produced
    start = time.perf_counter()  # no compile step in eager PyTorch: one timed run
    produced = run()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": produced, "tokens_per_s": produced / seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["standard", "small"], default="standard")
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--max-prompt", type=int, default=128)
    ap.add_argument("--max-new", type=int, default=512)
    ap.add_argument("--mean-len", type=int, default=128)
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--refill-every", type=int, default=16)
    ap.add_argument("--stacks", default="engine,static,hf")
    args = ap.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    from flax import nnx

    from tulu_jax.models import Decoder

    w = STANDARD if args.model == "standard" else SMALL
    model = Decoder(model_config(w), rngs=nnx.Rngs(0))
    prompts, stops = workload(args, w.vocab)
    result: dict[str, Any] = {"bench": "rollout", "args": vars(args),
                              "jax": jax.__version__, "load_before": os.getloadavg()[0]}
    for stack in args.stacks.split(","):
        print(f"[bench_rollout] {stack}", file=sys.stderr, flush=True)
        result[stack] = {"engine": bench_engine, "static": bench_static, "hf": bench_hf}[stack](model, prompts, stops,
                                                                                                args)
        print(f"[bench_rollout] {stack}: {result[stack]}", file=sys.stderr, flush=True)
    result["load_after"] = os.getloadavg()[0]
    for other in ("static", "hf"):
        if "engine" in result and other in result:
            result[f"engine_vs_{other}"] = result["engine"]["tokens_per_s"] / result[other]["tokens_per_s"]
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
