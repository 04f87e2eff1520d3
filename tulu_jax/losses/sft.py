"""Supervised fine-tuning loss with explicit denominators (Tülu 3 report §4.3.2: sum over tokens / sequences).

The three reductions, for a global batch split into micro-batches for gradient accumulation:

- ``sum`` (the recipe's): Σ token NLL of the global batch / its number of sequences. Every sequence weighs the
  same, whatever its length or micro-batch.
- ``mean``: Σ token NLL of the global batch / its number of supervised tokens: a global token mean, the same
  weighting of tokens as ``sum`` (every token equal) on another scale (the learning rate absorbs it).
- ``mean_per_micro_batch`` (the report's worse baseline, Hugging Face's default under gradient accumulation): each
  micro-batch's token mean, averaged over the micro-batches. Tokens of a micro-batch with few supervised tokens weigh
  more. The micro-batch is the global one (all data-parallel shards together).
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp

from tulu_jax.errors import ConfigError
from tulu_jax.losses.common import count_sequences, masked_sum, safe_denominator, token_logps

Array = jax.Array
REDUCTIONS = ("sum", "mean", "mean_per_micro_batch")
Reduction = Literal["sum", "mean", "mean_per_micro_batch"]


def sft_loss(logits: Array, targets: Array, loss_mask: Array, **kwargs: Any) -> tuple[Array, dict[str, Array]]:
    """`sft_loss_from_logps` of the targets' log-probs under `logits` [B, T, V] (any float dtype; float32 inside).

    (A model's `token_logps` gives the same log-probs without ever holding [B, T, V] float32 logits.)
    """
    return sft_loss_from_logps(token_logps(logits, targets), loss_mask, **kwargs)


def sft_loss_from_logps(
    logps: Array,
    loss_mask: Array,
    *,
    reduction: Reduction = "sum",
    num_sequences: Array | int | None = None,
    num_tokens: Array | int | None = None,
    segment_ids: Array | None = None,
    num_micro_batches: int = 1,
) -> tuple[Array, dict[str, Array]]:
    """Token negative log-likelihood of the supervised targets, divided by an explicit denominator.

    Args:
      logps: [B, T] log-probs of the next-token targets (batch contract), float32.
      loss_mask: [B, T] bool, True where the target is supervised.
      reduction: "sum" (recipe default) = Σ NLL / num_sequences; "mean" = Σ NLL / num_tokens;
        "mean_per_micro_batch" = Σ NLL / (this call's supervised tokens × num_micro_batches), so that the
        micro-batch losses add up to the average of their token means (see the module docstring).
      num_sequences: denominator of "sum". Pass the GLOBAL batch's count under gradient accumulation, so that the
        micro-batch losses (and gradients) add up to the full-batch ones. Default: Σ max(segment_ids) if
        `segment_ids` is given, else the number of rows with at least one supervised token (right for padded
        batches, wrong for packed ones: pass `segment_ids` or the count for those).
      num_tokens: denominator of "mean" (global count under accumulation). Default: Σ loss_mask.
      segment_ids: [B, T] optional, only used for the default `num_sequences`.
      num_micro_batches: the number of micro-batches the global batch is split into (only for
        "mean_per_micro_batch").

    Returns:
      (loss, metrics) with metrics `nll_sum` and `supervised_tokens` over THIS call's arrays (so they add up over
      micro-batches) and `denominator`, the value the loss was divided by (max(count, 1): empty batches give 0).
    """
    if reduction not in REDUCTIONS:
        raise ConfigError(f"sft_loss: reduction {reduction!r} is not one of {REDUCTIONS}")
    mask = loss_mask.astype(bool)
    nll_sum = -masked_sum(logps.astype(jnp.float32), mask)
    supervised_tokens = jnp.sum(mask, dtype=jnp.int32)
    if reduction == "sum":
        if num_sequences is None:
            num_sequences = count_sequences(segment_ids) if segment_ids is not None else jnp.sum(jnp.any(mask, axis=-1))
        denominator = safe_denominator(num_sequences)
    elif reduction == "mean":
        denominator = safe_denominator(supervised_tokens if num_tokens is None else num_tokens)
    else:
        denominator = safe_denominator(supervised_tokens) * num_micro_batches
    loss = nll_sum / denominator
    metrics = {
        "loss": jax.lax.stop_gradient(loss),
        "nll_sum": jax.lax.stop_gradient(nll_sum),
        "supervised_tokens": supervised_tokens,
        "denominator": denominator,
    }
    return loss, metrics
