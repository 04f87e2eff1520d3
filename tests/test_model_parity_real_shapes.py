"""Decoder parity with transformers at a real head size: head_dim 128 (as Llama 3.1, Qwen 2.5 and OLMo 2 use),
2 layers, Llama 3.1's real RoPE scaling (original context 8,192) exercised at positions past 8,192, and bfloat16
compared with transformers running in bfloat16.

The hidden size stays small (2 query heads × 128) so that this runs in seconds on a CPU; what the toy parity tests
(tests/test_model_parity.py, head_dim 16) cannot see is a head-size-dependent bug (RoPE's rotate-half pairing and
its 64 frequencies, the attention scale 1/sqrt(128), OLMo 2's q/k norm over 2 × 128 features) and long positions.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tulu_jax.models import load_hf_checkpoint
from tulu_jax.models.rope import rope_inv_freq

FAMILIES = ["llama", "qwen2", "olmo2"]
VOCAB, LENGTH = 160, 24
# Position ids per row: 0..23; 8180..8203 (across Llama 3.1's original context of 8,192); and 0, 900, ..., 20700.
# RoPE attention sees only relative positions, so the last row is the one that reaches the bands Llama 3.1's scaling
# changes (wavelengths above 8192 / 4 = 2,048 positions): its keys sit up to 20,700 positions apart.
POSITIONS = np.stack([np.arange(LENGTH), 8180 + np.arange(LENGTH), 900 * np.arange(LENGTH)])


def _hf_model(family: str):
    import torch
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=128, max_position_embeddings=131072)
    config = {
        # Llama 3.1 8B's rope_scaling, verbatim.
        "llama": lambda: transformers.LlamaConfig(**common, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
        "qwen2": lambda: transformers.Qwen2Config(**common, rope_parameters={"rope_type": "default",
                                                                             "rope_theta": 1000000.0}),
        "olmo2": lambda: transformers.Olmo2Config(**common, rope_parameters={"rope_type": "default",
                                                                             "rope_theta": 500000.0},
                                                  eos_token_id=2, pad_token_id=1),
    }[family]()
    torch.manual_seed(10 + FAMILIES.index(family))
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # norms and biases away from their 1 / 0 init, so that they are really compared
        for name, p in model.named_parameters():
            p.add_(0.05 * torch.randn_like(p))
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                # Sharp attention (scores of order 10, as in trained models): the logits then depend on the
                # rotary positions, so a wrong frequency shows (with random-init scales attention is near uniform).
                p.mul_(4.0)
    return model


@pytest.fixture(scope="module", params=FAMILIES)
def family_models(request, tmp_path_factory):
    """(family, torch float32 model, checkpoint dir) for one family at a time."""
    hf = _hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return request.param, hf, path


@pytest.fixture(scope="module")
def batch():
    return np.random.default_rng(0).integers(0, VOCAB, POSITIONS.shape), POSITIONS


@nnx.jit
def _forward(model, ids, positions):
    return model(ids, positions=positions, segment_ids=jnp.ones_like(ids))


def _ours(path, ids, positions, dtype=None):
    model = load_hf_checkpoint(path, dtype=dtype)
    return np.asarray(_forward(model, jnp.asarray(ids, jnp.int32), jnp.asarray(positions, jnp.int32)), np.float64)


def _torch(hf, ids, positions):
    import torch

    with torch.no_grad():
        logits = hf(input_ids=torch.tensor(ids), position_ids=torch.tensor(positions)).logits
    return logits.to(torch.float64).numpy()


def _torch_bfloat16(path):
    """transformers' model loaded in bfloat16 as users load it (from_pretrained with dtype: the rotary frequencies
    stay float32; `model.to(torch.bfloat16)` would round them to bfloat16 too, and break long positions)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="eager")
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    return model.eval()


def _rel_err(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_config_is_the_real_shape(family_models):
    family, _, path = family_models
    config = load_hf_checkpoint(path).config
    assert (config.head_dim, config.num_heads, config.num_kv_heads, config.num_layers) == (128, 2, 1, 2)
    if family == "llama":
        assert config.rope_scaling["original_max_position_embeddings"] == 8192


def test_float32_logits_match_transformers_past_8192_positions(family_models, batch):
    family, hf, path = family_models
    ids, positions = batch
    ours, ref = _ours(path, ids, positions), _torch(hf, ids, positions)
    # float32 on both sides. Rows 0-1 differ by summation order only (~5e-6). Row 2's rotation angles reach 20,700
    # rad, where one float32 ulp is 2e-3 rad and both sides round position × frequency (and the frequencies) in
    # float32: that moves sharp attention scores by ~1e-2 and the logits by up to ~1e-3 (measured 6e-4 for llama).
    # A wrong frequency band is off by O(1) there (checked below for Llama 3.1's scaling), far above 3e-3.
    for row, tolerance in enumerate((1e-4, 1e-4, 3e-3)):
        assert _rel_err(ours[row], ref[row]) < tolerance, f"row {row}, positions {positions[row, :3]}..."
    if family == "llama":  # the long row really exercises Llama 3.1's scaling: without it, it is O(1) off
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        np.testing.assert_allclose(rope_inv_freq(load_hf_checkpoint(path).config),
                                   ROPE_INIT_FUNCTIONS["llama3"](hf.config)[0].numpy(), rtol=1e-6)
        unscaled = load_hf_checkpoint(path, overrides={"rope_scaling": None})
        logits = np.asarray(_forward(unscaled, jnp.asarray(ids, jnp.int32), jnp.asarray(positions, jnp.int32)))
        assert _rel_err(logits[2], ref[2]) > 0.1


def test_bfloat16_logits_match_transformers_in_bfloat16(family_models, batch):
    """Both sides in bfloat16 (weights and compute), each compared with the float32 transformers logits.

    bfloat16 keeps 8 significant bits (relative rounding 2^-9 ≈ 2e-3 per operation), and the sharp attention of these
    weights (scores of order 10-30) amplifies a score error into the softmax: measured here, each side's logits are
    1-8% off the float32 ones, and ours and transformers' differ by 1-6% (they round in different places). A real
    bug (a wrong RoPE band, a missing norm) is off by O(1). So: ours within 10% of transformers-bf16, and our own
    error against float32 at most 1.5 × transformers' bfloat16 error (no worse a bfloat16 implementation).
    """
    _, hf, path = family_models
    ids, positions = batch
    ref32 = _torch(hf, ids, positions)
    ours, theirs = _ours(path, ids, positions, dtype="bfloat16"), _torch(_torch_bfloat16(path), ids, positions)
    assert _rel_err(ours, theirs) < 0.1
    assert _rel_err(ours, ref32) <= 1.5 * _rel_err(theirs, ref32)
