"""A train state with several trained models — PPO's policy and value model — each with its own optax optimizer,
learning rate and schedule, checkpointed and resumed together (one orbax checkpoint), exported separately.

`MultiTrainState.models` maps a name to an ordinary `TrainState` (its parameters, optimizer state and update count);
`step` and `rng` are the run's. A step over it updates each member with its own optimizer
(`tulu_jax.train.step.apply_gradients`).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tulu_jax.train.optim import Optimizer
from tulu_jax.train.state import TrainState, init_train_state

PyTree = Any


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MultiTrainState:
    """Named TrainStates trained together, the run's step counter and rng (checkpointed with them)."""

    models: dict[str, TrainState]
    step: jax.Array
    rng: jax.Array

    def replace(self, **changes: Any) -> "MultiTrainState":
        """A copy with the given fields replaced."""
        return dataclasses.replace(self, **changes)

    def arrays(self) -> dict[str, Any]:
        """What a checkpoint stores: every member's arrays under `models.<name>.…`, then step and rng."""
        return {"models": {name: m.arrays() for name, m in self.models.items()}, "step": self.step, "rng": self.rng}

    def with_arrays(self, arrays: Mapping[str, Any]) -> "MultiTrainState":
        """A state of this structure holding `arrays` (the inverse of `arrays()`)."""
        models = {name: m.with_arrays(arrays["models"][name]) for name, m in self.models.items()}
        return MultiTrainState(models=models, step=arrays["step"], rng=arrays["rng"])


def init_multi_train_state(
    members: Mapping[str, tuple[Callable[[nnx.Rngs], nnx.Module], Optimizer]],
    mesh: Mesh,
    state_shardings_fn: Callable[[nnx.State], PyTree],
    seed: int = 0,
) -> MultiTrainState:
    """Each member `name: (make_model, optimizer)` initialized directly into its shardings (member i from seed+i)."""
    models = {
        name: init_train_state(make, optimizer, mesh, state_shardings_fn, seed + i)
        for i, (name, (make, optimizer)) in enumerate(members.items())
    }
    replicated = NamedSharding(mesh, PartitionSpec())
    rng = jax.random.key_data(jax.random.fold_in(jax.random.key(seed), 0))
    step = jax.device_put(jnp.zeros((), jnp.int32), replicated)
    return MultiTrainState(models, step, jax.device_put(rng, replicated))


def export_members(
    state: MultiTrainState, out_dir: str | os.PathLike[str], tokenizer: Any | None = None, dtype: str | None = None,
) -> dict[str, pathlib.Path]:
    """Write each member that is an HF-exportable model (a Decoder) as its own HF directory `out_dir/<name>`."""
    from tulu_jax.models.hf_io import save_hf_checkpoint

    written = {}
    for name, member in state.models.items():
        path = pathlib.Path(out_dir) / name
        save_hf_checkpoint(member.model(), path, dtype=dtype)
        if tokenizer is not None and jax.process_index() == 0:
            tokenizer.save_pretrained(str(path))
        written[name] = path
    return written
