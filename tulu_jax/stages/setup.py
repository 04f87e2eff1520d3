"""What a training stage builds before its first step: mesh, tokenizer, model config, gradient accumulation, number
of steps, and the sharded train state (from scratch, from HF weights, or abstract for AOT compilation).

Nothing here reads training data; the model is never built whole on one host.
"""

from __future__ import annotations

import copy
import functools
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from tulu_jax.config import dump_config
from tulu_jax.errors import ConfigError
from tulu_jax.models.config import ModelConfig, load_hf_config
from tulu_jax.models.decoder import Decoder
from tulu_jax.models.presets import preset_config
from tulu_jax.sharding import (
    ShardingSpec,
    initialize_distributed,
    load_sharding,
    logical_to_spec,
    make_mesh,
    state_shardings,
)
from tulu_jax.stages.paths import resolve_path
from tulu_jax.stages.sections import ModelSection, TokenizerSection, TrainSection
from tulu_jax.train import (
    Optimizer,
    TrainState,
    abstract_train_state,
    create_train_state,
    init_train_state,
    train_state_shardings,
)

PyTree = Any


def check_run_dir(config: Any) -> None:
    """Before a stage prepares anything: may it write to config.output.run_dir (tulu_jax.stages.resume)? Call after
    setup_mesh (which may start jax.distributed); process 0 records an allowed config change."""
    from tulu_jax.stages.resume import check_stage_resume

    check_stage_resume(config.output, dump_config(config), write=jax.process_index() == 0)


def setup_mesh(
    sharding_path: str | os.PathLike[str], devices: Sequence[Any] | None = None
) -> tuple[ShardingSpec, Mesh]:
    """Start jax.distributed if this is a multi-process run, then load the sharding file and build its mesh."""
    resolved = resolve_path(sharding_path)
    if not resolved.is_file():
        raise ConfigError(f"{sharding_path}: sharding file not found")
    spec = load_sharding(resolved)
    initialize_distributed()
    return spec, make_mesh(spec, devices)


def batch_shards(mesh: Mesh, spec: ShardingSpec) -> int:
    """How many ways the batch axis is split (the product of the mesh axes the `batch` rule names)."""
    entry = logical_to_spec(("batch",), spec)[0]
    axes = (entry,) if isinstance(entry, str) else entry or ()
    return math.prod(mesh.shape[a] for a in axes)


def resolve_grad_accum(train: TrainSection, mesh: Mesh, spec: ShardingSpec) -> int:
    """Micro-batches per optimizer step; ConfigError unless every micro-batch splits evenly over the batch shards.

    Micro-batch i takes rows i, i+A, ... (see `tulu_jax.train.step`), which moves no data only when each device's
    rows divide by A: global_batch_size must be a multiple of A × batch shards.
    """
    shards = batch_shards(mesh, spec)
    if train.per_device_batch_size is not None:
        per_step = train.per_device_batch_size * shards
        if train.global_batch_size % per_step:
            raise ConfigError(
                f"train.global_batch_size {train.global_batch_size} is not a multiple of per_device_batch_size "
                f"{train.per_device_batch_size} × {shards} batch shards of {spec.source}"
            )
        accum = train.global_batch_size // per_step
    else:
        accum = train.grad_accum_steps or 1
    if train.global_batch_size % (accum * shards):
        raise ConfigError(
            f"train.global_batch_size {train.global_batch_size} must be a multiple of grad_accum_steps {accum} × "
            f"{shards} batch shards of {spec.source} ({accum * shards})"
        )
    return accum


def micro_batches_text(count: int) -> str:
    """"1 micro-batch", "4 micro-batches": for the stages' one-line summaries."""
    return f"{count} micro-batch{'es' if count > 1 else ''}"


def num_train_steps(num_batches: int, train: TrainSection) -> int:
    """Optimizer steps of the run: the batches of all epochs, capped by train.max_steps."""
    return num_batches if train.max_steps is None else min(num_batches, train.max_steps)


def resolve_model_config(
    section: ModelSection, tokenizer: Any | None = None, *, allow_preset_fallback: bool = False
) -> ModelConfig:
    """The ModelConfig of a run, from `model.path`'s config.json or `model.preset`, plus overrides and dtypes.

    Nothing is loaded but config.json. A from-scratch (preset) model takes its eos/pad/bos ids from `tokenizer`
    when one is given, and the tokenizer must fit in the vocabulary. `allow_preset_fallback` (compile-check):
    a missing `path` falls back to the preset's shapes.
    """
    fields = dict(section.overrides, param_dtype=section.param_dtype, compute_dtype=section.compute_dtype,
                  remat=section.remat, attention=section.attention)
    config_json = resolve_path(section.path) / "config.json" if section.path is not None else None
    if config_json is not None and (config_json.is_file() or section.preset is None or not allow_preset_fallback):
        if not config_json.is_file():
            hint = " (set model.preset for a from-scratch model)" if section.preset is None else ""
            raise ConfigError(f"model.path: {section.path} has no config.json{hint}")
        try:
            config = load_hf_config(str(config_json), **fields)
        except TypeError as e:  # an unknown override field
            raise ConfigError(f"model.overrides: {e}") from None
        from_scratch = False
    else:
        config = preset_config(section.preset, fields)
        from_scratch = True
    if tokenizer is not None:
        from tulu_jax.data.tokenizers import check_vocabulary

        check_vocabulary(tokenizer, config.vocab_size)
        if from_scratch:
            config = config.replace(
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id,
            )
    return config


