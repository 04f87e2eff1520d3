"""Rotary position embeddings (default, "linear" and Llama 3.1 "llama3" scaling), as transformers computes them."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from tulu_jax.models.config import ModelConfig


def rope_inv_freq(config: ModelConfig, *, local: bool = False) -> np.ndarray:
    """Inverse frequencies, float32 [head_dim // 2], computed in float32 like transformers' rope init functions.

    `local`: those of sliding-window layers, which use their own unscaled base when `config.local_rope_theta` is set
    (Gemma 3) and the global RoPE otherwise.
    """
    dim = config.head_dim
    theta = config.local_rope_theta if local and config.local_rope_theta is not None else config.rope_theta
    inv_freq = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    if config.rope_scaling is None or (local and config.local_rope_theta is not None):
        return inv_freq.astype(np.float32)
    s = config.rope_scaling
    if s["rope_type"] == "linear":  # positions divided by `factor`
        return (inv_freq / np.float32(s["factor"])).astype(np.float32)
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_context = s["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are slowed down by `factor`, short ones kept, the band between interpolated smoothly.
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_angles(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """(cos, sin), float32 [B, T, head_dim // 2], for int positions [B, T]."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    return jnp.cos(freqs), jnp.sin(freqs)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x [B, T, N, D] by the angles (HF's rotate-half layout); math in float32, result in x's dtype."""
    half = x.shape[-1] // 2
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., :half], xf[..., half:]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)
