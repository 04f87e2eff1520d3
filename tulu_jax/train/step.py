"""Jitted train and eval steps, model- and loss-agnostic, with exact gradient accumulation.

Loss contract: `loss_fn(model, micro_batch, denominators) -> (loss, aux_metrics)`. `denominators` is computed
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
LossFn = Callable[[nnx.Module, PyTree, PyTree], tuple[jax.Array, dict[str, jax.Array]]]
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
    """(params, model_state, micro_batch, denominators) -> (loss, (aux, new_model_state))."""

    def fn(params: nnx.State, model_state: nnx.State, micro_batch: PyTree, denominators: PyTree):
        model = nnx.merge(graphdef, _cast_floating(params, compute_dtype), model_state)
        if not train:
            model.eval()
        loss, aux = loss_fn(model, micro_batch, denominators)
        _, _, new_model_state = split_model(model)
        return jnp.asarray(loss, jnp.float32), (dict(aux), new_model_state)

    return fn


def build_train_step(
    graphdef: nnx.GraphDef,
    loss_fn: LossFn,
    optimizer: Optimizer,
    *,
    state_shardings: TrainState,
    batch_shardings: PyTree,
    grad_accum_steps: int = 1,
    denominators_fn: Callable[[PyTree], PyTree] | None = None,
    compute_dtype: Any | None = None,
    aux_reductions: Mapping[str, str] | None = None,
) -> Callable[[TrainState, PyTree], tuple[TrainState, dict[str, jax.Array]]]:
    """A jitted, state-donating `(state, batch) -> (state, metrics)`.

    metrics: `loss` (full-batch), `grad_norm` (global norm BEFORE clipping), `lr` (the schedule at this update),
    `skipped_nonfinite` (1 when a non-finite loss or gradient skipped the update: see `train.guard`),
    plus the loss function's aux metrics. The returned object is a `jax.jit` function, so it also serves AOT:
    `step.lower(abstract_state, abstract_batch).compile()` with sharded jax.ShapeDtypeStructs.
    `compute_dtype` (optional): cast floating parameters to it for the forward (float32 masters, bf16 compute).
    """
    _check_accum(grad_accum_steps, denominators_fn)
    aux_reductions = _check_reductions(aux_reductions)
    grad_fn = jax.value_and_grad(_micro_loss(graphdef, loss_fn, compute_dtype, train=True), has_aux=True)

    def train_step(state: TrainState, batch: PyTree) -> tuple[TrainState, dict[str, jax.Array]]:
        denominators = denominators_fn(batch) if denominators_fn is not None else None
        params = state.params
        if grad_accum_steps == 1:
            (loss, (aux, model_state)), grads = grad_fn(params, state.model_state, batch, denominators)
            grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
        else:
            micro_batches = split_micro_batches(batch, grad_accum_steps, batch_shardings)

            def body(carry, micro_batch):
                grad_sum, model_state = carry
                (loss, (aux, model_state)), grads = grad_fn(params, model_state, micro_batch, denominators)
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

        grad_norm = optax.tree.norm(grads)
        # The optimizer sees gradients in the parameters' dtype, so its moments keep that dtype too.
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
        updates, opt_state = optimizer.tx.update(grads, state.opt_state, params)
        new_state = state.replace(
            params=optax.apply_updates(params, updates),
            model_state=model_state,
            opt_state=opt_state,
            step=state.step + 1,
        )
        new_state, skipped = guard_nonfinite(state, new_state, loss, grad_norm)
        metrics = {**aux, "loss": loss, "grad_norm": grad_norm, "lr": optimizer.schedule(state.step),
                   SKIPPED_METRIC: skipped}
        return new_state, metrics

    metrics_sharding = _replicated_like(state_shardings)
    return jax.jit(
        train_step,
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=(state_shardings, metrics_sharding),
        donate_argnums=(0,),
    )


def build_eval_step(
    graphdef: nnx.GraphDef,
    loss_fn: LossFn,
    *,
    state_shardings: TrainState,
    batch_shardings: PyTree,
    grad_accum_steps: int = 1,
    denominators_fn: Callable[[PyTree], PyTree] | None = None,
    compute_dtype: Any | None = None,
    aux_reductions: Mapping[str, str] | None = None,
) -> Callable[[TrainState, PyTree], dict[str, jax.Array]]:
    """A jitted `(state, batch) -> metrics` (loss + aux, model in eval mode, no gradients, state not donated).

    `grad_accum_steps` splits the batch into micro-batches exactly as the train step does (to bound memory).
    """
    _check_accum(grad_accum_steps, denominators_fn)
    aux_reductions = _check_reductions(aux_reductions)
    micro_loss = _micro_loss(graphdef, loss_fn, compute_dtype, train=False)

    def eval_step(state: TrainState, batch: PyTree) -> dict[str, jax.Array]:
        denominators = denominators_fn(batch) if denominators_fn is not None else None
        if grad_accum_steps == 1:
            loss, (aux, _) = micro_loss(state.params, state.model_state, batch, denominators)
        else:

            def body(_, micro_batch):
                loss, (aux, _) = micro_loss(state.params, state.model_state, micro_batch, denominators)
                return None, (loss, aux)

            micro_batches = split_micro_batches(batch, grad_accum_steps, batch_shardings)
            _, (losses, stacked_aux) = jax.lax.scan(body, None, micro_batches)
            loss, aux = jnp.sum(losses), _reduce_aux(stacked_aux, aux_reductions)
        return {**aux, "loss": loss}

    return jax.jit(
        eval_step, in_shardings=(state_shardings, batch_shardings), out_shardings=_replicated_like(state_shardings)
    )
