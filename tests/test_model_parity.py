"""Decoder parity with transformers' PyTorch Llama 3.1 / Qwen 2 / OLMo 2, packing, KV cache, dtypes, remat, scan."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tulu_jax.models import Decoder, ModelConfig, load_hf_checkpoint
from tulu_jax.models.rope import rope_inv_freq

FAMILIES = ["llama", "qwen2", "olmo2"]
VOCAB = 160
LOGICAL_NAMES = {"vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "layers"}


def _tiny_hf(family: str):
    """A tiny random transformers model; weights perturbed so norms and biases are not trivially 1 / 0."""
    import torch
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)
    config = {
        # original_max_position_embeddings 64 puts RoPE frequencies in all three llama3 bands for head_dim 16.
        "llama": lambda: transformers.LlamaConfig(**common, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
        "qwen2": lambda: transformers.Qwen2Config(**common, tie_word_embeddings=True),
        "olmo2": lambda: transformers.Olmo2Config(**common, eos_token_id=2, pad_token_id=1),
    }[family]()
    torch.manual_seed(FAMILIES.index(family))
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """family -> (torch model, checkpoint dir, our float32 Decoder)."""
    out = {}
    for family in FAMILIES:
        hf = _tiny_hf(family)
        path = tmp_path_factory.mktemp(family)
        hf.save_pretrained(path)
        out[family] = (hf, path, load_hf_checkpoint(path))
    return out


@nnx.jit
def _forward(model, ids, mask):
    return model(ids, mask)


@nnx.jit
def _forward_packed(model, ids, positions, segments):
    return model(ids, positions=positions, segment_ids=segments)


@nnx.jit
def _forward_cached(model, ids, positions, cache, key_mask):
    return model.forward_cached(ids, positions, cache, key_mask)


def _padded_batch(seed: int = 0, length: int = 16):
    """Row 0 full, row 1 left-padded by 5, row 2 right-padded by 4."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, (3, length))
    mask = np.ones((3, length), np.int64)
    mask[1, :5] = 0
    mask[2, -4:] = 0
    return ids, mask


def _torch_logits(hf, ids, mask):
    import torch

    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)  # what transformers' generate uses for left padding
    with torch.no_grad():
        return hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                  position_ids=torch.tensor(positions)).logits.numpy()


def _rel_err(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers_with_padding(models, family):
    hf, _, model = models[family]
    ids, mask = _padded_batch()
    ours = np.asarray(_forward(model, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)))
    ref = _torch_logits(hf, ids, mask)
    assert ours.dtype == np.float32 and ours.shape == (3, 16, VOCAB)
    tokens = mask.astype(bool)
    assert _rel_err(ours[tokens], ref[tokens]) < 1e-4
    assert np.isfinite(ours).all()  # fully masked (padding) query rows must not produce NaN


def test_default_positions_follow_the_padding_mask():
    from tulu_jax.models.decoder import _positions_and_segments

    ids, mask = _padded_batch()
    positions, segments = _positions_and_segments(jnp.asarray(ids), jnp.asarray(mask), None, None)
    # Left-padded row 1 starts at 0 on its first real token; pads sit at 0 (as transformers' generate).
    np.testing.assert_array_equal(positions[1], [0] * 6 + list(range(1, 11)))
    np.testing.assert_array_equal(positions[2], list(range(12)) + [11] * 4)
    np.testing.assert_array_equal(segments, mask)


def test_llama3_rope_frequencies_match_transformers(models):
    import torch  # noqa: F401  (transformers' rope init returns torch tensors)
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf, _, model = models["llama"]
    expected = ROPE_INIT_FUNCTIONS["llama3"](hf.config)[0].numpy()
    ours = rope_inv_freq(model.config)
    np.testing.assert_allclose(ours, expected, rtol=1e-6)
    unscaled = rope_inv_freq(model.config.replace(rope_scaling=None))
    assert not np.allclose(unscaled, expected, rtol=1e-3)  # the scaling really changes some frequencies


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_row_equals_separate_sequences(models, family):
    _, _, model = models[family]
    rng = np.random.default_rng(1)
    first, second = rng.integers(0, VOCAB, 5), rng.integers(0, VOCAB, 7)
    # Row 0 packs both sequences (then 4 padding slots); rows 1-2 hold each alone, right-padded (HF mask).
    # Shapes [3, 16] like the parity test's, so the padded forward reuses its compiled function.
    ids = np.zeros((3, 16), np.int64)
    ids[0, :12], ids[1, :5], ids[2, :7] = np.concatenate([first, second]), first, second
    segments = np.zeros((3, 16), np.int64)
    segments[0, :12] = [1] * 5 + [2] * 7
    positions = np.zeros((3, 16), np.int64)
    positions[0, :12] = list(range(5)) + list(range(7))
    packed = np.asarray(_forward_packed(model, jnp.asarray(ids, jnp.int32), jnp.asarray(positions, jnp.int32),
                                        jnp.asarray(segments, jnp.int32)))
    mask = np.zeros((3, 16), np.int64)
    mask[1, :5], mask[2, :7] = 1, 1
    alone = np.asarray(_forward(model, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)))
    np.testing.assert_allclose(packed[0, :5], alone[1, :5], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(packed[0, 5:12], alone[2, :7], rtol=1e-5, atol=1e-5)
    assert np.isfinite(packed).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_cached_matches_full_forward_left_padded(models, family):
    _, _, model = models[family]
    ids, _ = _padded_batch(seed=2)
    prompt, new, slots = 12, 4, 18  # two spare cache slots that no query may see
    mask = np.ones_like(ids)
    mask[1, :5], mask[2, :2] = 0, 0  # left-padded prompts
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    full = np.asarray(_forward(model, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)))

    key_mask = jnp.asarray(np.concatenate([mask, np.ones((3, slots - prompt - new), np.int64)], axis=1), bool)
    cache = model.init_cache(3, slots)
    assert cache.k.shape == (2, 3, slots, 2, 16) and cache.index.dtype == jnp.int32
    logits, cache = _forward_cached(model, jnp.asarray(ids[:, :prompt], jnp.int32),
                                    jnp.asarray(positions[:, :prompt], jnp.int32), cache, key_mask)
    tokens = mask[:, :prompt].astype(bool)
    np.testing.assert_allclose(np.asarray(logits)[tokens], full[:, :prompt][tokens], rtol=1e-5, atol=1e-5)
    for t in range(prompt, prompt + new):
        logits, cache = _forward_cached(model, jnp.asarray(ids[:, t:t + 1], jnp.int32),
                                        jnp.asarray(positions[:, t:t + 1], jnp.int32), cache, key_mask)
        np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, t], rtol=1e-5, atol=1e-5)
    assert int(cache.index) == prompt + new


