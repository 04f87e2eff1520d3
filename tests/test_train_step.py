"""Train/eval steps: exact gradient accumulation, pre-clip grad norm and clipped updates vs a separate optax
reference, sharded (8 CPU devices) == single device, float32 masters with bf16 compute, AOT lowering.

Compiles are the cost here, so initial states and compiled steps are built once per module and reused.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from test_train_helpers import (
    batch_sharding,
    loss_fn,
    make_batch,
    make_mesh,
    make_model,
    numpy_loss,
    sequences_denominator,
    tokens_denominator,
    variable_shardings,
)
from tulu_jax.train import (
    abstract_train_state,
    build_eval_step,
    build_train_step,
    init_train_state,
    make_optimizer,
    shardings_of,
    split_micro_batches,
    with_shardings,
)

LR, CLIP, EPS, WD = 1e-2, 0.05, 1e-3, 0.01
# clip_norm is small enough to clip every step here, and a large eps makes Adam's update depend on the
# gradient's scale, so a step that skipped clipping would visibly differ from the reference.
OPT = make_optimizer(LR, warmup_ratio=0.0, total_steps=10, weight_decay=WD, clip_norm=CLIP, eps=EPS)
DENOMINATORS = {"sequences": sequences_denominator, "tokens": tokens_denominator}
MESHES = {"mesh8": make_mesh((2, 2, 2)), "mesh1": make_mesh((1, 1, 1), devices=jax.devices()[:1])}


@functools.cache
def initial_state(mesh_name: str):
    mesh = MESHES[mesh_name]
    return init_train_state(make_model, OPT, mesh, variable_shardings(mesh), seed=0)


def fresh_state(mesh_name: str):
    """A copy of the module's initial state (train steps donate their input)."""
    return jax.tree.map(jnp.copy, initial_state(mesh_name))


@functools.cache
def train_step(mesh_name: str, accum: int, denominator: str, compute_dtype=None):
    state = initial_state(mesh_name)
    return build_train_step(
        state.graphdef, loss_fn, OPT, state_shardings=shardings_of(state),
        batch_shardings=batch_sharding(MESHES[mesh_name]), grad_accum_steps=accum,
        denominators_fn=DENOMINATORS[denominator], compute_dtype=compute_dtype,
    )


@functools.partial(jax.jit, static_argnums=(2,))
def full_batch_loss_and_grads(state, batch, denominator: str):
    """Plain jax.grad of the full-batch loss, outside the step machinery."""

    def f(params):
        model = nnx.merge(state.graphdef, params, state.model_state)
        return loss_fn(model, batch, DENOMINATORS[denominator](batch))[0]

    return jax.value_and_grad(f)(state.params)


def pure(tree):
    return jax.device_get(nnx.to_pure_dict(tree))


