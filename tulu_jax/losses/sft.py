"""Supervised fine-tuning loss with explicit denominators (Tülu 3 report §4.3.2: sum over tokens / sequences)."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from tulu_jax.errors import ConfigError
from tulu_jax.losses.common import count_sequences, masked_sum, safe_denominator, token_logps

Array = jax.Array
REDUCTIONS = ("sum", "mean")


def sft_loss(
    logits: Array,
    targets: Array,
    loss_mask: Array,
    *,
    reduction: Literal["sum", "mean"] = "sum",
    num_sequences: Array | int | None = None,
    num_tokens: Array | int | None = None,
    segment_ids: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Token negative log-likelihood of the supervised targets, divided by an explicit denominator.

    Args:
      logits: [B, T, V] model outputs (any float dtype; float32 inside).
      targets: [B, T] next-token ids (batch contract).
      loss_mask: [B, T] bool, True where the target is supervised.
      reduction: "sum" (recipe default) = Σ NLL / num_sequences; "mean" = Σ NLL / num_tokens.
      num_sequences: denominator of "sum". Pass the GLOBAL batch's count under gradient accumulation, so that the
        micro-batch losses (and gradients) add up to the full-batch ones. Default: Σ max(segment_ids) if
        `segment_ids` is given, else the number of rows with at least one supervised token (right for padded
        batches, wrong for packed ones: pass `segment_ids` or the count for those).
      num_tokens: denominator of "mean" (global count under accumulation). Default: Σ loss_mask.
      segment_ids: [B, T] optional, only used for the default `num_sequences`.

    Returns:
      (loss, metrics) with metrics `nll_sum` and `supervised_tokens` over THIS call's arrays (so they add up over
      micro-batches) and `denominator`, the value the loss was divided by (max(count, 1): empty batches give 0).
    """
    if reduction not in REDUCTIONS:
        raise ConfigError(f"sft_loss: reduction {reduction!r} is not one of {REDUCTIONS}")
    mask = loss_mask.astype(bool)
    nll_sum = -masked_sum(token_logps(logits, targets), mask)
    supervised_tokens = jnp.sum(mask, dtype=jnp.int32)
    if reduction == "sum":
        if num_sequences is None:
            num_sequences = count_sequences(segment_ids) if segment_ids is not None else jnp.sum(jnp.any(mask, axis=-1))
        denominator = safe_denominator(num_sequences)
    else:
        denominator = safe_denominator(supervised_tokens if num_tokens is None else num_tokens)
    loss = nll_sum / denominator
    metrics = {
        "loss": jax.lax.stop_gradient(loss),
        "nll_sum": jax.lax.stop_gradient(nll_sum),
        "supervised_tokens": supervised_tokens,
        "denominator": denominator,
    }
    return loss, metrics
