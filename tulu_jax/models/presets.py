"""Shape presets: the ModelConfig of well-known checkpoints, for from-scratch runs and AOT compile checks.

The numbers are those of the models' published `config.json` files (Llama 3.1 8B/70B/405B, Qwen 2.5 7B,
OLMo 2 1124 7B), so that `tulu-jax compile-check` measures the real shapes without downloading any weights.
`tiny` is the CPU toy model of the tests and of `configs/tiny_sft.yaml` (its vocabulary is the bundled tiny
tokenizer's 384 tokens).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from tulu_jax.errors import ConfigError
from tulu_jax.models.config import ModelConfig

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
    """The ModelConfig of preset `name` with some fields replaced (e.g. {"num_layers": 4, "remat": "layer"}).

    Raises ConfigError for an unknown preset (naming the closest one) or an unknown / invalid field.
    """
    if name not in PRESETS:
        close = difflib.get_close_matches(name, list(PRESETS), n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"presets: {', '.join(PRESETS)}"
        raise ConfigError(f"unknown model preset {name!r} ({hint})")
    fields = {**PRESETS[name], **dict(overrides or {})}
    unknown = sorted(set(fields) - set(ModelConfig.__dataclass_fields__))
    if unknown:
        raise ConfigError(f"model preset {name!r}: unknown ModelConfig field(s) {unknown}")
    try:
        return ModelConfig(**fields)
    except Exception as e:  # CheckpointError / TypeError from the dataclass: a config problem here
        raise ConfigError(f"model preset {name!r} with overrides {dict(overrides or {})}: {e}") from None