def assert_trees_close(a, b, rtol, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_micro_batches_are_strided_rows():
    batch = {"x": np.arange(8 * 3).reshape(8, 3)}
    micro = split_micro_batches(batch, 4, None)
    assert micro["x"].shape == (4, 2, 3)
    np.testing.assert_array_equal(micro["x"][1], batch["x"][[1, 5]])
    with pytest.raises(ValueError, match="not divisible"):
        split_micro_batches(batch, 3, None)


def test_accumulation_needs_denominators():
    with pytest.raises(ValueError, match="denominators_fn"):
        build_train_step(None, loss_fn, OPT, state_shardings=None, batch_shardings=None, grad_accum_steps=2)


@pytest.mark.parametrize("denominator", sorted(DENOMINATORS))
def test_grad_accumulation_4x2_equals_batch_of_8(denominator):
    batches = [make_batch(11), make_batch(12)]
    state0 = initial_state("mesh1")
    count = float(DENOMINATORS[denominator](batches[0])["denominator"])

    results = {}
    for accum in (1, 4):
        state, step, history = fresh_state("mesh1"), train_step("mesh1", accum, denominator), []
        for batch in batches:
            state, metrics = step(state, batch)
            history.append(jax.device_get(metrics))
        results[accum] = (history, pure(state.params))

    (h1, p1), (h4, p4) = results[1], results[4]
    for m1, m4 in zip(h1, h4):
        for key in ("loss", "grad_norm", "nll_sum", "tokens", "lr"):
            np.testing.assert_allclose(m4[key], m1[key], rtol=2e-6, err_msg=key)
    assert_trees_close(p4, p1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h1[0]["loss"], numpy_loss(state0.params, batches[0], count), rtol=1e-5)
    assert int(h4[0]["tokens"]) == int(batches[0]["loss_mask"].sum())

    if denominator == "tokens":
        # The data makes the distinction matter: the mean of per-micro-batch token means is a different number.
        micro = split_micro_batches(batches[0], 4, None)
        means = [
            numpy_loss(state0.params, jax.tree.map(lambda x, i=i: x[i], micro), float(micro["loss_mask"][i].sum()))
            for i in range(4)
        ]
        assert abs(np.mean(means) - h1[0]["loss"]) > 1e-3


def test_grad_norm_is_pre_clip_and_update_uses_clipped_grads():
    batch = make_batch(21)
    state0 = initial_state("mesh1")
    loss, grads = full_batch_loss_and_grads(state0, batch, "tokens")
    params0 = state0.params
    norm = float(optax.tree.norm(grads))
    assert norm > 2 * CLIP  # clipping is active

    def reference_params(tx):
        updates, _ = tx.update(grads, tx.init(params0), params0)
        return pure(optax.apply_updates(params0, updates))

    adamw = optax.adamw(LR, eps=EPS, weight_decay=WD)
    with_clip = reference_params(optax.chain(optax.clip_by_global_norm(CLIP), adamw))
    without_clip = reference_params(adamw)

    new_state, metrics = train_step("mesh1", 4, "tokens")(fresh_state("mesh1"), batch)
    np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=2e-6)
    np.testing.assert_allclose(float(metrics["grad_norm"]), norm, rtol=2e-6)
    np.testing.assert_allclose(float(metrics["lr"]), LR, rtol=1e-6)
    ours = pure(new_state.params)
    # The reference decays every leaf, ours skips biases and norms: compare the kernels, decayed in both.
    for name in ("up", "out"):
        np.testing.assert_allclose(ours[name]["kernel"], with_clip[name]["kernel"], rtol=1e-5, atol=1e-7)
    assert not np.allclose(with_clip["up"]["kernel"], without_clip["up"]["kernel"], rtol=1e-3, atol=1e-5)
    # Biases and norms are not decayed: our bias equals the clipped reference without decay.
    no_decay = reference_params(optax.chain(optax.clip_by_global_norm(CLIP), optax.adam(LR, eps=EPS)))
    np.testing.assert_allclose(ours["up"]["bias"], no_decay["up"]["bias"], rtol=1e-5, atol=1e-7)


def test_sharded_step_equals_single_device():
    s8, s1 = fresh_state("mesh8"), fresh_state("mesh1")
    kernel = s8.params["up"]["kernel"][...]
    assert kernel.sharding.spec == PartitionSpec("fsdp", "tensor")
    assert s8.opt_state[1][0].mu["up"]["kernel"][...].sharding.spec == PartitionSpec("fsdp", "tensor")
    assert len(kernel.sharding.device_set) == 8 and len(s1.params["up"]["kernel"][...].sharding.device_set) == 1
    assert_trees_close(pure(s8.params), pure(s1.params), rtol=0, atol=0)  # init does not depend on the mesh

    step8, step1 = train_step("mesh8", 4, "tokens"), train_step("mesh1", 4, "tokens")
    for i in range(3):
        batch = make_batch(30 + i)
        s8, m8 = step8(s8, batch)
        s1, m1 = step1(s1, batch)
        np.testing.assert_allclose(float(m8["loss"]), float(m1["loss"]), rtol=1e-5)
        np.testing.assert_allclose(float(m8["grad_norm"]), float(m1["grad_norm"]), rtol=1e-5)
    assert_trees_close(pure(s8.params), pure(s1.params), rtol=1e-5, atol=1e-5)
    assert int(s8.step) == 3
    assert s8.params["up"]["kernel"][...].sharding.spec == PartitionSpec("fsdp", "tensor")


