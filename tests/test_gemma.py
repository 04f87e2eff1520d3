"""Gemma 2 / Gemma 3 (text) decoders against transformers' Gemma2ForCausalLM / Gemma3ForCausalLM: logits (tiny random
configs and a real head size), KV-cache decoding with sliding windows, greedy generation, export, configs, presets."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tulu_jax.errors import CheckpointError, ConfigError
from tulu_jax.models import Decoder, ModelConfig, load_hf_checkpoint, save_hf_checkpoint
from tulu_jax.models.presets import PRESETS, preset_config
from tulu_jax.models.sampler import generate

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
VOCAB = 160
LENGTH = 16  # > 3 sliding windows of 4: local and global layers see different keys
LOGICAL_NAMES = {"vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "layers"}
# Variant -> (transformers config class, its arguments). Small soft-caps (real: 50 / 30) so that they matter at this
# scale; query_pre_attn_scalar ≠ head_dim so that the query scale is tested; Gemma 3 with linear RoPE scaling on its
# global layers (as 4B+) and the default 5 local : 1 global pattern.
_TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, max_position_embeddings=256, sliding_window=4, query_pre_attn_scalar=24)
_REAL_HEAD = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
                  head_dim=256, max_position_embeddings=256, sliding_window=4, query_pre_attn_scalar=256)
_G3_ROPE = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
VARIANTS = {
    "gemma2": ("Gemma2Config", dict(_TINY, num_hidden_layers=3, attn_logit_softcapping=2.0,
                                    final_logit_softcapping=3.0)),
    "gemma3": ("Gemma3TextConfig", dict(_TINY, num_hidden_layers=6, rope_parameters=_G3_ROPE,
                                        final_logit_softcapping=3.0)),
    # Real head size (256) and Gemma's real caps / query scalar, few heads and a tiny width otherwise.
    "gemma2-head256": ("Gemma2Config", dict(_REAL_HEAD, num_hidden_layers=2)),
    "gemma3-head256": ("Gemma3TextConfig", dict(_REAL_HEAD, num_hidden_layers=2, rope_parameters=_G3_ROPE,
                                                layer_types=["sliding_attention", "full_attention"])),
}


def _tiny_hf(variant: str):
    """A random transformers Gemma; weights perturbed so that norms are not the identity and caps bite."""
    import torch
    import transformers

    config_class, kwargs = VARIANTS[variant]
    config = getattr(transformers, config_class)(**kwargs)
    torch.manual_seed(list(VARIANTS).index(variant))
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """variant -> (torch model, checkpoint dir, our float32 Decoder)."""
    out = {}
    for variant in VARIANTS:
        hf = _tiny_hf(variant)
        path = tmp_path_factory.mktemp(variant)
        hf.save_pretrained(path)
        out[variant] = (hf, path, load_hf_checkpoint(path))
    return out


@nnx.jit
def _forward(model, ids, mask):
    return model(ids, mask)


@nnx.jit
def _forward_cached(model, ids, positions, cache, key_mask):
    return model.forward_cached(ids, positions, cache, key_mask)


def _padded_batch(seed: int = 0):
    """Row 0 full, row 1 left-padded by 5, row 2 right-padded by 4."""
    ids = np.random.default_rng(seed).integers(0, VOCAB, (3, LENGTH))
    mask = np.ones((3, LENGTH), np.int64)
    mask[1, :5] = 0
    mask[2, -4:] = 0
    return ids, mask


def _torch_logits(hf, ids, mask):
    import torch

    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        return hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                  position_ids=torch.tensor(positions)).logits.float().numpy()


def _rel_err(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers_with_padding(models, variant):
    hf, _, model = models[variant]
    ids, mask = _padded_batch()
    ours = np.asarray(_forward(model, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)))
    ref = _torch_logits(hf, ids, mask)
    tokens = mask.astype(bool)
    assert ours.shape == (3, LENGTH, VOCAB) and np.isfinite(ours).all()
    assert _rel_err(ours[tokens], ref[tokens]) < 1e-4
    np.testing.assert_allclose(ours[tokens], ref[tokens], atol=1e-4)


@pytest.mark.parametrize("variant", ["gemma2-head256", "gemma3"])
def test_bfloat16_matches_transformers_in_bfloat16(models, variant):
    import torch
    import transformers

    _, path, _ = models[variant]
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16,
                                                           attn_implementation="eager").eval()
    ours = load_hf_checkpoint(path, dtype="bfloat16")
    ids, mask = _padded_batch(seed=5)
    # √hidden rounded to bfloat16 as transformers does (hidden 32: √32 → 5.65625), bit for bit.
    with torch.no_grad():
        embedded = hf.model.embed_tokens(torch.tensor(ids)).float().numpy()
    np.testing.assert_array_equal(np.asarray(ours._embed(jnp.asarray(ids)).astype(jnp.float32)), embedded)
    logits = np.asarray(_forward(ours, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)))
    tokens = mask.astype(bool)
    # Both sides round differently in bfloat16: ~1e-2 apart (each is ~1e-2 from float32).
    assert _rel_err(logits[tokens], _torch_logits(hf, ids, mask)[tokens]) < 3e-2


def _with_config(model: Decoder, **changes) -> Decoder:
    """The same weights under a changed config (same parameter shapes)."""
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Decoder(model.config.replace(**changes))))
    return nnx.merge(graphdef, nnx.state(model))


@pytest.mark.parametrize("variant, changes", [
    ("gemma2", dict(attn_logit_softcap=None)),
    ("gemma2", dict(final_logit_softcap=None)),
    ("gemma2", dict(layer_types=None)),  # no sliding window anywhere
    ("gemma2", dict(query_pre_attn_scalar=None)),
    ("gemma2", dict(scale_embeddings=False)),
    ("gemma3", dict(local_rope_theta=None)),
    ("gemma3", dict(rope_scaling=None)),
    ("gemma3", dict(layer_types=("sliding_attention",) * 5 + ("full_attention",), sliding_window=6)),
])
def test_each_gemma_feature_is_needed_for_parity(models, variant, changes):
    """The parity test can fail: without any one of these features our logits leave transformers' (> 1e-3)."""
    hf, _, model = models[variant]
    ids, mask = _padded_batch()
    ours = np.asarray(_forward(_with_config(model, **changes), jnp.asarray(ids, jnp.int32),
                               jnp.asarray(mask, jnp.int32)))
    tokens = mask.astype(bool)
    assert _rel_err(ours[tokens], _torch_logits(hf, ids, mask)[tokens]) > 1e-3


