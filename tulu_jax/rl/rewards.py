"""RLVR reward shaping as pure functions of arrays (RECIPE.md "RLVR"; Tülu 3 report §6).

PPO: a sequence score from the verifier and the stop flag, then per-token rewards r_t = −β·kl_t with the score added
at the last response token (the input of `tulu_jax.losses.gae`). GRPO: per-sequence scores → group advantages
broadcast over the response tokens, zero-variance groups dropped. Arrays are [N] per sequence and [N, T] over the
response positions, `mask` True on response tokens.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from tulu_jax.losses.ppo import grpo_advantages, grpo_nonzero_variance
from tulu_jax.losses.reward import last_token_index

Array = jax.Array


def sequence_scores(
    verifier_scores: Array,
    finished: Array,
    *,
    alpha: float = 10.0,
    non_stop_penalty: float | None = -10.0,
) -> Array:
    """Score per sequence: α·verifier score; a response cut off without EOS scores `non_stop_penalty` instead.

    As open-instruct (`non_stop_penalty` / `penalty_reward_value = -10`), the penalty REPLACES the score: a truncated
    response gets −10 whether or not its text happens to verify. `non_stop_penalty=None` turns the penalty off.

    Args:
      verifier_scores: [N] in [0, 1] (`tulu_jax.rl.verifiers`).
      finished: [N] bool, True when the response ended with EOS.
      alpha: the verifier reward multiplier (recipe: 10).

    Returns:
      [N] float32 scores.
    """
    scores = alpha * jnp.asarray(verifier_scores, jnp.float32)
    if non_stop_penalty is None:
        return scores
    return jnp.where(jnp.asarray(finished, bool), scores, jnp.float32(non_stop_penalty))


def token_rewards(scores: Array, kl: Array, mask: Array, *, kl_coef: float) -> Array:
    """Per-token PPO rewards: r_t = −kl_coef·kl_t on response tokens, plus the sequence score at the last one.

    Args:
      scores: [N] sequence scores (`sequence_scores`).
      kl: [N, T] per-token KL estimate, log π − log π_ref (`losses.kl_estimate(..., "k1")`).
      mask: [N, T] bool response mask (a row without response tokens gets no reward at all).
      kl_coef: β (recipe: 0.05 for 8B).

    Returns:
      [N, T] float32 rewards, 0 off the mask.
    """
    m = mask.astype(bool)
    kl = jnp.where(m, jnp.asarray(kl, jnp.float32), 0.0)
    last = jnp.arange(m.shape[-1])[None, :] == last_token_index(m)[:, None]
    return -kl_coef * kl + jnp.where(last, jnp.asarray(scores, jnp.float32)[:, None], 0.0)


def grpo_token_advantages(
    scores: Array,
    mask: Array,
    group_size: int,
    *,
    scale: Literal["std", "none"] = "std",
    drop_zero_variance: bool = True,
) -> tuple[Array, Array, Array]:
    """GRPO advantages over the response tokens, with zero-variance groups dropped and counted.

    Args:
      scores: [N] sequence scores, the G = group_size samples of each prompt consecutive.
      mask: [N, T] bool response mask.
      scale: "std" divides by the group's population std (+1e-8), "none" only centres.
      drop_zero_variance: leave out groups whose scores are all equal (no signal).

    Returns:
      (advantages [N, T] float32 (0 off the returned mask), loss_mask [N, T] bool (`mask` without the dropped
      samples; use it, and its global Σ as num_tokens, in `losses.grpo_policy_loss`), num_dropped_groups int32).
    """
    advantages = grpo_advantages(scores, group_size, scale=scale)
    keep, dropped = grpo_nonzero_variance(scores, group_size)
    if not drop_zero_variance:
        keep, dropped = jnp.ones_like(keep), jnp.zeros_like(dropped)
    loss_mask = mask.astype(bool) & keep[:, None]
    return jnp.where(loss_mask, advantages[:, None], 0.0), loss_mask, dropped


def groups_with_spread_first(scores: np.ndarray, group_size: int, num_groups: int) -> tuple[np.ndarray, int]:
    """Row indices of `num_groups` of the rollout's groups: those whose scores differ first, then zero-variance ones,
    each kind in rollout order (DAPO's dynamic sampling with a fixed oversampling: a zero-variance group has zero
    GRPO advantage, so training on it spends compute on no signal). "Differ" is `grpo_nonzero_variance`'s test, the
    one that drops groups from the GRPO loss.

    Args:
      scores: [N] host sequence scores, the G = group_size samples of each prompt consecutive.
      num_groups: how many groups to keep (at most N / group_size).

    Returns:
      (int32 [num_groups · group_size] row indices, each group's rows consecutive; the number of groups with a
      spread among all N / group_size).
    """
    keep, _ = grpo_nonzero_variance(jnp.asarray(scores), group_size)
    spread = np.asarray(keep)[::group_size]
    if num_groups > len(spread):
        raise ValueError(f"cannot keep {num_groups} groups of a rollout with {len(spread)}")
    order = np.concatenate([np.flatnonzero(spread), np.flatnonzero(~spread)])[:num_groups]
    return rows_of_groups(order, group_size), int(spread.sum())


def rows_of_groups(groups: np.ndarray, group_size: int) -> np.ndarray:
    """int32 row indices of the given groups of `group_size` consecutive rows, in the groups' order."""
    return (np.asarray(groups)[:, None] * group_size + np.arange(group_size)).reshape(-1).astype(np.int32)
