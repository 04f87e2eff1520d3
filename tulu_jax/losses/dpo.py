"""Preference losses: DPO, length-normalized DPO (the Tülu 3 choice), SimPO and IPO.

Where averaging happens: `dpo_loss` takes SEQUENCE log-probs. The caller computes them with
`sequence_logps(token_logps, response_mask, average=uses_average_logps(loss_type))`, for the policy and the
reference alike; so `dpo` and `dpo_norm` share one formula and differ only in that flag (sum vs mean over response
tokens). Cached reference log-probs must be computed with the same flag as the run that uses them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from tulu_jax.errors import ConfigError
from tulu_jax.losses.common import compute_dtype, masked_sum, safe_denominator

Array = jax.Array
LOSS_TYPES = ("dpo", "dpo_norm", "simpo", "ipo")


def _check_loss_type(loss_type: str) -> None:
    if loss_type not in LOSS_TYPES:
        raise ConfigError(f"dpo loss_type {loss_type!r} is not one of {LOSS_TYPES}")


def uses_average_logps(loss_type: str) -> bool:
    """Whether `loss_type` scores a response by its MEAN token log-prob (dpo_norm, simpo) rather than the sum."""
    _check_loss_type(loss_type)
    return loss_type in ("dpo_norm", "simpo")


def needs_reference(loss_type: str) -> bool:
    """Whether `loss_type` uses reference-model log-probs (all but simpo)."""
    _check_loss_type(loss_type)
    return loss_type != "simpo"


def sequence_logps(token_logps: Array, mask: Array, *, average: bool) -> Array:
    """Response log-prob per row: Σ_t m_t logp_t, or that sum / max(Σ_t m_t, 1) when `average`.

    Args:
      token_logps: [..., T] per-token log-probs (e.g. from `token_logps`).
      mask: [..., T] bool, True on response tokens.
      average: mean instead of sum; a fully masked row gives 0, never NaN.

    Returns:
      [...] float32 (float64 stays float64).
    """
    values = token_logps.astype(compute_dtype(token_logps))
    total = masked_sum(values, mask, axis=-1)
    if not average:
        return total
    return total / safe_denominator(jnp.sum(mask.astype(bool), axis=-1))


def _log_sigmoid_loss(z: Array, label_smoothing: float) -> Array:
    # −(1−ε) log σ(z) − ε log σ(−z); log_sigmoid is the softplus form, finite for |z| ~ 1e5.
    loss = -jax.nn.log_sigmoid(z)
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss - label_smoothing * jax.nn.log_sigmoid(-z)
    return loss


def check_dpo_hyperparameters(beta: float, loss_type: str, label_smoothing: float, gamma_beta_ratio: float) -> None:
    """ConfigError unless the loss type is known and β, label smoothing and SimPO's γ/β are in range."""
    _check_loss_type(loss_type)
    if not (math.isfinite(beta) and beta > 0):
        raise ConfigError(f"dpo beta must be a finite number > 0, got {beta!r}")
    if not 0.0 <= label_smoothing <= 0.5:
        raise ConfigError(
            f"dpo label_smoothing (a flipped-label probability) must be in [0, 0.5], got {label_smoothing!r}"
        )
    if loss_type == "ipo" and label_smoothing:
        raise ConfigError("dpo label_smoothing is not defined for loss_type 'ipo' (a squared loss); set it to 0")
    if not math.isfinite(gamma_beta_ratio):
        raise ConfigError(f"dpo gamma_beta_ratio must be finite, got {gamma_beta_ratio!r}")


def dpo_loss(
    policy_chosen: Array,
    policy_rejected: Array,
    ref_chosen: Array | None = None,
    ref_rejected: Array | None = None,
    *,
    beta: float,
    loss_type: str,
    label_smoothing: float = 0.0,
    gamma_beta_ratio: float = 0.3,
    pair_mask: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Per-pair preference loss from sequence log-probs (see the module docstring for sum vs mean).

    With ℓ = (π_c − π_r) − (ref_c − ref_r):
      dpo / dpo_norm: −(1−ε) log σ(βℓ) − ε log σ(−βℓ)
      ipo:            (ℓ − 1/(2β))²
      simpo:          −(1−ε) log σ(z) − ε log σ(−z), z = β(π̄_c − π̄_r) − γ, γ = gamma_beta_ratio·β (no reference)

    Args:
      policy_chosen, policy_rejected: [P] policy sequence log-probs.
      ref_chosen, ref_rejected: [P] reference sequence log-probs (required unless loss_type is simpo, ignored then).
      beta: inverse temperature β > 0.
      loss_type: one of LOSS_TYPES.
      label_smoothing: ε in [0, 0.5] (conservative DPO); not allowed for ipo.
      gamma_beta_ratio: γ/β for simpo.
      pair_mask: [P] bool, False for padding pairs: their loss is 0 and they are left out of the metrics.

    Returns:
      (loss_per_pair [P], metrics): the caller divides Σ loss_per_pair by the global number of pairs. Metrics are
      means over (valid) pairs, detached: `loss`, `chosen_reward`, `rejected_reward` (β(logπ − logπ_ref), or β·logπ̄
      for simpo), `reward_margin`, `reward_accuracy` (chosen reward > rejected), `chosen_logps`, `rejected_logps`.
    """
    check_dpo_hyperparameters(beta, loss_type, label_smoothing, gamma_beta_ratio)
    dtype = compute_dtype(policy_chosen)
    pc, pr = policy_chosen.astype(dtype), policy_rejected.astype(dtype)
    if loss_type == "simpo":
        chosen_reward, rejected_reward = beta * pc, beta * pr
        loss = _log_sigmoid_loss(beta * ((pc - pr) - gamma_beta_ratio), label_smoothing)
    else:
        if ref_chosen is None or ref_rejected is None:
            raise ConfigError(f"dpo loss_type {loss_type!r} needs reference log-probs (ref_chosen, ref_rejected)")
        rc, rr = ref_chosen.astype(dtype), ref_rejected.astype(dtype)
        chosen_reward, rejected_reward = beta * (pc - rc), beta * (pr - rr)
        ell = (pc - pr) - (rc - rr)
        if loss_type == "ipo":
            loss = jnp.square(ell - 1.0 / (2.0 * beta))
        else:
            loss = _log_sigmoid_loss(beta * ell, label_smoothing)

    valid = jnp.ones(loss.shape, bool) if pair_mask is None else pair_mask.astype(bool)
    loss = jnp.where(valid, loss, jnp.zeros_like(loss))
    num_valid = safe_denominator(jnp.sum(valid))

    def mean(x: Array) -> Array:
        return jax.lax.stop_gradient(masked_sum(x, valid) / num_valid)

    metrics = {
        "loss": mean(loss),
        "chosen_reward": mean(chosen_reward),
        "rejected_reward": mean(rejected_reward),
        "reward_margin": mean(chosen_reward - rejected_reward),
        "reward_accuracy": mean((chosen_reward > rejected_reward).astype(dtype)),
        "chosen_logps": mean(pc),
        "rejected_logps": mean(pr),
    }
    return loss, metrics
