"""Shardings of model state: every nnx Variable by its logical axis names, and a sharded initializer."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tulu_jax.errors import ConfigError
from tulu_jax.pytree import path_name
from tulu_jax.sharding.spec import Rules, ShardingSpec, logical_to_spec


def _variable_logical_axes(var: nnx.Variable) -> tuple[Any, ...] | None:
    names = var.get_metadata().get("out_sharding")
    return tuple(names) if names else None


def state_shardings(abstract_state: Any, mesh: Mesh, rules: Rules | ShardingSpec) -> Any:
    """NamedShardings for every leaf of an nnx State (or any pytree holding nnx Variables), e.g. from nnx.eval_shape.

    A Variable with logical names (its `out_sharding` metadata) is sharded by the rules; anything else (scalars,
    RNG keys, unnamed variables) is replicated. Optimizer moments copy their parameter's metadata, so they are
    sharded like it. Variables keep their place in the tree, so the result can be passed as jit's out_shardings.
    """
    rules = rules.rules if isinstance(rules, ShardingSpec) else rules
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(path: tuple, leaf: Any) -> Any:
        if not isinstance(leaf, nnx.Variable):
            return replicated
        names = _variable_logical_axes(leaf)
        if names is None:
            return leaf.replace(replicated)
        shape = tuple(getattr(leaf.get_value(), "shape", ()))
        where = path_name(path)
        if len(names) != len(shape):
            raise ValueError(f"variable '{where}' has shape {shape} but {len(names)} logical axes {names}")
        spec = logical_to_spec(names, rules)
        for dim, (size, entry) in enumerate(zip(shape, spec, strict=True)):
            axes = (entry,) if isinstance(entry, str) else entry or ()
            parts = math.prod(mesh.shape[a] for a in axes)
            if size % parts:
                raise ConfigError(
                    f"variable '{where}' dimension {dim} ('{names[dim]}', size {size}) cannot be split over mesh "
                    f"axes {axes} of total size {parts}: change 'rules.{names[dim]}' or the mesh"
                )
        return leaf.replace(NamedSharding(mesh, spec))

    return jax.tree_util.tree_map_with_path(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def init_sharded(make_model: Callable[[], nnx.Module], mesh: Mesh, rules: Rules | ShardingSpec) -> nnx.Module:
    """Build `make_model()` directly into its shardings: one jitted init, so no host ever holds the full model.

    Eager variable sharding (Flax's default, which needs a mesh context) is turned off while tracing: the
    out_shardings computed from the logical names place every array instead. The optimizer of a sharded `model`
    is built the same way: `init_sharded(lambda: nnx.Optimizer(model, tx, wrt=nnx.Param), mesh, rules)`.
    """
    with nnx.use_eager_sharding(False):
        graphdef, abstract_state = nnx.split(nnx.eval_shape(make_model))
    shardings = state_shardings(abstract_state, mesh, rules)

    @functools.partial(jax.jit, out_shardings=shardings)
    def init() -> Any:
        with nnx.use_eager_sharding(False):
            return nnx.state(make_model())

    return nnx.merge(graphdef, init())
