"""The DPO stage: preference pairs → length-normalized DPO (the Tülu 3 choice) or dpo / simpo / ipo (docs/recipe.md).

Data: `data.sources` → `load_preference_pairs` (both row shapes; each side tokenized like SFT, its response mask is
the SFT label mask; truncated to `data.max_seq_len` and counted; pairs with an empty response dropped and counted;
chosen == rejected counted; malformed rows raise or are skipped and counted) → padded pair batches
(`tulu_jax.data.preference_batching`) → global arrays.

Reference: the initial policy, frozen. `dpo.reference: cached` scores every pair once before training and stores the
table next to the run, keyed by a fingerprint of model, data and settings (`tulu_jax.stages.reference`); `live`
keeps a frozen copy on the mesh, passed to the step as a jit argument (`frozen["reference"]`), which scores each
micro-batch inside the step. Both give the same training. simpo uses no reference.

Loss (`dpo_loss_fn`): Σ over the pairs of the GLOBAL batch of the per-pair loss, divided by the global number of
pairs (computed once from the full batch by `pair_denominators`), so gradient accumulation is exact. Metrics are
global means over real pairs too: chosen/rejected rewards β(log π − log π_ref), reward margin and accuracy.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from tulu_jax.data.preference_batching import PairLogps
from tulu_jax.losses import dpo_loss, needs_reference, uses_average_logps
from tulu_jax.losses.dpo import LOSS_TYPES, check_dpo_hyperparameters
from tulu_jax.models.activation_sharding import with_activation_sharding
from tulu_jax.sharding import ShardingSpec
from tulu_jax.stages.reference import (
    build_reference_fn,
    compute_reference_logps,
    load_or_compute_reference,
    pair_sequence_logps,
    reference_fingerprint,
    replicated,
)
from tulu_jax.stages.run_dir import model_config_dict
from tulu_jax.stages import sections
from tulu_jax.stages.setup import batch_shards, micro_batches_text, num_train_steps
from tulu_jax.stages.training import StageData, StageSetup, TrainingStage
from tulu_jax.train import Optimizer, Step, TrainState, build_train_step, freeze, shardings_of
from tulu_jax.train.batcher import Batcher
from tulu_jax.train.batches import PairBatch

PyTree = Any
REFERENCE = "reference"  # the frozen model's name in `frozen` (live reference)
@dataclasses.dataclass
class DPOSection:
    """The preference loss (docs/recipe.md): loss_type dpo_norm (Tülu 3) | dpo | simpo | ipo; beta β; label_smoothing
    ε (conservative DPO; not for ipo); gamma_beta_ratio γ/β (simpo); reference: cached (one scoring pass before
    training, stored in the run dir) | live (a frozen copy on the mesh); concat_forward: chosen and rejected in one
    forward (faster) or two (less memory); reference_batch_size: pairs per batch of the cached pass (default:
    train.global_batch_size)."""

    loss_type: Literal["dpo", "dpo_norm", "simpo", "ipo"] = "dpo_norm"
    beta: float = 5.0
    label_smoothing: float = 0.0
    gamma_beta_ratio: float = 0.3
    reference: Literal["cached", "live"] = "cached"
    concat_forward: bool = True
    reference_batch_size: int | None = None

    def __post_init__(self) -> None:
        check_dpo_hyperparameters(self.beta, self.loss_type, self.label_smoothing, self.gamma_beta_ratio)
        if self.reference_batch_size is not None and self.reference_batch_size <= 0:
            raise ValueError(f"'dpo.reference_batch_size' must be > 0, got {self.reference_batch_size}")


@dataclasses.dataclass
class DPODataSection(sections.DataSection):
    """`data` of DPO: the shared fields; pairs are truncated to 2048 tokens per side by default, and never packed."""

    max_seq_len: int = 2048

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.packing:
            raise ValueError("'data.packing' must be false for DPO: each side of a pair is one padded row")


@dataclasses.dataclass
class DPOOptimSection(sections.OptimSection):
    """`optim` of DPO: the recipe's defaults are lr 5e-7 (8B) and warmup ratio 0.1."""

    lr: float = 5e-7
    warmup_ratio: float = 0.1


