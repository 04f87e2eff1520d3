"""Which arrays of a tree hold NaN or inf: what saves, exports and model loads check before trusting parameters.

One jitted reduction per array and one small fetch (a flag per array); the arrays stay where they are.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


@jax.jit
def _finite_flags(leaves: list[jax.Array]) -> list[jax.Array]:
    return [jnp.all(jnp.isfinite(x)) for x in leaves]


def _dotted(path: tuple[Any, ...]) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def nonfinite_leaves(tree: PyTree) -> list[str]:
    """Dotted names of the floating arrays of `tree` that hold a NaN or an inf (empty when all are finite)."""
    flat = [
        (path, leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
        if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.inexact)
    ]
    flags = jax.device_get(_finite_flags([leaf for _, leaf in flat]))
    return [_dotted(path) for (path, _), ok in zip(flat, flags, strict=True) if not ok]
