"""ModelConfig: one dataclass for the Llama 3.x, Qwen 2/2.5 and OLMo 2 decoder families, with HF config I/O."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any, Literal

from tulu_jax.errors import CheckpointError

DType = Literal["float32", "bfloat16"]
Remat = Literal["none", "layer", "dots"]

# HF architecture name -> (model_type, family defaults for keys an older config.json may omit).
_FAMILIES: dict[str, dict[str, Any]] = {
    "LlamaForCausalLM": {
        "model_type": "llama",
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 2048,
        "attention_bias": False,
        "qk_norm": False,
        "norm_placement": "pre",
    },
    "Qwen2ForCausalLM": {
        "model_type": "qwen2",
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 32768,
        "attention_bias": True,  # Qwen2 always has q/k/v biases (and no o_proj bias)
        "qk_norm": False,
        "norm_placement": "pre",
    },
    "Olmo2ForCausalLM": {
        "model_type": "olmo2",
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 2048,
        "attention_bias": False,
        "qk_norm": True,
        "norm_placement": "post",
    },
}
_MODEL_TYPE_TO_ARCH = {spec["model_type"]: arch for arch, spec in _FAMILIES.items()}
_LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
_DTYPES = ("float32", "bfloat16")
_REMATS = ("none", "layer", "dots")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a decoder-only transformer (Llama 3.x, Qwen 2/2.5, OLMo 2).

    `attention_bias` means q/k/v projection biases (Qwen 2); `qk_norm` is OLMo 2's RMSNorm over the full q and k
    projections; `norm_placement` "pre" is Llama/Qwen (norm before attention/MLP), "post" is OLMo 2 (norm of the
    attention/MLP output before the residual add). `rope_scaling` is None or a Llama 3.1 dict
    {"rope_type": "llama3", factor, low_freq_factor, high_freq_factor, original_max_position_embeddings}.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: Mapping[str, Any] | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    norm_placement: Literal["pre", "post"] = "pre"
    max_position_embeddings: int = 2048
    param_dtype: DType = "float32"
    compute_dtype: DType = "float32"
    remat: Remat = "none"
    architecture: str = "LlamaForCausalLM"
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        def bad(field: str, reason: str) -> CheckpointError:
            return CheckpointError(f"ModelConfig field {field!r}: {reason}")

        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                      "head_dim"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise bad(field, f"must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise bad("num_kv_heads", f"{self.num_kv_heads} does not divide num_heads={self.num_heads}")
        if self.head_dim % 2:
            raise bad("head_dim", f"RoPE needs an even head_dim, got {self.head_dim}")
        for field, allowed in (("param_dtype", _DTYPES), ("compute_dtype", _DTYPES), ("remat", _REMATS),
                               ("norm_placement", ("pre", "post")), ("architecture", tuple(_FAMILIES))):
            if getattr(self, field) not in allowed:
                raise bad(field, f"{getattr(self, field)!r} is not one of {allowed}")
        if self.rope_scaling is not None:
            _check_llama3_rope(dict(self.rope_scaling), where="ModelConfig.rope_scaling")
            # Frozen + hashable: the config is static data in the NNX graphdef (jit cache key).
            object.__setattr__(self, "rope_scaling", _FrozenDict(self.rope_scaling))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """All end-of-sequence ids (Llama 3.1 instruct models have several)."""
        if self.eos_token_id is None:
            return ()
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any], *, source: str = "config.json", **overrides: Any) -> ModelConfig:
        """Build from a Hugging Face config dict (transformers 4 or 5 layout).

        `source` names the file in error messages; `overrides` set tulu-jax-only fields (dtypes, remat).
        Raises CheckpointError for an unsupported architecture or an unsupported option of a supported one.
        """
        arch = _architecture(hf, source)
        family = _FAMILIES[arch]

        def get(key: str, default: Any = None) -> Any:
            value = hf.get(key)
            return default if value is None else value

        def unsupported(what: str) -> CheckpointError:
            return CheckpointError(f"{source}: {arch} with {what} is not supported")

        if get("hidden_act", "silu") != "silu":
            raise unsupported(f"hidden_act={hf['hidden_act']!r}")
        if get("mlp_bias", False):
            raise unsupported("mlp_bias=true")
        if arch != "Qwen2ForCausalLM" and get("attention_bias", False):
            raise unsupported("attention_bias=true (output-projection bias)")
        if get("use_sliding_window", False):
            raise unsupported("use_sliding_window=true")
        rope_theta, rope_scaling = _rope_from_hf(hf, source)
        hidden, heads = _required_int(hf, "hidden_size", source), _required_int(hf, "num_attention_heads", source)
        fields: dict[str, Any] = dict(
            vocab_size=_required_int(hf, "vocab_size", source),
            hidden_size=hidden,
            intermediate_size=_required_int(hf, "intermediate_size", source),
            num_layers=_required_int(hf, "num_hidden_layers", source),
            num_heads=heads,
            num_kv_heads=int(get("num_key_value_heads", heads)),
            head_dim=int(get("head_dim", hidden // heads)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            rms_norm_eps=float(get("rms_norm_eps", family["rms_norm_eps"])),
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            attention_bias=family["attention_bias"],
            qk_norm=family["qk_norm"],
            norm_placement=family["norm_placement"],
            max_position_embeddings=int(get("max_position_embeddings", family["max_position_embeddings"])),
            architecture=arch,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
        )
        fields.update(overrides)
        try:
            return cls(**fields)
        except CheckpointError as e:
            raise CheckpointError(f"{source}: {e}") from None

    def to_hf_config(self, *, dtype: DType | None = None) -> dict[str, Any]:
        """The config.json dict transformers 5 loads; also carries the transformers 4 rope keys for older readers."""
        family = _FAMILIES[self.architecture]
        rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope_parameters.update(dict(self.rope_scaling))
        hf: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": family["model_type"],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope_parameters,
            "rope_theta": self.rope_theta,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling is not None else None,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "dtype": dtype or self.param_dtype,
            "torch_dtype": dtype or self.param_dtype,
            "use_cache": True,
        }
        if self.architecture == "Qwen2ForCausalLM":
            hf.update(use_sliding_window=False, sliding_window=None)
        else:
            hf.update(attention_bias=False)
        if self.architecture == "LlamaForCausalLM":
            hf.update(mlp_bias=False)
        return hf

    def __hash__(self) -> int:
        return hash(tuple(getattr(self, f.name) for f in dataclasses.fields(self)))


class _FrozenDict(dict):
    """A hashable dict (ModelConfig stays hashable and equal to a config built from a plain dict); do not mutate."""

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items())))


def load_hf_config(path: str, **overrides: Any) -> ModelConfig:
    """Read a config.json file into a ModelConfig; errors name the file."""
    try:
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: config.json not found") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(hf).__name__}")
    return ModelConfig.from_hf_config(hf, source=path, **overrides)


def _architecture(hf: Mapping[str, Any], source: str) -> str:
    archs = hf.get("architectures")
    if archs:
        if not isinstance(archs, list) or len(archs) != 1:
            raise CheckpointError(f"{source}: field 'architectures' must list one architecture, got {archs!r}")
        arch = archs[0]
    else:
        model_type = hf.get("model_type")
        if model_type not in _MODEL_TYPE_TO_ARCH:
            raise CheckpointError(
                f"{source}: no 'architectures' and unsupported model_type {model_type!r}; "
                f"supported: {sorted(_MODEL_TYPE_TO_ARCH)}"
            )
        arch = _MODEL_TYPE_TO_ARCH[model_type]
    if arch not in _FAMILIES:
        raise CheckpointError(f"{source}: unsupported architecture {arch!r}; supported: {sorted(_FAMILIES)}")
    return arch


def _required_int(hf: Mapping[str, Any], key: str, source: str) -> int:
    value = hf.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise CheckpointError(f"{source}: field {key!r} must be an int, got {value!r}")
    return value


def _rope_from_hf(hf: Mapping[str, Any], source: str) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, llama3 scaling or None) from transformers 5 `rope_parameters` or 4's `rope_theta`/`rope_scaling`."""
    params = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    if not params:
        params = dict(legacy)
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise CheckpointError(f"{source}: partial_rotary_factor != 1 is not supported")
    if rope_type == "default":
        return float(theta), None
    if rope_type != "llama3":
        raise CheckpointError(f"{source}: rope_type {rope_type!r} is not supported (only 'default' and 'llama3')")
    scaling = {"rope_type": "llama3"}
    for key in _LLAMA3_ROPE_KEYS:
        value = params.get(key)
        if value is None and key == "original_max_position_embeddings":
            value = hf.get("original_max_position_embeddings", hf.get("max_position_embeddings"))
        scaling[key] = value
    _check_llama3_rope(scaling, where=f"{source} rope scaling")
    return float(theta), scaling


def _check_llama3_rope(scaling: dict[str, Any], *, where: str) -> None:
    if scaling.get("rope_type") != "llama3":
        raise CheckpointError(f"{where}: rope_type must be 'llama3', got {scaling.get('rope_type')!r}")
    missing = [k for k in _LLAMA3_ROPE_KEYS if not isinstance(scaling.get(k), (int, float))]
    if missing:
        raise CheckpointError(f"{where}: missing or non-numeric {missing}")
    if scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise CheckpointError(f"{where}: high_freq_factor must exceed low_freq_factor")
