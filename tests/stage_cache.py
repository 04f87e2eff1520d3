"""Meshes, initial train states and compiled steps that a stage's tests build once and reuse (tests/test_dpo_stage.py,
tests/test_rm_stage.py): compiling a tiny model's step costs far more than running it."""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from tulu_jax.sharding import ShardingSpec, load_sharding, make_mesh

REPO = pathlib.Path(__file__).resolve().parent.parent
_MESHES: dict[str, tuple[ShardingSpec, jax.sharding.Mesh]] = {}


def mesh(name: str) -> tuple[ShardingSpec, jax.sharding.Mesh]:
    """(spec, mesh): "one" CPU device or the 8-device data × fsdp × tensor mesh (sharding/cpu-8.yaml)."""
    if name not in _MESHES:
        spec = load_sharding(REPO / "sharding" / ("cpu-1.yaml" if name == "one" else "cpu-8.yaml"))
        _MESHES[name] = spec, make_mesh(spec, devices=jax.devices()[:1] if name == "one" else None)
    return _MESHES[name]


class StageCache:
    """One stage's seed-0 initial state per mesh and its compiled step per (mesh, grad_accum_steps), built on first
    use. `init(spec, mesh)` makes the state; `build(state, spec, mesh, accum)` makes the step."""

    def __init__(self, init: Callable[[ShardingSpec, jax.sharding.Mesh], Any],
                 build: Callable[[Any, ShardingSpec, jax.sharding.Mesh, int], Any]):
        self._init, self._build = init, build
        self._states: dict[str, Any] = {}
        self._steps: dict[tuple[str, int], Any] = {}

    def initial_state(self, mesh_name: str) -> Any:
        """The initial state on the mesh, a new copy each call (steps donate their input state)."""
        if mesh_name not in self._states:
            self._states[mesh_name] = self._init(*mesh(mesh_name))
        return jax.tree.map(jnp.copy, self._states[mesh_name])

    def step(self, mesh_name: str, accum: int) -> Any:
        """The stage's jitted train step on the mesh with `accum` micro-batches."""
        if (mesh_name, accum) not in self._steps:
            self._steps[mesh_name, accum] = self._build(self.initial_state(mesh_name), *mesh(mesh_name), accum)
        return self._steps[mesh_name, accum]
