"""Token log-probs (and entropies) from final hidden states without full-vocabulary logits for the whole sequence.

A training loss needs one number per token, log softmax(h W)[target], but the float32 logits behind it are
[B, T, V] (32 × 4096 × 128,256 × 4 B = 67 GB for one Llama 3 micro-batch). Here the sequence is cut into chunks
of `chunk_size` positions and a `jax.lax.scan` computes each chunk's logits, reduces them to [B, chunk] and drops
them; the chunk body is rematerialized (`jax.checkpoint`), so the backward pass also holds one chunk's logits at
a time instead of the saved softmax of every position. Values and gradients equal the unchunked computation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tulu_jax.models.activation_sharding import constrain
from tulu_jax.models.dense import weight_einsum


def _chunk_logps(hidden: jax.Array, weight: jax.Array, targets: jax.Array, *, vocab_first: bool, dtype: str,
                 softcap: float | None, entropy: bool) -> tuple[jax.Array, jax.Array | None]:
    """One chunk: hidden [B, C, H], targets [B, C] → (log-probs [B, C], entropies [B, C] or None), float32."""
    spec = "bch,vh->bcv" if vocab_first else "bch,hv->bcv"
    # The weight is cast here, inside the chunk, so its gradient accumulates over chunks in the parameter dtype.
    logits = weight_einsum(spec, hidden.astype(dtype), weight.astype(dtype), preferred_element_type=jnp.float32)
    if softcap is not None:  # Gemma 2: cap · tanh(logits / cap), the logits the model's distribution is over
        logits = softcap * jnp.tanh(logits / softcap)
    logits = constrain(logits, ("batch", "length", "act_vocab"))
    lse = jax.nn.logsumexp(logits, axis=-1)
    # A masked sum instead of a gather: it stays local on a vocabulary-sharded axis (then one all-reduce).
    onehot = jnp.arange(logits.shape[-1], dtype=jnp.int32) == targets[..., None].astype(jnp.int32)
    picked = jnp.sum(jnp.where(onehot, logits, 0.0), axis=-1)
    if not entropy:
        return picked - lse, None
    probs = jnp.exp(logits - lse[..., None])
    return picked - lse, lse - jnp.sum(probs * logits, axis=-1)


def chunked_token_logps(hidden: jax.Array, weight: jax.Array, targets: jax.Array, *, chunk_size: int,
                        vocab_first: bool = False, compute_dtype: str = "float32", softcap: float | None = None,
                        entropy: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
    """log softmax(hidden @ W)[targets] per position, float32 [B, T], computed `chunk_size` positions at a time.

    Args:
      hidden: [B, T, H] final (normed) hidden states.
      weight: the LM head, [H, V], or [V, H] with `vocab_first` (a tied embedding table).
      targets: [B, T] int token ids in [0, V).
      chunk_size: positions per chunk (T need not be a multiple: the last chunk is padded, the padding dropped).
      compute_dtype: dtype of the matmul inputs (the logits are always accumulated in float32).
      softcap: if set, the logits are soft-capped first (cap · tanh(logits / cap), Gemma 2's final soft-cap).
      entropy: also return the entropy of each position's distribution, float32 [B, T] (RLVR's metric/bonus).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    b, t, h = hidden.shape
    size = min(chunk_size, t)
    chunks = -(-t // size)
    pad = chunks * size - t
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
    hs = jnp.swapaxes(hidden.reshape(b, chunks, size, h), 0, 1)  # [chunks, B, C, H]
    ts = jnp.swapaxes(targets.reshape(b, chunks, size), 0, 1)

    @jax.checkpoint
    def chunk(w: jax.Array, xs: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array | None]:
        return _chunk_logps(xs[0], w, xs[1], vocab_first=vocab_first, dtype=compute_dtype, softcap=softcap,
                            entropy=entropy)

    _, (logps, ents) = jax.lax.scan(lambda carry, xs: (carry, chunk(weight, xs)), None, (hs, ts))

    def unchunk(x: jax.Array) -> jax.Array:
        return constrain(jnp.swapaxes(x, 0, 1).reshape(b, chunks * size)[:, :t], ("batch", "length"))

    return (unchunk(logps), unchunk(ents)) if entropy else unchunk(logps)
