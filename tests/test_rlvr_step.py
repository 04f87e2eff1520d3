"""The RLVR programs (`tulu_jax.rl.ppo_step`) through the stage's own setup: the rollout → RolloutBatch program and
the PPO step give the same batch, loss, metrics and update on the 8-device mesh (data × fsdp × tensor, with
gradient accumulation) as on one device; GRPO's group advantages; the per-member NaN guard. (The loop's rollouts,
the sampler/old-log-prob agreement and the no-copy weight sync: tests/test_rlvr_stage.py.)"""

from __future__ import annotations

import dataclasses
import functools
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from tulu_jax.rl.ppo_step import POLICY, VALUE, rollout_layout
from tulu_jax.sharding import load_sharding, make_mesh
from tulu_jax.stages.rlvr import STAGE, RLVRConfig
from tulu_jax.stages.sections import load_stage_config

B, P, N = 8, 16, 8


def config(*overrides: str) -> RLVRConfig:
    # The rollouts here are synthetic, not sampled from the policy: the old log-probs are recomputed.
    return load_stage_config(RLVRConfig, "configs/tiny_rlvr.yaml", (
        "optim.schedule=constant", "rlvr.max_new_tokens=8", "rlvr.reuse_sampler_logps=false",
        f"output.run_dir={tempfile.mkdtemp()}", *overrides))