@dataclasses.dataclass
class DPOTrainSection(sections.TrainSection):
    """`train` of DPO: global_batch_size counts PAIRS (128 in the recipe); one epoch by default."""

    epochs: int = 1


@dataclasses.dataclass
class DPOOutputSection(sections.OutputSection):
    """`output` of DPO: the run directory also holds the cached reference log-probs."""

    run_dir: str = "runs/dpo"


@dataclasses.dataclass
class DPOConfig:
    """A full DPO run: the shared sections (see `tulu_jax.stages.sections`) plus `dpo`."""

    model: sections.ModelSection
    tokenizer: sections.TokenizerSection = dataclasses.field(default_factory=sections.TokenizerSection)
    data: DPODataSection = dataclasses.field(default_factory=DPODataSection)
    optim: DPOOptimSection = dataclasses.field(default_factory=DPOOptimSection)
    train: DPOTrainSection = dataclasses.field(default_factory=DPOTrainSection)
    output: DPOOutputSection = dataclasses.field(default_factory=DPOOutputSection)
    dpo: DPOSection = dataclasses.field(default_factory=DPOSection)

    def __post_init__(self) -> None:
        if not self.data.sources:
            raise ValueError("'data.sources' lists no data source")


# --------------------------------------------------------------------------------------------------- loss/step


def pair_denominators(batch: PairBatch) -> dict[str, jax.Array]:
    """The global batch's number of real pairs (padding pairs have no tokens)."""
    return {"pairs": jnp.sum(jnp.max(batch.chosen.segment_ids, axis=-1) > 0, dtype=jnp.int32)}


def dpo_loss_fn(dpo: DPOSection) -> Any:
    """`loss_fn(model, batch, denominators, frozen) -> (loss, aux)` on a pair batch.

    The reference log-probs (unless simpo) come from the batch (`ref_*_logps`, cached) or, with a live reference,
    from `frozen["reference"]` scoring the same micro-batch. loss = Σ_pairs of this (micro-)batch loss_pair / global
    pairs. aux, summed over micro-batches: the reward metrics of `dpo_loss` as global means over real pairs,
    `pairs` and `tokens` (non-padding, both sides).
    """
    average = uses_average_logps(dpo.loss_type)
    use_reference = needs_reference(dpo.loss_type)
    live = use_reference and dpo.reference == "live"

    def loss_fn(model: nnx.Module, batch: PairBatch, den: Mapping[str, jax.Array], frozen: Any = None):
        chosen, rejected = pair_sequence_logps(model, batch, average=average, concat_forward=dpo.concat_forward)
        valid = jnp.max(batch.chosen.segment_ids, axis=-1) > 0
        if live:
            references = pair_sequence_logps(frozen[REFERENCE].model(), batch, average=average,
                                             concat_forward=dpo.concat_forward)
        else:
            references = (batch.reference.chosen, batch.reference.rejected) if use_reference else (None, None)
        per_pair, metrics = dpo_loss(
            chosen, rejected, *references, beta=dpo.beta, loss_type=dpo.loss_type,
            label_smoothing=dpo.label_smoothing, gamma_beta_ratio=dpo.gamma_beta_ratio, pair_mask=valid,
        )
        pairs = jnp.sum(valid, dtype=jnp.int32)
        total = jnp.maximum(den["pairs"], 1).astype(jnp.float32)
        # dpo_loss's metrics are means over this micro-batch's pairs: reweighted so their sum is the global mean.
        share = pairs.astype(jnp.float32) / total
        aux = {key: value * share for key, value in metrics.items() if key != "loss"}
        aux["pairs"] = pairs
        aux["tokens"] = sum(jnp.sum(side.segment_ids > 0, dtype=jnp.int32) for side in (batch.chosen, batch.rejected))
        return jnp.sum(per_pair) / total, aux

    return loss_fn