def test_bfloat16_compute_is_close_to_float32(models):
    _, path, model = models["llama"]
    bf16 = load_hf_checkpoint(path, dtype="bfloat16")
    assert bf16.embed[...].dtype == jnp.bfloat16
    ids, mask = _padded_batch(seed=3)
    args = (jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))
    low, high = np.asarray(_forward(bf16, *args)), np.asarray(_forward(model, *args))
    assert low.dtype == np.float32
    tokens = mask.astype(bool)
    assert _rel_err(low[tokens], high[tokens]) < 3e-2


def _loss_and_grads(model, ids, mask, weights):
    graphdef, state = nnx.split(model)

    def loss(state):
        return (nnx.merge(graphdef, state)(ids, mask) * weights).sum()

    return jax.jit(jax.value_and_grad(loss))(state), jax.make_jaxpr(loss)(state)


def _remat_policies(jaxpr) -> list:
    """The policy of every jax.checkpoint (remat) equation, searched through nested jaxprs (scan bodies)."""
    from jax.extend.core import jaxprs_in_params

    found = []
    for eqn in jaxpr.eqns:
        if "policy" in eqn.params and "prevent_cse" in eqn.params:
            found.append(eqn.params["policy"])
        for sub in jaxprs_in_params(eqn.params):
            found += _remat_policies(sub)
    return found


def test_remat_policies_change_nothing_but_memory(models):
    _, path, model = models["olmo2"]
    ids, mask = _padded_batch(seed=4, length=8)
    ids, mask = jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)
    weights = jnp.asarray(np.random.default_rng(4).standard_normal((3, 8, VOCAB)), jnp.float32)
    (loss, grads), jaxpr = _loss_and_grads(model, ids, mask, weights)
    assert _remat_policies(jaxpr.jaxpr) == []
    for remat, policy in (("layer", None), ("dots", jax.checkpoint_policies.dots_with_no_batch_dims_saveable)):
        rematted = load_hf_checkpoint(path, overrides={"remat": remat})
        (loss_r, grads_r), jaxpr_r = _loss_and_grads(rematted, ids, mask, weights)
        assert _remat_policies(jaxpr_r.jaxpr) == [policy]  # one checkpointed body: the scanned layer
        np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
        for a, b in zip(jax.tree.leaves(grads_r), jax.tree.leaves(grads)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def _tiny_config(num_layers: int, **changes) -> ModelConfig:
    fields = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=num_layers, num_heads=4,
                  num_kv_heads=2, head_dim=8)
    return ModelConfig(**{**fields, **changes})


def test_layer_stack_is_scanned_not_unrolled():
    ids = jnp.zeros((1, 4), jnp.int32)

    def program(num_layers: int) -> str:
        graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(_tiny_config(num_layers))))
        return str(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(ids))(state))

    two, six = program(2), program(6)
    # An unrolled stack would grow with depth; a scan only changes the stacked shapes and the scan length.
    assert len(two.splitlines()) == len(six.splitlines())
    assert "length=6" in six and six.count(" scan[") == 1


def test_params_carry_logical_axis_names_only():
    model = nnx.eval_shape(lambda: Decoder(_tiny_config(3, attention_bias=True, qk_norm=True, norm_placement="post")))
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    assert {"q_bias", "k_bias", "v_bias", "q_norm", "k_norm"} <= {path[-1] for path in params}
    for path, var in params.items():
        names = var.get_metadata()["out_sharding"]
        assert len(names) == len(var.shape) and set(names) <= LOGICAL_NAMES, (path, names)
        if path[0] == "layers":
            assert names[0] == "layers" and var.shape[0] == 3, path


def test_model_config_is_hashable_and_validated():
    a = _tiny_config(2, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    b = _tiny_config(2, rope_scaling=dict(a.rope_scaling))
    assert a == b and hash(a) == hash(b)
    from tulu_jax.errors import CheckpointError

    with pytest.raises(CheckpointError, match="num_kv_heads"):
        _tiny_config(2, num_kv_heads=3)
    with pytest.raises(CheckpointError, match="remat"):
        _tiny_config(2, remat="everything")
