"""Reward-model loss on preference pairs: −log σ(r_c − r_r), the rewards taken at each side's last token."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tulu_jax.losses.common import compute_dtype, masked_sum, safe_denominator

Array = jax.Array


def last_token_index(mask: Array) -> Array:
    """[N] int32 index of the last True position of each row of `mask` [N, T]; −1 for a row without any."""
    positions = jnp.arange(mask.shape[-1], dtype=jnp.int32)
    return jnp.max(jnp.where(mask.astype(bool), positions, -1), axis=-1)


def last_token_values(values: Array, mask: Array) -> Array:
    """values [N, T] at each row's last `mask` position → [N] (0 for a row without any)."""
    index = last_token_index(mask)
    picked = jnp.take_along_axis(values, jnp.maximum(index, 0)[:, None], axis=1)[:, 0]
    return jnp.where(index >= 0, picked, jnp.zeros_like(picked))


def reward_model_loss(
    chosen_rewards: Array,
    rejected_rewards: Array,
    *,
    pair_mask: Array | None = None,
    num_pairs: Array | int | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Bradley-Terry loss Σ_pairs −log σ(r_c − r_r) / num_pairs (Tülu 3's RM, InstructGPT's objective).

    Args:
      chosen_rewards, rejected_rewards: [P] scalar rewards (e.g. `last_token_values` of the RewardModel output
        over each side's tokens).
      pair_mask: [P] bool, False for padding pairs (left out of the loss and the metrics).
      num_pairs: denominator (the global pair count under accumulation); default Σ pair_mask.

    Returns:
      (loss, metrics): `loss` (detached), `accuracy` (r_c > r_r), `margin` (r_c − r_r), `chosen_reward`,
      `rejected_reward`; each Σ over valid pairs / num_pairs, so they add up over micro-batches.
    """
    dtype = compute_dtype(chosen_rewards)
    valid = jnp.ones(chosen_rewards.shape, bool) if pair_mask is None else pair_mask.astype(bool)
    rc = jnp.where(valid, chosen_rewards.astype(dtype), 0.0)
    rr = jnp.where(valid, rejected_rewards.astype(dtype), 0.0)
    margin = rc - rr
    denominator = safe_denominator(jnp.sum(valid) if num_pairs is None else num_pairs)
    loss = masked_sum(-jax.nn.log_sigmoid(margin), valid) / denominator

    def mean(x: Array) -> Array:
        return jax.lax.stop_gradient(masked_sum(x, valid) / denominator)

    metrics = {
        "loss": jax.lax.stop_gradient(loss),
        "accuracy": mean((margin > 0).astype(dtype)),
        "margin": mean(margin),
        "chosen_reward": mean(rc),
        "rejected_reward": mean(rr),
    }
    return loss, metrics
