"""Host batches → global batches on the mesh: the one place where this process's rows become sharded jax.Arrays.

A host batch is any pytree of NumPy arrays whose leading axis holds this process's rows (the whole batch in a
single-process run); `Batcher` assembles each leaf into a global `[global_batch_size, ...]` jax.Array with
`jax.make_array_from_process_local_data`, so every process contributes only its own rows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

PyTree = Any


def _is_sharding(x: Any) -> bool:
    return isinstance(x, jax.sharding.Sharding)


class Batcher:
    """Place host batches on the mesh. `shardings`: one sharding for every leaf, or a tree of them that is a prefix
    of the batch's tree (e.g. a typed batch of shardings); `typed`: host dict → typed batch (e.g.
    `train.batches.PairBatch.from_host`), applied first."""

    def __init__(self, shardings: PyTree, global_batch_size: int, typed: Callable[[Any], PyTree] | None = None):
        self.shardings = shardings
        self.global_batch_size = global_batch_size
        self.typed = typed

    def __call__(self, host_batch: PyTree) -> PyTree:
        """Assemble one global batch (every leaf [local_rows, ...] → [global_batch_size, ...])."""
        if self.typed is not None:
            host_batch = self.typed(host_batch)

        def place(sharding: jax.sharding.Sharding, subtree: PyTree) -> PyTree:
            return jax.tree.map(
                lambda x: jax.make_array_from_process_local_data(sharding, x, (self.global_batch_size, *x.shape[1:])),
                subtree,
            )

        return jax.tree.map(place, self.shardings, host_batch, is_leaf=_is_sharding)
