"""The distillation stage, `tulu-jax distill` (Gemma style; docs/recipe.md "Distillation").

Modes (`distill.mode`):
- `online`: a frozen teacher on the student's mesh (`frozen["teacher"]`, a jit argument of the step, laid out by the
  same logical rules) scores every batch; dense targets, `soft_cross_entropy` (Gemma 2) unless
  `distill.divergence: generalized_jsd`.
- `offline`: sparse targets written by `tulu-jax distill-targets` (K ids + float16 probabilities per distilled
  token, streamed back with their token rows by grain); `sparse_soft_cross_entropy` (Gemma 3). No teacher in memory.
- `on_policy` (GKD): with probability λ (`distill.lambda_on_policy`, drawn per step from (seed, step)) a batch's
  responses are replaced by the student's own samples (the sampler over the very parameters being trained,
  `tulu_jax.stages.distill_on_policy`); the teacher scores every response token; `generalized_jsd` with β.

`data.format: text` distils every token (Gemma 2 pre-training distillation); chat data distils response tokens only
(the SFT label mask). The loss is Σ over distilled tokens of the global batch / their count (computed once per
global batch, so gradient accumulation is exact). Logits are computed `distill.logits_chunk` positions at a time
(rematerialized in the backward), so neither model's [B, T, V] float32 logits exist whole. Teacher and student
must share one vocabulary (sizes and tokenizer hash; ConfigError otherwise). Checkpoints, resume and HF export are
every stage's (`stages.run_dir`); the teacher is reloaded, never checkpointed.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tulu_jax.data.distill_targets import MODES, TargetRows, distill_dataset
from tulu_jax.errors import ConfigError
from tulu_jax.losses.distill import generalized_jsd, soft_cross_entropy, sparse_soft_cross_entropy
from tulu_jax.sharding import ShardingSpec, batch_sharding
from tulu_jax.stages.sections import (
    ModelSection,
    OptimSection,
    OutputSection,
    TokenizerSection,
    TrainSection,
)
from tulu_jax.stages.setup import batch_shards, micro_batches_text, num_train_steps
from tulu_jax.stages.sft import SFTDataSection, prepare_sft_data
from tulu_jax.stages.teacher import (
    TEACHER,
    build_teacher,
    check_teacher_vocabulary,
    per_device_bytes,
    teacher_tokenizer_path,
)
from tulu_jax.stages.training import StageData, StageSetup, TrainingStage
from tulu_jax.train import Step, TrainState, build_train_step, shardings_of
from tulu_jax.train.batcher import Batcher
from tulu_jax.train.batches import Batch

PyTree = Any
Divergence = Literal["soft_cross_entropy", "generalized_jsd"]
_GIB = 1024**3


@dataclasses.dataclass
class TargetsSection:
    """Offline targets (`tulu-jax distill-targets` writes them, `mode: offline` reads them): path (a directory),
    k ids per distilled token (Gemma 3: 256), mode top_k | sampled (K ids drawn without replacement in proportion to
    the teacher's probabilities, Gumbel top-k), rows_per_shard, batch_size (rows per teacher pass), seed."""

    path: str = "runs/distill_targets"
    k: int = 256
    mode: Literal["top_k", "sampled"] = "top_k"
    rows_per_shard: int = 1024
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("k", "rows_per_shard", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"'distill.targets.{key}' must be >= 1, got {getattr(self, key)}")
        if self.mode not in MODES:
            raise ValueError(f"'distill.targets.mode' must be one of {MODES}, got {self.mode!r}")


@dataclasses.dataclass
class DistillSection:
    """The teacher and the divergence. mode: online | offline | on_policy (module docstring). teacher: a model
    section like `model` (HF path or preset). teacher_tokenizer: its tokenizer directory (default: teacher.path when
    it holds one) — compared with the student's by vocabulary hash. divergence: soft_cross_entropy |
    generalized_jsd (default: soft CE online, JSD on-policy; offline is always sparse CE). beta: JSD's β (0 forward
    KL, 1 reverse KL). temperature: of both softmaxes (no T² factor). lambda_on_policy: the fraction of on-policy
    batches; max_new_tokens / sampling_temperature: the student's samples. logits_chunk: positions per logits chunk
    (0: the whole sequence at once)."""

    teacher: ModelSection
    mode: Literal["online", "offline", "on_policy"] = "online"
    teacher_tokenizer: str | None = None
    divergence: Divergence | None = None
    beta: float = 0.5
    temperature: float = 1.0
    lambda_on_policy: float = 1.0
    max_new_tokens: int = 64
    sampling_temperature: float = 1.0
    logits_chunk: int = 0
    targets: TargetsSection = dataclasses.field(default_factory=TargetsSection)

    def __post_init__(self) -> None:
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"'distill.beta' must be in [0, 1], got {self.beta}")
        if not 0.0 <= self.lambda_on_policy <= 1.0:
            raise ValueError(f"'distill.lambda_on_policy' must be in [0, 1], got {self.lambda_on_policy}")
        for key in ("temperature", "max_new_tokens"):
            if getattr(self, key) <= 0:
                raise ValueError(f"'distill.{key}' must be > 0, got {getattr(self, key)}")
        if self.logits_chunk < 0:
            raise ValueError(f"'distill.logits_chunk' must be >= 0, got {self.logits_chunk}")
        if self.mode == "offline" and self.divergence is not None:
            raise ValueError("'distill.divergence' does not apply to mode offline (sparse soft cross-entropy)")

    @property
    def resolved_divergence(self) -> str:
        """The dense divergence of online / on-policy modes."""
        if self.divergence is not None:
            return self.divergence
        return "generalized_jsd" if self.mode == "on_policy" else "soft_cross_entropy"


