"""The config sections every training stage shares (a stage may subclass one to add fields), and the loader.

Sections: `ModelSection`, `TokenizerSection`, `SourceSection`/`DataSection`, `OptimSection` (`.build(total_steps)`
gives the optimizer), `TrainSection`, `OutputSection`. Every bad key or value is a ConfigError naming the key and
the file, before anything runs (`load_stage_config`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any, Literal, TypeVar

from tulu_jax.config import load_config
from tulu_jax.data.rows import Source
from tulu_jax.errors import ConfigError
from tulu_jax.stages.paths import resolve_path
from tulu_jax.train.optim import Optimizer, make_optimizer

T = TypeVar("T")
DType = Literal["float32", "bfloat16"]


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
    attention: the training forward's attention, auto (splash kernel on TPU, cuDNN on GPU, einsum on CPU) | einsum |
    splash | cudnn (`tulu_jax.models.fused_attention`).
    """

    path: str | None = None
    preset: str | None = None
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    param_dtype: DType = "float32"
    compute_dtype: DType = "float32"
    remat: Literal["none", "layer", "dots"] = "none"
    attention: Literal["auto", "einsum", "splash", "cudnn"] = "auto"

    def __post_init__(self) -> None:
        if self.path is None and self.preset is None:
            raise ValueError("'model' needs 'path' (an HF directory) or 'preset' (e.g. tiny, llama3.1-8b)")
        managed = {"param_dtype", "compute_dtype", "remat", "attention"} & set(self.overrides)
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

    def build(self, total_steps: int) -> Optimizer:
        """The AdamW optimizer and schedule of this section over `total_steps` updates."""
        return make_optimizer(
            self.lr, warmup_ratio=self.warmup_ratio, total_steps=total_steps, weight_decay=self.weight_decay,
            b1=self.betas[0], b2=self.betas[1], eps=self.eps, clip_norm=self.clip, schedule=self.schedule,
        )


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