def load_stage_tokenizer(section: TokenizerSection, model: ModelSection) -> Any:
    """The run's tokenizer (tokenizer.path, else model.path; `qwen2.5` builds Qwen 2.5's offline) with its
    `chat_template` set to the run's training template (tokenizer.chat_template and add_bos, resolved): stages
    render conversations with `tokenizer.chat_template`."""
    from tulu_jax.data.templates import NAMED_TEMPLATES, is_inline_jinja, training_chat_template
    from tulu_jax.data.tokenizers import load_tokenizer, qwen25_tokenizer

    path = section.path if section.path is not None else model.path
    if path is None:
        raise ConfigError("tokenizer.path is not set and there is no model.path to take the tokenizer from")
    # qwen25_tokenizer() is shared within the process: this run sets its own template on a copy.
    tokenizer = copy.deepcopy(qwen25_tokenizer()) if path == "qwen2.5" else load_tokenizer(resolve_path(path))
    # The template the run trains with becomes the tokenizer's own, so that the run's tokenizer/ copy and the hf/
    # export prompt the model as training did (as open-instruct saves it).
    spec = section.chat_template
    spec = spec if spec in NAMED_TEMPLATES or is_inline_jinja(spec) else str(resolve_path(spec))
    tokenizer.chat_template = training_chat_template(tokenizer, spec, add_bos=section.add_bos)
    return tokenizer


def variable_shardings(mesh: Mesh, spec: ShardingSpec) -> Callable[[nnx.State], PyTree]:
    """nnx.State → shardings by the spec's logical-axis rules (what `train_state_shardings` expects)."""
    return functools.partial(state_shardings, mesh=mesh, rules=spec)


def _make_decoder(config: ModelConfig) -> Callable[[nnx.Rngs], Decoder]:
    return lambda rngs: Decoder(config, rngs=rngs)


def init_stage_state(
    section: ModelSection, config: ModelConfig, optimizer: Optimizer, mesh: Mesh, spec: ShardingSpec, seed: int
) -> TrainState:
    """A sharded TrainState: the model from `section.path`'s weights (streamed into their shardings) or a fresh
    init of `config` (one jitted init into the shardings); optimizer state sharded like the parameters."""
    shard_fn = variable_shardings(mesh, spec)
    if section.path is None:
        return init_train_state(_make_decoder(config), optimizer, mesh, shard_fn, seed)
    from tulu_jax.models.hf_io import load_hf_checkpoint

    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0)))
    param_shardings = shard_fn(nnx.state(abstract))
    fields = dict(section.overrides, param_dtype=config.param_dtype, compute_dtype=config.compute_dtype,
                  remat=config.remat, attention=config.attention)
    model = load_hf_checkpoint(resolve_path(section.path), shardings=param_shardings, overrides=fields)
    return _state_from_model(model, optimizer, mesh, shard_fn, seed)


def _state_from_model(
    model: nnx.Module, optimizer: Optimizer, mesh: Mesh, shard_fn: Callable[[nnx.State], PyTree], seed: int
) -> TrainState:
    """Wrap a live sharded model in a TrainState whose optimizer state is created directly in its shardings."""
    template = jax.eval_shape(lambda: create_train_state(model, optimizer, seed))
    shardings = train_state_shardings(template, mesh, shard_fn)
    graphdef = template.graphdef

    def build(params: nnx.State, model_state: nnx.State) -> TrainState:
        fresh = create_train_state(nnx.merge(graphdef, params, model_state), optimizer, seed)
        return fresh.replace(params=params, model_state=model_state)

    _, params, model_state = nnx.split(model, nnx.Param, ...)
    with jax.set_mesh(mesh):
        return jax.jit(build, out_shardings=shardings)(params, model_state)


def abstract_stage_state(config: ModelConfig, optimizer: Optimizer, mesh: Mesh, spec: ShardingSpec) -> TrainState:
    """The TrainState as sharded ShapeDtypeStructs on `mesh` (AOT compilation; nothing is allocated)."""
    return abstract_train_state(_make_decoder(config), optimizer, mesh, variable_shardings(mesh, spec))
