"""PPO and GRPO pieces for RLVR (Tülu 3 report §6; RECIPE.md "RLVR"): GAE, whitening, KL estimators, clipped losses.

Conventions: every per-token array is [B, T] over the RESPONSE positions, `mask` True on response tokens (False on
prompt and padding); float32 inside (float64 stays float64). The losses divide by an explicit `num_tokens` (default
Σ mask): pass the GLOBAL count of the optimizer step's response tokens and the micro-batch losses, gradients and
metrics add up exactly to the full-batch ones. Every metric is a Σ over this call's mask tokens / the same
denominator, so metrics add up over micro-batches like the loss does.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from tulu_jax.errors import ConfigError
from tulu_jax.losses.common import compute_dtype, masked_sum, safe_denominator

Array = jax.Array
KL_KINDS = ("k1", "k2", "k3")
GRPO_SCALES = ("std", "none")


def _float(x: Array) -> Array:
    x = jnp.asarray(x)
    return x.astype(compute_dtype(x))


def _check_shapes(mask: Array, **arrays: Array) -> None:
    """Every per-token input must be [B, T] like the mask: jnp broadcasting would silently pair [B] with T."""
    for name, x in arrays.items():
        if jnp.shape(x) != mask.shape:
            raise ValueError(f"{name} has shape {jnp.shape(x)}, expected the mask's {mask.shape} ([B, T])")


def _masked(x: Array, mask: Array) -> Array:
    """x as float with 0 off the mask BEFORE any arithmetic: a NaN/inf there gives neither a NaN loss nor gradient."""
    x = _float(x)
    return jnp.where(mask, x, jnp.zeros_like(x))


def gae(rewards: Array, values: Array, mask: Array, *, gamma: float = 1.0, lam: float = 0.95) -> tuple[Array, Array]:
    """Generalized advantage estimation over the response tokens.

    δ_t = r_t + γ·V_{t+1}·m_{t+1} − V_t and A_t = δ_t + γλ·m_{t+1}·A_{t+1}, scanned from the last position; the value
    after the last response token is 0 (so a right-padded row equals open-instruct's reversed loop with its values
    and rewards zeroed past the response).

    Args:
      rewards: [B, T] per-token rewards (KL penalty + the sequence score at the last response token).
      values: [B, T] value-model predictions V_t (the old values of the rollout).
      mask: [B, T] bool, True on response tokens.
      gamma, lam: discount γ and GAE λ (recipe: 1.0 and 0.95).

    Returns:
      (advantages, returns), both [B, T], returns = A + V, both exactly 0 where `mask` is False.
    """
    _check_shapes(mask, rewards=rewards, values=values)
    m = mask.astype(bool)
    r, v = _masked(rewards, m), _masked(values, m)
    # The next position's value and mask, 0 past the end; `v` is already 0 off the mask, so V_{t+1}·m_{t+1} = next_v.
    next_v = jnp.pad(v[:, 1:], ((0, 0), (0, 1)))
    next_m = jnp.pad(m[:, 1:], ((0, 0), (0, 1))).astype(r.dtype)
    delta = r + gamma * next_v - v

    def step(carry: Array, xs: tuple[Array, Array]) -> tuple[Array, Array]:
        delta_t, next_m_t = xs
        adv = delta_t + gamma * lam * next_m_t * carry
        return adv, adv

    _, adv_reversed = jax.lax.scan(step, jnp.zeros(r.shape[:1], r.dtype), (delta.T[::-1], next_m.T[::-1]))
    advantages = jnp.where(m, adv_reversed[::-1].T, 0.0)
    returns = jnp.where(m, advantages + v, 0.0)
    return advantages, returns


def whiten(x: Array, mask: Array, *, shift_mean: bool = True, eps: float = 1e-8) -> Array:
    """(x − mean) / sqrt(var + eps) with the masked mean and unbiased variance over the WHOLE batch; 0 off the mask.

    As TRL/open-instruct's `masked_whiten` (Bessel-corrected variance; `shift_mean=False` adds the mean back, the
    convention for rewards). Fewer than two mask tokens: the variance's denominator is clamped to 1.

    Args:
      x: [B, T] values (advantages).
      mask: [B, T] bool.
    """
    m = mask.astype(bool)
    x = _masked(x, m)
    n = jnp.sum(m)
    mean = masked_sum(x, m) / safe_denominator(n)
    var = masked_sum(jnp.square(x - mean), m) / safe_denominator(n - 1)
    out = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return jnp.where(m, out, 0.0)


def kl_estimate(logps: Array, ref_logps: Array, kind: Literal["k1", "k2", "k3"] = "k1") -> Array:
    """Per-token estimate of KL(π‖π_ref) from samples of π, with d = logps − ref_logps.

    k1 = d (unbiased, the recipe's reward penalty), k2 = d²/2, k3 = exp(−d) − 1 + d (unbiased and ≥ 0, GRPO's loss
    term). Returns the same shape as the inputs, float32; masking is the caller's.
    """
    if kind not in KL_KINDS:
        raise ConfigError(f"kl estimator {kind!r} is not one of {KL_KINDS}")
    d = _float(logps) - _float(ref_logps)
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * jnp.square(d)
    return jnp.expm1(-d) + d


def ppo_policy_loss(
    logps: Array,
    old_logps: Array,
    advantages: Array,
    mask: Array,
    *,
    clip: float = 0.2,
    num_tokens: Array | int | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Clipped surrogate: Σ_mask max(−A·ρ, −A·clip(ρ, 1−clip, 1+clip)) / num_tokens, ρ = exp(logps − old_logps).

    Args:
      logps: [B, T] log π_θ of the sampled tokens (differentiated).
      old_logps: [B, T] log π_old from the rollout (constant).
      advantages: [B, T] (whitened) advantages (GRPO's per-sequence ones: `grpo_policy_loss` broadcasts them).
      mask: [B, T] bool, True on response tokens.
      clip: ε of the ratio clip.
      num_tokens: denominator (global response-token count under accumulation); default Σ mask.

    Returns:
      (loss, metrics): `loss` (detached), `clipfrac` (tokens where the clipped branch is the larger one),
      `approx_kl` (½·(logps − old_logps)², as open-instruct logs it), all Σ_mask / num_tokens.
    """
    _check_shapes(mask, logps=logps, old_logps=old_logps, advantages=advantages)
    m = mask.astype(bool)
    log_ratio = _masked(logps, m) - _masked(old_logps, m)
    ratio = jnp.exp(log_ratio)
    adv = _masked(advantages, m)
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - clip, 1.0 + clip)
    denominator = safe_denominator(jnp.sum(m) if num_tokens is None else num_tokens)
    loss = masked_sum(jnp.maximum(unclipped, clipped), m) / denominator

    def token_mean(x: Array) -> Array:
        return jax.lax.stop_gradient(masked_sum(x, m) / denominator)

    metrics = {
        "loss": jax.lax.stop_gradient(loss),
        "clipfrac": token_mean((clipped > unclipped).astype(loss.dtype)),
        "approx_kl": token_mean(0.5 * jnp.square(log_ratio)),
    }
    return loss, metrics


