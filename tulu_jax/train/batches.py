"""Typed device batches: what a step receives, as `flax.struct` dataclasses (pytrees with named fields).

Host pipelines (`tulu_jax.data`) yield dicts of NumPy arrays; `from_host` turns one into its typed batch just before
`train.batcher.Batcher` places it on the mesh, and a step reads fields (`batch.chosen.input_ids`), never keys rebuilt
with f-strings. Shardings and abstract (ShapeDtypeStruct) batches have the same types, so they are prefix trees of
the batch for jit's in_shardings and AOT compilation.

- `Batch`: the LM batch contract (docs/ARCHITECTURE.md, "Batches"), every field [B, T].
- `PairBatch(chosen, rejected, index, reference)`: a preference batch; `reference` holds the cached reference
  log-probs [B] (None when the step scores a live reference, or for simpo).
- `RolloutBatch`: what an RLVR step trains on, built on the mesh from a rollout (every field [B, T] over the
  prompt + response tokens).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tulu_jax.sharding import Rules, ShardingSpec, batch_sharding, logical_to_spec

PyTree = Any


@struct.dataclass
class Batch:
    """input_ids, positions, segment_ids (0 = padding), targets (next token in the segment) int32, loss_mask bool."""

    input_ids: Any
    positions: Any
    segment_ids: Any
    targets: Any
    loss_mask: Any

    @classmethod
    def from_host(cls, host: Mapping[str, np.ndarray], prefix: str = "") -> Batch:
        """From a host dict with keys `<prefix>input_ids`, ... (e.g. prefix "chosen_" in a pair batch)."""
        return cls(**{name: host[prefix + name] for name in cls.__dataclass_fields__})

    @classmethod
    def spec(cls, batch_size: int, seq_len: int, sharding: Any = None) -> Batch:
        """ShapeDtypeStructs [batch_size, seq_len] (with `sharding` if given) for AOT compilation."""
        return cls(*(jax.ShapeDtypeStruct((batch_size, seq_len), np.dtype(np.bool_ if name == "loss_mask" else
                                                                           np.int32), sharding=sharding)
                     for name in cls.__dataclass_fields__))

    @classmethod
    def like(cls, value: Any) -> Batch:
        """Every field `value` (e.g. one sharding for the whole batch)."""
        return cls(*(value for _ in cls.__dataclass_fields__))


@struct.dataclass
class RefLogps:
    """Reference sequence log-probs of each pair's chosen and rejected side, float32 [B]."""

    chosen: Any
    rejected: Any


@struct.dataclass
class PairBatch:
    """B preference pairs: each side an LM batch [B, T], `index` int32 [B] (the pair's position in the data, -1 for
    padding pairs) and the cached reference log-probs (or None)."""

    chosen: Batch
    rejected: Batch
    index: Any
    reference: RefLogps | None = None

    @classmethod
    def from_host(cls, host: Mapping[str, np.ndarray]) -> PairBatch:
        """From a host pair batch (`tulu_jax.data.preference_batching`: `chosen_*`, `rejected_*`, `pair_index`, and
        `ref_*_logps` when it carries reference log-probs)."""
        from tulu_jax.data.preference_batching import PAIR_INDEX, REF_KEYS

        reference = RefLogps(host[REF_KEYS[0]], host[REF_KEYS[1]]) if REF_KEYS[0] in host else None
        return cls(Batch.from_host(host, "chosen_"), Batch.from_host(host, "rejected_"), host[PAIR_INDEX], reference)

    @classmethod
    def shardings(cls, mesh: Mesh, rules: Rules | ShardingSpec, *, reference: bool) -> PairBatch:
        """[B, T] fields like an LM batch, [B] fields along the same batch axes."""
        matrix = Batch.like(batch_sharding(mesh, rules))
        row = NamedSharding(mesh, PartitionSpec(logical_to_spec(("batch",), rules)[0]))
        return cls(matrix, matrix, row, RefLogps(row, row) if reference else None)

    @classmethod
    def spec(cls, shardings: PairBatch, pairs: int, seq_len: int) -> PairBatch:
        """Sharded ShapeDtypeStructs of `pairs` pairs × `seq_len` tokens per side, laid out by `shardings`."""
        row = lambda dtype, s: jax.ShapeDtypeStruct((pairs,), np.dtype(dtype), sharding=s)  # noqa: E731
        reference = shardings.reference
        return cls(
            Batch.spec(pairs, seq_len, shardings.chosen.input_ids),
            Batch.spec(pairs, seq_len, shardings.rejected.input_ids),
            row(np.int32, shardings.index),
            None if reference is None else RefLogps(row(np.float32, reference.chosen),
                                                    row(np.float32, reference.rejected)),
        )


@struct.dataclass
class RolloutBatch:
    """An RLVR training batch over prompt + response tokens [B, T]: tokens, positions, segment_ids (1 on prompt and
    response tokens, 0 on padding), response_mask (bool: the token is a sampled response token, the
    policy-gradient's support), old_logps (the sampling policy's log π),
    ref_logps (the frozen reference's), values (the value model's before the update), rewards (per token, KL
    penalty and the verifier's score at the last response token), advantages and returns (GAE), all float32 but the
    first four."""

    tokens: Any
    positions: Any
    segment_ids: Any
    response_mask: Any
    old_logps: Any
    ref_logps: Any
    values: Any
    rewards: Any
    advantages: Any
    returns: Any
