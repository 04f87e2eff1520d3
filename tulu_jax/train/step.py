"""Jitted train and eval steps, model- and loss-agnostic, with exact gradient accumulation.

Step contract: `step(state, batch, frozen) -> (state, metrics)`. `frozen` is a pytree of models that the step reads
but does not train (a DPO/PPO reference, a distillation teacher): a mapping name → `FrozenModel`, or None. It is a
jit ARGUMENT with explicit in_shardings laid out by the same logical rules as the state, never a constant baked into
the compiled program, so billions of frozen weights cost argument memory, not program size or compile time.

Loss contract: `loss_fn(model, micro_batch, denominators, frozen) -> (loss, aux_metrics)`. `denominators` is computed
ONCE from the full global batch by `denominators_fn(batch)` (e.g. the number of sequences or of supervised tokens)
and handed to every micro-batch, so that the loss of each micro-batch is its share of the full-batch loss: the
step SUMS micro-batch losses and gradients (float32), which then equal the full-batch loss and gradient exactly.
`aux_metrics` (a dict of arrays) are summed over micro-batches too, unless `aux_reductions` names another
reduction ("mean", "max", "min") for a key.

Micro-batches are strided (micro-batch i holds rows i, i+A, i+2A, ...): when each device's rows are divisible by
A, every device contributes rows of its own shard to every micro-batch and splitting moves no data.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from tulu_jax.train.guard import SKIPPED_METRIC, guard_nonfinite
from tulu_jax.train.optim import Optimizer
from tulu_jax.train.state import TrainState, split_model

PyTree = Any
LossFn = Callable[[nnx.Module, PyTree, PyTree, PyTree], tuple[jax.Array, dict[str, jax.Array]]]
_REDUCTIONS = {"sum": jnp.sum, "mean": jnp.mean, "max": jnp.max, "min": jnp.min}


def _replicated_like(shardings: PyTree) -> jax.sharding.Sharding:
    """A replicated sharding on the devices of the first sharding found in `shardings` (for scalar metrics)."""
    first = jax.tree.leaves(shardings)[0]
    if isinstance(first, NamedSharding):
        return NamedSharding(first.mesh, PartitionSpec())
    return first


def _cast_floating(tree: PyTree, dtype: Any | None) -> PyTree:
    if dtype is None:
        return tree
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def split_micro_batches(batch: PyTree, num: int, batch_shardings: PyTree | None) -> PyTree:
    """[B, ...] leaves → [num, B/num, ...], micro-batch i = rows i, i+num, ...; keeps the batch-axis sharding.

    Splitting moves no data when each device's share of the batch is divisible by `num`.
    """

    def split(x: jax.Array, sharding: Any) -> jax.Array:
        if x.ndim == 0 or x.shape[0] % num:
            raise ValueError(
                f"gradient accumulation: batch leading dimension {x.shape[:1]} is not divisible by "
                f"grad_accum_steps={num} (leaf of shape {x.shape})"
            )
        y = jnp.swapaxes(x.reshape(x.shape[0] // num, num, *x.shape[1:]), 0, 1)
        if isinstance(sharding, NamedSharding):
            y = jax.lax.with_sharding_constraint(y, NamedSharding(sharding.mesh, PartitionSpec(None, *sharding.spec)))
        return y

    if batch_shardings is None:
        return jax.tree.map(lambda x: split(x, None), batch)
    # batch_shardings may be a prefix of the batch tree (e.g. one sharding for every leaf).
    return jax.tree.map(lambda s, sub: jax.tree.map(lambda x: split(x, s), sub), batch_shardings, batch)


def _reduce_aux(stacked: dict[str, jax.Array], aux_reductions: Mapping[str, str]) -> dict[str, jax.Array]:
    return {k: _REDUCTIONS[aux_reductions.get(k, "sum")](v, axis=0) for k, v in stacked.items()}


def _check_reductions(aux_reductions: Mapping[str, str] | None) -> dict[str, str]:
    aux_reductions = dict(aux_reductions or {})
    bad = {k: v for k, v in aux_reductions.items() if v not in _REDUCTIONS}
    if bad:
        raise ValueError(f"aux_reductions: unknown reductions {bad}; use one of {sorted(_REDUCTIONS)}")
    return aux_reductions


def _check_accum(grad_accum_steps: int, denominators_fn: Callable | None) -> None:
    if grad_accum_steps < 1:
        raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")
    if grad_accum_steps > 1 and denominators_fn is None:
        # Without global denominators each micro-batch would normalize by its own size: not the full-batch loss.
        raise ValueError("grad_accum_steps > 1 needs a denominators_fn computed from the full batch")


def _micro_loss(graphdef: nnx.GraphDef, loss_fn: LossFn, compute_dtype: Any | None, *, train: bool) -> Callable:
    """(params, model_state, micro_batch, denominators, frozen) -> (loss, (aux, new_model_state))."""

    def fn(params: nnx.State, model_state: nnx.State, micro_batch: PyTree, denominators: PyTree, frozen: PyTree):
        model = nnx.merge(graphdef, _cast_floating(params, compute_dtype), model_state)
        if not train:
            model.eval()
        loss, aux = loss_fn(model, micro_batch, denominators, jax.lax.stop_gradient(frozen))
        _, _, new_model_state = split_model(model)
        return jnp.asarray(loss, jnp.float32), (dict(aux), new_model_state)

    return fn


def apply_gradients(member: TrainState, grads: nnx.State, optimizer: Optimizer) -> tuple[TrainState, jax.Array]:
    """One optimizer update of a model's state inside a jitted step (a multi-model step calls it per member):
    (the updated state, the global gradient norm before clipping)."""
    grad_norm = optax.tree.norm(grads)
    # The optimizer sees gradients in the parameters' dtype, so its moments keep that dtype too.
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, member.params)
    updates, opt_state = optimizer.tx.update(grads, member.opt_state, member.params)
    new = member.replace(params=optax.apply_updates(member.params, updates), opt_state=opt_state,
                         step=member.step + 1)
    return new, grad_norm


class Step:
    """A jitted step with the contract `(state, batch, frozen)`; `frozen` may be left out (None: no frozen model).

    `lower(state, batch, frozen)` serves AOT compilation with sharded ShapeDtypeStructs; `jitted` is the jax.jit
    function itself.
    """

    def __init__(self, jitted: Any):
        self.jitted = jitted

    def __call__(self, state: Any, batch: PyTree, frozen: PyTree = None) -> Any:
        """Run the step."""
        return self.jitted(state, batch, frozen)

    def lower(self, state: Any, batch: PyTree, frozen: PyTree = None) -> Any:
        """`jax.jit(...).lower` with the same arguments."""
        return self.jitted.lower(state, batch, frozen)

    def trace(self, state: Any, batch: PyTree, frozen: PyTree = None) -> Any:
        """`jax.jit(...).trace` with the same arguments (tracing only: e.g. to record activation constraints)."""
        return self.jitted.trace(state, batch, frozen)


def build_train_step(
    graphdef: nnx.GraphDef,
    loss_fn: LossFn,
    optimizer: Optimizer,
    *,
    state_shardings: TrainState,
    batch_shardings: PyTree,
    frozen_shardings: PyTree = None,
    grad_accum_steps: int = 1,
    denominators_fn: Callable[[PyTree], PyTree] | None = None,
    compute_dtype: Any | None = None,
    aux_reductions: Mapping[str, str] | None = None,
) -> Step:
    """A jitted, state-donating `(state, batch, frozen) -> (state, metrics)`.

    metrics: `loss` (full-batch), `grad_norm` (global norm BEFORE clipping), `lr` (the schedule at this update),
    `skipped_nonfinite` (1 when a non-finite loss or gradient skipped the update: see `train.guard`),
    plus the loss function's aux metrics. It also serves AOT: `step.lower(abstract_state, abstract_batch,
    abstract_frozen).compile()` with sharded jax.ShapeDtypeStructs. `frozen_shardings`: the shardings of the frozen
    models (e.g. `shardings_of(frozen)`), None without any. `compute_dtype` (optional): cast floating parameters to
    it for the forward (float32 masters, bf16 compute).
    """
    _check_accum(grad_accum_steps, denominators_fn)
    aux_reductions = _check_reductions(aux_reductions)
    grad_fn = jax.value_and_grad(_micro_loss(graphdef, loss_fn, compute_dtype, train=True), has_aux=True)

    def train_step(state: TrainState, batch: PyTree, frozen: PyTree) -> tuple[TrainState, dict[str, jax.Array]]:
        denominators = denominators_fn(batch) if denominators_fn is not None else None
        params = state.params
        if grad_accum_steps == 1:
            (loss, (aux, model_state)), grads = grad_fn(params, state.model_state, batch, denominators, frozen)
            grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
        else:
            micro_batches = split_micro_batches(batch, grad_accum_steps, batch_shardings)

            def body(carry, micro_batch):
                grad_sum, model_state = carry
                (loss, (aux, model_state)), grads = grad_fn(params, model_state, micro_batch, denominators, frozen)
                grad_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_sum, grads)
                # Keep the accumulator laid out like the parameters (reduce-scatter per micro-batch under FSDP).
                grad_sum = jax.lax.with_sharding_constraint(grad_sum, state_shardings.params)
                return (grad_sum, model_state), (loss, aux)

            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
            (grads, model_state), (losses, stacked_aux) = jax.lax.scan(
                body, (zeros, state.model_state), micro_batches
            )
            loss = jnp.sum(losses)
            aux = _reduce_aux(stacked_aux, aux_reductions)

        new_state, grad_norm = apply_gradients(state.replace(model_state=model_state), grads, optimizer)
        new_state, skipped = guard_nonfinite(state, new_state, loss, grad_norm)
        metrics = {**aux, "loss": loss, "grad_norm": grad_norm, "lr": optimizer.schedule(state.step),
                   SKIPPED_METRIC: skipped}
        return new_state, metrics

    metrics_sharding = _replicated_like(state_shardings)
    return Step(jax.jit(
        train_step,
        in_shardings=(state_shardings, batch_shardings, frozen_shardings),
        out_shardings=(state_shardings, metrics_sharding),
        donate_argnums=(0,),
    ))


def build_eval_step(
    graphdef: nnx.GraphDef,
    loss_fn: LossFn,
    *,
    state_shardings: TrainState,
    batch_shardings: PyTree,
    frozen_shardings: PyTree = None,
    grad_accum_steps: int = 1,
    denominators_fn: Callable[[PyTree], PyTree] | None = None,
    compute_dtype: Any | None = None,
    aux_reductions: Mapping[str, str] | None = None,
) -> Step:
    """A jitted `(state, batch, frozen) -> metrics` (loss + aux, model in eval mode, no gradients, not donated).

    `grad_accum_steps` splits the batch into micro-batches exactly as the train step does (to bound memory).
    """
    _check_accum(grad_accum_steps, denominators_fn)
    aux_reductions = _check_reductions(aux_reductions)
    micro_loss = _micro_loss(graphdef, loss_fn, compute_dtype, train=False)

    def eval_step(state: TrainState, batch: PyTree, frozen: PyTree) -> dict[str, jax.Array]:
        denominators = denominators_fn(batch) if denominators_fn is not None else None
        if grad_accum_steps == 1:
            loss, (aux, _) = micro_loss(state.params, state.model_state, batch, denominators, frozen)
        else:

            def body(_, micro_batch):
                loss, (aux, _) = micro_loss(state.params, state.model_state, micro_batch, denominators, frozen)
                return None, (loss, aux)

            micro_batches = split_micro_batches(batch, grad_accum_steps, batch_shardings)
            _, (losses, stacked_aux) = jax.lax.scan(body, None, micro_batches)
            loss, aux = jnp.sum(losses), _reduce_aux(stacked_aux, aux_reductions)
        return {**aux, "loss": loss}

    return Step(jax.jit(
        eval_step, in_shardings=(state_shardings, batch_shardings, frozen_shardings),
        out_shardings=_replicated_like(state_shardings),
    ))
