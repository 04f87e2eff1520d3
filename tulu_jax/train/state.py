"""TrainState: the whole training state as one immutable pytree, and its sharded initialization.

Precision: `params` are stored in the model's `param_dtype`. For float32 master weights with bfloat16 compute,
build the model with `param_dtype="float32"` and either let the model cast in its forward (the Decoder's
`compute_dtype`), or pass `compute_dtype=jnp.bfloat16` to `build_train_step`, which casts the floating
parameters before the forward; gradients then flow back through the cast to the float32 masters and the
optimizer (and its moments) stays in float32.

Randomness: `rng` is a raw `uint32[2]` key (`jax.random.key_data`) that stages derive keys from with
`jax.random.fold_in(state.key, state.step)`; it is checkpointed, so a resumed run draws the same numbers.
Randomness the model owns (an `nnx.Rngs` stream, e.g. dropout) lives in `model_state` and is threaded through
every step, so it is checkpointed as well.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tulu_jax.pytree import path_name
from tulu_jax.train.optim import Optimizer

PyTree = Any


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Model parameters, other model variables, optimizer state, step counter and rng, as a pytree.

    `graphdef` (the model's structure) is static: two states with different graphdefs are different pytree types.
    """

    graphdef: nnx.GraphDef = dataclasses.field(metadata={"static": True})
    params: nnx.State
    model_state: nnx.State
    opt_state: PyTree
    step: jax.Array
    rng: jax.Array

    @property
    def key(self) -> jax.Array:
        """`rng` as a typed PRNG key."""
        return jax.random.wrap_key_data(self.rng)

    def model(self) -> nnx.Module:
        """A live module holding this state's parameters (for evaluation or export outside jit)."""
        return nnx.merge(self.graphdef, self.params, self.model_state)

    def replace(self, **changes: Any) -> "TrainState":
        """A copy with the given fields replaced."""
        return dataclasses.replace(self, **changes)

    def arrays(self) -> dict[str, Any]:
        """Everything but the static graphdef, as the dict a checkpoint stores (`params.…`, `opt_state.…`, ...)."""
        return {name: getattr(self, name) for name in ("params", "model_state", "opt_state", "step", "rng")}

    def with_arrays(self, arrays: dict[str, Any]) -> "TrainState":
        """A state of this structure holding `arrays` (the inverse of `arrays()`, e.g. after a restore)."""
        return TrainState(graphdef=self.graphdef, **arrays)


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """`graphdef, params (nnx.Param), model_state (every other variable)` — the split every step uses."""
    return nnx.split(model, nnx.Param, ...)


def create_train_state(model: nnx.Module, optimizer: Optimizer, seed: int) -> TrainState:
    """A TrainState from a live model (used inside the jitted initializer, or for tiny unsharded models)."""
    graphdef, params, model_state = split_model(model)
    return TrainState(
        graphdef=graphdef,
        params=params,
        model_state=model_state,
        opt_state=optimizer.tx.init(params),
        step=jnp.zeros((), jnp.int32),
        rng=jax.random.key_data(jax.random.fold_in(jax.random.key(seed), 1)),
    )


def _init_fn(make_model: Callable[[nnx.Rngs], nnx.Module], optimizer: Optimizer, seed: int) -> Callable[[], TrainState]:
    def init() -> TrainState:
        # Shardings come only from jit's out_shardings: no eager per-variable constraints (those need the
        # logical rules in context, and would bind the model to one mesh).
        with nnx.use_eager_sharding(False):
            model = make_model(nnx.Rngs(seed))
        return create_train_state(model, optimizer, seed)

    return init


def eval_shape_train_state(
    make_model: Callable[[nnx.Rngs], nnx.Module], optimizer: Optimizer, seed: int = 0
) -> TrainState:
    """The TrainState's shapes and dtypes (jax.ShapeDtypeStruct leaves, variable metadata kept); allocates nothing."""
    return jax.eval_shape(_init_fn(make_model, optimizer, seed))


