"""Names of pytree key paths: the one place that turns `jax.tree_util` key paths into readable names.

Used for orbax checkpoint entries, weight-decay masks, HF tensor names and error messages.
"""

from __future__ import annotations

from typing import Any


def key_name(key: Any) -> str:
    """One key of a path: a dict key, an attribute name, a sequence index (else the key's str)."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_names(path: tuple[Any, ...]) -> tuple[str, ...]:
    """A pytree key path as its keys' names: `('params', 'layers', 'mlp', 'kernel', 'value')`."""
    return tuple(key_name(key) for key in path)


def path_name(path: tuple[Any, ...]) -> str:
    """A pytree key path as a dotted name (`params.layers.mlp.kernel.value`), as orbax names checkpoint arrays."""
    return ".".join(path_names(path))