def build_dpo_step(
    graphdef: nnx.GraphDef,
    optimizer: Optimizer,
    dpo: DPOSection,
    *,
    state_shardings: TrainState,
    batch_shardings: PairBatch,
    frozen_shardings: Any = None,
    grad_accum_steps: int = 1,
) -> Step:
    """The jitted DPO train step `(state, pair batch, frozen) -> (state, metrics)` (run and AOT compile); frozen is
    `{"reference": FrozenModel}` with a live reference, else None."""
    return build_train_step(
        graphdef,
        dpo_loss_fn(dpo),
        optimizer,
        state_shardings=state_shardings,
        batch_shardings=batch_shardings,
        frozen_shardings=frozen_shardings,
        grad_accum_steps=grad_accum_steps,
        denominators_fn=pair_denominators,
    )


# --------------------------------------------------------------------------------------------------- run


def reference_table(
    config: DPOConfig, state: TrainState, pairs: list, model_config: Any, mesh: Mesh, spec: ShardingSpec,
    accum: int, source_name: str,
) -> PairLogps:
    """The cached reference table of the run directory, computed now (one no-grad pass of the initial `state`) if
    absent or made for this very run."""
    from tulu_jax.data.pipeline import PipelineConfig, batch_iterator
    from tulu_jax.data.preference_batching import preference_dataset

    # Pairs per batch of the pass: a multiple of the batch shards and of the processes (the pipeline's shares).
    unit = math.lcm(batch_shards(mesh, spec), jax.process_count())
    size = -(-(config.dpo.reference_batch_size or config.train.global_batch_size) // unit) * unit
    pipeline = PipelineConfig(seq_len=config.data.max_seq_len, global_batch_size=size, shuffle=False)
    shardings = PairBatch.shardings(mesh, spec, reference=False)
    micro = math.gcd(accum, size // batch_shards(mesh, spec))
    fn = build_reference_fn(state.graphdef, average=uses_average_logps(config.dpo.loss_type),
                            concat_forward=config.dpo.concat_forward, micro_batches=micro,
                            batch_sharding=shardings.chosen.input_ids, out_sharding=replicated(mesh))
    fn = with_activation_sharding(fn, mesh, spec)
    fingerprint = reference_fingerprint(
        params=state.params, model_config=model_config_dict(model_config), pairs=pairs,
        max_seq_len=config.data.max_seq_len, chat_template=config.tokenizer.chat_template,
        average=uses_average_logps(config.dpo.loss_type),
    )

    def compute() -> PairLogps:
        print(f"tulu-jax dpo: scoring {len(pairs)} pairs with the reference model", file=sys.stderr)
        dataset = preference_dataset(pairs, pipeline, source_name=source_name)
        return compute_reference_logps(fn, state.params, state.model_state, batch_iterator(dataset, pipeline),
                                       len(pairs), Batcher(shardings, size, typed=PairBatch.from_host))

    table, cached = load_or_compute_reference(config.output.run_dir, fingerprint, compute)
    if cached:
        print(f"tulu-jax dpo: reusing the cached reference log-probs in {config.output.run_dir}", file=sys.stderr)
    return table


class DPOStage(TrainingStage):
    """DPO as a registered stage (`tulu_jax.stages.registry`): preference pairs, padded pair batches (with cached
    reference log-probs, or a live frozen reference passed to the step), the step of `build_dpo_step`."""

    name = "dpo"
    config_class = DPOConfig

    def load_data(self, config: DPOConfig, tokenizer: Any, spec: ShardingSpec, mesh: Mesh) -> StageData:
        """Tokenized pairs (the counts go to the log and data_report.json) and their padded batches."""
        from tulu_jax.data.preference import load_preference_pairs
        from tulu_jax.data.preference_batching import preference_dataset

        sources = [s.to_source() for s in config.data.sources]
        pairs, stats = load_preference_pairs(
            sources, tokenizer, max_seq_len=config.data.max_seq_len, template=tokenizer.chat_template,
            seed=config.data.seed, on_error=config.data.on_error, shuffle=config.data.shuffle,
            max_bad_fraction=config.data.max_bad_fraction,
        )
        print(stats.summary(), file=sys.stderr)
        source_name = ", ".join(s.path for s in config.data.sources)
        dataset = preference_dataset(pairs, self.pipeline_config(config), source_name=source_name)
        return StageData(dataset, num_train_steps(len(dataset), config.train), {"data_report.json": stats.report()},
                         {"pairs": pairs, "source_name": source_name})

    @staticmethod
    def _cached(config: DPOConfig) -> bool:
        return needs_reference(config.dpo.loss_type) and config.dpo.reference == "cached"

    def frozen(self, setup: StageSetup) -> Any:
        """A live reference: the initial policy, frozen (its own buffers: the step donates the policy's)."""
        dpo = setup.config.dpo
        if not (needs_reference(dpo.loss_type) and dpo.reference == "live"):
            return None
        return {REFERENCE: freeze(setup.state, copy=not setup.abstract)}

    def batch_shardings(self, setup: StageSetup) -> PairBatch:
        """[B, T] fields like SFT, [B] fields (pair index, cached reference log-probs) along the batch axes."""
        return PairBatch.shardings(setup.mesh, setup.spec, reference=self._cached(setup.config))

    def abstract_batch(self, setup: StageSetup) -> PairBatch:
        """train.global_batch_size pairs × data.max_seq_len tokens per side."""
        config = setup.config
        return PairBatch.spec(self.batch_shardings(setup), config.train.global_batch_size, config.data.max_seq_len)

    def build_step(self, setup: StageSetup) -> Step:
        """`build_dpo_step` with the setup's state, shardings, frozen reference and accumulation."""
        return build_dpo_step(
            setup.state.graphdef, setup.optimizer, setup.config.dpo, state_shardings=shardings_of(setup.state),
            batch_shardings=self.batch_shardings(setup), frozen_shardings=shardings_of(setup.frozen),
            grad_accum_steps=setup.grad_accum,
        )

    def batches(self, setup: StageSetup) -> tuple[Any, Batcher]:
        """Pair batches (with the cached reference table added: scored now, or read from the run directory)."""
        from tulu_jax.data.pipeline import batch_iterator
        from tulu_jax.data.preference_batching import add_reference

        config, data = setup.config, setup.data
        dataset = data.dataset
        if self._cached(config):
            table = reference_table(config, setup.state, data.extra["pairs"], setup.model_config, setup.mesh,
                                    setup.spec, setup.grad_accum, data.extra["source_name"])
            dataset = add_reference(dataset, table, len(data.extra["pairs"]))
        batcher = Batcher(self.batch_shardings(setup), config.train.global_batch_size, typed=PairBatch.from_host)
        return batch_iterator(dataset, self.pipeline_config(config)), batcher

    def describe(self, setup: StageSetup) -> str:
        """The loss, the global batch, the micro-batches per device, the reference, the model and its dtypes."""
        config, model = setup.config, setup.model_config
        pairs, seq_len = config.train.global_batch_size, config.data.max_seq_len
        per_device = pairs // (setup.grad_accum * batch_shards(setup.mesh, setup.spec))
        reference = config.dpo.reference if needs_reference(config.dpo.loss_type) else "no"
        return (
            f"dpo step ({config.dpo.loss_type} β={config.dpo.beta}, {reference} reference, concat_forward "
            f"{config.dpo.concat_forward}): global batch {pairs} pairs × {seq_len} tokens per side, "
            f"{micro_batches_text(setup.grad_accum)} of {per_device} pair(s) per device; model {model.architecture} "
            f"hidden {model.hidden_size} × {model.num_layers} layers, params {model.param_dtype}, compute "
            f"{model.compute_dtype}, remat {model.remat}"
        )


STAGE = DPOStage()


__all__ = [
    "DPOConfig",
    "DPOSection",
    "DPOStage",
    "LOSS_TYPES",
    "STAGE",
    "build_dpo_step",
    "dpo_loss_fn",
    "pair_denominators",
]
