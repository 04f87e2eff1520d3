"""The RLVR stage on the 8-device CPU mesh: the rollout reads the policy's own arrays (no copy) before and after an
update, a resumed run draws the same rollouts and ends in the same state as an uninterrupted one, the policy and
value model are exported for transformers, and bad rows / a mismatched value model fail with one clear error."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tulu_jax.data.tokenizers import load_tokenizer
from tulu_jax.errors import ConfigError, DataError
from tulu_jax.models.presets import preset_config
from tulu_jax.rl.loop import RLVRLoop, load_prompts
from tulu_jax.rl.ppo_step import POLICY, VALUE
from tulu_jax.stages.rlvr import STAGE, RLVRConfig, check_value_model_path
from tulu_jax.stages.sections import load_stage_config

ROLLOUT_KEYS = ("score", "verifier", "response_length", "non_stop_rate", "entropy", "kl_to_ref")


def config(*overrides: str) -> RLVRConfig:
    return load_stage_config(RLVRConfig, "configs/tiny_rlvr.yaml", (
        "optim.schedule=constant", "rlvr.max_new_tokens=8", "rlvr.ppo_epochs=1", "output.progress=false",
        "output.save_every=1", *overrides))


@functools.cache
def loop_and_initial():
    setup = STAGE.setup(config(f"output.run_dir={tempfile.mkdtemp()}"), "sharding/cpu-8.yaml")
    loop = RLVRLoop(setup, STAGE.build_step(setup), STAGE.batch_shardings(setup))
    return loop, jax.tree.map(jnp.copy, setup.state)


def fresh_state():
    loop, initial = loop_and_initial()
    return jax.tree.map(jnp.copy, initial)


def pointers(tree):
    """The device buffers of every shard of every array (sharded arrays have no single pointer)."""
    return [[shard.data.unsafe_buffer_pointer() for shard in x.addressable_shards] for x in jax.tree.leaves(tree)]


def test_rollout_reads_the_policy_arrays_without_a_copy_before_and_after_an_update():
    loop, _ = loop_and_initial()
    state = fresh_state()
    seen = []
    jitted = loop.rollout.jitted

    def recording(states, *args):  # what the sampler program receives, then the program itself
        seen.append(pointers(states))
        with jax.transfer_guard("disallow"):  # an implicit copy or resharding of an argument would raise
            return jitted(states, *args)

    loop.rollout.jitted = recording
    try:
        before, _ = loop.generate(state, 0)
        assert seen[-1] == pointers((state.models[POLICY].params, state.models[POLICY].model_state))
        state, metrics = loop.iteration(state, 0)  # generate, score, prepare, PPO steps
        assert metrics["weight_sync_s"] == 0.0 and metrics["optimizer_steps"] == 2
        after, _ = loop.generate(state, 0)  # the same prompts and key, the updated parameters
        assert seen[-1] == pointers((state.models[POLICY].params, state.models[POLICY].model_state))
    finally:
        loop.rollout.jitted = jitted
    assert not np.allclose(np.asarray(after.logprobs), np.asarray(before.logprobs))


def test_scoring_overlapped_with_generation_gives_the_sequential_rollouts_and_scores():
    """Chunked rollouts scored while the next chunk is generated equal those scored chunk by chunk, and the scores
    are the GSM8K verifier's on the decoded responses."""
    from tulu_jax.rl.verifiers import verify

    loop, _ = loop_and_initial()
    state, rl = fresh_state(), loop.rl
    results = {}
    try:
        rl.rollout_chunks = 2
        for overlap in (True, False):
            rl.overlap_scoring = overlap
            out, indices, scores, metrics = loop.rollouts(state, 1)
            scores = np.asarray(scores)
            results[overlap] = jax.device_get((out.tokens, out.lengths, out.finished, out.prompt_ids)), indices, \
                scores, metrics
        whole, whole_indices = loop.generate(state, 1)
        whole = jax.device_get((whole.tokens, whole.lengths, whole.finished, whole.prompt_ids))
    finally:
        rl.rollout_chunks, rl.overlap_scoring = 1, True
    (overlapped, indices, scores, metrics), (sequential, seq_indices, seq_scores, _) = results[True], results[False]
    assert indices == seq_indices == whole_indices and len(indices) == loop.setup.config.train.global_batch_size
    for a, b, c in zip(overlapped, sequential, whole):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(scores, seq_scores)
    tokens, lengths, finished, _ = overlapped
    tokenizer = loop.setup.tokenizer
    for i, row in enumerate(indices):
        data = loop.prompts.rows[row].data
        response = tokenizer.decode(tokens[i, :lengths[i] - int(finished[i])].tolist(), skip_special_tokens=True)
        assert scores[i] == verify(data["dataset"], response, data["ground_truth"])
    assert {"generation_s", "scoring_s", "rollout_s", "accuracy/gsm8k", "verifier_timeouts"} <= set(metrics)


