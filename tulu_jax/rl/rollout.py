"""Rollouts from the parameters a stage is training: the sampler (`tulu_jax.models.sampler.sample`) jitted with the
trainer's own shardings, on the trainer's mesh.

No copy and no resharding of the weights: the rollout's in_shardings for the parameters ARE the train state's
shardings, parameters are not donated, and the train step updates the same arrays the next rollout reads
(`rollout(state, ...)` passes `state.params` / `state.model_state` through as they are). The prompts, outputs and
KV cache are laid out by the batch rule (the cache also by `act_kv_heads` where the rules split it), so sampling
is data/FSDP/tensor parallel like the train step. (The Tülu 3 405B run spent ~25 s per iteration moving weights
from its learners to vLLM; here that cost is zero by construction.)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tulu_jax.models.sampler import SamplingSettings, bucket_length, prepare_prompts, sample
from tulu_jax.sharding import ShardingSpec, batch_sharding, named_sharding

PyTree = Any
# The KV cache k/v [L, B, S, KVH, Dh] by logical name: split by batch, and by KV heads where the rules say so.
CACHE_AXES = ("layers", "batch", "length", "act_kv_heads", "head_dim")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RolloutOutput:
    """Device arrays, batch-sharded. tokens int32 [B, N] (pad after the stop token), logprobs float32 [B, N] (log π
    of the sampling policy, 0 after the stop), lengths int32 [B] (stop token included), finished bool [B], and the
    left-padded prompt block that was fed: prompt_ids int32 [B, P], prompt_mask bool [B, P]."""

    tokens: jax.Array
    logprobs: jax.Array
    lengths: jax.Array
    finished: jax.Array
    prompt_ids: jax.Array
    prompt_mask: jax.Array


def process_rows(sharding: jax.sharding.Sharding, num_rows: int) -> np.ndarray:
    """The rows of a [num_rows, ...] batch laid out by `sharding` (split along its first axis) that live on this
    process's devices, in order: all of them in a single-process run, this host's share in a multi-process one."""
    shape = (num_rows,) + (1,) * max(len(getattr(sharding, "spec", ())) - 1, 0)
    rows: set[int] = set()
    for index in sharding.addressable_devices_indices_map(shape).values():
        rows.update(range(*index[0].indices(num_rows)))
    return np.array(sorted(rows), np.int64)


def place_process_rows(sharding: jax.sharding.Sharding, num_rows: int, build: Callable[[np.ndarray], Any]) -> Any:
    """Global [num_rows, ...] arrays laid out by `sharding` of which this process builds only its own rows:
    `build(rows)` gets `process_rows(sharding, num_rows)` and returns those rows (a host array or a tuple of them)."""
    local = build(process_rows(sharding, num_rows))
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x),
                                                                        (num_rows, *np.shape(x)[1:])), local)


def local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded array (`process_rows` order; replicas counted once)."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    shards = {s.index[0].indices(x.shape[0])[0]: s.data for s in x.addressable_shards}
    return np.concatenate([np.asarray(shards[start]) for start in sorted(shards)])


class Rollout:
    """A jitted, sharded sampler bound to a trainer's layout: `rollout(state, prompts, rng)`.

    `graphdef` and `state_shardings` are the train state's (`state.graphdef`, `shardings_of(state)`); `max_new_tokens`
    and the sampling settings are fixed per Rollout (one program per batch size and prompt bucket).
    """

    def __init__(
        self,
        graphdef: nnx.GraphDef,
        state_shardings: Any,
        mesh: Mesh,
        spec: ShardingSpec,
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
    ):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.max_new_tokens = max_new_tokens
        self.settings = SamplingSettings(float(temperature), float(top_p), int(top_k))
        self.batch_sharding = batch_sharding(mesh, spec)
        self.row_sharding = NamedSharding(mesh, PartitionSpec(self.batch_sharding.spec[0]))
        self.replicated = NamedSharding(mesh, PartitionSpec())
        self.param_shardings = (state_shardings.params, state_shardings.model_state)
        fn = functools.partial(
            sample, graphdef, settings=self.settings, new_bucket=bucket_length(max_new_tokens),
            cache_sharding=named_sharding(mesh, spec, CACHE_AXES),
        )

        def run(states: tuple[nnx.State, ...], ids: jax.Array, mask: jax.Array, key: jax.Array, stops: jax.Array,
                pad: jax.Array) -> tuple[jax.Array, ...]:
            tokens, logprobs, lengths, finished = fn(states, ids, mask, key, max_new_tokens, stops, pad)
            return tokens[:, :max_new_tokens], logprobs[:, :max_new_tokens], lengths, finished

        matrix, row, replicated = self.batch_sharding, self.row_sharding, self.replicated
        # Where each field of a RolloutOutput lives: [B, ·] fields batch-sharded, [B] fields row-sharded.
        self.output_shardings = RolloutOutput(tokens=matrix, logprobs=matrix, lengths=row, finished=row,
                                              prompt_ids=matrix, prompt_mask=matrix)
        self.jitted = jax.jit(
            run,
            in_shardings=(self.param_shardings, matrix, matrix, replicated, replicated, replicated),
            out_shardings=(matrix, matrix, row, row),
        )

    def place_prompts(
        self, config: Any, prompts: Sequence[Sequence[int]] | np.ndarray, prompt_mask: np.ndarray | None = None, *,
        eos_id: int | Sequence[int] | None = None, stop_ids: Sequence[int] = (), pad_id: int | None = None,
    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """Left-pad and validate prompts (as `generate` does) and put them on the mesh: (ids, mask, stops, pad)."""
        ids, mask, stops, pad = prepare_prompts(config, prompts, prompt_mask, eos_id=eos_id, stop_ids=stop_ids,
                                                pad_id=pad_id)
        return (jax.device_put(ids, self.batch_sharding), jax.device_put(mask, self.batch_sharding),
                jax.device_put(stops, self.replicated), jax.device_put(np.int32(pad), self.replicated))

    def place_rng(self, rng: jax.Array) -> jax.Array:
        """A PRNG key replicated on the mesh (the rollout's key argument)."""
        return jax.device_put(rng, self.replicated)

    def __call__(
        self, state: Any, prompt_ids: jax.Array, prompt_mask: jax.Array, rng: jax.Array, stop_ids: jax.Array,
        pad_id: jax.Array,
    ) -> RolloutOutput:
        """Sample from `state.params` / `state.model_state` (the arrays themselves) for prompts placed by
        `place_prompts` and a key placed by `place_rng`; nothing is fetched to the host."""
        tokens, logprobs, lengths, finished = self.jitted(
            (state.params, state.model_state), prompt_ids, prompt_mask, rng, stop_ids, pad_id
        )
        return RolloutOutput(tokens, logprobs, lengths, finished, prompt_ids, prompt_mask)