@pytest.mark.parametrize("variant", ["gemma2", "gemma3"])
def test_forward_cached_matches_full_forward_past_the_window(models, variant):
    _, _, model = models[variant]
    ids, _ = _padded_batch(seed=2)
    prompt, slots = 6, LENGTH + 2  # the decoded tokens run 10 positions past a 6-token prompt (window 4)
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # left-padded prompt
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    full = np.asarray(_forward(model, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)))
    key_mask = jnp.asarray(np.concatenate([mask, np.ones((3, slots - LENGTH), np.int64)], axis=1), bool)
    cache = model.init_cache(3, slots)
    logits, cache = _forward_cached(model, jnp.asarray(ids[:, :prompt], jnp.int32),
                                    jnp.asarray(positions[:, :prompt], jnp.int32), cache, key_mask)
    tokens = mask[:, :prompt].astype(bool)
    np.testing.assert_allclose(np.asarray(logits)[tokens], full[:, :prompt][tokens], rtol=1e-5, atol=1e-5)
    for t in range(prompt, LENGTH):
        logits, cache = _forward_cached(model, jnp.asarray(ids[:, t:t + 1], jnp.int32),
                                        jnp.asarray(positions[:, t:t + 1], jnp.int32), cache, key_mask)
        np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, t], rtol=1e-5, atol=1e-5)


def test_sharded_forward_on_8_devices_matches_one_device(models):
    """Gemma 3's extra parameters (per-head QK-norm, post-norms) import into a data × fsdp × tensor mesh."""
    from tulu_jax.sharding import batch_sharding, load_sharding, make_mesh, state_shardings

    _, path, model = models["gemma3"]
    spec = load_sharding(REPO_ROOT / "sharding" / "cpu-8.yaml")
    mesh = make_mesh(spec)
    abstract = nnx.state(nnx.eval_shape(lambda: Decoder(model.config)))
    sharded = load_hf_checkpoint(path, shardings=state_shardings(abstract, mesh, spec))
    assert len(sharded.layers.q_proj.get_value().sharding.device_set) == 8
    ids, mask = _padded_batch()
    ids, mask = np.concatenate([ids, ids[:1]]), np.concatenate([mask, mask[:1]])  # 4 rows: data × fsdp
    rows = batch_sharding(mesh, spec)
    got = _forward(sharded, jax.device_put(jnp.asarray(ids, jnp.int32), rows),
                   jax.device_put(jnp.asarray(mask, jnp.int32), rows))
    want = _forward(model, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


PROMPT_LENGTHS = (9, 5, 12)  # left-padded to 12 by transformers, to a 16 bucket by our sampler
NEW_TOKENS = 12


def _prompts():
    rng = np.random.default_rng(7)
    return [list(rng.integers(3, VOCAB, n)) for n in PROMPT_LENGTHS]


def _hf_greedy(hf, prompts) -> np.ndarray:
    import torch

    width = max(map(len, prompts))
    ids, mask = np.zeros((len(prompts), width), np.int64), np.zeros((len(prompts), width), np.int64)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt):], mask[i, width - len(prompt):] = prompt, 1
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                          max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=0)
    return out[:, width:].numpy()


