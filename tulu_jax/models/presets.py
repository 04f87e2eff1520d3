"""Shape presets: the ModelConfig of well-known checkpoints, for from-scratch runs and AOT compile checks.

The numbers are those of the models' published `config.json` files (Llama 3.1 8B/70B/405B, Qwen 2.5 7B,
OLMo 2 1124 7B, google/gemma-2-{2b,9b,27b}, google/gemma-3-1b-pt and the `text_config` of
google/gemma-3-{4b,12b,27b}-pt), so that `tulu-jax compile-check` measures the real shapes without downloading any
weights.
`tiny` is the CPU toy model of the tests and of `configs/tiny_sft.yaml` (its vocabulary is the bundled tiny
tokenizer's 384 tokens).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from tulu_jax.errors import ConfigError
from tulu_jax.models.config import ModelConfig, architecture_fields

_LLAMA31_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
_LLAMA31 = dict(
    vocab_size=128256,
    head_dim=128,
    num_kv_heads=8,
    rope_theta=500000.0,
    rope_scaling=_LLAMA31_ROPE,
    rms_norm_eps=1e-5,
    max_position_embeddings=131072,
    architecture="LlamaForCausalLM",
    bos_token_id=128000,
    eos_token_id=128001,
)

# Gemma 2: sliding (4096) and global layers alternate, soft-caps 50 (attention) / 30 (logits), RoPE base 10k.
_GEMMA2 = dict(
    architecture_fields("Gemma2ForCausalLM"),
    vocab_size=256000,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
    sliding_window=4096,
    attn_logit_softcap=50.0,
    final_logit_softcap=30.0,
    bos_token_id=2,
    eos_token_id=1,
    pad_token_id=0,
)
# Gemma 3: 5 sliding layers then 1 global; local RoPE base 10k, global 1M (linearly scaled ×8 from 4B up); QK-norm.
_GEMMA3 = dict(
    architecture_fields("Gemma3ForCausalLM"),
    rope_theta=1000000.0,
    local_rope_theta=10000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    bos_token_id=2,
    eos_token_id=1,
    pad_token_id=0,
)
_GEMMA3_LARGE = dict(_GEMMA3, vocab_size=262208, max_position_embeddings=131072, sliding_window=1024,
                     rope_scaling={"rope_type": "linear", "factor": 8.0})


def _gemma_layers(num_layers: int, period: int) -> dict[str, Any]:
    """num_layers and layer_types: every `period`-th layer global, the others sliding (transformers' default)."""
    return dict(num_layers=num_layers, layer_types=tuple("full_attention" if (i + 1) % period == 0
                                                         else "sliding_attention" for i in range(num_layers)))


PRESETS: dict[str, dict[str, Any]] = {
    "llama3.1-8b": dict(_LLAMA31, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32),
    "llama3.1-70b": dict(_LLAMA31, hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64),
    "llama3.1-405b": dict(_LLAMA31, hidden_size=16384, intermediate_size=53248, num_layers=126, num_heads=128),
    "qwen2.5-7b": dict(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        head_dim=128,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        max_position_embeddings=32768,
        attention_bias=True,
        architecture="Qwen2ForCausalLM",
        bos_token_id=151643,
        eos_token_id=151643,
    ),
    "olmo2-7b": dict(
        vocab_size=100352,
        hidden_size=4096,
        intermediate_size=11008,
        num_layers=32,
        num_heads=32,
        num_kv_heads=32,
        head_dim=128,
        rope_theta=500000.0,
        rms_norm_eps=1e-6,
        max_position_embeddings=4096,
        qk_norm=True,
        norm_placement="post",
        architecture="Olmo2ForCausalLM",
        bos_token_id=100257,
        eos_token_id=100257,
        pad_token_id=100277,
    ),
    "gemma2-2b": dict(_GEMMA2, **_gemma_layers(26, 2), hidden_size=2304, intermediate_size=9216, num_heads=8,
                      num_kv_heads=4, head_dim=256, query_pre_attn_scalar=256),
    "gemma2-9b": dict(_GEMMA2, **_gemma_layers(42, 2), hidden_size=3584, intermediate_size=14336, num_heads=16,
                      num_kv_heads=8, head_dim=256, query_pre_attn_scalar=224),
    "gemma2-27b": dict(_GEMMA2, **_gemma_layers(46, 2), hidden_size=4608, intermediate_size=36864, num_heads=32,
                       num_kv_heads=16, head_dim=128, query_pre_attn_scalar=144),
    "gemma3-1b": dict(_GEMMA3, **_gemma_layers(26, 6), vocab_size=262144, max_position_embeddings=32768,
                      sliding_window=512, hidden_size=1152, intermediate_size=6912, num_heads=4, num_kv_heads=1,
                      head_dim=256, query_pre_attn_scalar=256),
    "gemma3-4b": dict(_GEMMA3_LARGE, **_gemma_layers(34, 6), hidden_size=2560, intermediate_size=10240, num_heads=8,
                      num_kv_heads=4, head_dim=256, query_pre_attn_scalar=256),
    "gemma3-12b": dict(_GEMMA3_LARGE, **_gemma_layers(48, 6), hidden_size=3840, intermediate_size=15360,
                       num_heads=16, num_kv_heads=8, head_dim=256, query_pre_attn_scalar=256),
    "gemma3-27b": dict(_GEMMA3_LARGE, **_gemma_layers(62, 6), hidden_size=5376, intermediate_size=21504,
                       num_heads=32, num_kv_heads=16, head_dim=128, query_pre_attn_scalar=168),
    "tiny": dict(
        vocab_size=384,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        max_position_embeddings=4096,
        architecture="LlamaForCausalLM",
    ),
}


def preset_config(name: str, overrides: Mapping[str, Any] | None = None) -> ModelConfig:
    """The ModelConfig of preset `name` with some fields replaced (e.g. {"num_layers": 4, "remat": "layer"}; a
    Gemma preset given only a new num_layers keeps its local/global layer pattern).

    Raises ConfigError for an unknown preset (naming the closest one) or an unknown / invalid field.
    """
    if name not in PRESETS:
        close = difflib.get_close_matches(name, list(PRESETS), n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"presets: {', '.join(PRESETS)}"
        raise ConfigError(f"unknown model preset {name!r} ({hint})")
    preset, overrides = PRESETS[name], dict(overrides or {})
    fields = {**preset, **overrides}
    if preset.get("layer_types") and isinstance(overrides.get("num_layers"), int) and "layer_types" not in overrides:
        # A shallower/deeper Gemma keeps its local/global pattern.
        fields.update(_gemma_layers(overrides["num_layers"], preset["layer_types"].index("full_attention") + 1))
    unknown = sorted(set(fields) - set(ModelConfig.__dataclass_fields__))
    if unknown:
        raise ConfigError(f"model preset {name!r}: unknown ModelConfig field(s) {unknown}")
    try:
        return ModelConfig(**fields)
    except Exception as e:  # CheckpointError / TypeError from the dataclass: a config problem here
        raise ConfigError(f"model preset {name!r} with overrides {dict(overrides or {})}: {e}") from None
