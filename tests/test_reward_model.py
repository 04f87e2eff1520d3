"""Reward model: the scalar head and its loss, HF export/import as <Family>ForSequenceClassification checked against
transformers (scores within 1e-4), sharded forward and import, the value-model-from-policy initialization."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from flax import nnx

from tulu_jax.errors import CheckpointError, ConfigError
from tulu_jax.losses import last_token_values, reward_model_loss
from tulu_jax.models import Decoder, ModelConfig
from tulu_jax.models.hf_reward_io import load_hf_reward_model, save_hf_reward_model
from tulu_jax.models.reward import RewardModel, check_value_model_matches, reward_model_from_decoder
from tulu_jax.sharding import init_sharded, load_sharding, make_mesh, state_shardings

PAD = 0
FAMILIES = {
    "llama": dict(architecture="LlamaForCausalLM"),
    "qwen2": dict(architecture="Qwen2ForCausalLM", attention_bias=True, tie_word_embeddings=True),
}


def tiny_config(family: str) -> ModelConfig:
    shape = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_heads=4, head_dim=8,
                 max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=PAD)
    if family == "gemma2":  # soft-caps, sandwich norms and a 4-token sliding window on the first layer
        hf = transformers.Gemma2Config(**shape, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       sliding_window=4).to_dict()
        return ModelConfig.from_hf_config(hf)
    return ModelConfig(**shape, num_layers=2, num_kv_heads=2, **FAMILIES[family])


def random_reward_model(config: ModelConfig, seed: int = 0) -> RewardModel:
    """A RewardModel with every parameter (norms and biases included) perturbed, so no weight is trivial."""
    graphdef, state = nnx.split(RewardModel(config, nnx.Rngs(seed)))

    @jax.jit
    def perturb(state):
        leaves, treedef = jax.tree.flatten(state)
        keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
        return jax.tree.unflatten(treedef, [x + 0.1 * jax.random.normal(k, x.shape, x.dtype)
                                            for x, k in zip(leaves, keys)])

    return nnx.merge(graphdef, perturb(state))


@nnx.jit
def per_token(model, ids, mask):
    return model(ids, mask)


@nnx.jit
def sequence_rewards(model, ids, mask):
    return model.sequence_rewards(ids, mask)


def right_padded_batch():
    rng = np.random.default_rng(0)
    lengths = np.array([12, 5, 9, 1])
    ids = rng.integers(3, 96, size=(4, 12)).astype(np.int32)  # content never holds the pad id
    mask = (np.arange(12)[None, :] < lengths[:, None]).astype(np.int32)
    return np.where(mask == 1, ids, PAD), mask


def torch_scores(hf_model, ids, mask):
    with torch.no_grad():
        return hf_model(input_ids=torch.tensor(ids, dtype=torch.long),
                        attention_mask=torch.tensor(mask)).logits[:, 0].numpy()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """family -> (our model, its export dir, transformers' load of that dir)."""
    out = {}
    for family in (*FAMILIES, "gemma2"):
        model = random_reward_model(tiny_config(family))
        path = tmp_path_factory.mktemp(f"rm-{family}")
        # Qwen 2 as a sharded checkpoint: the head then gets its own file in the index.
        save_hf_reward_model(model, path, max_shard_bytes=40_000 if family == "qwen2" else 5_000_000_000)
        hf = transformers.AutoModelForSequenceClassification.from_pretrained(path, attn_implementation="eager")
        out[family] = (model, path, hf.eval())
    return out


@pytest.mark.parametrize("family", [*FAMILIES, "gemma2"])
def test_export_loads_as_sequence_classification_with_equal_scores(exported, family):
    model, path, hf = exported[family]
    expected_class = {"llama": "LlamaForSequenceClassification", "qwen2": "Qwen2ForSequenceClassification",
                      "gemma2": "Gemma2ForSequenceClassification"}[family]
    assert type(hf).__name__ == expected_class and hf.config.num_labels == 1
    assert json.loads((path / "config.json").read_text())["architectures"] == [expected_class]
    assert (path / "model.safetensors.index.json").exists() == (family == "qwen2")
    ids, mask = right_padded_batch()
    ours = np.asarray(sequence_rewards(model, jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(ours, torch_scores(hf, ids, mask), rtol=1e-4, atol=1e-4)
    assert np.ptp(ours) > 1e-3  # the rows score differently: the comparison can fail
    # The per-token scalars (the value model's V_t) agree at every real position too.
    with torch.no_grad():
        hidden = hf.model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask))[0]
        theirs = hf.score(hidden)[..., 0].numpy()
    ours_per_token = np.asarray(per_token(model, jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(ours_per_token[mask == 1], theirs[mask == 1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_import_of_a_transformers_reward_model_scores_equal_and_reexports_bit_exact(exported, family, tmp_path):
    _, _, hf = exported[family]
    torch.manual_seed(3)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hf.save_pretrained(tmp_path / "hf")
    model = load_hf_reward_model(tmp_path / "hf")
    ids, mask = right_padded_batch()
    np.testing.assert_allclose(np.asarray(sequence_rewards(model, jnp.asarray(ids), jnp.asarray(mask))),
                               torch_scores(hf, ids, mask), rtol=1e-4, atol=1e-4)
    save_hf_reward_model(model, tmp_path / "again")
    again = load_hf_reward_model(tmp_path / "again")
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model, nnx.Param)),
                                 nnx.to_flat_state(nnx.state(again, nnx.Param)), strict=True):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))


