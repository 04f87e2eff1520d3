"""Per-layer attention inputs for stacks that alternate local (sliding-window) and global layers (Gemma 2 / 3).

The layer stack runs under one `jax.lax.scan`, so a layer's kind is data, not structure: the scan carries one bool
per layer (`sliding_flags`) and each layer picks its mask and RoPE angles from the global and the local set, both
computed once before the scan. Stacks without sliding layers get the global set only (their numerics unchanged).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from tulu_jax.models.attention import window_mask
from tulu_jax.models.config import ModelConfig
from tulu_jax.models.rope import rope_angles, rope_inv_freq


@flax.struct.dataclass
class AttentionInputs:
    """What one layer's attention needs besides its weights: mask bool [B, T, S], RoPE cos/sin [B, T, Dh/2]."""

    mask: jax.Array
    cos: jax.Array
    sin: jax.Array


@flax.struct.dataclass
class LayerInputs:
    """The global (full-attention) inputs and, when the stack has sliding layers, the local ones."""

    full: AttentionInputs
    local: AttentionInputs | None

    @classmethod
    def build(cls, config: ModelConfig, positions: jax.Array, mask: jax.Array, query_slots: jax.Array) -> LayerInputs:
        """From int positions [B, T], the causal/padding `mask` [B, T, S] and the queries' slots [T]."""
        cos, sin = rope_angles(positions, rope_inv_freq(config))
        full = AttentionInputs(mask, cos, sin)
        if not any(config.sliding_layers):
            return cls(full, None)
        if config.local_rope_theta is not None:  # Gemma 3: sliding layers have their own RoPE base
            cos, sin = rope_angles(positions, rope_inv_freq(config, local=True))
        return cls(full, AttentionInputs(window_mask(mask, query_slots, config.sliding_window), cos, sin))

    def at(self, sliding: jax.Array) -> AttentionInputs:
        """The inputs of a layer whose (traced, scalar bool) kind is `sliding`."""
        if self.local is None:
            return self.full
        return jax.tree.map(lambda local, full: jnp.where(sliding, local, full), self.local, self.full)


def sliding_flags(config: ModelConfig) -> jax.Array:
    """bool [num_layers]: which layers use the sliding window (the scan's per-layer input)."""
    return jnp.asarray(config.sliding_layers, dtype=bool)
