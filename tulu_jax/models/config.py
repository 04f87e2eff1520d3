"""ModelConfig: one dataclass for the Llama 3.x, Qwen 2/2.5, OLMo 2, Gemma 2 and Gemma 3 (text) decoder families,
with HF config I/O."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any, Literal

from tulu_jax.errors import CheckpointError

DType = Literal["float32", "bfloat16"]
Remat = Literal["none", "layer", "dots"]

# HF architecture name -> model_type, `defaults` for keys an older config.json may omit, and `fixed`: the ModelConfig
# fields the architecture implies (set on import; export refuses a config that differs from them).
_PLAIN = dict(hidden_act="silu", norm_unit_offset=False, qk_norm_per_head=False, scale_embeddings=False,
              query_pre_attn_scalar=None, attn_logit_softcap=None, final_logit_softcap=None, layer_types=None,
              sliding_window=None, local_rope_theta=None)
# Gemma: GeGLU, (1 + w) RMSNorm before and after attention and MLP, embeddings × √hidden; the rest (window, layer
# pattern, soft-caps, query scalar, RoPE bases) comes from config.json with transformers 5.23's Gemma2Config /
# Gemma3TextConfig defaults (`_gemma_fields_from_hf`).
_GEMMA = dict(hidden_act="gelu_tanh", norm_unit_offset=True, scale_embeddings=True, attention_bias=False,
              norm_placement="sandwich")
_FAMILIES: dict[str, dict[str, Any]] = {
    "LlamaForCausalLM": {
        "model_type": "llama",
        "defaults": {"rms_norm_eps": 1e-6, "max_position_embeddings": 2048},
        "fixed": dict(_PLAIN, attention_bias=False, qk_norm=False, norm_placement="pre"),
    },
    "Qwen2ForCausalLM": {
        "model_type": "qwen2",
        "defaults": {"rms_norm_eps": 1e-6, "max_position_embeddings": 32768},
        # Qwen2 always has q/k/v biases (and no o_proj bias)
        "fixed": dict(_PLAIN, attention_bias=True, qk_norm=False, norm_placement="pre"),
    },
    "Olmo2ForCausalLM": {
        "model_type": "olmo2",
        "defaults": {"rms_norm_eps": 1e-5, "max_position_embeddings": 2048},
        "fixed": dict(_PLAIN, attention_bias=False, qk_norm=True, norm_placement="post"),
    },
    "Gemma2ForCausalLM": {
        "model_type": "gemma2",
        "defaults": {"rms_norm_eps": 1e-6, "max_position_embeddings": 8192},
        "fixed": dict(_GEMMA, qk_norm=False, qk_norm_per_head=False, local_rope_theta=None),
    },
    "Gemma3ForCausalLM": {
        "model_type": "gemma3_text",
        "defaults": {"rms_norm_eps": 1e-6, "max_position_embeddings": 131072},
        # transformers' Gemma3Attention never passes attn_logit_softcapping on: Gemma 3 has no attention soft-cap.
        "fixed": dict(_GEMMA, qk_norm=True, qk_norm_per_head=True, attn_logit_softcap=None),
    },
}
GEMMA_ARCHITECTURES = ("Gemma2ForCausalLM", "Gemma3ForCausalLM")
# Gemma 3 4B+ are published as Gemma3ForConditionalGeneration: the text decoder's config is `text_config`, which
# transformers 4 wrote without the keys left at Gemma3TextConfig's defaults (these, from transformers 5.23).
_GEMMA3_MULTIMODAL = "Gemma3ForConditionalGeneration"
_GEMMA3_TEXT_DEFAULTS = dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                             num_attention_heads=8, num_key_value_heads=4, head_dim=256, bos_token_id=2,
                             eos_token_id=1, pad_token_id=0)
_MODEL_TYPE_TO_ARCH = {spec["model_type"]: arch for arch, spec in _FAMILIES.items()}
_LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
_DTYPES = ("float32", "bfloat16")
_REMATS = ("none", "layer", "dots")
ATTENTION_CHOICES = ("auto", "einsum", "splash", "cudnn")
_PLACEMENTS = ("pre", "post", "sandwich")
_ACTIVATIONS = ("silu", "gelu_tanh")
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a decoder-only transformer (Llama 3.x, Qwen 2/2.5, OLMo 2, Gemma 2, Gemma 3 text).

    `attention_bias` means q/k/v projection biases (Qwen 2); `qk_norm` is OLMo 2's RMSNorm over the full q and k
    projections, or with `qk_norm_per_head` Gemma 3's RMSNorm of each head; `norm_placement` "pre" is Llama/Qwen
    (norm before attention/MLP), "post" is OLMo 2 (norm of the attention/MLP output before the residual add),
    "sandwich" is Gemma (both). `rope_scaling` is None, a Llama 3.1 dict {"rope_type": "llama3", factor,
    low_freq_factor, high_freq_factor, original_max_position_embeddings} or {"rope_type": "linear", factor}.

    Gemma fields: `hidden_act` "gelu_tanh" (GeGLU), `norm_unit_offset` (RMSNorm scales by 1 + w),
    `scale_embeddings` (embeddings × √hidden_size), `query_pre_attn_scalar` (queries scaled by its -1/2 power
    instead of head_dim's), `attn_logit_softcap` / `final_logit_softcap` (cap · tanh(x / cap) on attention scores /
    output logits), `layer_types` (per layer "full_attention" or "sliding_attention"; None = all full) with
    `sliding_window` (a sliding layer's query sees the keys less than `sliding_window` slots back), and
    `local_rope_theta` (Gemma 3: sliding layers' unscaled RoPE base; None = the global RoPE everywhere).
    `logits_chunk_size`: sequence positions per chunk when a loss asks for token log-probs (`Decoder.token_logps`
    never holds more than [B, chunk, V] float32 logits); like dtypes and remat it is not part of the HF config.
    `attention`: the training forward's attention, auto | einsum | splash | cudnn (`models/fused_attention.py`);
    not part of the HF config either.
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
    logits_chunk_size: int = 512
    attention: str = "auto"
    architecture: str = "LlamaForCausalLM"
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    hidden_act: Literal["silu", "gelu_tanh"] = "silu"
    norm_unit_offset: bool = False
    qk_norm_per_head: bool = False
    scale_embeddings: bool = False
    query_pre_attn_scalar: int | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    layer_types: tuple[str, ...] | None = None
    sliding_window: int | None = None
    local_rope_theta: float | None = None

    def __post_init__(self) -> None:
        def bad(field: str, reason: str) -> CheckpointError:
            return CheckpointError(f"ModelConfig field {field!r}: {reason}")

        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                      "head_dim", "logits_chunk_size"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise bad(field, f"must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise bad("num_kv_heads", f"{self.num_kv_heads} does not divide num_heads={self.num_heads}")
        if self.head_dim % 2:
            raise bad("head_dim", f"RoPE needs an even head_dim, got {self.head_dim}")
        for field, allowed in (("param_dtype", _DTYPES), ("compute_dtype", _DTYPES), ("remat", _REMATS),
                               ("attention", ATTENTION_CHOICES),
                               ("norm_placement", _PLACEMENTS), ("hidden_act", _ACTIVATIONS),
                               ("architecture", tuple(_FAMILIES))):
            if getattr(self, field) not in allowed:
                raise bad(field, f"{getattr(self, field)!r} is not one of {allowed}")
        for field in ("attn_logit_softcap", "final_logit_softcap", "local_rope_theta"):
            value = getattr(self, field)
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise bad(field, f"must be None or a positive number, got {value!r}")
        self._check_layer_types(bad)
        if self.rope_scaling is not None:
            check_rope_scaling(dict(self.rope_scaling), where="ModelConfig.rope_scaling")
            # Frozen + hashable: the config is static data in the NNX graphdef (jit cache key).
            object.__setattr__(self, "rope_scaling", _FrozenDict(self.rope_scaling))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))

    def _check_layer_types(self, bad: Any) -> None:
        for field in ("sliding_window", "query_pre_attn_scalar"):
            value = getattr(self, field)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise bad(field, f"must be None or a positive int, got {value!r}")
        if self.layer_types is None:
            return
        types = tuple(self.layer_types)
        object.__setattr__(self, "layer_types", types)  # hashable
        if len(types) != self.num_layers:
            raise bad("layer_types", f"lists {len(types)} layers, num_layers is {self.num_layers}")
        unknown = sorted(set(types) - set(LAYER_TYPES))
        if unknown:
            raise bad("layer_types", f"{unknown} not in {LAYER_TYPES}")
        if "sliding_attention" in types and self.sliding_window is None:
            raise bad("sliding_window", "sliding_attention layers need a sliding_window")

    @property
    def sliding_layers(self) -> tuple[bool, ...]:
        """Per layer: True for a sliding-window (local) attention layer."""
        return tuple(t == "sliding_attention" for t in self.layer_types or ("full_attention",) * self.num_layers)

    @property
    def query_scale(self) -> float:
        """The factor queries are multiplied by: query_pre_attn_scalar^-1/2 (Gemma), else head_dim^-1/2."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

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
        A Gemma3ForConditionalGeneration config gives its text decoder (Gemma3ForCausalLM).
        """
        hf = _text_decoder_config(hf)
        arch = _architecture(hf, source)
        family = _FAMILIES[arch]

        def get(key: str, default: Any = None) -> Any:
            value = hf.get(key)
            return default if value is None else value

        def unsupported(what: str) -> CheckpointError:
            return CheckpointError(f"{source}: {arch} with {what} is not supported")

        gemma = arch in GEMMA_ARCHITECTURES
        act_key, act = ("hidden_activation", "gelu_pytorch_tanh") if gemma else ("hidden_act", "silu")
        if get(act_key, act) != act:
            raise unsupported(f"{act_key}={hf[act_key]!r}")
        if get("mlp_bias", False):
            raise unsupported("mlp_bias=true")
        if arch != "Qwen2ForCausalLM" and get("attention_bias", False):
            raise unsupported("attention_bias=true (output-projection bias)")
        if get("use_sliding_window", False):
            raise unsupported("use_sliding_window=true")
        if get("use_bidirectional_attention", False):
            raise unsupported("use_bidirectional_attention=true")
        hidden, heads = _required_int(hf, "hidden_size", source), _required_int(hf, "num_attention_heads", source)
        num_layers = _required_int(hf, "num_hidden_layers", source)
        fields: dict[str, Any] = dict(
            vocab_size=_required_int(hf, "vocab_size", source),
            hidden_size=hidden,
            intermediate_size=_required_int(hf, "intermediate_size", source),
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=int(get("num_key_value_heads", heads)),
            head_dim=int(get("head_dim", 256 if gemma else hidden // heads)),
            rms_norm_eps=float(get("rms_norm_eps", family["defaults"]["rms_norm_eps"])),
            tie_word_embeddings=bool(get("tie_word_embeddings", gemma)),
            max_position_embeddings=int(get("max_position_embeddings", family["defaults"]["max_position_embeddings"])),
            architecture=arch,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
            **family["fixed"],
        )
        if arch == "Gemma3ForCausalLM":
            fields.update(_gemma3_rope_from_hf(hf, source))
        else:
            fields["rope_theta"], fields["rope_scaling"] = _rope_from_params(_hf_rope_params(hf), hf, source)
        if gemma:
            fields.update(_gemma_fields_from_hf(hf, arch, num_layers))
        fields.update(overrides)
        try:
            return cls(**fields)
        except CheckpointError as e:
            raise CheckpointError(f"{source}: {e}") from None

    def to_hf_config(self, *, dtype: DType | None = None) -> dict[str, Any]:
        """The config.json dict transformers 5 loads; also carries the transformers 4 rope keys for older readers.

        Raises CheckpointError when a field differs from what the architecture implies (e.g. a sliding window on
        a Llama): transformers would build a different model from that config.json.
        """
        family = _FAMILIES[self.architecture]
        differ = {k: getattr(self, k) for k, v in family["fixed"].items() if getattr(self, k) != v}
        if differ:
            raise CheckpointError(f"ModelConfig with {differ} cannot be written as {self.architecture}")
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
        if self.architecture in GEMMA_ARCHITECTURES:
            hf.update(hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh",
                      query_pre_attn_scalar=self.query_pre_attn_scalar, sliding_window=self.sliding_window,
                      layer_types=list(self.layer_types or ("full_attention",) * self.num_layers),
                      final_logit_softcapping=_optional_float(self.final_logit_softcap),
                      attn_logit_softcapping=_optional_float(self.attn_logit_softcap))
        if self.architecture == "Gemma3ForCausalLM":
            # Per layer type; transformers 4 read rope_theta / rope_scaling (global) and rope_local_base_freq.
            local = rope_parameters if self.local_rope_theta is None else {"rope_type": "default",
                                                                          "rope_theta": self.local_rope_theta}
            hf.update(rope_parameters={"full_attention": rope_parameters, "sliding_attention": local},
                      rope_local_base_freq=local["rope_theta"])
        return hf

    def __hash__(self) -> int:
        return hash(tuple(getattr(self, f.name) for f in dataclasses.fields(self)))


class _FrozenDict(dict):
    """A hashable dict (ModelConfig stays hashable and equal to a config built from a plain dict); do not mutate."""

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items())))


def architecture_fields(architecture: str) -> dict[str, Any]:
    """The ModelConfig fields an HF architecture implies (norm placement, activation, Gemma flags, ...)."""
    return {**_FAMILIES[architecture]["fixed"], "architecture": architecture}


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


def _text_decoder_config(hf: Mapping[str, Any]) -> Mapping[str, Any]:
    """The text decoder's config of a multimodal Gemma 3 config (token ids from the top level when the text config
    has none); any other config unchanged."""
    archs = hf.get("architectures")
    if archs != [_GEMMA3_MULTIMODAL] and (archs or hf.get("model_type") != "gemma3"):
        return hf
    ids = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf.get(k) is not None}
    text = {k: v for k, v in dict(hf.get("text_config") or {}).items() if v is not None or k not in ids}
    return {**_GEMMA3_TEXT_DEFAULTS, **ids, **text, "architectures": ["Gemma3ForCausalLM"]}


def _required_int(hf: Mapping[str, Any], key: str, source: str) -> int:
    value = hf.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise CheckpointError(f"{source}: field {key!r} must be an int, got {value!r}")
    return value


def _hf_rope_params(hf: Mapping[str, Any]) -> dict[str, Any]:
    """One RoPE parameter dict (with rope_theta) from transformers 5 `rope_parameters` or 4's
    `rope_theta`/`rope_scaling`."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    params["rope_theta"] = params.get("rope_theta") or hf.get("rope_theta") or 10000.0
    return params