@pytest.fixture(scope="module")
def greedy(models):
    """variant -> our KV-cache sampler's greedy tokens [3, NEW_TOKENS]."""
    return {v: generate(models[v][2], _prompts(), max_new_tokens=NEW_TOKENS).tokens for v in ("gemma2", "gemma3")}


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["gemma2", "gemma3"])
def test_greedy_generation_matches_transformers(models, greedy, variant):
    hf, _, _ = models[variant]
    ref = _hf_greedy(hf, _prompts())
    assert len(np.unique(ref)) > 3  # a real sequence, not one repeated token
    np.testing.assert_array_equal(greedy[variant], ref)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["gemma2", "gemma3"])
def test_export_loads_in_transformers_and_generates_the_same(models, greedy, variant, tmp_path):
    import transformers

    hf, _, model = models[variant]
    save_hf_checkpoint(model, tmp_path)
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(exported) is type(hf)
    for key in ("layer_types", "sliding_window", "query_pre_attn_scalar", "final_logit_softcapping",
                "attn_logit_softcapping", "rope_parameters", "hidden_activation", "tie_word_embeddings"):
        assert getattr(exported.config, key) == getattr(hf.config, key), key
    theirs, ours = hf.state_dict(), exported.state_dict()
    assert set(theirs) == set(ours)
    for name, value in theirs.items():
        np.testing.assert_array_equal(ours[name].numpy(), value.numpy(), err_msg=name)
    np.testing.assert_array_equal(_hf_greedy(exported, _prompts()), greedy[variant])


# Published config.json files (transformers 4 layout, abridged to the keys that shape the model).
GEMMA2_9B_JSON = {
    "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0, "head_dim": 256, "hidden_act": "gelu_pytorch_tanh",
    "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 3584, "intermediate_size": 14336,
    "max_position_embeddings": 8192, "num_attention_heads": 16, "num_hidden_layers": 42, "num_key_value_heads": 8,
    "query_pre_attn_scalar": 224, "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "sliding_window": 4096,
    "vocab_size": 256000, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0,
}
GEMMA3_4B_TEXT_JSON = {  # text_config of google/gemma-3-4b-pt, as a Gemma3ForCausalLM
    "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "head_dim": 256, "hidden_size": 2560,
    "intermediate_size": 10240, "num_attention_heads": 8, "num_hidden_layers": 34, "num_key_value_heads": 4,
    "query_pre_attn_scalar": 256, "rope_local_base_freq": 10000.0, "rope_theta": 1000000.0,
    "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024, "sliding_window_pattern": 6,
    "vocab_size": 262208, "max_position_embeddings": 131072, "final_logit_softcapping": None,
    "attn_logit_softcapping": None, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0,
}


@pytest.mark.parametrize("hf_json, preset", [(GEMMA2_9B_JSON, "gemma2-9b"), (GEMMA3_4B_TEXT_JSON, "gemma3-4b")])
def test_published_configs_equal_the_presets_in_both_transformers_layouts(hf_json, preset):
    import transformers

    v4 = ModelConfig.from_hf_config(hf_json)
    assert v4 == preset_config(preset)
    # transformers 5 rewrites the same file into its own layout (rope_parameters per layer type, layer_types).
    config_class = transformers.Gemma2Config if preset.startswith("gemma2") else transformers.Gemma3TextConfig
    v5 = config_class.from_dict({k: v for k, v in hf_json.items() if k not in ("architectures",)}).to_dict()
    assert "layer_types" in v5 and "rope_parameters" in v5
    assert ModelConfig.from_hf_config({**v5, "architectures": hf_json["architectures"]}) == v4
    sliding = v4.sliding_layers
    assert sliding[:6] == ((True, False) * 3 if preset.startswith("gemma2") else (True,) * 5 + (False,))