def test_the_samplers_old_log_probs_equal_a_recomputing_forward_pass():
    """The loop's rollout → batch program takes the old log-probs from the sampler (cached decoding, temperature 1);
    the same program with `rlvr.reuse_sampler_logps: false` recomputes them with a full forward over prompt +
    response. Every field of the two batches agrees (old log-probs to 1e-5 on every response position), so the
    PPO ratio starts at 1 and the update is the gradient of the distribution that was sampled either way."""
    loop, _ = loop_and_initial()
    assert loop.rl.old_logps_from_sampler
    state = fresh_state()
    out, _, scores, _ = loop.rollouts(state, 0)
    models = {name: (m.params, m.model_state) for name, m in state.models.items()}
    recompute = STAGE.build_prepare(loop.setup, dataclasses.replace(loop.rl, reuse_sampler_logps=False))
    args = (models, loop.setup.frozen, out.prompt_ids, out.prompt_mask, out.tokens, out.lengths, out.finished,
            scores, out.logprobs)
    (reused, reused_metrics), (recomputed, recomputed_metrics) = jax.device_get((loop.prepare(*args),
                                                                                recompute(*args)))
    width = out.prompt_ids.shape[1]
    mask = reused.response_mask[:, width:]
    sampled = np.asarray(out.logprobs)
    assert mask.sum() == np.asarray(out.lengths).sum() > 0 and (sampled[~mask] == 0).all()
    np.testing.assert_array_equal(reused.old_logps[:, width:][mask], sampled[mask])
    np.testing.assert_allclose(recomputed.old_logps[:, width:][mask], sampled[mask], atol=1e-5)
    for name in reused.__dataclass_fields__:
        np.testing.assert_allclose(getattr(reused, name), getattr(recomputed, name), atol=1e-4, err_msg=name)
    assert "entropy" in recomputed_metrics and "entropy" not in reused_metrics  # then the step's entropy is logged
    for key in reused_metrics:
        np.testing.assert_allclose(reused_metrics[key], recomputed_metrics[key], rtol=1e-4, atol=1e-5, err_msg=key)


