"""Per-array checksums computed on device: what checkpoints record to detect corrupt files on restore (and what
the DPO reference cache fingerprints its model with).

A checksum is two 32-bit position-weighted sums of an array's bits: exact integer arithmetic, so the same on any
mesh or sharding, and a change of any single element always changes both sums (every multiplier is odd). The
arrays never leave the devices; only two numbers per array are fetched.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from tulu_jax.train.state import path_name

PyTree = Any
_M1, _C1, _M2, _C2 = 0x9E3779B1, 0x7F4A7C15, 0x85EBCA77, 0xC2B2AE3D


def array_checksum(x: jax.Array) -> jax.Array:
    """The checksum of one array: uint32 [2] (traceable; 64-bit values are checksummed as 32-bit)."""
    if not jnp.issubdtype(x.dtype, jnp.floating) and not jnp.issubdtype(x.dtype, jnp.integer):
        x = x.astype(jnp.float32)
    width = jnp.dtype(x.dtype).itemsize * 8
    if width == 64:
        x = x.astype(jnp.float32 if jnp.issubdtype(x.dtype, jnp.floating) else jnp.int32)
        width = 32
    bits = jax.lax.bitcast_convert_type(x, {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32}[width]).astype(jnp.uint32)
    index = jnp.zeros(x.shape, jnp.uint32)
    stride = 1
    for dim in reversed(range(x.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, dim) * jnp.uint32(stride % 2**32)
        stride *= x.shape[dim]
    m1 = (index * jnp.uint32(_M1) + jnp.uint32(_C1)) | jnp.uint32(1)
    m2 = ((index ^ jnp.uint32(_C2)) * jnp.uint32(_M2)) | jnp.uint32(1)
    h1 = jnp.sum(bits * m1, dtype=jnp.uint32)
    h2 = jnp.sum((bits ^ (bits >> 7)) * m2, dtype=jnp.uint32)
    return jnp.stack([h1, h2])


@jax.jit
def array_checksums(leaves: list[jax.Array]) -> list[jax.Array]:
    """`array_checksum` of every array, in one jitted call."""
    return [array_checksum(x) for x in leaves]


def tree_checksums(tree: PyTree) -> dict[str, str]:
    """Dotted array name (as `state.path_name` spells it) → its checksum as 16 hex digits."""
    flat = [(path_name(path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]
    sums = jax.device_get(array_checksums([leaf for _, leaf in flat]))
    return {name: f"{int(s[0]):08x}{int(s[1]):08x}" for (name, _), s in zip(flat, sums, strict=True)}


def mismatched(recorded: dict[str, str], tree: PyTree) -> list[str]:
    """Names of the arrays of `tree` whose checksum differs from (or is missing in) `recorded`."""
    return [name for name, value in tree_checksums(tree).items() if recorded.get(name) != value]
