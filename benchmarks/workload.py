"""The standard benchmark workload, as one value.

Source: the side-by-side harness's `../shared/bench/workload.py` (the constants TRL/PyTorch, Tunix and tulu-jax are
all measured on); copied here so a clone without `../shared` runs `benchmarks/standard.py` on the same problem.
Keep the `STANDARD` values equal to the harness's: its FLOP formulas and ratios assume them. `QUICK` and `TINY` are
this repository's own smoke sizes (bench_model / bench_sft / bench_dpo `--quick`, standard.py `--tiny`).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Workload:
    """Model shape (Llama, float32, untied, random init seed 0), problem sizes and the timing protocol."""

    vocab: int = 32000
    hidden: int = 512
    intermediate: int = 1536
    layers: int = 8
    heads: int = 8
    kv_heads: int = 4
    rope_theta: float = 500000.0
    sft_batch: int = 8
    sft_seq: int = 512  # every token supervised
    dpo_pairs: int = 8
    dpo_prompt: int = 256
    dpo_response: int = 256  # each side is prompt + response tokens
    dpo_beta: float = 5.0  # length-normalised DPO
    lr: float = 1e-5  # AdamW, weight decay 0, clip 1.0
    grad_clip: float = 1.0
    gen_batch: int = 8
    gen_prompt: int = 128
    gen_new: int = 128  # greedy, KV cache, no early stop
    matmul_n: int = 4096  # the ceiling's float32 matmul size
    bandwidth_mib: int = 1024

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden // self.heads

    def matmul_params(self) -> int:
        """Parameters used in matmuls: q/k/v/o, gate/up/down of every layer and the untied LM head."""
        d, f, hd = self.hidden, self.intermediate, self.head_dim
        attn = d * self.heads * hd + 2 * d * self.kv_heads * hd + self.heads * hd * d
        return self.layers * (attn + 3 * d * f) + self.vocab * d

    def train_flops(self, batch: int, seq: int) -> int:
        """6·N·T + 12·L·d·S²·B (PaLM appendix; full S×S attention square, optimizer not counted)."""
        return 6 * self.matmul_params() * batch * seq + 12 * self.layers * self.hidden * seq * seq * batch

    def sft_step_flops(self) -> int:
        """One SFT train step over sft_batch × sft_seq tokens."""
        return self.train_flops(self.sft_batch, self.sft_seq)

    def dpo_step_flops(self) -> int:
        """The policy's forward + backward on chosen and rejected: 2·pairs sequences of prompt + response."""
        return self.train_flops(2 * self.dpo_pairs, self.dpo_prompt + self.dpo_response)

    def gen_flops(self) -> int:
        """Forward FLOPs of the generation workload: 2·N per token plus 4·L·d·context per token."""
        b, p, g = self.gen_batch, self.gen_prompt, self.gen_new
        ctx = p * p + sum(range(p + 1, p + g + 1))
        return 2 * self.matmul_params() * b * (p + g) + 4 * self.layers * self.hidden * b * ctx


STANDARD = Workload()
# A seconds-long smoke run of the same code paths (tests; no figure from it means anything).
TINY = Workload(vocab=512, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, sft_batch=2, sft_seq=32,
                dpo_pairs=2, dpo_prompt=16, dpo_response=16, gen_batch=2, gen_prompt=16, gen_new=8, matmul_n=256,
                bandwidth_mib=8)
# A small smoke run of the bench_*.py scripts (`--quick`; seconds to a minute, figures only roughly comparable).
QUICK = Workload(vocab=4096, hidden=128, intermediate=384, layers=2, heads=4, kv_heads=2, sft_batch=2, sft_seq=128,
                 dpo_pairs=2, dpo_prompt=64, dpo_response=64, gen_batch=4, gen_prompt=32, gen_new=32, matmul_n=1024,
                 bandwidth_mib=256)
WARMUP_STEPS = 2  # excluded (compile / allocator warm-up)
TIMED_STEPS = 5  # median reported
