"""Hugging Face safetensors import (streamed tensor by tensor into target shardings) and export.

HF stores one tensor per layer in torch's [out, in] layout; the Decoder stacks layers on a leading axis and uses
[in, out] kernels with heads split out. Each Decoder parameter is described by a `_Source`: the HF tensor name
(per layer or not), whether it is transposed, and how each HF axis splits into Decoder axes. Import reads, for each
device shard, only the HF slice that shard needs (`safe_open(...).get_slice`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy, so safetensors' numpy reader handles bf16 files)
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from safetensors import safe_open
from safetensors.numpy import save_file

from tulu_jax.errors import CheckpointError
from tulu_jax.finite import nonfinite_leaves
from tulu_jax.models.config import ModelConfig, load_hf_config
from tulu_jax.models.decoder import Decoder, layer_param_specs
from tulu_jax.pytree import path_names

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5_000_000_000  # transformers' default "5GB"
# Tensors some checkpoints carry that the model does not need (old Llama exports saved RoPE buffers).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# Gemma 3 4B+ checkpoints (Gemma3ForConditionalGeneration) nest the text decoder under one of these prefixes (as
# transformers writes them / in its in-memory names) beside the vision tower and projector, which are not ours.
_NESTED_TEXT_PREFIXES = ("language_model.model.", "model.language_model.")


@dataclasses.dataclass(frozen=True)
class _Source:
    """Where a Decoder parameter comes from in an HF checkpoint.

    `groups[a]` lists the Decoder axes (sizes) that HF axis `a` (after the optional transpose) splits into, e.g.
    q_proj: HF [N*D, H] -> transpose -> [H, N*D] -> groups ((H,), (N, D)) -> Decoder [H, N, D].
    """

    hf_name: str  # with "{i}" for the layer index when `stacked`
    transpose: bool
    groups: tuple[tuple[int, ...], ...]
    stacked: bool

    def hf_shape(self) -> tuple[int, ...]:
        shape = tuple(math.prod(g) for g in self.groups)
        return shape[::-1] if self.transpose else shape

    def tensor_name(self, layer: int | None) -> str:
        return self.hf_name.format(i=layer) if self.stacked else self.hf_name


def _sources(config: ModelConfig) -> dict[tuple[str, ...], _Source]:
    """Decoder state path -> HF source, for this config."""
    h, i, n, k, d, v = (config.hidden_size, config.intermediate_size, config.num_heads, config.num_kv_heads,
                        config.head_dim, config.vocab_size)
    layer = "model.layers.{i}."
    norms = {  # Decoder norm -> HF module, per norm placement
        "pre": {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"},
        "post": {"attn_norm": "post_attention_layernorm", "mlp_norm": "post_feedforward_layernorm"},
        "sandwich": {"attn_norm": "input_layernorm", "post_attn_norm": "post_attention_layernorm",
                     "mlp_norm": "pre_feedforward_layernorm", "post_mlp_norm": "post_feedforward_layernorm"},
    }[config.norm_placement]
    q_norm, k_norm = ((d,), (d,)) if config.qk_norm_per_head else ((n, d), (k, d))
    per_layer = {
        **{name: (f"{module}.weight", False, ((h,),)) for name, module in norms.items()},
        "q_proj": ("self_attn.q_proj.weight", True, ((h,), (n, d))),
        "k_proj": ("self_attn.k_proj.weight", True, ((h,), (k, d))),
        "v_proj": ("self_attn.v_proj.weight", True, ((h,), (k, d))),
        "o_proj": ("self_attn.o_proj.weight", True, ((n, d), (h,))),
        "gate_proj": ("mlp.gate_proj.weight", True, ((h,), (i,))),
        "up_proj": ("mlp.up_proj.weight", True, ((h,), (i,))),
        "down_proj": ("mlp.down_proj.weight", True, ((i,), (h,))),
        "q_bias": ("self_attn.q_proj.bias", False, ((n, d),)),
        "k_bias": ("self_attn.k_proj.bias", False, ((k, d),)),
        "v_bias": ("self_attn.v_proj.bias", False, ((k, d),)),
        "q_norm": ("self_attn.q_norm.weight", False, (q_norm,)),
        "k_norm": ("self_attn.k_norm.weight", False, (k_norm,)),
    }
    sources = {
        ("embed",): _Source("model.embed_tokens.weight", False, ((v,), (h,)), False),
        ("final_norm",): _Source("model.norm.weight", False, ((h,),), False),
    }
    if not config.tie_word_embeddings:
        sources[("unembed",)] = _Source("lm_head.weight", True, ((h,), (v,)), False)
    for name in layer_param_specs(config):  # the Decoder decides which per-layer params exist
        hf_name, transpose, groups = per_layer[name]
        sources[("layers", name)] = _Source(layer + hf_name, transpose, groups, True)
    return sources


# ----------------------------------------------------------------------------------------------------------- import


def load_hf_checkpoint(hf_dir: str | os.PathLike[str], *, dtype: Any = None, shardings: Any = None,
                       overrides: Mapping[str, Any] | None = None) -> Decoder:
    """Load an HF Llama 3.x / Qwen 2 / OLMo 2 / Gemma 2 / Gemma 3 (text) directory (config.json + safetensors) into
    a Decoder; a Gemma3ForConditionalGeneration directory (Gemma 3 4B+) gives its text decoder.

    dtype: parameter and compute dtype ("float32" default, or "bfloat16"). shardings: optional pytree of
    NamedSharding matching `nnx.state(abstract Decoder)` (default: one device). overrides: other ModelConfig
    fields (e.g. remat, compute_dtype). Each tensor is read slice by slice straight into its target sharding.
    Raises CheckpointError naming the file/tensor for an unsupported architecture, a missing shard file, a missing,
    unexpected or wrong-shaped tensor, and for parameters holding NaN or inf.
    """
    hf_dir = os.fspath(hf_dir)
    config = load_hf_config(os.path.join(hf_dir, "config.json"), **dtype_fields(dtype, overrides))
    return load_module(hf_dir, config, lambda: Decoder(config, rngs=nnx.Rngs(0)), _sources(config), shardings)


def dtype_fields(dtype: Any, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """ModelConfig fields for a load: param and compute dtype from `dtype`, then `overrides`."""
    fields: dict[str, Any] = {}
    if dtype is not None:
        name = jnp.dtype(dtype).name
        fields.update(param_dtype=name, compute_dtype=name)
    fields.update(overrides or {})
    return fields


def load_module(hf_dir: str, config: ModelConfig, factory: Any, sources: dict[tuple[str, ...], _Source],
                shardings: Any) -> Any:
    """Build `factory()` (an nnx Module) with every parameter read from the HF tensors `sources` names (state path
    -> source), after checking that exactly those tensors exist with the right shapes (`config` for the checks)."""
    abstract = nnx.eval_shape(factory)
    graphdef, abstract_state = nnx.split(abstract)
    target_shardings = _flat_shardings(shardings) if shardings is not None else None

    with contextlib.ExitStack() as stack:
        tensors = _open_checkpoint(hf_dir, stack)
        _validate(config, sources, tensors)

        def load(path: tuple[Any, ...], leaf: jax.ShapeDtypeStruct) -> jax.Array:
            key = _path_names(path)
            if target_shardings is None:
                sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            elif key in target_shardings:
                sharding = target_shardings[key]
            else:
                raise ValueError(f"shardings has no entry for parameter {'/'.join(key)}")
            return _load_param(sources[key], tensors, leaf, sharding)

        state = jax.tree_util.tree_map_with_path(load, abstract_state)
    model = nnx.merge(graphdef, state)
    refuse_nonfinite(model, f"{hf_dir} (loaded)")
    return model


def refuse_nonfinite(model: nnx.Module, what: str) -> None:
    """CheckpointError naming the parameters of `model` that hold NaN or inf (a diverged or damaged model)."""
    bad = nonfinite_leaves(nnx.state(model, nnx.Param))
    if bad:
        raise CheckpointError(
            f"{what}: {len(bad)} parameter arrays hold NaN or inf (e.g. {bad[0]}); the model diverged or its files "
            "are damaged"
        )


def load_model(hf_dir: str | os.PathLike[str], *, dtype: Any = None, shardings: Any = None) -> Decoder:
    """The public entry point: a Decoder from an HF directory; call it as `model(input_ids, attention_mask=None)`
    with int32 [B, T] arrays to get float32 logits [B, T, vocab]. See `load_hf_checkpoint`."""
    return load_hf_checkpoint(hf_dir, dtype=dtype, shardings=shardings)


class _Tensors:
    """Tensor name -> (file, open safetensors handle); `stored` maps a name to its name in the file when they
    differ (a nested text decoder)."""

    def __init__(self) -> None:
        self.where: dict[str, tuple[str, Any]] = {}
        self.stored: dict[str, str] = {}

    def get_slice(self, name: str) -> Any:
        return self.where[name][1].get_slice(self.stored.get(name, name))

    def unnest_text_decoder(self) -> None:
        """Keep only a nested text decoder's tensors (Gemma3ForConditionalGeneration), renamed to `model.*`."""
        if "model.embed_tokens.weight" in self.where:
            return
        for prefix in _NESTED_TEXT_PREFIXES:
            if prefix + "embed_tokens.weight" in self.where:
                names = {"model." + n[len(prefix):]: n for n in self.where if n.startswith(prefix)}
                self.where = {name: self.where[stored] for name, stored in names.items()}
                self.stored = names
                return