def ppo_value_loss(
    values: Array,
    old_values: Array,
    returns: Array,
    mask: Array,
    *,
    clip: float = 0.2,
    num_tokens: Array | int | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Clipped value loss: 0.5 · Σ_mask max((V − R)², (clip(V, V_old − clip, V_old + clip) − R)²) / num_tokens.

    Args:
      values: [B, T] current value predictions (differentiated).
      old_values: [B, T] the rollout's values; returns: [B, T] GAE returns (constants).
      mask: [B, T] bool; clip: the value clip range; num_tokens: as in `ppo_policy_loss`.

    Returns:
      (loss, metrics): `loss` (detached) and `clipfrac` (tokens where the clipped error is the larger), Σ_mask /
      num_tokens.
    """
    _check_shapes(mask, values=values, old_values=old_values, returns=returns)
    m = mask.astype(bool)
    v, v_old, ret = _masked(values, m), _masked(old_values, m), _masked(returns, m)
    unclipped = jnp.square(v - ret)
    clipped = jnp.square(jnp.clip(v, v_old - clip, v_old + clip) - ret)
    denominator = safe_denominator(jnp.sum(m) if num_tokens is None else num_tokens)
    loss = 0.5 * masked_sum(jnp.maximum(unclipped, clipped), m) / denominator
    metrics = {
        "loss": jax.lax.stop_gradient(loss),
        "clipfrac": jax.lax.stop_gradient(masked_sum((clipped > unclipped).astype(loss.dtype), m) / denominator),
    }
    return loss, metrics


def grpo_policy_loss(
    logps: Array,
    old_logps: Array,
    ref_logps: Array,
    advantages: Array,
    mask: Array,
    *,
    clip: float = 0.2,
    kl_coef: float = 0.05,
    num_tokens: Array | int | None = None,
) -> tuple[Array, dict[str, Array]]:
    """GRPO's token-level loss: `ppo_policy_loss` + kl_coef · Σ_mask k3(logps, ref_logps) / num_tokens.

    Args:
      advantages: [B] per-sequence group advantages (broadcast over the tokens) or [B, T].
      ref_logps: [B, T] reference-model log-probs of the sampled tokens; the rest as in `ppo_policy_loss`.

    Returns:
      (loss, metrics): the policy-loss metrics plus `policy_loss` (the clipped part) and `kl` (mean k3 per token).
    """
    adv = _float(advantages)
    if adv.ndim == 1:
        adv = adv[:, None]
    policy_loss, metrics = ppo_policy_loss(
        logps, old_logps, jnp.broadcast_to(adv, logps.shape), mask, clip=clip, num_tokens=num_tokens
    )
    _check_shapes(mask, ref_logps=ref_logps)
    m = mask.astype(bool)
    denominator = safe_denominator(jnp.sum(m) if num_tokens is None else num_tokens)
    kl = masked_sum(kl_estimate(_masked(logps, m), _masked(ref_logps, m), "k3"), m) / denominator
    loss = policy_loss + kl_coef * kl
    metrics = {
        **metrics,
        "loss": jax.lax.stop_gradient(loss),
        "policy_loss": metrics["loss"],
        "kl": jax.lax.stop_gradient(kl),
    }
    return loss, metrics


def _groups(rewards: Array, group_size: int) -> Array:
    if group_size < 1 or rewards.ndim != 1 or rewards.shape[0] % group_size:
        raise ConfigError(
            f"grpo: rewards of shape {tuple(rewards.shape)} cannot be split into groups of group_size={group_size} "
            "(need a 1-D array whose length is a multiple of group_size)"
        )
    return _float(rewards).reshape(-1, group_size)


def grpo_advantages(rewards: Array, group_size: int, *, scale: Literal["std", "none"] = "std") -> Array:
    """Group-relative advantages: A = (r − group mean) / (group population std + 1e-8); `scale="none"`: r − mean.

    Args:
      rewards: [N] sequence rewards, N = num_prompts · group_size, each prompt's samples consecutive.
      group_size: G samples per prompt.

    Returns:
      [N] float32 advantages (a zero-variance group gets all zeros; see `grpo_nonzero_variance`).
    """
    if scale not in GRPO_SCALES:
        raise ConfigError(f"grpo scale {scale!r} is not one of {GRPO_SCALES}")
    groups = _groups(rewards, group_size)
    centered = groups - jnp.mean(groups, axis=1, keepdims=True)
    if scale == "std":
        centered = centered / (jnp.std(groups, axis=1, keepdims=True) + 1e-8)
    return centered.reshape(-1)


def grpo_nonzero_variance(rewards: Array, group_size: int) -> tuple[Array, Array]:
    """Which samples belong to a group whose rewards are not all equal (those carry no learning signal).

    Returns:
      (keep [N] bool, num_dropped_groups int32 scalar).
    """
    groups = _groups(rewards, group_size)
    varied = jnp.max(groups, axis=1) > jnp.min(groups, axis=1)
    keep = jnp.repeat(varied, group_size)
    return keep, jnp.sum(~varied, dtype=jnp.int32)


def explained_variance(values: Array, returns: Array, mask: Array) -> Array:
    """1 − Var(R − V) / Var(R) over the mask tokens of the whole batch (1: the value model predicts the returns,
    0: no better than their mean, < 0: worse). A batch whose returns do not vary gives 0, not NaN."""
    m = mask.astype(bool)
    v, r = _masked(values, m), _masked(returns, m)
    n = safe_denominator(jnp.sum(m))

    def variance(x: Array) -> Array:
        return masked_sum(jnp.square(x - masked_sum(x, m) / n), m) / n

    var_returns = variance(r)
    return jnp.where(var_returns > 0, 1.0 - variance(r - v) / jnp.where(var_returns > 0, var_returns, 1.0), 0.0)


def token_entropy(logits: Array) -> Array:
    """Entropy −Σ_x p(x) log p(x) of softmax(logits) per position, float32: logits [..., V] → [...]."""
    log_p = jax.nn.log_softmax(_float(logits), axis=-1)
    return -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)
