"""Frozen models: the reference, teacher or value models a step reads but does not train, passed to the step as a
jit argument (`step(state, batch, frozen)`), laid out by the same logical rules as the trained state.

`frozen` is a mapping name → `FrozenModel` (e.g. `{"reference": ...}`) or None. Its shardings are part of the
step's in_shardings, so a frozen model is never a constant inside the compiled program.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from tulu_jax.train.state import TrainState

PyTree = Any


@struct.dataclass
class FrozenModel:
    """A model's structure (static) and its variables (arrays): `model()` rebuilds the module inside a step."""

    graphdef: nnx.GraphDef = struct.field(pytree_node=False)
    params: nnx.State
    model_state: nnx.State

    def model(self) -> nnx.Module:
        """The live module (build it inside the jitted step; its parameters get no gradient there)."""
        return nnx.merge(self.graphdef, self.params, self.model_state)


def freeze(state: TrainState, *, copy: bool = True) -> FrozenModel:
    """The model of `state` as a FrozenModel, in the state's shardings.

    copy=True gives it its own buffers: a train step donates the trained state, so a frozen snapshot of the initial
    policy (a DPO/PPO reference) must not share them. Abstract (ShapeDtypeStruct) states are never copied.
    """
    params, model_state = state.params, state.model_state
    if copy and all(isinstance(x, jax.Array) for x in jax.tree.leaves((params, model_state))):
        params, model_state = jax.tree.map(jnp.copy, (params, model_state))
    return FrozenModel(state.graphdef, params, model_state)