def test_dynamic_sampling_trains_the_groups_whose_scores_differ_and_reports_every_sampled_row():
    """With more prompt groups sampled than trained (`rlvr.rollout_prompts`), the iteration keeps the groups whose
    sequence scores differ first, gathered from the rollout as they were sampled; the reward metrics cover every
    sampled row. A synthetic 16-row rollout in groups of 4 through the loop's own programs."""
    from tulu_jax.rl.rollout import RolloutOutput

    loop, _ = loop_and_initial()
    rng = np.random.default_rng(0)
    host = RolloutOutput(tokens=rng.integers(0, 50, (16, 8)).astype(np.int32),
                         logprobs=rng.normal(size=(16, 8)).astype(np.float32),
                         lengths=rng.integers(1, 9, 16).astype(np.int32), finished=rng.random(16) < 0.8,
                         prompt_ids=rng.integers(0, 50, (16, 4)).astype(np.int32), prompt_mask=np.ones((16, 4), bool))
    verifier = np.array([1, 1, 1, 1, 0, 1, 0, 0, 0, 0, 0, 0, 1, 0, 1, 1], np.float32)
    host.finished[:4] = True  # group 0: all verified and stopped, no spread; group 2 gets one only by a cut-off
    host.finished[8:12] = [True, True, False, True]
    out = jax.device_put(host, loop.rollout.output_shardings)
    saved = loop.rl.group_size, loop.per_iteration, loop.trained_groups
    try:
        loop.rl.group_size, loop.per_iteration, loop.trained_groups = 4, 4, 3
        kept, kept_scores, metrics = loop.trained_rows(out, jax.device_put(verifier, loop.rollout.row_sharding))
    finally:
        loop.rl.group_size, loop.per_iteration, loop.trained_groups = saved
    rows = [*range(4, 8), *range(8, 12), *range(12, 16)]  # groups 1, 2, 3 have a spread; group 0 is left out
    kept = jax.device_get(kept)
    for name in ("tokens", "logprobs", "lengths", "finished", "prompt_ids", "prompt_mask"):
        np.testing.assert_array_equal(getattr(kept, name), getattr(host, name)[rows])
    np.testing.assert_array_equal(np.asarray(kept_scores), verifier[rows])
    score = np.where(host.finished, 10.0 * verifier, -10.0)
    assert metrics == pytest.approx({"score": score.mean(), "verifier": verifier.mean(),
                                     "non_stop_rate": 1 - host.finished.mean(),
                                     "response_length": host.lengths.mean(), "sampled_groups_with_spread": 3.0})


GRPO_4 = ("rlvr.algorithm=grpo", "rlvr.group_size=4", "rlvr.num_minibatches=1")  # 2 prompt groups trained


@pytest.mark.parametrize("overrides, message", [
    (("rlvr.rollout_prompts=16",), "more only for grpo"),  # ppo has no groups to pick from
    ((*GRPO_4, "rlvr.rollout_prompts=1"), "at least the 2 prompt groups"),
    ((*GRPO_4, "rlvr.rollout_prompts=3", "rlvr.rollout_chunks=8"), "12 rollout sequences per iteration"),
])
def test_dynamic_sampling_settings_that_cannot_work_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config(*overrides)


