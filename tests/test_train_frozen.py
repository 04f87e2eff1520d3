"""Frozen models (a reference, a teacher) are jit ARGUMENTS of the step `(state, batch, frozen)`, with the state's
logical layout, never constants baked into the compiled program; and the step reads them correctly."""

from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from test_train_helpers import batch_sharding, make_batch, make_mesh, make_model, variable_shardings
from tulu_jax.train import FrozenModel, build_train_step, freeze, init_train_state, make_optimizer, shardings_of

MESH = make_mesh((2, 2, 2))
OPT = make_optimizer(1e-2, warmup_ratio=0.0, total_steps=4)
# A non-splat dense constant in StableHLO text: a hex blob or a literal list, with its tensor type.
DENSE_CONSTANT = re.compile(r'stablehlo\.constant dense<(?:"0x[0-9A-F]+"|\[[^>]*\])> : tensor<([0-9x]+)x[a-z0-9]+>')


def token_logps(model, batch):
    logp = jax.nn.log_softmax(model(batch["input_ids"]), axis=-1)
    return jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]


def ref_loss(model, batch, denominators, frozen):
    """A KL-like pull toward the frozen reference: Σ mask (log π − log π_ref)² / rows."""
    diff = token_logps(model, batch) - token_logps(frozen["reference"].model(), batch)
    return jnp.sum(jnp.where(batch["loss_mask"], diff**2, 0.0)) / batch["input_ids"].shape[0], {}


@functools.cache
def setup():
    policy = init_train_state(make_model, OPT, MESH, variable_shardings(MESH), seed=0)
    reference = init_train_state(make_model, OPT, MESH, variable_shardings(MESH), seed=1)
    frozen = {"reference": freeze(reference)}
    step = build_train_step(policy.graphdef, ref_loss, OPT, state_shardings=shardings_of(policy),
                            batch_shardings=batch_sharding(MESH), frozen_shardings=shardings_of(frozen))
    batch = jax.device_put(make_batch(0), batch_sharding(MESH))
    return policy, frozen, step, batch


def large_constants(text: str, min_elements: int) -> list[str]:
    return [shape for shape in DENSE_CONSTANT.findall(text)
            if math.prod(int(n) for n in shape.split("x")) >= min_elements]


def test_frozen_parameters_are_arguments_not_constants():
    policy, frozen, step, batch = setup()
    text = step.lower(policy, batch, frozen).as_text()
    smallest = min(x.size for x in jax.tree.leaves(frozen))
    assert large_constants(text, smallest) == []
    main = next(line for line in text.splitlines() if "func.func public @main(" in line)
    arguments = len(re.findall(r"%arg\d+:", main))
    assert arguments == len(jax.tree.leaves((policy, batch, frozen)))
    # each frozen argument keeps its state layout: the embedding is split over fsdp like the policy's
    embed = frozen["reference"].params["embed"]["embedding"][...]
    assert embed.sharding == policy.params["embed"]["embedding"][...].sharding
    assert not embed.sharding.is_fully_replicated


def test_the_detector_sees_weights_closed_over_as_constants():
    """The same loss with the reference closed over (the mistake the contract prevents) embeds its weights."""
    policy, frozen, _, batch = setup()
    baked = functools.partial(ref_loss, frozen=frozen)
    step = build_train_step(policy.graphdef, lambda m, b, d, f: baked(m, b, d), OPT,
                            state_shardings=shardings_of(policy), batch_shardings=batch_sharding(MESH))
    text = step.lower(policy, batch).as_text()
    assert len(large_constants(text, min(x.size for x in jax.tree.leaves(frozen)))) >= 4  # embed, up, norm, out


def test_the_step_reads_the_frozen_model_and_trains_only_the_policy():
    policy, frozen, step, batch = setup()
    before = jax.tree.map(np.asarray, frozen)
    new_state, metrics = step(jax.tree.map(jnp.copy, policy), batch, frozen)

    def numpy_loss(params):  # the same loss outside the step machinery
        model = nnx.merge(policy.graphdef, params, policy.model_state)
        return ref_loss(model, batch, None, frozen)[0]

    np.testing.assert_allclose(metrics["loss"], numpy_loss(policy.params), rtol=1e-6)
    assert float(metrics["loss"]) > 0  # two different inits
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, frozen), before)  # untouched, not donated
    assert int(new_state.step) == 1 and isinstance(frozen["reference"], FrozenModel)