def test_multimodal_gemma3_checkpoint_gives_its_text_decoder(tmp_path):
    """Gemma 3 4B+ are published as Gemma3ForConditionalGeneration: the text decoder loads, the vision tower is
    left out, and text-only logits equal transformers' multimodal model's."""
    import torch
    import transformers

    _, kwargs = VARIANTS["gemma3-head256"]
    vision = transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14)
    config = transformers.Gemma3Config(text_config=transformers.Gemma3TextConfig(**kwargs), vision_config=vision,
                                       mm_tokens_per_image=4, boi_token_index=VOCAB - 3, eoi_token_index=VOCAB - 2,
                                       image_token_index=VOCAB - 1)
    torch.manual_seed(0)
    hf = transformers.Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    model = load_hf_checkpoint(tmp_path)
    assert model.config.architecture == "Gemma3ForCausalLM" and model.config.layer_types == tuple(kwargs["layer_types"])
    ids, mask = _padded_batch()
    ids = np.minimum(ids, VOCAB - 4)  # no image tokens
    ours = np.asarray(_forward(model, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)))
    tokens = mask.astype(bool)
    assert _rel_err(ours[tokens], _torch_logits(hf, ids, mask)[tokens]) < 1e-4

    # transformers 4.52-4.57 wrote the same tensors as model.language_model.* / model.vision_tower.*
    from safetensors.numpy import load_file, save_file

    tensors = load_file(tmp_path / "model.safetensors")
    save_file({"model." + n.replace("language_model.model.", "language_model."): t for n, t in tensors.items()},
              tmp_path / "model.safetensors", metadata={"format": "pt"})
    renamed = load_hf_checkpoint(tmp_path)
    for a, b in zip(jax.tree.leaves(nnx.state(renamed)), jax.tree.leaves(nnx.state(model))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # google/gemma-3-4b-it's config.json (transformers 4: text_config lists only non-default keys; vision omitted).
    published = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "eos_token_id": [1, 106],
                 "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                                 "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                                 "sliding_window": 1024}}
    assert ModelConfig.from_hf_config(published) == preset_config("gemma3-4b", {"eos_token_id": (1, 106)})


@pytest.mark.parametrize("name", [n for n in PRESETS if n.startswith("gemma")])
def test_gemma_presets_round_trip_and_carry_logical_names(name):
    import transformers

    config = preset_config(name)
    hf = config.to_hf_config()
    assert ModelConfig.from_hf_config(json.loads(json.dumps(hf))) == config
    transformers.AutoConfig.for_model(**{k: v for k, v in hf.items() if k != "architectures"})  # strict-validates
    shallow = preset_config(name, {"num_layers": 7})
    assert shallow.sliding_layers == config.sliding_layers[:7]  # the local/global pattern survives a depth change
    model = nnx.eval_shape(lambda: Decoder(shallow.replace(vocab_size=64)))
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        assert set(var.get_metadata()["out_sharding"]) <= LOGICAL_NAMES, path


def test_gemma_config_errors_name_the_problem():
    base = dict(GEMMA3_4B_TEXT_JSON)
    with pytest.raises(CheckpointError, match="use_bidirectional_attention"):
        ModelConfig.from_hf_config({**base, "use_bidirectional_attention": True})
    with pytest.raises(CheckpointError, match="hidden_activation='gelu'"):
        ModelConfig.from_hf_config({**base, "hidden_activation": "gelu"})
    with pytest.raises(CheckpointError, match="sliding_attention layers"):
        ModelConfig.from_hf_config({**base, "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}})
    with pytest.raises(CheckpointError, match="layer_types"):
        ModelConfig.from_hf_config({**base, "layer_types": ["full_attention"] * 3})
    with pytest.raises(CheckpointError, match="sliding_window"):
        ModelConfig.from_hf_config({**base, "sliding_window": None})
    with pytest.raises(CheckpointError, match="cannot be written as LlamaForCausalLM"):
        preset_config("tiny", {"layer_types": ("sliding_attention",) * 2, "sliding_window": 8}).to_hf_config()
    with pytest.raises(ConfigError, match="gemma3-1b"):
        preset_config("gemma3-1b", {"layer_types": ("bidirectional",) * 26})