def read_metrics(run_dir):
    return {row["step"]: row for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.slow
def test_resumed_run_draws_the_same_rollouts_and_exports(tmp_path):
    loop, _ = loop_and_initial()
    output = loop.setup.config.output

    def run(name, iterations, export):
        output.run_dir, output.export_hf = str(tmp_path / name), export
        loop.setup.state = fresh_state()
        return loop.run(iterations)

    whole = run("whole", 2, True)
    run("resumed", 1, False)
    resumed = run("resumed", 2, False)  # restores iteration 1 (state, optimizers, rng, prompt position)
    a, b = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "resumed")
    assert sorted(a) == [1, 2]
    for key in ROLLOUT_KEYS + ("policy_loss", "value_loss"):
        np.testing.assert_allclose(b[2][key], a[2][key], rtol=1e-6, atol=1e-6, err_msg=key)
    for x, y in zip(jax.tree.leaves(whole.arrays()), jax.tree.leaves(resumed.arrays())):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-6)
    assert {"accuracy/gsm8k", "clipfrac", "approx_kl", "explained_variance", "generation_s", "scoring_s",
            "rollout_s", "training_s", "skipped_nonfinite"} <= set(a[2])

    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    ids = np.array([[3, 17, 42, 99, 7, 8]], np.int32)
    policy = AutoModelForCausalLM.from_pretrained(tmp_path / "whole" / "hf")
    with torch.no_grad():
        logits = policy(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    ours = np.asarray(jax.jit(lambda m, x: m(x))(whole.models[POLICY].model(), jnp.asarray(ids)))
    np.testing.assert_allclose(logits, ours, rtol=1e-4, atol=1e-4)
    value = AutoModelForSequenceClassification.from_pretrained(tmp_path / "whole" / "value_hf")
    assert type(value).__name__ == "LlamaForSequenceClassification" and value.config.num_labels == 1
    assert VALUE in whole.models


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


GOOD = {"messages": [{"role": "user", "content": "What is 2 + 3?"}], "ground_truth": "5", "dataset": "gsm8k"}


@pytest.mark.parametrize("bad, field", [
    ({k: v for k, v in GOOD.items() if k != "ground_truth"}, "ground_truth"),
    ({**GOOD, "dataset": "trivia"}, "dataset"),
])
def test_bad_rows_name_file_row_and_field(tmp_path, bad, field):
    path = write_rows(tmp_path / "rows.jsonl", [GOOD, bad])
    cfg = config(f"data.sources=[{{path: {path}}}]")
    tokenizer = load_tokenizer("tulu_jax/assets/tiny_tokenizer")
    with pytest.raises(DataError) as error:
        load_prompts(cfg, tokenizer)
    message = str(error.value)
    assert str(path) in message and field in message and "2" in message and "\n" not in message


@pytest.mark.parametrize("field, value, what", [("hidden_size", 32, "hidden size"),
                                                ("vocab_size", 500, "vocabulary size")])
def test_a_value_model_that_does_not_match_the_policy_is_refused(tmp_path, field, value, what):
    policy = preset_config("tiny", {})
    hf = {"architectures": ["LlamaForSequenceClassification"], "vocab_size": policy.vocab_size,
          "hidden_size": policy.hidden_size, field: value}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    cfg = config("rlvr.value_init=reward_model", f"rlvr.value_model_path={tmp_path}")
    with pytest.raises(ConfigError, match=what) as error:
        check_value_model_path(cfg, policy)
    assert str(tmp_path) in str(error.value) and "\n" not in str(error.value)


@pytest.mark.slow
def test_compile_check_compiles_the_rlvr_step_for_a_tpu_topology(monkeypatch):
    from tulu_jax import cli
    from tulu_jax.stages.compile_check import compile_check

    for key, value in cli.QUIET_LIBTPU.items():
        monkeypatch.setenv(key, value)
    result = compile_check("rlvr", "configs/tiny_rlvr.yaml", "sharding/v5p-8.yaml")
    assert result.fits and "KV cache" in result.summary and "ppo" in result.summary
    # The arguments hold at least the policy and value models with their Adam moments, split over the chips.
    _, (state, batch, _), _ = STAGE.aot(config(), "sharding/v5p-8.yaml")
    assert set(state.models) == {POLICY, VALUE}
    shard_bytes = sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
                      for x in jax.tree.leaves((state, batch)))
    assert shard_bytes <= result.report["argument_bytes"]


def test_the_pipeline_runs_rlvr_on_the_worlds_prompts_after_dpo(tmp_path):
    from tulu_jax.stages.pipeline import load_pipeline_config, stage_config

    pipeline = load_pipeline_config("configs/tiny_arith.yaml", ("stages=[base,sft,preferences,dpo,rlvr]",))
    cfg = stage_config(pipeline, "rlvr", tmp_path, str(tmp_path / "dpo" / "hf"))
    assert isinstance(cfg, RLVRConfig) and cfg.model.path == str(tmp_path / "dpo" / "hf")
    assert [s.path for s in cfg.data.sources] == [str(tmp_path / "data" / "prompts.jsonl")]
    assert cfg.output.run_dir == str(tmp_path / "rlvr")


def test_the_value_model_starts_from_a_reward_model_export(tmp_path):
    from flax import nnx

    from tulu_jax.models.hf_reward_io import save_hf_reward_model
    from tulu_jax.models.reward import RewardModel

    reward_model = RewardModel(preset_config("tiny", {"param_dtype": "float32"}), nnx.Rngs(7))
    save_hf_reward_model(reward_model, tmp_path / "rm")
    setup = STAGE.setup(config("rlvr.value_init=reward_model", f"rlvr.value_model_path={tmp_path / 'rm'}",
                               f"output.run_dir={tmp_path / 'run'}"), "sharding/cpu-8.yaml")
    value = setup.state.models[VALUE].params
    np.testing.assert_allclose(np.asarray(value["score"][...]), np.asarray(reward_model.score[...]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(value["decoder"]["embed"][...]),
                               np.asarray(reward_model.decoder.embed[...]), rtol=1e-6)
    assert value["decoder"]["embed"][...].sharding.num_devices == 8
