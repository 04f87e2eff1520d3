"""Rollouts from the training state's own arrays (`tulu_jax.rl.rollout.Rollout`) on the 8-device CPU mesh: no copy
and no resharding of the weights, the trainer's shardings as in_shardings, the same tokens as the unsharded sampler,
and the next rollout after a train step reads the updated parameters."""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tulu_jax.models.decoder import Decoder
from tulu_jax.models.presets import preset_config
from tulu_jax.models.sampler import generate
from tulu_jax.rl.rollout import Rollout
from tulu_jax.sharding import load_sharding, make_mesh, state_shardings
from tulu_jax.train import build_train_step, init_train_state, make_optimizer, shardings_of

SPEC = load_sharding(pathlib.Path(__file__).resolve().parent.parent / "sharding" / "cpu-8.yaml")
MESH = make_mesh(SPEC)
CONFIG = preset_config("tiny", {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "eos_token_id": 1,
                                "pad_token_id": 0})
OPT = make_optimizer(3e-2, warmup_ratio=0.0, total_steps=4, schedule="constant")
PROMPTS = [[5, 9, 12], [7], [3, 4, 5, 6, 7, 8, 9], [10, 11], [2, 2, 2, 2], [30, 31, 32], [40], [50, 51, 52, 53, 54]]
MAX_NEW = 8


@functools.cache
def trainer():
    state = init_train_state(lambda rngs: Decoder(CONFIG, rngs=rngs), OPT, MESH,
                             lambda s: state_shardings(s, MESH, SPEC), seed=0)
    return state, shardings_of(state)


def unsharded(state, **sampling):
    """The same parameters fetched to the host and sampled with `generate` on one device."""
    params, model_state = jax.device_get((state.params, state.model_state))
    model = nnx.merge(state.graphdef, params, model_state)
    return generate(model, PROMPTS, max_new_tokens=MAX_NEW, eos_id=1, pad_id=0, rng=jax.random.key(3), **sampling)


def roll(rollout: Rollout, state):
    ids, mask, stops, pad = rollout.place_prompts(CONFIG, PROMPTS, eos_id=1, pad_id=0)
    key = rollout.place_rng(jax.random.key(3))
    with jax.transfer_guard("disallow"):  # any implicit copy or resharding of an argument would raise here
        out = rollout(state, ids, mask, key, stops, pad)
    return out, (ids, mask, key, stops, pad)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_rollout_from_the_sharded_state_matches_the_unsharded_sampler(temperature):
    state, shardings = trainer()
    assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(state.params))
    rollout = Rollout(state.graphdef, shardings, MESH, SPEC, max_new_tokens=MAX_NEW, temperature=temperature)
    out, _ = roll(rollout, state)
    expected = unsharded(state, temperature=temperature)
    np.testing.assert_array_equal(np.asarray(out.tokens), expected.tokens)
    np.testing.assert_array_equal(np.asarray(out.lengths), expected.lengths)
    np.testing.assert_allclose(np.asarray(out.logprobs), expected.logprobs, rtol=1e-5, atol=1e-5)
    assert out.tokens.sharding.spec[0] == ("data", "fsdp")  # outputs stay batch-sharded on the mesh


def test_rollout_reads_the_arrays_the_train_step_updates():
    state, shardings = trainer()
    state = jax.tree.map(jnp.copy, state)  # this test trains it (the step donates)
    rollout = Rollout(state.graphdef, shardings, MESH, SPEC, max_new_tokens=MAX_NEW, temperature=0.0)
    before, args = roll(rollout, state)
    compiled = rollout.jitted.lower((state.params, state.model_state), *args).compile()
    arrays = jax.tree.leaves((state.params, state.model_state))
    wanted = jax.tree.leaves((shardings.params, shardings.model_state))
    got = jax.tree.leaves(compiled.input_shardings[0][0])
    assert len(got) == len(wanted) == len(arrays)
    assert all(g.is_equivalent_to(w, x.ndim) for g, w, x in zip(got, wanted, arrays))

    def loss(model, batch, denominators, frozen):  # push the model toward token 2 everywhere
        logits = model(batch)
        return -jnp.mean(jax.nn.log_softmax(logits)[..., 2]), {}

    step = build_train_step(state.graphdef, loss, OPT, state_shardings=shardings,
                            batch_shardings=rollout.batch_sharding)
    state, _ = step(state, args[0])
    after, _ = roll(rollout, state)
    assert not np.allclose(np.asarray(after.logprobs), np.asarray(before.logprobs))
    expected = unsharded(state, temperature=0.0)
    np.testing.assert_array_equal(np.asarray(after.tokens), expected.tokens)
    np.testing.assert_allclose(np.asarray(after.logprobs), expected.logprobs, rtol=1e-5, atol=1e-5)


def test_each_process_builds_only_its_rows_of_the_rollout_batch():
    """`place_process_rows` asks for the rows on this process's devices (all 8 devices are this process's here, so
    all rows, in order) and assembles the global batch-sharded array from them; `local_rows` reads them back."""
    from tulu_jax.rl.rollout import local_rows, place_process_rows, process_rows
    from tulu_jax.sharding import batch_sharding

    sharding = batch_sharding(MESH, SPEC)
    assert sharding.spec[0] == ("data", "fsdp")  # rows split 4 ways, replicated over the tensor axis
    full = np.arange(8 * 5, dtype=np.int32).reshape(8, 5)
    asked = []

    def build(rows):
        asked.append(rows)
        return full[rows], full[rows] > 20

    ids, mask = place_process_rows(sharding, 8, build)
    np.testing.assert_array_equal(asked[0], np.arange(8))
    assert ids.sharding == mask.sharding == sharding and ids.shape == (8, 5)
    np.testing.assert_array_equal(np.asarray(ids), full)
    np.testing.assert_array_equal(np.asarray(mask), full > 20)
    np.testing.assert_array_equal(local_rows(ids), full)