def _rope_from_params(params: Mapping[str, Any], hf: Mapping[str, Any],
                      source: str) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, scaling or None) from one RoPE parameter dict: default, linear or llama3 RoPE."""
    rope_type = params.get("rope_type", params.get("type", "default"))
    if params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise CheckpointError(f"{source}: partial_rotary_factor != 1 is not supported")
    theta = float(params["rope_theta"])
    if rope_type == "default":
        return theta, None
    if rope_type == "linear":
        scaling = {"rope_type": "linear", "factor": params.get("factor")}
    elif rope_type == "llama3":
        scaling = {"rope_type": "llama3"}
        for key in _LLAMA3_ROPE_KEYS:
            value = params.get(key)
            if value is None and key == "original_max_position_embeddings":
                value = hf.get("original_max_position_embeddings", hf.get("max_position_embeddings"))
            scaling[key] = value
    else:
        raise CheckpointError(f"{source}: rope_type {rope_type!r} is not supported "
                              "(only 'default', 'linear' and 'llama3')")
    check_rope_scaling(scaling, where=f"{source} rope scaling")
    return theta, scaling


def _gemma3_rope_from_hf(hf: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Gemma 3's global RoPE (maybe linearly scaled) and its sliding layers' own base (`local_rope_theta`)."""
    params = hf.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:  # transformers 5: one dict per layer type
        full, local = dict(params.get("full_attention") or {}), dict(params.get("sliding_attention") or {})
    else:  # transformers 4
        full = {**(hf.get("rope_scaling") or {}), "rope_theta": hf.get("rope_theta")}
        local = {"rope_type": "default", "rope_theta": hf.get("rope_local_base_freq")}
    # Gemma3TextConfig's default bases: 1M global, 10k local.
    full["rope_theta"], local["rope_theta"] = full.get("rope_theta") or 1e6, local.get("rope_theta") or 1e4
    theta, scaling = _rope_from_params(full, hf, f"{source} (full_attention)")
    if local == full:  # the sliding layers share the global RoPE
        return dict(rope_theta=theta, rope_scaling=scaling, local_rope_theta=None)
    local_theta, local_scaling = _rope_from_params(local, hf, f"{source} (sliding_attention)")
    if local_scaling is not None:
        raise CheckpointError(f"{source}: scaled RoPE on Gemma 3 sliding_attention layers is not supported")
    return dict(rope_theta=theta, rope_scaling=scaling, local_rope_theta=local_theta)