@dataclasses.dataclass
class DistillConfig:
    """A distillation run: the student (`model`, trained), its tokenizer, data, optimizer, steps, outputs, and
    `distill` (teacher, mode, divergence, offline targets)."""

    model: ModelSection
    distill: DistillSection
    tokenizer: TokenizerSection = dataclasses.field(default_factory=TokenizerSection)
    data: SFTDataSection = dataclasses.field(default_factory=SFTDataSection)
    optim: OptimSection = dataclasses.field(default_factory=OptimSection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    output: OutputSection = dataclasses.field(default_factory=OutputSection)

    def __post_init__(self) -> None:
        if self.distill.mode != "offline" and not self.data.sources:
            raise ValueError("'data.sources' lists no data source")
        if self.distill.mode == "on_policy" and (self.data.format != "chat" or self.data.packing):
            raise ValueError("distill.mode on_policy needs chat data (prompts to answer) without data.packing")


@struct.dataclass
class SparseTargetBatch:
    """An LM batch (`tokens`) with the teacher's K ids (int32) and probabilities (float16) per position [B, T, K]."""

    tokens: Batch
    teacher_ids: Any
    teacher_probs: Any

    @classmethod
    def from_host(cls, host: Mapping[str, np.ndarray]) -> SparseTargetBatch:
        """From a host batch of `tulu_jax.data.distill_targets.distill_dataset`."""
        return cls(Batch.from_host(host), host["teacher_ids"], host["teacher_probs"])


# --------------------------------------------------------------------------------------------------- loss


def _chunked_sum(fn: Callable[..., tuple[jax.Array, dict]], arrays: tuple[jax.Array, ...], chunk: int) -> Any:
    """Σ over chunks of the sequence axis (axis 1 of every array) of fn(*chunk_arrays) -> (loss, metrics), each chunk
    rematerialized in the backward; the whole sequence at once when chunk is 0 or ≥ T."""
    length = arrays[0].shape[1]
    if chunk == 0 or chunk >= length:
        return fn(*arrays)
    if length % chunk:
        raise ConfigError(f"distill.logits_chunk {chunk} must divide data.max_seq_len {length}")
    split = tuple(jnp.moveaxis(x.reshape(x.shape[0], length // chunk, chunk, *x.shape[2:]), 1, 0) for x in arrays)

    def body(total: Any, xs: tuple[jax.Array, ...]) -> tuple[Any, None]:
        out = jax.checkpoint(fn)(*xs)
        return jax.tree.map(jnp.add, total, out), None

    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, *(x[0] for x in split)))
    return jax.lax.scan(body, zeros, split)[0]


def distill_loss_fn(section: DistillSection) -> Callable:
    """`loss_fn(model, batch, denominators, frozen) -> (loss, aux)`: the student's divergence from the teacher over
    the distilled tokens, / the global batch's distilled-token count (`denominators["num_tokens"]`)."""
    chunk = section.logits_chunk

    def loss_fn(model: nnx.Module, batch: Any, den: Mapping[str, jax.Array], frozen: Any = None):
        tokens = batch.tokens if section.mode == "offline" else batch
        hidden = model.hidden(tokens.input_ids, positions=tokens.positions, segment_ids=tokens.segment_ids)
        if section.mode == "offline":
            def piece(h, ids, probs, mask):
                return sparse_soft_cross_entropy(model.lm_head(h), ids, probs, mask, num_tokens=den["num_tokens"])

            loss, metrics = _chunked_sum(piece, (hidden, batch.teacher_ids, batch.teacher_probs, tokens.loss_mask),
                                         chunk)
        else:
            teacher = frozen[TEACHER].model()
            teacher_hidden = teacher.hidden(tokens.input_ids, positions=tokens.positions,
                                            segment_ids=tokens.segment_ids)
            kwargs = dict(temperature=section.temperature, num_tokens=den["num_tokens"])
            if section.resolved_divergence == "generalized_jsd":
                divergence, kwargs["beta"] = generalized_jsd, section.beta
            else:
                divergence = soft_cross_entropy

            def piece(h, th, mask):
                return divergence(model.lm_head(h), teacher.lm_head(th), mask, **kwargs)

            loss, metrics = _chunked_sum(piece, (hidden, teacher_hidden, tokens.loss_mask), chunk)
        metrics.pop("loss")  # the step reports the full-batch loss itself
        return loss, metrics

    return loss_fn


def distill_denominators(batch: Any) -> dict[str, jax.Array]:
    """The global batch's distilled-token count."""
    tokens = batch.tokens if isinstance(batch, SparseTargetBatch) else batch
    return {"num_tokens": jnp.sum(tokens.loss_mask, dtype=jnp.int32)}


# --------------------------------------------------------------------------------------------------- stage


def _size(nbytes: int) -> str:
    return f"{nbytes / _GIB:.2f} GiB" if nbytes >= _GIB // 10 else f"{nbytes / 2**20:.2f} MiB"


class DistillStage(TrainingStage):
    """Distillation as a registered stage (module docstring)."""

    name = "distill"
    config_class = DistillConfig

    def load_data(self, config: DistillConfig, tokenizer: Any, spec: ShardingSpec, mesh: Mesh) -> StageData:
        """Offline: the target directory (its tokenizer hash must be the student's); else the SFT data pipeline."""
        from tulu_jax.data.pipeline import batch_dataset
        from tulu_jax.data.vocab import vocabulary_hash

        pipeline = self.pipeline_config(config)
        if config.distill.mode == "offline":
            source = TargetRows(config.distill.targets.path)
            if source.manifest.tokenizer_hash != vocabulary_hash(tokenizer):
                raise ConfigError(
                    f"{source.directory}: the targets were written with tokenizer hash "
                    f"{source.manifest.tokenizer_hash[:12]}, the student's tokenizer hashes "
                    f"{vocabulary_hash(tokenizer)[:12]}; distillation needs one vocabulary"
                )
            dataset = distill_dataset(source, pipeline)
            return StageData(dataset, num_train_steps(len(dataset), config.train),
                             {"targets_manifest.json": dataclasses.asdict(source.manifest)})
        rows, report = prepare_sft_data(config.data, tokenizer, config.tokenizer.chat_template)
        print(report.summary(), file=sys.stderr)
        dataset = batch_dataset(rows, pipeline, source_name="the tokenized distillation mixture")
        return StageData(dataset, num_train_steps(len(dataset), config.train),
                         {"data_report.json": dataclasses.asdict(report)})

    def frozen(self, setup: StageSetup) -> PyTree:
        """The teacher (online, on-policy), vocabulary-checked against the student; None offline."""
        distill = setup.config.distill
        if distill.mode == "offline":
            return None
        teacher_config, teacher = build_teacher(distill.teacher, setup.tokenizer, setup.mesh, setup.spec,
                                                abstract=setup.abstract, seed=setup.config.train.seed)
        tokenizer_path = None if setup.abstract else teacher_tokenizer_path(distill.teacher,
                                                                            distill.teacher_tokenizer)
        check_teacher_vocabulary(setup.model_config, teacher_config, setup.tokenizer, tokenizer_path)
        return {TEACHER: teacher}

    def batch_shardings(self, setup: StageSetup) -> PyTree:
        """LM batch fields [B, T] by the batch rule; offline targets [B, T, K] likewise (K replicated)."""
        matrix = batch_sharding(setup.mesh, setup.spec)
        if setup.config.distill.mode != "offline":
            return matrix
        cube = NamedSharding(setup.mesh, PartitionSpec(*matrix.spec, None))
        return SparseTargetBatch(Batch.like(matrix), cube, cube)

    def abstract_batch(self, setup: StageSetup) -> PyTree:
        """train.global_batch_size × data.max_seq_len (× distill.targets.k offline)."""
        config = setup.config
        rows, length = config.train.global_batch_size, config.data.max_seq_len
        shardings = self.batch_shardings(setup)
        if config.distill.mode != "offline":
            return Batch.spec(rows, length, shardings)
        k = config.distill.targets.k
        cube = lambda dtype: jax.ShapeDtypeStruct((rows, length, k), np.dtype(dtype),  # noqa: E731
                                                  sharding=shardings.teacher_ids)
        return SparseTargetBatch(Batch.spec(rows, length, shardings.tokens.input_ids), cube(np.int32),
                                 cube(np.float16))

    def build_step(self, setup: StageSetup) -> Step:
        """`train.build_train_step` with `distill_loss_fn`, the teacher's shardings and exact accumulation."""
        return build_train_step(
            setup.state.graphdef, distill_loss_fn(setup.config.distill), setup.optimizer,
            state_shardings=shardings_of(setup.state), batch_shardings=self.batch_shardings(setup),
            frozen_shardings=shardings_of(setup.frozen), grad_accum_steps=setup.grad_accum,
            denominators_fn=distill_denominators,
        )

    def batches(self, setup: StageSetup) -> tuple[Any, Callable[[PyTree], PyTree]]:
        """The grain iterator and the Batcher; on-policy batches stay on the host until the step decides whether
        the student answers them (`train_step`)."""
        from tulu_jax.data.pipeline import batch_iterator

        config = setup.config
        typed = SparseTargetBatch.from_host if config.distill.mode == "offline" else Batch.from_host
        batcher = Batcher(self.batch_shardings(setup), config.train.global_batch_size, typed=typed)
        iterator = batch_iterator(setup.data.dataset, self.pipeline_config(config))
        return iterator, (lambda host: host) if config.distill.mode == "on_policy" else batcher

    def train_step(self, setup: StageSetup, step: Step) -> Callable[[TrainState, PyTree], Any]:
        """On-policy: roll out the student on a λ share of batches first (`distill_on_policy.OnPolicyStep`)."""
        if setup.config.distill.mode != "on_policy":
            return super().train_step(setup, step)
        from tulu_jax.stages.distill_on_policy import OnPolicyStep

        batcher = Batcher(self.batch_shardings(setup), setup.config.train.global_batch_size, typed=Batch.from_host)
        return OnPolicyStep(setup, step, batcher)

    def describe(self, setup: StageSetup) -> str:
        """Mode, divergence, batch, accumulation, and both models' per-device parameter memory."""
        config, model, distill = setup.config, setup.model_config, setup.config.distill
        per_device = config.train.global_batch_size // (setup.grad_accum * batch_shards(setup.mesh, setup.spec))
        how = "sparse soft CE" if distill.mode == "offline" else distill.resolved_divergence
        if distill.mode != "offline" and distill.resolved_divergence == "generalized_jsd":
            how += f" β={distill.beta}"
        student = _size(per_device_bytes(setup.state.params))
        teacher = "none (offline targets)" if setup.frozen is None else \
            _size(per_device_bytes(setup.frozen[TEACHER].params))
        return (
            f"distill step ({distill.mode}, {how}, T={distill.temperature}): global batch "
            f"{config.train.global_batch_size} × {config.data.max_seq_len} tokens, "
            f"{micro_batches_text(setup.grad_accum)} of {per_device} sequence(s) per device; student "
            f"{model.architecture} hidden {model.hidden_size} × {model.num_layers} layers, params per device: "
            f"student {student} (+ optimizer state), teacher {teacher}; compute {model.compute_dtype}, "
            f"remat {model.remat}"
        )


STAGE = DistillStage()