def test_eval_step_matches_numpy_and_train_step_compiles_ahead_of_time():
    mesh = MESHES["mesh8"]
    state = initial_state("mesh8")
    batch = make_batch(41)
    evaluate = build_eval_step(
        state.graphdef, loss_fn, state_shardings=shardings_of(state), batch_shardings=batch_sharding(mesh),
        grad_accum_steps=2, denominators_fn=tokens_denominator,
    )
    metrics = evaluate(state, batch)
    count = float(batch["loss_mask"].sum())
    np.testing.assert_allclose(float(metrics["loss"]), numpy_loss(state.params, batch, count), rtol=1e-5)
    assert int(metrics["tokens"]) == int(batch["loss_mask"].sum())

    # AOT: the same jitted train step lowers from sharded ShapeDtypeStructs, and the executable runs.
    abstract_state = abstract_train_state(make_model, OPT, mesh, variable_shardings(mesh))
    assert jax.tree.structure(abstract_state) == jax.tree.structure(state)
    abstract_batch = with_shardings(batch, jax.tree.map(lambda _: batch_sharding(mesh), batch))
    compiled = train_step("mesh8", 4, "tokens").lower(abstract_state, abstract_batch).compile()
    _, train_metrics = compiled(fresh_state("mesh8"), batch, None)  # (state, batch, frozen): no frozen model
    np.testing.assert_allclose(float(train_metrics["loss"]), float(metrics["loss"]), rtol=1e-6)


def test_float32_masters_with_bf16_compute():
    state0 = initial_state("mesh1")
    batch = make_batch(51)
    bf16_params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), state0.params)
    model = nnx.merge(state0.graphdef, bf16_params, state0.model_state)
    expected = loss_fn(model, batch, tokens_denominator(batch))[0]
    new_state, metrics = train_step("mesh1", 1, "tokens", jnp.bfloat16)(fresh_state("mesh1"), batch)
    np.testing.assert_allclose(float(metrics["loss"]), float(expected), rtol=1e-6)
    assert {x.dtype for x in jax.tree.leaves(new_state.params)} == {jnp.dtype(jnp.float32)}
    assert new_state.opt_state[1][0].mu["up"]["kernel"][...].dtype == jnp.float32


def test_aux_reductions_over_micro_batches():
    state = initial_state("mesh1")
    batch = make_batch(61)
    evaluate = build_eval_step(
        state.graphdef, loss_fn, state_shardings=shardings_of(state), batch_shardings=batch_sharding(MESHES["mesh1"]),
        grad_accum_steps=4, denominators_fn=tokens_denominator, aux_reductions={"tokens": "max", "nll_sum": "mean"},
    )
    metrics = evaluate(state, batch)
    micro = split_micro_batches(batch, 4, None)
    per_micro_tokens = np.asarray(micro["loss_mask"]).sum(axis=(1, 2))
    assert int(metrics["tokens"]) == per_micro_tokens.max() and len(set(per_micro_tokens)) > 1
    # Σ nll over the batch = loss · token count; the mean over micro-batches is a quarter of it.
    np.testing.assert_allclose(float(metrics["nll_sum"]) * 4, float(metrics["loss"]) * batch["loss_mask"].sum(),
                               rtol=1e-5)
    with pytest.raises(ValueError, match="unknown reductions"):
        build_eval_step(state.graphdef, loss_fn, state_shardings=None, batch_shardings=None,
                        aux_reductions={"tokens": "median"})