def host_rollout(vocab: int, rows: int = B, group: int = 1, width: int = N) -> tuple[np.ndarray, ...]:
    """A fixed rollout: left-padded prompts (the same one for each `group` consecutive rows), responses of 1..N
    tokens in `width` columns, stop flags, verifier scores and (unread) sampler log-probs."""
    rng = np.random.default_rng(0)
    prompt_len = np.repeat(rng.integers(3, P + 1, rows // group), group)
    prompt_mask = np.arange(P)[None, :] >= (P - prompt_len)[:, None]
    prompt_ids = np.where(prompt_mask, np.repeat(rng.integers(5, vocab, (rows // group, P)), group, 0), 0)
    lengths = rng.integers(1, N + 1, rows).astype(np.int32)
    response = np.where(np.arange(width)[None, :] < lengths[:, None], rng.integers(5, vocab, (rows, width)), 0)
    finished = rng.random(rows) < 0.7
    scores = (rng.random(rows) < 0.5).astype(np.float32)
    return (prompt_ids.astype(np.int32), prompt_mask, response.astype(np.int32), lengths, finished, scores,
            np.zeros((rows, width), np.float32))


def prepare_and_step(sharding_file: str, *overrides: str):
    """Stage setup on the sharding file's mesh (8 or 1 devices), the rollout program, one PPO step: host results."""
    spec = load_sharding(sharding_file)
    mesh = make_mesh(spec, jax.devices()[:1] if sharding_file.endswith("cpu-1.yaml") else None)
    cfg = config(*overrides)
    setup = STAGE.setup(cfg, (spec, mesh))
    batch_sharding = STAGE.batch_shardings(setup).tokens
    prepare = STAGE.build_prepare(setup)
    models = {k: (m.params, m.model_state) for k, m in setup.state.models.items()}
    batch, prepare_metrics = prepare(models, setup.frozen, *host_rollout(setup.model_config.vocab_size))
    step = STAGE.build_step(setup)
    state, metrics = step(setup.state, batch, setup.frozen)
    return jax.device_get((batch, prepare_metrics, metrics, state.arrays())), batch_sharding


@functools.cache
def results():
    sharded, sharding = prepare_and_step("sharding/cpu-8.yaml", "train.grad_accum_steps=2",
                                         "rlvr.num_minibatches=1")
    single, _ = prepare_and_step("sharding/cpu-1.yaml", "rlvr.num_minibatches=1")
    return sharded, single, sharding


def test_sharded_and_unsharded_ppo_give_the_same_batch_loss_and_update():
    (batch, prepared, metrics, state), single, sharding = results()
    assert sharding.mesh.size == 8 and sharding.spec[0] == ("data", "fsdp")
    s_batch, s_prepared, s_metrics, s_state = single
    for name in batch.__dataclass_fields__:
        np.testing.assert_allclose(getattr(batch, name), getattr(s_batch, name), rtol=1e-5, atol=1e-5, err_msg=name)
    for key in prepared:
        np.testing.assert_allclose(prepared[key], s_prepared[key], rtol=1e-5, atol=1e-5, err_msg=key)
    assert set(metrics) == set(s_metrics) >= {"policy_loss", "value_loss", "clipfrac", "approx_kl", "entropy"}
    for key in metrics:
        np.testing.assert_allclose(metrics[key], s_metrics[key], rtol=1e-5, atol=1e-5, err_msg=key)
    for (path, a), (_, b) in zip(jax.tree_util.tree_flatten_with_path(state)[0],
                                 jax.tree_util.tree_flatten_with_path(s_state)[0]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=jax.tree_util.keystr(path))
    # Both models were updated, and the first step on a rollout is on-policy: ratio 1, nothing clipped.
    assert metrics["policy_grad_norm"] > 0 and metrics["value_grad_norm"] > 0
    assert int(state["step"]) == int(state["models"][POLICY]["step"]) == int(state["models"][VALUE]["step"]) == 1
    assert metrics["clipfrac"] == 0.0 and abs(metrics["approx_kl"]) < 1e-10


def test_rollout_batch_follows_the_recipe():
    """Rewards, GAE and whitening of the prepared batch against a NumPy loop written from RECIPE.md."""
    (batch, prepared, _, _), _, _ = results()
    prompt_ids, prompt_mask, response, lengths, finished, scores, _ = host_rollout(384)
    mask = batch.response_mask
    assert mask.sum() == lengths.sum() and not mask[:, :P].any()
    kl = np.where(mask, batch.old_logps - batch.ref_logps, 0.0)
    score = np.where(finished, 10.0 * scores, -10.0)
    advantages = np.zeros_like(kl)
    for b in range(B):
        idx = np.flatnonzero(mask[b])
        rewards = -0.05 * kl[b, idx]
        rewards[-1] += score[b]
        values = batch.values[b, idx]
        last = 0.0
        for j in reversed(range(len(idx))):
            next_value = values[j + 1] if j + 1 < len(idx) else 0.0
            last = rewards[j] + next_value - values[j] + 0.95 * last
            advantages[b, idx[j]] = last
        np.testing.assert_allclose(batch.returns[b, idx], advantages[b, idx] + values, rtol=1e-4, atol=1e-4)
    flat = advantages[mask]
    whitened = (flat - flat.mean()) / np.sqrt(flat.var(ddof=1) + 1e-8)
    np.testing.assert_allclose(batch.advantages[mask], whitened, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(prepared["score"], score.mean(), rtol=1e-6)
    np.testing.assert_allclose(prepared["kl_to_ref"], kl.sum(axis=1).mean(), rtol=1e-5, atol=1e-6)
    tokens, positions, segment_ids, _ = jax.device_get(rollout_layout(prompt_ids, prompt_mask, response, lengths))
    np.testing.assert_array_equal(batch.tokens, tokens)
    assert (positions[np.arange(B), P + lengths - 1] == prompt_mask.sum(1) + lengths - 1).all()


GRPO_SCORES = np.array([1, 0, 0, 1, 1, 1, 1, 1, 0, 0, 1, 0, 1, 1, 0, 1], np.float32)  # group 1: no variance


@functools.cache
def grpo_prepare_and_step(share_prompts: bool):
    """GRPO (groups of 4, 16 rows) on the 8-device mesh with 2 micro-batches: the prepared batch, its metrics, one
    step's metrics and the updated state, on host."""
    spec = load_sharding("sharding/cpu-8.yaml")
    cfg = config("rlvr.algorithm=grpo", "rlvr.group_size=4", "rlvr.num_minibatches=1", "train.global_batch_size=16",
                 "train.grad_accum_steps=2", f"rlvr.share_prompts={str(share_prompts).lower()}")
    setup = STAGE.setup(cfg, (spec, make_mesh(spec)))
    assert set(setup.state.models) == {POLICY} and cfg.rlvr.prompt_group == (4 if share_prompts else 1)
    prepare = STAGE.build_prepare(setup)
    *rollout, _, logprobs = host_rollout(setup.model_config.vocab_size, rows=16, group=4,
                                         width=cfg.rlvr.response_width)
    policy = setup.state.models[POLICY]
    batch, prepared = prepare({POLICY: (policy.params, policy.model_state)}, setup.frozen, *rollout[:4],
                              np.ones(16, bool), GRPO_SCORES, logprobs)
    state, metrics = STAGE.build_step(setup)(setup.state, batch, setup.frozen)
    return jax.device_get((batch, prepared, metrics, state.arrays())), rollout[3]


def test_grpo_group_advantages_drop_zero_variance_groups_and_train_without_a_value_model():
    (host, host_prepared, metrics, _), lengths = grpo_prepare_and_step(True)
    assert int(host_prepared["grpo_dropped_groups"]) == 1
    assert host.response_mask[4:8].sum() == 0 and host.response_mask.sum() == lengths.sum() - lengths[4:8].sum()
    for g in (0, 2, 3):
        group = 10.0 * GRPO_SCORES[4 * g:4 * g + 4]
        expected = (group - group.mean()) / (group.std() + 1e-8)
        for b in range(4):
            np.testing.assert_allclose(host.advantages[4 * g + b][host.response_mask[4 * g + b]], expected[b],
                                       rtol=1e-5)
    assert metrics["policy_grad_norm"] > 0 and "value_loss" not in metrics
    assert abs(metrics["kl"]) < 1e-6 and metrics["clipfrac"] == 0.0  # the reference is the initial policy


def test_grpo_shared_prompts_give_the_whole_rows_batch_metrics_and_update():
    """`rlvr.share_prompts` (each group's prompt forward once, in prepare and in the step's micro-batches) changes
    only the cost: the same reference log-probs, advantages, metrics and parameter update as whole rows."""
    (batch, prepared, metrics, state), _ = grpo_prepare_and_step(True)
    (w_batch, w_prepared, w_metrics, w_state), _ = grpo_prepare_and_step(False)
    mask = batch.response_mask
    for name in batch.__dataclass_fields__:  # whole rows also fill the prompt slots: compare response tokens
        np.testing.assert_allclose(getattr(batch, name)[mask], getattr(w_batch, name)[mask], rtol=1e-5, atol=1e-5,
                                   err_msg=name)
    assert set(prepared) == set(w_prepared) and set(metrics) == set(w_metrics)
    for key in prepared:
        np.testing.assert_allclose(prepared[key], w_prepared[key], rtol=1e-5, atol=1e-5, err_msg=key)
    for key in metrics:
        np.testing.assert_allclose(metrics[key], w_metrics[key], rtol=1e-4, atol=1e-6, err_msg=key)
    for (path, a), (_, b) in zip(jax.tree_util.tree_flatten_with_path(state)[0],
                                 jax.tree_util.tree_flatten_with_path(w_state)[0]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_a_poisoned_minibatch_leaves_each_poisoned_member_and_its_optimizer_unchanged():
    """The NaN guard of the PPO step, per member: NaN advantages skip the policy's update, NaN returns the value
    model's; the other member still updates, the step counters advance, the skipped updates are counted."""
    spec = load_sharding("sharding/cpu-1.yaml")
    cfg = config("rlvr.num_minibatches=1")
    setup = STAGE.setup(cfg, (spec, make_mesh(spec, jax.devices()[:1])))
    prepare = STAGE.build_prepare(setup)
    models = {k: (m.params, m.model_state) for k, m in setup.state.models.items()}
    batch, _ = prepare(models, setup.frozen, *host_rollout(setup.model_config.vocab_size))
    step = STAGE.build_step(setup)
    nan_row = np.zeros(batch.advantages.shape, bool)
    nan_row[0] = True
    for poisoned, field in ((POLICY, "advantages"), (VALUE, "returns")):
        state = jax.tree.map(jnp.copy, setup.state)  # the step donates its state
        before = jax.device_get(state.arrays())
        bad = dataclasses.replace(batch, **{field: jnp.where(nan_row, jnp.nan, getattr(batch, field))})
        new, metrics = jax.device_get(step(state, bad, setup.frozen))
        after = new.arrays()
        other = VALUE if poisoned == POLICY else POLICY
        assert metrics[f"{poisoned}_skipped_nonfinite"] == 1 and metrics[f"{other}_skipped_nonfinite"] == 0
        assert metrics["skipped_nonfinite"] == 1
        for key in ("params", "opt_state"):
            jax.tree.map(np.testing.assert_array_equal, after["models"][poisoned][key],
                         before["models"][poisoned][key])
        changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), after["models"][other]["params"],
                                               before["models"][other]["params"]))
        assert any(changed) and all(np.isfinite(x).all() for x in jax.tree.leaves(after["models"][other]["params"]))
        assert int(after["step"]) == int(after["models"][poisoned]["step"]) == 1
