"""What every training stage (SFT, DPO, RLVR) shares: config sections and the pieces of the stage runner.

A stage (see `tulu_jax.stages.sft.run_sft`) is written with these pieces, in this order:

1. config:    `load_stage_config(StageConfig, path, overrides)`; sections `ModelSection`, `TokenizerSection`,
              `DataSection`, `OptimSection`, `TrainSection`, `OutputSection` (a stage may subclass one to add
              fields). Every bad key or value is a ConfigError naming the key and the file, before anything runs.
2. mesh:      `setup_mesh(sharding_path)` → (ShardingSpec, Mesh) (also starts jax.distributed when multi-process).
3. tokenizer: `load_stage_tokenizer(cfg.tokenizer, cfg.model)`.
4. model:     `resolve_model_config(cfg.model, tokenizer)` (HF dir or preset + overrides; never loads weights).
5. schedule:  `resolve_grad_accum(cfg.train, mesh, spec)`, `num_train_steps(num_batches, cfg.train)`,
              `make_stage_optimizer(cfg.optim, num_steps)`.
6. state:     `init_stage_state(cfg.model, model_config, optimizer, mesh, spec, seed)` (sharded init from scratch
              or streamed HF import; never built whole on one host); `abstract_stage_state(...)` for AOT.
7. step:      `tulu_jax.train.build_train_step(state.graphdef, loss_fn, optimizer, state_shardings=...,
              batch_shardings=batch_sharding(mesh, spec), ...)`.
8. batches:   host batches (this process's rows) → global jax.Arrays with `GlobalBatcher`.
9. loop:      `train_and_export(...)`: run dir + resolved config, checkpoints (resume, SIGTERM), metrics JSONL
              with tokens/s, progress bar, then the final HF export with the tokenizer.

Paths in configs are relative to the working directory; a path starting with `tulu_jax/` that does not exist
there is looked up inside the installed package, so bundled assets (`tulu_jax/assets/...`) work from anywhere.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import os
import pathlib
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from tulu_jax.config import dump_config, load_config
from tulu_jax.data.rows import Source
from tulu_jax.errors import ConfigError
from tulu_jax.models.config import ModelConfig, load_hf_config
from tulu_jax.models.decoder import Decoder
from tulu_jax.models.presets import preset_config
from tulu_jax.sharding import (
    ShardingSpec,
    batch_sharding,
    initialize_distributed,
    load_sharding,
    logical_to_spec,
    make_mesh,
    state_shardings,
)
from tulu_jax.stages.paths import resolve_path
from tulu_jax.train import (
    Checkpointer,
    MetricsWriter,
    Optimizer,
    TrainState,
    abstract_train_state,
    create_train_state,
    init_train_state,
    make_optimizer,
    run_training,
    train_state_shardings,
)

T = TypeVar("T")
PyTree = Any
DType = Literal["float32", "bfloat16"]

__all__ = [
    "ModelSection",
    "TokenizerSection",
    "SourceSection",
    "DataSection",
    "OptimSection",
    "TrainSection",
    "OutputSection",
    "resolve_path",
    "model_config_dict",
    "load_stage_config",
    "check_run_dir",
    "setup_mesh",
    "batch_shards",
    "resolve_grad_accum",
    "micro_batches_text",
    "num_train_steps",
    "resolve_model_config",
    "load_stage_tokenizer",
    "make_stage_optimizer",
    "variable_shardings",
    "init_stage_state",
    "abstract_stage_state",
    "GlobalBatcher",
    "abstract_batch",
    "ThroughputWriter",
    "prepare_run_dir",
    "export_hf",
    "train_and_export",
]


# --------------------------------------------------------------------------------------------------- config


def _positive(value: float | int, key: str) -> None:
    if value <= 0:
        raise ValueError(f"'{key}' must be > 0, got {value}")


@dataclasses.dataclass
class ModelSection:
    """The model: a Hugging Face directory to fine-tune, or a shape preset to initialize from scratch.

    path: HF directory (config.json + safetensors) whose weights are loaded. preset: a name from
    `tulu_jax.models.presets.PRESETS` (llama3.1-8b, llama3.1-70b, llama3.1-405b, qwen2.5-7b, olmo2-7b, tiny).
    With both, training needs `path` to exist and `compile-check` falls back to the preset's shapes when it does
    not (so a recipe config can hold a placeholder path). overrides: other ModelConfig fields (e.g. num_layers,
    vocab_size, rope_theta). param_dtype: master weights (and optimizer moments); compute_dtype: the forward and
    backward (float32 masters with bfloat16 compute is the recipe's "bf16"); remat: activation recomputation.
    """

    path: str | None = None
    preset: str | None = None
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    param_dtype: DType = "float32"
    compute_dtype: DType = "float32"
    remat: Literal["none", "layer", "dots"] = "none"

    def __post_init__(self) -> None:
        if self.path is None and self.preset is None:
            raise ValueError("'model' needs 'path' (an HF directory) or 'preset' (e.g. tiny, llama3.1-8b)")
        managed = {"param_dtype", "compute_dtype", "remat"} & set(self.overrides)
        if managed:
            raise ValueError(f"set {sorted(managed)} as 'model.<key>', not in 'model.overrides'")


@dataclasses.dataclass
class TokenizerSection:
    """The tokenizer: a local HF tokenizer directory (default: model.path), or `qwen2.5` for the offline-built
    Qwen 2.5 tokenizer. chat_template: tulu | native (the tokenizer's own) | qwen2.5 | a path to a Jinja file |
    inline Jinja. add_bos: the template starts with the BOS token (the recipe's OLMo 2 models were trained so).
    The run trains with, and exports, exactly that template (`load_stage_tokenizer`)."""

    path: str | None = None
    chat_template: str = "tulu"
    add_bos: bool = False

    def __post_init__(self) -> None:
        from tulu_jax.data.templates import NAMED_TEMPLATES, is_inline_jinja

        spec = self.chat_template
        if spec not in NAMED_TEMPLATES and not is_inline_jinja(spec) and not resolve_path(spec).is_file():
            raise ValueError(
                f"'tokenizer.chat_template' must be one of {list(NAMED_TEMPLATES)}, a path to a Jinja file or inline "
                f"Jinja; no file {spec!r}"
            )


@dataclasses.dataclass
class SourceSection:
    """One data source: a JSONL/Parquet file or folder, or a saved `datasets` directory. weight: the fraction of
    its rows to take (above 1 repeats rows); rows: an exact count instead; neither: every row once."""

    path: str
    weight: float | None = None
    rows: int | None = None
    split: str = "train"

    def __post_init__(self) -> None:
        try:  # tulu_jax.data.rows.Source holds the rules; the config loader reports a ValueError with its key
            self.to_source()
        except ConfigError as e:
            raise ValueError(str(e)) from None

    def to_source(self) -> Source:
        """The mixture source this section describes (path resolved like every config path)."""
        return Source(str(resolve_path(self.path)), weight=self.weight, rows=self.rows, split=self.split)


@dataclasses.dataclass
class DataSection:
    """Training data: the mixture, the sequence length and batching, what to do with bad rows, the shuffle seed.

    max_seq_len: rows are truncated to it (and counted). packing: padding-free packing of several rows per
    sequence (Tülu 3 did not pack; the loss and gradients are the same). on_error: `raise` stops at the first
    malformed row (file/row/field named), `skip` skips and counts them (a summary line per source: counts per field,
    first row numbers) and stops only when more than max_bad_fraction of a source's rows (or of the tokenized rows)
    are malformed. seed: the mixture draw and the shuffle.
    """

    sources: list[SourceSection] = dataclasses.field(default_factory=list)
    max_seq_len: int = 4096
    packing: bool = False
    on_error: Literal["raise", "skip"] = "raise"
    max_bad_fraction: float = 0.01
    seed: int = 0
    shuffle: bool = True

    def __post_init__(self) -> None:
        _positive(self.max_seq_len, "data.max_seq_len")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"'data.max_bad_fraction' must be in [0, 1], got {self.max_bad_fraction}")


@dataclasses.dataclass
class OptimSection:
    """AdamW (torch semantics) after global-norm clipping, with a warmup + decay schedule (docs/recipe.md, SFT)."""

    lr: float = 5e-6
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    clip: float | None = 1.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: Literal["linear", "cosine", "constant"] = "linear"

    def __post_init__(self) -> None:
        if self.lr < 0:
            raise ValueError(f"'optim.lr' must be >= 0, got {self.lr}")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ValueError(f"'optim.warmup_ratio' must be in [0, 1], got {self.warmup_ratio}")
        if self.weight_decay < 0:
            raise ValueError(f"'optim.weight_decay' must be >= 0, got {self.weight_decay}")
        if self.clip is not None:
            _positive(self.clip, "optim.clip")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"'optim.betas' must be in [0, 1), got {list(self.betas)}")


@dataclasses.dataclass
class TrainSection:
    """Steps and batch: global_batch_size sequences per optimizer step, split into grad_accum_steps
    micro-batches; or give per_device_batch_size (sequences per batch-parallel device per micro-batch) and the
    accumulation follows from the mesh. epochs over the data; max_steps caps the run. seed: model init + rng.
    max_nonfinite_steps: the run stops after this many consecutive steps skipped for a NaN/inf loss or gradient."""

    global_batch_size: int = 128
    grad_accum_steps: int | None = None
    per_device_batch_size: int | None = None
    epochs: int = 2
    max_steps: int | None = None
    seed: int = 0
    max_nonfinite_steps: int = 3

    def __post_init__(self) -> None:
        _positive(self.global_batch_size, "train.global_batch_size")
        _positive(self.epochs, "train.epochs")
        _positive(self.max_nonfinite_steps, "train.max_nonfinite_steps")
        for key in ("grad_accum_steps", "per_device_batch_size", "max_steps"):
            if getattr(self, key) is not None:
                _positive(getattr(self, key), f"train.{key}")
        if self.grad_accum_steps is not None and self.per_device_batch_size is not None:
            raise ValueError("give 'train.grad_accum_steps' or 'train.per_device_batch_size', not both")


@dataclasses.dataclass
class OutputSection:
    """Where the run goes: run_dir holds config.yaml, checkpoints/, metrics.jsonl and the final hf/ export.

    save_every: checkpoint every this many steps (null: only at the end and on SIGTERM); keep_last: checkpoints
    kept; log_every: steps between metric fetches (every step is still written); export_hf: write run_dir/hf
    (model + tokenizer) at the end, in export_dtype (default: model.param_dtype). strict_resume (`--strict-resume`):
    a corrupt newest checkpoint stops the run instead of falling back to the newest intact one.
    """

    run_dir: str = "runs/sft"
    save_every: int | None = 500
    keep_last: int = 2
    log_every: int = 10
    export_hf: bool = True
    export_dtype: DType | None = None
    progress: bool = True
    tensorboard: bool = True  # also log scalars to run_dir/tensorboard when tensorboardX (or torch's) is installed
    resume: bool = False  # continue run_dir's checkpoint (`--resume`); tulu_jax.stages.resume has the rules
    allow_config_change: bool = False  # with resume: accept (and record) a changed config (`--allow-config-change`)
    strict_resume: bool = False  # a corrupt newest checkpoint stops the run (`--strict-resume`)

    def __post_init__(self) -> None:
        for key in ("keep_last", "log_every"):
            _positive(getattr(self, key), f"output.{key}")
        if self.save_every is not None:
            _positive(self.save_every, "output.save_every")


def load_stage_config(cls: type[T], path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> T:
    """Load a stage config file (resolved like any config path) with `--set key=value` overrides.

    Every unknown key and bad value raises ConfigError naming the key and the file (or `--set`).
    """
    resolved = resolve_path(path)
    if not resolved.is_file():
        raise ConfigError(f"{path}: config file not found")
    return load_config(cls, resolved, overrides)


# --------------------------------------------------------------------------------------------------- mesh


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


# --------------------------------------------------------------------------------------------------- model


def resolve_model_config(
    section: ModelSection, tokenizer: Any | None = None, *, allow_preset_fallback: bool = False
) -> ModelConfig:
    """The ModelConfig of a run, from `model.path`'s config.json or `model.preset`, plus overrides and dtypes.

    Nothing is loaded but config.json. A from-scratch (preset) model takes its eos/pad/bos ids from `tokenizer`
    when one is given, and the tokenizer must fit in the vocabulary. `allow_preset_fallback` (compile-check):
    a missing `path` falls back to the preset's shapes.
    """
    fields = dict(section.overrides, param_dtype=section.param_dtype, compute_dtype=section.compute_dtype,
                  remat=section.remat)
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


def make_stage_optimizer(optim: OptimSection, total_steps: int) -> Optimizer:
    """The AdamW optimizer and schedule of `optim` over `total_steps` updates."""
    return make_optimizer(
        optim.lr,
        warmup_ratio=optim.warmup_ratio,
        total_steps=total_steps,
        weight_decay=optim.weight_decay,
        b1=optim.betas[0],
        b2=optim.betas[1],
        eps=optim.eps,
        clip_norm=optim.clip,
        schedule=optim.schedule,
    )


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
                  remat=config.remat)
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


# --------------------------------------------------------------------------------------------------- batches


class GlobalBatcher:
    """Host batches (this process's rows, NumPy [B / processes, T]) → global jax.Arrays [B, T] on the mesh.

    Uses `jax.make_array_from_process_local_data`, so each process contributes only its own rows; in a
    single-process run the host batch is the whole global batch.
    """

    def __init__(self, mesh: Mesh, spec: ShardingSpec, global_batch_size: int):
        self.sharding: NamedSharding = batch_sharding(mesh, spec)
        self.global_batch_size = global_batch_size

    def __call__(self, host_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """Assemble one global batch (every leaf [local_rows, ...] → [global_batch_size, ...])."""
        return {
            key: jax.make_array_from_process_local_data(
                self.sharding, value, (self.global_batch_size, *value.shape[1:])
            )
            for key, value in host_batch.items()
        }


def abstract_batch(
    dtypes: Mapping[str, Any], global_batch_size: int, seq_len: int, sharding: NamedSharding
) -> dict[str, jax.ShapeDtypeStruct]:
    """Sharded ShapeDtypeStructs [global_batch_size, seq_len] for a batch with the given key → dtype."""
    shape = (global_batch_size, seq_len)
    return {key: jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=sharding) for key, dtype in dtypes.items()}


# --------------------------------------------------------------------------------------------------- loop


class ThroughputWriter:
    """A MetricsWriter front that adds `step_time_s`, `tokens_per_s` and (for token-level losses, whose rows carry
    `nll_sum` and `supervised_tokens`) `loss_per_token` to every step's row.

    The loop fetches metrics in windows (every `log_every` steps, before a checkpoint, at the end), so the
    wall time of a window is only known when it is fetched: every step of a window gets the window's mean step
    time, and `tokens_per_s` = the step's `tokens` metric (non-padding tokens of the global batch) / that time.
    The first window includes compilation. Wire it as `run_training(..., metrics_writer=w, on_step=w.on_step)`.
    """

    def __init__(self, writer: MetricsWriter | None):
        self._writer = writer
        self._dispatched = 0
        self._window_end = -1
        self._clock = time.perf_counter()
        self._step_time = float("nan")

    def on_step(self, step: int, state: TrainState, metrics: Mapping[str, jax.Array]) -> None:
        """Record that `step` was dispatched (run_training's on_step hook)."""
        self._dispatched = step

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Write one step's row; the first row of a new window measures the window."""
        if step > self._window_end:
            now = time.perf_counter()
            self._window_end = max(self._dispatched, step)
            self._step_time = (now - self._clock) / (self._window_end - step + 1)
            self._clock = now
        if self._writer is None:
            return
        row = dict(jax.device_get(dict(metrics)))
        row["step_time_s"] = self._step_time
        if "nll_sum" in row and "supervised_tokens" in row:  # comparable across batch shapes, unlike a sum loss
            row["loss_per_token"] = float(row["nll_sum"]) / max(float(row["supervised_tokens"]), 1.0)
        if "tokens" in row:
            row["tokens_per_s"] = float(row["tokens"]) / max(self._step_time, 1e-12)
        self._writer.write(step, row)

    def close(self) -> None:
        """Close the underlying writer."""
        if self._writer is not None:
            self._writer.close()


def prepare_run_dir(output: OutputSection, config: Any, extra: Mapping[str, Any] | None = None) -> pathlib.Path:
    """Create run_dir and save the resolved config there as config.yaml (plus JSON files from `extra`)."""
    import yaml

    run_dir = pathlib.Path(output.run_dir)
    if jax.process_index() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(dump_config(config), sort_keys=False))
        for name, value in (extra or {}).items():
            (run_dir / name).write_text(json.dumps(value, indent=2))
    return run_dir


def model_config_dict(config: ModelConfig) -> dict[str, Any]:
    """A ModelConfig as JSON-able data (the run's model_config.json), readable by `ModelConfig(**d)`."""
    data = dataclasses.asdict(config)
    if data["rope_scaling"] is not None:
        data["rope_scaling"] = dict(data["rope_scaling"])
    if isinstance(data["eos_token_id"], tuple):
        data["eos_token_id"] = list(data["eos_token_id"])
    return data


def export_hf(state: TrainState, out_dir: str | os.PathLike[str], tokenizer: Any | None, dtype: str | None) -> None:
    """Write the state's model as an HF checkpoint (every process calls; process 0 writes) plus the tokenizer."""
    from tulu_jax.models.hf_io import save_hf_checkpoint

    save_hf_checkpoint(state.model(), out_dir, dtype=dtype)
    if tokenizer is not None and jax.process_index() == 0:
        tokenizer.save_pretrained(str(out_dir))


def train_and_export(
    *,
    state: TrainState,
    train_step: Callable[[TrainState, PyTree], tuple[TrainState, dict[str, jax.Array]]],
    batches: Any,
    num_steps: int,
    output: OutputSection,
    config: Any,
    model_config: ModelConfig,
    prepare_batch: Callable[[PyTree], PyTree],
    tokenizer: Any | None,
    stage: str,
    run_files: Mapping[str, Any] | None = None,
) -> TrainState:
    """The stage loop: the run dir (config.yaml, model_config.json, tokenizer/), checkpoints (resume, periodic,
    final, SIGTERM), metrics.jsonl, progress, then (output.export_hf) the final model and tokenizer in run_dir/hf.
    Returns the final state.

    `batches` is a stateful host-batch iterator (`get_state`/`set_state`); `prepare_batch` turns a host batch
    into global arrays (a GlobalBatcher). The stage has called `check_run_dir` first: a run_dir that holds a
    checkpoint is continued only with output.resume (tulu_jax.stages.resume).
    `run_files`: more JSON files for the run dir, name → data (e.g. the data report).
    """
    model_dict = model_config_dict(model_config)
    run_dir = prepare_run_dir(output, config, {"model_config.json": model_dict, **dict(run_files or {})})
    if tokenizer is not None and jax.process_index() == 0:  # `tulu-jax convert to-hf` copies it next to the weights
        tokenizer.save_pretrained(str(run_dir / "tokenizer"))
    checkpointer = Checkpointer(run_dir / "checkpoints", max_to_keep=output.keep_last)
    writer = ThroughputWriter(MetricsWriter(run_dir / "metrics.jsonl",
                                            run_dir / "tensorboard" if output.tensorboard else None))
    metadata = {"stage": stage, "config": dump_config(config), "model_config": model_dict}
    try:
        state = run_training(
            state,
            train_step,
            batches,
            num_steps=num_steps,
            checkpointer=checkpointer,
            save_every=output.save_every,
            metrics_writer=writer,  # type: ignore[arg-type]  (same write/close interface)
            on_step=writer.on_step,
            log_every=output.log_every,
            metadata=metadata,
            prepare_batch=prepare_batch,
            progress=output.progress,
            max_nonfinite_steps=config.train.max_nonfinite_steps,
            strict_resume=output.strict_resume,
        )
    finally:
        writer.close()
        checkpointer.close()
    if output.export_hf:
        export_hf(state, run_dir / "hf", tokenizer, output.export_dtype or model_config.param_dtype)
        print(f"tulu-jax: exported the trained model to {run_dir / 'hf'}", file=sys.stderr)
    return state