def opt_state_shardings(opt_state: PyTree, params: PyTree, param_shardings: PyTree, replicated: Any) -> PyTree:
    """Shardings of an optimizer state, derived from its tree structure.

    Every subtree of `opt_state` with the structure of `params` (Adam's `mu` and `nu`: optax builds them by mapping
    over the parameters) takes `param_shardings`; every other leaf must be a scalar (step counters) and is
    replicated. Anything else is an optimizer whose state is not laid out like the parameters: ValueError, never a
    silently replicated array.
    """
    structure = jax.tree.structure(params)

    def like_params(node: Any) -> bool:
        return node is not None and jax.tree.structure(node) == structure

    def one(path: tuple[Any, ...], node: Any) -> Any:
        if like_params(node):
            return param_shardings
        if getattr(node, "ndim", 0):
            raise ValueError(
                f"optimizer state leaf '{path_name(path)}' (shape {tuple(node.shape)}) is neither a scalar nor part "
                "of a subtree shaped like the parameters: cannot tell how to shard it"
            )
        return replicated

    return jax.tree_util.tree_map_with_path(one, opt_state, is_leaf=like_params)


def train_state_shardings(
    abstract: TrainState, mesh: Mesh, variable_shardings: Callable[[nnx.State], PyTree]
) -> TrainState:
    """Shardings for every leaf of a TrainState.

    `variable_shardings` maps an (abstract) nnx.State with its variables' logical-axis metadata to a tree of
    shardings of the same structure (e.g. `tulu_jax.sharding.state_shardings` with mesh and rules bound). It is
    applied to `params` and `model_state`; the optimizer state follows the parameters (`opt_state_shardings`);
    step and rng are replicated.
    """
    replicated = NamedSharding(mesh, PartitionSpec())
    param_shardings = variable_shardings(abstract.params)
    return TrainState(
        graphdef=abstract.graphdef,
        params=param_shardings,
        model_state=variable_shardings(abstract.model_state),
        opt_state=opt_state_shardings(abstract.opt_state, abstract.params, param_shardings, replicated),
        step=replicated,
        rng=replicated,
    )


def shardings_of(tree: PyTree) -> PyTree:
    """The `.sharding` of every leaf (jax.Array or sharded jax.ShapeDtypeStruct)."""
    return jax.tree.map(lambda x: x.sharding, tree)


def with_shardings(abstract: PyTree, shardings: PyTree) -> PyTree:
    """`jax.ShapeDtypeStruct`s carrying the given shardings: the input of AOT `.lower()` and of restores."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)


def abstract_train_state(
    make_model: Callable[[nnx.Rngs], nnx.Module],
    optimizer: Optimizer,
    mesh: Mesh,
    variable_shardings: Callable[[nnx.State], PyTree],
) -> TrainState:
    """The TrainState as sharded `jax.ShapeDtypeStruct`s, for `train_step.lower(state, batch).compile()`."""
    abstract = eval_shape_train_state(make_model, optimizer)
    return with_shardings(abstract, train_state_shardings(abstract, mesh, variable_shardings))


def init_train_state(
    make_model: Callable[[nnx.Rngs], nnx.Module],
    optimizer: Optimizer,
    mesh: Mesh,
    state_shardings_fn: Callable[[nnx.State], PyTree],
    seed: int = 0,
) -> TrainState:
    """Initialize model and optimizer directly into their shardings (nothing is built whole on one host).

    `make_model(rngs)` builds the nnx.Module; `state_shardings_fn` maps an abstract nnx.State to its shardings
    (see `train_state_shardings`). Returns a TrainState whose leaves are sharded jax.Arrays; read the shardings
    back with `shardings_of(state)`.
    """
    init = _init_fn(make_model, optimizer, seed)
    abstract = jax.eval_shape(init)
    shardings = train_state_shardings(abstract, mesh, state_shardings_fn)
    with jax.set_mesh(mesh):
        return jax.jit(init, out_shardings=shardings)()
