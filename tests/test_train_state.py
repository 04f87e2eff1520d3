"""Train-state layout: optimizer-state shardings derived from the tree structure (never by name or shape), and a
mismatch raising instead of silently replicating."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from test_train_helpers import make_mesh, make_model, variable_shardings
from tulu_jax.pytree import path_name
from tulu_jax.train import Optimizer, abstract_train_state, make_optimizer

MESH = make_mesh((2, 2, 2))


def flat_shardings(tree) -> dict[str, object]:
    return {path_name(p): s for p, s in jax.tree_util.tree_flatten_with_path(tree)[0]}


def param_specs(state) -> dict[str, PartitionSpec]:
    return {name: x.sharding.spec for name, x in flat_shardings(state.params).items()}


def test_adamw_moments_are_sharded_like_their_parameters():
    optimizer = make_optimizer(1e-3, warmup_ratio=0.1, total_steps=10, weight_decay=0.1)  # chain, masked decay
    state = abstract_train_state(make_model, optimizer, MESH, variable_shardings(MESH))
    params = param_specs(state)
    assert params["up.kernel.value"] == PartitionSpec("fsdp", "tensor")
    opt = {name: x.sharding.spec for name, x in flat_shardings(state.opt_state).items()}
    moments = {name: spec for name, spec in opt.items() if ".mu." in name or ".nu." in name}
    assert len(moments) == 2 * len(params)
    for name, spec in moments.items():
        assert spec == params[name.split(".mu.")[-1].split(".nu.")[-1]], name
    assert all(spec == PartitionSpec() for name, spec in opt.items() if name not in moments)  # counters


def test_two_param_shaped_subtrees_in_one_state_both_follow_the_parameters():
    """SGD momentum plus Adam: two moment trees under other names, found by structure alone."""
    tx = optax.chain(optax.trace(decay=0.9), optax.scale_by_adam())
    state = abstract_train_state(make_model, Optimizer(tx, lambda step: 1.0), MESH, variable_shardings(MESH))
    opt = flat_shardings(state.opt_state)
    kernel = [x.sharding.spec for name, x in opt.items() if name.endswith("up.kernel.value")]
    assert kernel == [PartitionSpec("fsdp", "tensor")] * 3  # trace, mu, nu


def test_an_optimizer_state_not_shaped_like_the_parameters_raises():
    def init(params):
        return {"history": jnp.zeros((7,))}  # not per parameter, not a scalar: no way to know its layout

    tx = optax.GradientTransformation(init, lambda updates, state, params=None: (updates, state))
    with pytest.raises(ValueError, match=r"optimizer state leaf '.*history' \(shape \(7,\)\)"):
        abstract_train_state(make_model, Optimizer(tx, lambda step: 1.0), MESH, variable_shardings(MESH))


def test_step_and_rng_are_replicated():
    state = abstract_train_state(make_model, make_optimizer(1e-3, warmup_ratio=0.0, total_steps=1), MESH,
                                 variable_shardings(MESH))
    assert state.step.sharding == NamedSharding(MESH, PartitionSpec()) == state.rng.sharding


# --- two trained models in one state ----------------------------------------------------------------------------


def _decoder(**overrides):
    from tulu_jax.models.decoder import Decoder
    from tulu_jax.models.presets import preset_config

    config = preset_config("tiny", {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, **overrides})
    return lambda rngs: Decoder(config, rngs=rngs)


def test_a_two_model_state_trains_each_with_its_own_optimizer_saves_restores_and_exports(tmp_path):
    from tulu_jax.models.hf_io import load_hf_checkpoint
    from tulu_jax.sharding import load_sharding, make_mesh, state_shardings
    from tulu_jax.train import Checkpointer, shardings_of, with_shardings
    from tulu_jax.train.multi import MultiTrainState, export_members, init_multi_train_state
    from tulu_jax.train.step import apply_gradients

    spec = load_sharding("sharding/cpu-8.yaml")
    mesh = make_mesh(spec)
    optimizers = {  # different learning rates and schedules: the value model's warmup makes its first update 0
        "policy": make_optimizer(1e-2, warmup_ratio=0.0, total_steps=4, schedule="constant"),
        "value": make_optimizer(5e-2, warmup_ratio=0.5, total_steps=4, schedule="linear"),
    }
    members = {"policy": (_decoder(), optimizers["policy"]), "value": (_decoder(num_layers=1), optimizers["value"])}
    state = init_multi_train_state(members, mesh, lambda s: state_shardings(s, mesh, spec), seed=0)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, size=(8, 6)), jnp.int32)

    def losses(params, name, s):
        logits = nnx.merge(s.models[name].graphdef, params, s.models[name].model_state)(ids)
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, ids[..., None], -1)[..., 0])

    @jax.jit
    def step(s: MultiTrainState) -> MultiTrainState:
        models = {}
        for name, member in s.models.items():
            grads = jax.grad(losses)(member.params, name, s)
            models[name] = apply_gradients(member, grads, optimizers[name])[0]
        return s.replace(models=models, step=s.step + 1)

    before = jax.tree.map(np.asarray, state.arrays())
    state = step(state)
    changed = lambda name: any(  # noqa: E731
        not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before["models"][name]["params"]),
                                                 jax.tree.leaves(state.models[name].params)))
    assert changed("policy") and not changed("value")  # the value model's first lr is 0 (its own schedule)
    state = step(state)
    assert changed("value") and int(state.step) == 2 and int(state.models["value"].step) == 2

    checkpointer = Checkpointer(tmp_path / "ckpt")
    checkpointer.save(2, state, force=True)
    checkpointer.wait()
    target = with_shardings(jax.eval_shape(lambda: state), shardings_of(state))
    restored = checkpointer.restore(target=target).state
    checkpointer.close()
    assert isinstance(restored, MultiTrainState) and set(restored.models) == {"policy", "value"}
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, restored.arrays()),
                 jax.tree.map(np.asarray, state.arrays()))
    assert jax.tree.leaves(shardings_of(restored)) == jax.tree.leaves(shardings_of(state))  # restored in place

    written = export_members(restored, tmp_path / "hf")
    assert sorted(written) == ["policy", "value"]
    for name, path in written.items():
        exported = load_hf_checkpoint(path)
        assert exported.config.num_layers == (2 if name == "policy" else 1)
        np.testing.assert_allclose(exported(ids), restored.models[name].model()(ids), rtol=1e-5, atol=1e-5)