def test_sharded_forward_and_import_equal_unsharded(exported):
    model, path, _ = exported["llama"]
    spec = load_sharding("sharding/cpu-8.yaml")
    mesh = make_mesh(spec)
    config = model.config
    sharded = init_sharded(lambda: RewardModel(config, nnx.Rngs(0)), mesh, spec)
    assert sharded.score[...].sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
    nnx.update(sharded, jax.device_put(nnx.state(model), state_shardings(nnx.state(sharded), mesh, spec)))
    ids, mask = right_padded_batch()
    expected = np.asarray(per_token(model, jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(np.asarray(per_token(sharded, jnp.asarray(ids), jnp.asarray(mask))), expected,
                               rtol=1e-5, atol=1e-5)
    loaded = load_hf_reward_model(path, shardings=state_shardings(nnx.state(sharded), mesh, spec))
    assert loaded.decoder.embed[...].sharding.spec == sharded.decoder.embed[...].sharding.spec
    loaded_scores = per_token(loaded, jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(loaded_scores), expected, rtol=1e-5, atol=1e-5)


def test_value_model_from_the_policy_keeps_the_backbone_and_drops_the_lm_head():
    config = tiny_config("llama")
    spec = load_sharding("sharding/cpu-8.yaml")
    policy = init_sharded(lambda: Decoder(config, nnx.Rngs(5)), make_mesh(spec), spec)
    value_model = reward_model_from_decoder(policy, nnx.Rngs(6))
    assert not hasattr(value_model.decoder, "unembed") and hasattr(policy, "unembed")
    embed, policy_embed = value_model.decoder.embed[...], policy.embed[...]
    assert embed.sharding == policy_embed.sharding and embed.sharding.num_devices == 8
    policy_embed.delete()  # as a donating train step of the policy would: the value model has its own copy
    assert not embed.is_deleted()
    ids, mask = right_padded_batch()
    fresh_policy = Decoder(config, nnx.Rngs(5))
    hidden = np.asarray(nnx.jit(lambda m, i, a: m.hidden(i, a))(fresh_policy, jnp.asarray(ids), jnp.asarray(mask)))
    expected = hidden @ np.asarray(value_model.score[...])[:, 0]
    values = per_token(value_model, jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(values), expected, rtol=1e-5, atol=1e-6)


def test_value_model_must_match_the_policy():
    policy = tiny_config("llama")
    check_value_model_matches(policy, policy.replace(num_layers=1))
    with pytest.raises(ConfigError, match="vocabulary size 128 differs from the policy's 96"):
        check_value_model_matches(policy, policy.replace(vocab_size=128))
    with pytest.raises(ConfigError, match="hidden size 64 differs"):
        check_value_model_matches(policy, policy.replace(hidden_size=64))


def test_reward_model_loss_against_numpy_and_torch_with_padding_pairs():
    rng = np.random.default_rng(1)
    chosen, rejected = rng.normal(size=8) * 3, rng.normal(size=8) * 3
    valid = np.array([1, 1, 1, 0, 1, 1, 0, 1], bool)
    z = (chosen - rejected)[valid]
    n = valid.sum()
    (loss, metrics), grads = jax.value_and_grad(
        lambda c, r: reward_model_loss(c, r, pair_mask=jnp.asarray(valid)), argnums=(0, 1), has_aux=True
    )(jnp.asarray(chosen, jnp.float32), jnp.asarray(rejected, jnp.float32))
    np.testing.assert_allclose(float(loss), np.log1p(np.exp(-z)).sum() / n, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(float(metrics["accuracy"]), (z > 0).mean(), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["margin"]), z.mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(metrics["chosen_reward"]), chosen[valid].mean(), rtol=1e-5, atol=1e-6)
    tc = torch.tensor(chosen, requires_grad=True)
    tr = torch.tensor(rejected, requires_grad=True)
    t_loss = -(F.logsigmoid(tc - tr) * torch.tensor(valid, dtype=torch.float64)).sum() / n
    t_loss.backward()
    np.testing.assert_allclose(np.asarray(grads[0]), tc.grad.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(grads[1]), tr.grad.numpy(), rtol=1e-5, atol=1e-7)
    # Micro-batches with the global pair count add up.
    halves = [reward_model_loss(jnp.asarray(chosen[s]), jnp.asarray(rejected[s]), pair_mask=jnp.asarray(valid[s]),
                                num_pairs=int(n))[0] for s in (slice(0, 3), slice(3, 8))]
    np.testing.assert_allclose(sum(float(h) for h in halves), float(loss), rtol=1e-6)
    # The rewards come from the per-token output at each side's last token.
    per_token = jnp.asarray(rng.normal(size=(2, 5)))
    side_mask = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    np.testing.assert_array_equal(np.asarray(last_token_values(per_token, side_mask)),
                                  np.asarray(per_token)[[0, 1], [2, 4]])


def test_bad_reward_checkpoints_raise_checkpoint_errors(exported, tmp_path):
    import shutil

    from safetensors.numpy import load_file, save_file

    _, path, _ = exported["llama"]
    for name, edit, message in (
        ("causal", lambda hf: hf.update(architectures=["LlamaForCausalLM"]), "is not one of"),
        ("labels", lambda hf: hf.update(id2label={"0": "a", "1": "b"}), "one label"),
    ):
        shutil.copytree(path, tmp_path / name)
        hf = json.loads((tmp_path / name / "config.json").read_text())
        edit(hf)
        (tmp_path / name / "config.json").write_text(json.dumps(hf))
        with pytest.raises(CheckpointError, match=message):
            load_hf_reward_model(tmp_path / name)
    shutil.copytree(path, tmp_path / "no-score")
    single = tmp_path / "no-score" / "model.safetensors"
    tensors = load_file(str(single))
    del tensors["score.weight"]
    save_file(tensors, str(single), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="score"):
        load_hf_reward_model(tmp_path / "no-score")
