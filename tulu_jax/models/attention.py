"""Grouped-query attention with boolean masks: packed/padded causal masks, KV-cache masks, sliding windows."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Masked scores get the most negative float32 (finite): a fully masked query row (padding) softmaxes to a
# uniform row instead of NaN, and any allowed key outweighs every masked one.
_MASKED = float(jnp.finfo(jnp.float32).min)


def segment_causal_mask(segment_ids: jax.Array) -> jax.Array:
    """bool [B, T, T]: query i sees key j iff j <= i, same segment, and the key is not padding (segment 0)."""
    t = segment_ids.shape[1]
    causal = jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return causal[None] & same & (segment_ids != 0)[:, None, :]


def cache_mask(key_mask: jax.Array, index: jax.Array, num_queries: int) -> jax.Array:
    """bool [B, T, S]: query t (at cache slot index+t) sees slot j iff key_mask[b, j] and j <= index + t."""
    slots = jnp.arange(key_mask.shape[1])
    query_slots = index + jnp.arange(num_queries)
    causal = slots[None, :] <= query_slots[:, None]
    return causal[None] & key_mask[:, None, :]


def window_mask(mask: jax.Array, query_slots: jax.Array, window: int) -> jax.Array:
    """`mask` [B, T, S] narrowed to a sliding window: query t (at slot query_slots[t]) also needs key slot j with
    query_slots[t] - j < window (transformers' sliding_window_overlay, in slots: within one left-padded row or one
    packed segment, slot distance is position distance)."""
    slots = jnp.arange(mask.shape[-1])
    return mask & (query_slots[:, None] - slots[None, :] < window)[None]


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, softcap: float | None = None) -> jax.Array:
    """Softmax attention, q [B,T,N,D], k/v [B,S,K,D] (N a multiple of K), mask bool [B,T,S] -> [B,T,N,D].

    q must already carry the query scale. Scores and softmax are float32 whatever the compute dtype. `softcap`
    (Gemma 2) maps the scores to softcap · tanh(scores / softcap) before masking.
    """
    b, t, n, d = q.shape
    kv_heads = k.shape[2]
    qg = q.reshape(b, t, kv_heads, n // kv_heads, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    scores = jnp.where(mask[:, None, None, :, :], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype).reshape(b, t, n, d)
