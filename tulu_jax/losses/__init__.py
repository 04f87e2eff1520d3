"""Losses: pure functions of arrays (no model, no mesh), float32 inside, explicit denominators."""

from tulu_jax.losses.common import count_sequences, masked_sum, safe_denominator, token_logps
from tulu_jax.losses.dpo import LOSS_TYPES, dpo_loss, needs_reference, sequence_logps, uses_average_logps
from tulu_jax.losses.sft import REDUCTIONS, sft_loss

__all__ = [
    "LOSS_TYPES",
    "REDUCTIONS",
    "count_sequences",
    "dpo_loss",
    "masked_sum",
    "needs_reference",
    "safe_denominator",
    "sequence_logps",
    "sft_loss",
    "token_logps",
    "uses_average_logps",
]