def _gemma_fields_from_hf(hf: Mapping[str, Any], arch: str, num_layers: int) -> dict[str, Any]:
    """The config-dependent Gemma fields, with transformers 5.23's defaults for absent keys (a key present with
    null means "off", as in transformers)."""
    gemma2 = arch == "Gemma2ForCausalLM"
    # Gemma 2: sliding, full, sliding, ...; Gemma 3: every `sliding_window_pattern`-th layer is full (5 local : 1).
    period = 2 if gemma2 else int(hf.get("sliding_window_pattern") or 6)
    layer_types = hf.get("layer_types") or ["full_attention" if (i + 1) % period == 0 else "sliding_attention"
                                            for i in range(num_layers)]
    fields = dict(
        layer_types=tuple(layer_types),
        sliding_window=hf.get("sliding_window", 4096),
        query_pre_attn_scalar=int(hf.get("query_pre_attn_scalar") or 256),
        final_logit_softcap=_optional_float(hf.get("final_logit_softcapping", 30.0 if gemma2 else None)),
    )
    if gemma2:
        fields["attn_logit_softcap"] = _optional_float(hf.get("attn_logit_softcapping", 50.0))
    return fields


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def check_rope_scaling(scaling: dict[str, Any], *, where: str) -> None:
    """Raise CheckpointError unless `scaling` is a complete "linear" or "llama3" RoPE scaling dict."""
    rope_type = scaling.get("rope_type")
    if rope_type == "linear":
        factor = scaling.get("factor")
        if set(scaling) != {"rope_type", "factor"} or not isinstance(factor, (int, float)) or factor <= 0:
            raise CheckpointError(f"{where}: linear RoPE scaling needs exactly a positive 'factor', got {scaling}")
        return
    if rope_type != "llama3":
        raise CheckpointError(f"{where}: rope_type must be 'llama3' or 'linear', got {rope_type!r}")
    missing = [k for k in _LLAMA3_ROPE_KEYS if not isinstance(scaling.get(k), (int, float))]
    if missing:
        raise CheckpointError(f"{where}: missing or non-numeric {missing}")
    if scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise CheckpointError(f"{where}: high_freq_factor must exceed low_freq_factor")
