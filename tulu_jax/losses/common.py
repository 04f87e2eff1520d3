"""Building blocks shared by the losses: per-token log-probs, masked sums and safe denominators."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def compute_dtype(x: Array) -> jnp.dtype:
    """float32 for half-precision inputs; float64 stays float64 (only reachable with jax x64 enabled)."""
    return jnp.promote_types(x.dtype, jnp.float32)


@jax.custom_vjp
def token_logps(logits: Array, targets: Array) -> Array:
    """log softmax(logits)[..., target] per position, in float32.

    Args:
      logits: [B, T, V] (any float dtype; upcast to float32 inside).
      targets: [B, T] int token ids in [0, V).

    Returns:
      [B, T] float32 log-probabilities of the targets.

    The backward pass keeps only the logits and the [B, T] log-normalizer and recomputes the softmax, instead of
    autodiff's saved [B, T, V] float32 exponentials (the largest activation of a language-model step).
    """
    return _token_logps_fwd(logits, targets)[0]


def _token_logps_fwd(logits: Array, targets: Array) -> tuple[Array, tuple[Array, Array, Array]]:
    x = logits.astype(compute_dtype(logits))
    lse = jax.nn.logsumexp(x, axis=-1)
    picked = jnp.take_along_axis(x, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - lse, (logits, targets, lse)


def _token_logps_bwd(residuals: tuple[Array, Array, Array], g: Array) -> tuple[Array, None]:
    logits, targets, lse = residuals
    x = logits.astype(lse.dtype)
    softmax = jnp.exp(x - lse[..., None])
    onehot = jnp.arange(x.shape[-1], dtype=jnp.int32) == targets[..., None].astype(jnp.int32)
    grad = g[..., None] * (onehot.astype(x.dtype) - softmax)
    return grad.astype(logits.dtype), None


token_logps.defvjp(_token_logps_fwd, _token_logps_bwd)


def masked_sum(values: Array, mask: Array, axis: int | tuple[int, ...] | None = None) -> Array:
    """Σ values over `mask`; masked entries are replaced by 0 first so a NaN/inf there cannot leak in."""
    return jnp.sum(jnp.where(mask.astype(bool), values, jnp.zeros_like(values)), axis=axis)


def safe_denominator(count: Array | int | float) -> Array:
    """max(count, 1) as float32: an empty selection divides by 1 and gives 0, never NaN."""
    return jnp.maximum(jnp.asarray(count, jnp.float32), 1.0)


def count_sequences(segment_ids: Array) -> Array:
    """Number of sequences in a batch (contract: Σ over rows of max(segment_ids); 0 = padding)."""
    return jnp.sum(jnp.max(segment_ids, axis=-1))