def _open_checkpoint(hf_dir: str, stack: contextlib.ExitStack) -> _Tensors:
    index_path, single_path = os.path.join(hf_dir, INDEX_FILE), os.path.join(hf_dir, SINGLE_FILE)
    if os.path.exists(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: not a safetensors index with a 'weight_map' ({e!r})") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.exists(os.path.join(hf_dir, f))]
        if missing:
            raise CheckpointError(f"{index_path}: shard file(s) {missing} listed in the index are missing")
    elif os.path.exists(single_path):
        weight_map, files = None, [SINGLE_FILE]
    else:
        raise CheckpointError(f"{hf_dir}: neither {SINGLE_FILE} nor {INDEX_FILE} found")

    tensors = _Tensors()
    for file in files:
        path = os.path.join(hf_dir, file)
        try:
            handle = stack.enter_context(safe_open(path, framework="numpy"))
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{path}: cannot open as safetensors ({e})") from None
        for name in handle.keys():
            if weight_map is not None and weight_map.get(name) != file:
                continue  # the index is authoritative about which file holds a tensor
            tensors.where[name] = (path, handle)
    if weight_map is not None:
        absent = sorted(n for n in weight_map if n not in tensors.where)
        if absent:
            file = os.path.join(hf_dir, weight_map[absent[0]])
            raise CheckpointError(f"{file}: tensor {absent[0]!r} listed in {INDEX_FILE} is not in the file")
    tensors.unnest_text_decoder()
    return tensors


def _validate(config: ModelConfig, sources: dict[tuple[str, ...], _Source], tensors: _Tensors) -> None:
    """Every needed tensor present with the right shape, and no unexpected tensor, before loading anything."""
    expected: set[str] = set()
    for source in sources.values():
        for layer in range(config.num_layers) if source.stacked else [None]:
            name = source.tensor_name(layer)
            expected.add(name)
            if name not in tensors.where:
                files = sorted({f for f, _ in tensors.where.values()})
                raise CheckpointError(f"missing tensor {name!r} (searched {files})")
            shape = tuple(tensors.get_slice(name).get_shape())
            if shape != source.hf_shape():
                raise CheckpointError(
                    f"{tensors.where[name][0]}: tensor {name!r} has shape {list(shape)}, expected "
                    f"{list(source.hf_shape())} for {config.architecture} per config.json"
                )
    ignorable = {"lm_head.weight"} if config.tie_word_embeddings else set()
    unexpected = sorted(n for n in tensors.where
                        if n not in expected and n not in ignorable and not n.endswith(_IGNORED_SUFFIXES))
    if unexpected:
        raise CheckpointError(
            f"{tensors.where[unexpected[0]][0]}: unexpected tensor(s) {unexpected[:5]} for {config.architecture} "
            f"(is config.json the right one for these weights?)"
        )


def _load_param(source: _Source, tensors: _Tensors, leaf: jax.ShapeDtypeStruct,
                sharding: jax.sharding.Sharding) -> jax.Array:
    """Build one Decoder parameter in its sharding, each device shard read from only the HF slices it needs."""
    dtype = np.dtype(leaf.dtype)
    blocks: dict[tuple[tuple[int, int], ...], np.ndarray] = {}  # replicated shards read once

    def callback(index: tuple[slice, ...]) -> np.ndarray:
        bounds = tuple(s.indices(n)[:2] for s, n in zip(index, leaf.shape))
        if bounds not in blocks:
            if source.stacked:
                per_layer = [_read(tensors.get_slice(source.tensor_name(layer)), source, bounds[1:])
                             for layer in range(*bounds[0])]
                blocks[bounds] = np.stack(per_layer).astype(dtype)
            else:
                blocks[bounds] = _read(tensors.get_slice(source.hf_name), source, bounds).astype(dtype)
        return blocks[bounds]

    return jax.make_array_from_callback(leaf.shape, sharding, callback)


def _read(hf_slice: Any, source: _Source, bounds: tuple[tuple[int, int], ...]) -> np.ndarray:
    """Read the Decoder-layout block `bounds` ((start, stop) per Decoder axis) of one HF tensor.

    For an HF axis split into Decoder axes (a, b, ...), read the contiguous HF range covering the requested range
    of `a` with all of (b, ...), then cut the requested (b, ...) ranges after reshaping.
    """
    hf_ranges, shape, cut = [], [], []
    axis = 0
    for group in source.groups:
        (start, stop), rest = bounds[axis], bounds[axis + 1: axis + len(group)]
        inner = math.prod(group[1:])
        hf_ranges.append(slice(start * inner, stop * inner))
        shape += [stop - start, *group[1:]]
        cut += [slice(None), *(slice(a, b) for a, b in rest)]
        axis += len(group)
    if source.transpose:
        block = np.asarray(hf_slice[tuple(hf_ranges[::-1])]).T
    else:
        block = np.asarray(hf_slice[tuple(hf_ranges)])
    return block.reshape(shape)[tuple(cut)]


def _path_names(path: tuple[Any, ...]) -> tuple[str, ...]:
    """A pytree key path as names, without the trailing `.value` of an nnx Variable."""
    names = path_names(path)
    return names[:-1] if names and names[-1] == "value" else names


def _flat_shardings(shardings: Any) -> dict[tuple[str, ...], jax.sharding.Sharding]:
    leaves = jax.tree_util.tree_flatten_with_path(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    return {_path_names(path): leaf for path, leaf in leaves[0]}


# ----------------------------------------------------------------------------------------------------------- export


def save_hf_checkpoint(model: Decoder, out_dir: str | os.PathLike[str], *,
                       max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, dtype: Any = None) -> None:
    """Write `model` as an HF checkpoint that `transformers.AutoModelForCausalLM.from_pretrained` loads.

    Writes config.json, generation_config.json (when token ids are known) and safetensors: one model.safetensors,
    or model-0000k-of-0000n.safetensors shards of at most `max_shard_bytes` plus model.safetensors.index.json.
    dtype: tensor dtype in the files (default: the model's param dtype). A model holding NaN or inf is refused
    (CheckpointError) before anything is written. Sharded arrays are gathered one HF tensor
    at a time; every process must call this, process 0 writes.
    """
    out_dir = os.fspath(out_dir)
    refuse_nonfinite(model, f"export to {out_dir}")
    config = model.config
    out_dtype = np.dtype(jnp.dtype(dtype if dtype is not None else config.param_dtype))
    params = {path: var[...] for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}

    plan: list[tuple[str, _Source, tuple[str, ...], int | None]] = []
    for path, source in _sources(config).items():
        for layer in range(config.num_layers) if source.stacked else [None]:
            plan.append((source.tensor_name(layer), source, path, layer))
    nbytes = {name: math.prod(source.hf_shape()) * out_dtype.itemsize for name, source, _, _ in plan}
    files = _assign_files([name for name, _, _, _ in plan], nbytes, max_shard_bytes)

    writer = jax.process_index() == 0
    if writer:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config.to_hf_config(dtype=out_dtype.name), f, indent=2)
        generation = {k: v for k, v in (("bos_token_id", config.bos_token_id),
                                         ("eos_token_id", config.to_hf_config()["eos_token_id"]),
                                         ("pad_token_id", config.pad_token_id)) if v is not None}
        if generation:
            with open(os.path.join(out_dir, "generation_config.json"), "w", encoding="utf-8") as f:
                json.dump(generation, f, indent=2)

    pending: dict[str, np.ndarray] = {}
    for position, (name, source, path, layer) in enumerate(plan):
        value = params[path] if layer is None else params[path][layer]
        pending[name] = _to_hf_layout(_to_host(value), source).astype(out_dtype)
        last_of_file = position + 1 == len(plan) or files[plan[position + 1][0]] != files[name]
        if last_of_file:
            if writer:
                save_file(pending, os.path.join(out_dir, files[name]), metadata={"format": "pt"})
            pending = {}
    if writer and len(set(files.values())) > 1:
        index = {"metadata": {"total_size": sum(nbytes.values())}, "weight_map": files}
        with open(os.path.join(out_dir, INDEX_FILE), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
    if jax.process_count() > 1:  # nobody reads the directory before process 0 has finished writing it
        multihost_utils.sync_global_devices("tulu_jax.save_hf_checkpoint")


def _assign_files(names: list[str], nbytes: dict[str, int], max_shard_bytes: int) -> dict[str, str]:
    """Tensor name -> file name, filling shards in order up to max_shard_bytes (a bigger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        if shards[-1] and size + nbytes[name] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes[name]
    if len(shards) == 1:
        return {name: SINGLE_FILE for name in names}
    total = len(shards)
    return {name: f"model-{k + 1:05d}-of-{total:05d}.safetensors" for k, shard in enumerate(shards) for name in shard}


def _to_host(x: jax.Array) -> np.ndarray:
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _to_hf_layout(value: np.ndarray, source: _Source) -> np.ndarray:
    """Decoder layout (one layer) -> HF layout: merge each axis group, transpose back to torch's [out, in]."""
    merged = value.reshape(tuple(math.prod(g) for g in source.groups))
    return np.ascontiguousarray(merged.T if source.transpose else merged)
