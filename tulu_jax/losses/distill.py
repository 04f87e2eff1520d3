"""Teacher-student distillation losses in the Gemma style (RECIPE.md "Distillation"; Gemma 2 §6.1, Gemma 3 §2.2, GKD).

Conventions: logits are [B, T, V] at the SAME positions for student and teacher (the teacher's distribution over the
token that follows position t), `mask` [B, T] True where a token is distilled (response tokens for chat data, every
real token for plain text). Softmaxes are float32; the teacher is a constant (stop_gradient). Each loss divides by an
explicit `num_tokens` (default Σ mask; pass the global count under gradient accumulation) and every metric is a
Σ over this call's mask tokens / the same denominator, so losses and metrics add up exactly over micro-batches (and
over chunks of T: the functions are per-token, so they can be applied to slices of the sequence).

Temperature: both distributions are softmax(logits / temperature); no T² factor unless
`scale_by_temperature_squared=True` (generalized_jsd). The metric `forward_kl` is always KL(P_T‖P_S) at T = 1.
Teacher and student vocabularies must be the same: `tulu_jax.data.vocab.check_same_vocabulary`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from tulu_jax.errors import ConfigError
from tulu_jax.losses.common import compute_dtype, masked_sum, safe_denominator

Array = jax.Array


def _check_temperature(temperature: float) -> None:
    if not (math.isfinite(temperature) and temperature > 0):
        raise ConfigError(f"distillation temperature must be a finite number > 0, got {temperature!r}")


def _check_shapes(student_logits: Array, teacher_logits: Array, mask: Array) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ConfigError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ: "
            "distillation needs the same positions and the same vocabulary (see data.vocab.check_same_vocabulary)"
        )
    if mask.shape != student_logits.shape[:-1]:
        raise ConfigError(f"mask {tuple(mask.shape)} does not match logits {tuple(student_logits.shape)}")


def _log_probs(logits: Array, mask: Array, temperature: float) -> Array:
    """float32 log_softmax(logits / temperature), with logits zeroed off the mask first (no NaN can come back)."""
    x = logits.astype(compute_dtype(logits))
    x = jnp.where(mask[..., None], x, jnp.zeros_like(x))
    return jax.nn.log_softmax(x / temperature if temperature != 1.0 else x, axis=-1)


def _kl(log_p: Array, log_q: Array) -> Array:
    """KL(p‖q) per position, Σ_x p (log p − log q); entries with p = 0 contribute 0 (not 0 · −inf)."""
    p = jnp.exp(log_p)
    return jnp.sum(jnp.where(p > 0, p * (log_p - log_q), 0.0), axis=-1)


def _dense_log_probs(
    student_logits: Array, teacher_logits: Array, mask: Array, temperature: float
) -> tuple[Array, Array, Array]:
    """Checks, then (bool mask, student log-probs, detached teacher log-probs) at `temperature`."""
    _check_temperature(temperature)
    _check_shapes(student_logits, teacher_logits, mask)
    m = mask.astype(bool)
    log_t = jax.lax.stop_gradient(_log_probs(teacher_logits, m, temperature))
    return m, _log_probs(student_logits, m, temperature), log_t


def _reduce(
    per_token: Array,
    logits: tuple[Array, Array],
    log_probs: tuple[Array, Array],
    mask: Array,
    temperature: float,
    num_tokens: Array | int | None,
) -> tuple[Array, dict[str, Array]]:
    """Σ_mask per_token / denominator, with the metrics of every dense loss (forward KL at T = 1: reuses the
    loss's (student, teacher) log-probs when they already are at T = 1)."""
    denominator = safe_denominator(jnp.sum(mask) if num_tokens is None else num_tokens)
    loss = masked_sum(per_token, mask) / denominator
    if temperature == 1.0:
        log_s, log_t = log_probs
    else:
        log_s, log_t = (_log_probs(x, mask, 1.0) for x in logits)
    forward_kl = jax.lax.stop_gradient(masked_sum(_kl(log_t, log_s), mask) / denominator)
    return loss, {
        "loss": jax.lax.stop_gradient(loss),
        "forward_kl": forward_kl,
        "tokens": jnp.sum(mask, dtype=jnp.int32),
    }


def soft_cross_entropy(
    student_logits: Array,
    teacher_logits: Array,
    mask: Array,
    *,
    temperature: float = 1.0,
    num_tokens: Array | int | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Gemma 2's distillation loss: Σ_mask Σ_x −P_T(x) log P_S(x) / num_tokens, both at `temperature`.

    Same gradient as the forward KL(P_T‖P_S) (they differ by the teacher's entropy, a constant).

    Args:
      student_logits, teacher_logits: [B, T, V] (any float dtype; float32 inside).
      mask: [B, T] bool, True on distilled tokens.
      temperature: softmax temperature of both distributions.
      num_tokens: denominator (global count under accumulation); default Σ mask.

    Returns:
      (loss, metrics): `loss` (detached), `forward_kl` (KL(P_T‖P_S) at T = 1), `tokens` (this call's Σ mask).
    """
    m, log_s, log_t = _dense_log_probs(student_logits, teacher_logits, mask, temperature)
    per_token = -jnp.sum(jnp.exp(log_t) * log_s, axis=-1)
    return _reduce(per_token, (student_logits, teacher_logits), (log_s, log_t), m, temperature, num_tokens)


def generalized_jsd(
    student_logits: Array,
    teacher_logits: Array,
    mask: Array,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    num_tokens: Array | int | None = None,
    scale_by_temperature_squared: bool = False,
) -> tuple[Array, dict[str, Array]]:
    """GKD's generalized Jensen-Shannon divergence, averaged over mask tokens (TRL `generalized_jsd_loss`,
    reduction "batchmean" with masked labels −100).

    M = β·P_T + (1−β)·P_S and JSD_β = β·KL(P_T‖M) + (1−β)·KL(P_S‖M), summed over the vocabulary; β = 0 is exactly
    the forward KL(P_T‖P_S) and β = 1 exactly the reverse KL(P_S‖P_T) (own branches: the mixture formula tends to 0
    at both ends).

    Args:
      student_logits, teacher_logits: [B, T, V]; mask: [B, T] bool.
      beta: β in [0, 1].
      temperature: softmax temperature of both distributions.
      num_tokens: denominator (global count under accumulation); default Σ mask.
      scale_by_temperature_squared: multiply by T² (Hinton's gradient-scale correction); off by default, as in TRL.

    Returns:
      (loss, metrics): `loss` (detached), `forward_kl` (KL(P_T‖P_S) at T = 1), `tokens`.
    """
    if not 0.0 <= beta <= 1.0:
        raise ConfigError(f"generalized_jsd beta must be in [0, 1], got {beta!r}")
    m, log_s, log_t = _dense_log_probs(student_logits, teacher_logits, mask, temperature)
    if beta == 0.0:
        per_token = _kl(log_t, log_s)
    elif beta == 1.0:
        per_token = _kl(log_s, log_t)
    else:
        log_mix = jnp.logaddexp(log_t + math.log(beta), log_s + math.log1p(-beta))
        per_token = beta * _kl(log_t, log_mix) + (1.0 - beta) * _kl(log_s, log_mix)
    if scale_by_temperature_squared:
        per_token = per_token * temperature**2
    return _reduce(per_token, (student_logits, teacher_logits), (log_s, log_t), m, temperature, num_tokens)


def sparse_soft_cross_entropy(
    student_logits: Array,
    teacher_ids: Array,
    teacher_probs: Array,
    mask: Array,
    *,
    num_tokens: Array | int | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Soft cross-entropy against K stored teacher tokens per position (Gemma 3's sampled-256 targets, or top-k).

    The teacher target is renormalized over its K entries, q_k = p_k / Σ_j p_j; loss = Σ_mask −Σ_k q_k log P_S(id_k)
    / num_tokens. With K = V (every id once) it equals `soft_cross_entropy` at T = 1. Ids should be distinct: a
    repeated id counts once per occurrence.

    Args:
      student_logits: [B, T, V].
      teacher_ids: [B, T, K] int ids in [0, V).
      teacher_probs: [B, T, K] teacher probabilities of those ids (float16 on disk is fine; float32 inside).
      mask: [B, T] bool; num_tokens: as in `soft_cross_entropy`.

    Returns:
      (loss, metrics): `loss` (detached), `teacher_mass` (mean Σ_k p_k before renormalizing: how much of the
      teacher's distribution the K ids cover), `tokens`.
    """
    if teacher_ids.shape != teacher_probs.shape or teacher_ids.shape[:-1] != student_logits.shape[:-1]:
        raise ConfigError(
            f"sparse targets: teacher_ids {tuple(teacher_ids.shape)} and teacher_probs {tuple(teacher_probs.shape)} "
            f"must both be [B, T, K] for student logits {tuple(student_logits.shape)}"
        )
    if mask.shape != student_logits.shape[:-1]:
        raise ConfigError(f"mask {tuple(mask.shape)} does not match logits {tuple(student_logits.shape)}")
    m = mask.astype(bool)
    x = student_logits.astype(compute_dtype(student_logits))
    x = jnp.where(m[..., None], x, jnp.zeros_like(x))
    # log P_S(id) = logit(id) − logsumexp(logits): gathers K values instead of materializing a [B, T, V] log-softmax.
    picked = jnp.take_along_axis(x, teacher_ids.astype(jnp.int32), axis=-1)
    log_s = picked - jax.nn.logsumexp(x, axis=-1, keepdims=True)
    probs = jnp.where(m[..., None], teacher_probs.astype(x.dtype), 0.0)
    mass = jnp.sum(probs, axis=-1)
    q = jax.lax.stop_gradient(probs / jnp.where(mass > 0, mass, 1.0)[..., None])
    per_token = -jnp.sum(q * log_s, axis=-1)
    denominator = safe_denominator(jnp.sum(m) if num_tokens is None else num_tokens)
    loss = masked_sum(per_token, m) / denominator
    return loss, {
        "loss": jax.lax.stop_gradient(loss),
        "teacher_mass": jax.lax.stop_gradient(masked_sum(mass, m) / denominator),
        "tokens": jnp.sum(m, dtype=jnp.int32),
    }
