"""The DPO stage: preference pairs → length-normalized DPO (the Tülu 3 choice) or dpo / simpo / ipo (docs/recipe.md).

Data: `data.sources` → `load_preference_pairs` (both row shapes; each side tokenized like SFT, its response mask is
the SFT label mask; truncated to `data.max_seq_len` and counted; pairs with an empty response dropped and counted;
chosen == rejected counted; malformed rows raise or are skipped and counted) → padded pair batches
(`tulu_jax.data.preference_batching`) → global arrays.

Reference: the initial policy, frozen. `dpo.reference: cached` scores every pair once before training and stores the
table next to the run, keyed by a fingerprint of model, data and settings (`tulu_jax.stages.reference`); `live`
keeps a frozen copy on the mesh and scores each batch before its step. Either way the step reads the reference
log-probs from the batch, so both give the same training. simpo uses no reference.

Loss (`dpo_loss_fn`): Σ over the pairs of the GLOBAL batch of the per-pair loss, divided by the global number of
pairs (computed once from the full batch by `pair_denominators`), so gradient accumulation is exact. Metrics are
global means over real pairs too: chosen/rejected rewards β(log π − log π_ref), reward margin and accuracy.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tulu_jax.data.preference_batching import PAIR_BATCH_KEYS, PAIR_INDEX, REF_KEYS, PairLogps
from tulu_jax.losses import dpo_loss, needs_reference, uses_average_logps
from tulu_jax.losses.dpo import LOSS_TYPES, _check_hyperparameters
from tulu_jax.models.activation_sharding import with_activation_sharding
from tulu_jax.sharding import ShardingSpec, batch_sharding, logical_to_spec
from tulu_jax.stages.common import (
    DataSection,
    ModelSection,
    OptimSection,
    OutputSection,
    TokenizerSection,
    TrainSection,
    batch_shards,
    check_run_dir,
    init_stage_state,
    load_stage_config,
    load_stage_tokenizer,
    make_stage_optimizer,
    micro_batches_text,
    model_config_dict,
    num_train_steps,
    resolve_grad_accum,
    resolve_model_config,
    setup_mesh,
    train_and_export,
)
from tulu_jax.stages.reference import (
    LiveReference,
    build_reference_fn,
    compute_reference_logps,
    load_or_compute_reference,
    pair_sequence_logps,
    reference_fingerprint,
    replicated,
)
from tulu_jax.train import Optimizer, TrainState, build_train_step, shardings_of

PyTree = Any
# Pair batch keys → dtype; the first group is [B, T], the rest [B].
_SIDE_DTYPES = {"input_ids": jnp.int32, "positions": jnp.int32, "segment_ids": jnp.int32, "targets": jnp.int32,
                "loss_mask": jnp.bool_}
PAIR_BATCH_DTYPES: dict[str, Any] = {
    **{f"{side}_{key}": dtype for side in ("chosen", "rejected") for key, dtype in _SIDE_DTYPES.items()},
    PAIR_INDEX: jnp.int32,
    REF_KEYS[0]: jnp.float32,
    REF_KEYS[1]: jnp.float32,
}


# --------------------------------------------------------------------------------------------------- config


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
        _check_hyperparameters(self.beta, self.loss_type, self.label_smoothing, self.gamma_beta_ratio)
        if self.reference_batch_size is not None and self.reference_batch_size <= 0:
            raise ValueError(f"'dpo.reference_batch_size' must be > 0, got {self.reference_batch_size}")


@dataclasses.dataclass
class DPODataSection(DataSection):
    """`data` of DPO: the shared fields; pairs are truncated to 2048 tokens per side by default, and never packed."""

    max_seq_len: int = 2048

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.packing:
            raise ValueError("'data.packing' must be false for DPO: each side of a pair is one padded row")


@dataclasses.dataclass
class DPOOptimSection(OptimSection):
    """`optim` of DPO: the recipe's defaults are lr 5e-7 (8B) and warmup ratio 0.1."""

    lr: float = 5e-7
    warmup_ratio: float = 0.1


@dataclasses.dataclass
class DPOTrainSection(TrainSection):
    """`train` of DPO: global_batch_size counts PAIRS (128 in the recipe); one epoch by default."""

    epochs: int = 1


@dataclasses.dataclass
class DPOOutputSection(OutputSection):
    """`output` of DPO: the run directory also holds the cached reference log-probs."""

    run_dir: str = "runs/dpo"


@dataclasses.dataclass
class DPOConfig:
    """A full DPO run: the shared sections (see `tulu_jax.stages.common`) plus `dpo`."""

    model: ModelSection
    tokenizer: TokenizerSection = dataclasses.field(default_factory=TokenizerSection)
    data: DPODataSection = dataclasses.field(default_factory=DPODataSection)
    optim: DPOOptimSection = dataclasses.field(default_factory=DPOOptimSection)
    train: DPOTrainSection = dataclasses.field(default_factory=DPOTrainSection)
    output: DPOOutputSection = dataclasses.field(default_factory=DPOOutputSection)
    dpo: DPOSection = dataclasses.field(default_factory=DPOSection)

    def __post_init__(self) -> None:
        if not self.data.sources:
            raise ValueError("'data.sources' lists no data source")


# --------------------------------------------------------------------------------------------------- loss/step


def pair_denominators(batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """The global batch's number of real pairs (padding pairs have no tokens)."""
    return {"pairs": jnp.sum(jnp.max(batch["chosen_segment_ids"], axis=-1) > 0, dtype=jnp.int32)}


def dpo_loss_fn(dpo: DPOSection) -> Any:
    """`loss_fn(model, batch, denominators) -> (loss, aux)` on a pair batch (with `ref_*_logps` unless simpo).

    loss = Σ_pairs of this (micro-)batch loss_pair / global pairs. aux, summed over micro-batches: the reward
    metrics of `dpo_loss` as global means over real pairs, `pairs` and `tokens` (non-padding, both sides).
    """
    average = uses_average_logps(dpo.loss_type)
    use_reference = needs_reference(dpo.loss_type)

    def loss_fn(model: nnx.Module, batch: Mapping[str, jax.Array], den: Mapping[str, jax.Array]):
        chosen, rejected = pair_sequence_logps(model, batch, average=average, concat_forward=dpo.concat_forward)
        valid = jnp.max(batch["chosen_segment_ids"], axis=-1) > 0
        references = (batch[REF_KEYS[0]], batch[REF_KEYS[1]]) if use_reference else (None, None)
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
        aux["tokens"] = sum(jnp.sum(batch[f"{s}_segment_ids"] > 0, dtype=jnp.int32) for s in ("chosen", "rejected"))
        return jnp.sum(per_pair) / total, aux

    return loss_fn


def pair_batch_shardings(mesh: Mesh, spec: ShardingSpec, keys: Sequence[str]) -> dict[str, NamedSharding]:
    """Shardings of a pair batch: [B, T] keys like an SFT batch, [B] keys along the same batch axes."""
    matrix = batch_sharding(mesh, spec)
    vector = NamedSharding(mesh, PartitionSpec(logical_to_spec(("batch",), spec)[0]))
    return {key: vector if key == PAIR_INDEX or key in REF_KEYS else matrix for key in keys}


def build_dpo_step(
    graphdef: nnx.GraphDef,
    optimizer: Optimizer,
    dpo: DPOSection,
    *,
    state_shardings: TrainState,
    batch_shardings: Mapping[str, NamedSharding],
    grad_accum_steps: int = 1,
) -> Any:
    """The jitted DPO train step `(state, pair batch) -> (state, metrics)` (also used by compile-check)."""
    return build_train_step(
        graphdef,
        dpo_loss_fn(dpo),
        optimizer,
        state_shardings=state_shardings,
        batch_shardings=dict(batch_shardings),
        grad_accum_steps=grad_accum_steps,
        denominators_fn=pair_denominators,
    )


class PairBatcher:
    """Host pair batches (this process's pairs) → global jax.Arrays, each key in its pair-batch sharding."""

    def __init__(self, shardings: Mapping[str, NamedSharding], global_batch_size: int):
        self.shardings = dict(shardings)
        self.global_batch_size = global_batch_size

    def __call__(self, host_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """Assemble one global batch (every leaf [local pairs, ...] → [global_batch_size, ...])."""
        return {
            key: jax.make_array_from_process_local_data(
                self.shardings[key], value, (self.global_batch_size, *value.shape[1:])
            )
            for key, value in host_batch.items()
        }


# --------------------------------------------------------------------------------------------------- run


def _reference_table(
    config: DPOConfig, state: TrainState, pairs: list, model_config: Any, mesh: Mesh, spec: ShardingSpec,
    accum: int, source_name: str,
) -> PairLogps:
    """The cached reference table of the run directory, computed now (one no-grad pass) if absent."""
    from tulu_jax.data.pipeline import PipelineConfig, batch_iterator
    from tulu_jax.data.preference_batching import preference_dataset

    # Pairs per batch of the pass: a multiple of the batch shards and of the processes (the pipeline's shares).
    unit = math.lcm(batch_shards(mesh, spec), jax.process_count())
    size = -(-(config.dpo.reference_batch_size or config.train.global_batch_size) // unit) * unit
    pipeline = PipelineConfig(seq_len=config.data.max_seq_len, global_batch_size=size, shuffle=False)
    shardings = pair_batch_shardings(mesh, spec, PAIR_BATCH_KEYS)
    micro = math.gcd(accum, size // batch_shards(mesh, spec))
    fn = build_reference_fn(state.graphdef, average=uses_average_logps(config.dpo.loss_type),
                            concat_forward=config.dpo.concat_forward, micro_batches=micro,
                            batch_sharding=shardings["chosen_input_ids"], out_sharding=replicated(mesh))
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
                                       len(pairs), PairBatcher(shardings, size))

    table, cached = load_or_compute_reference(config.output.run_dir, fingerprint, compute)
    if cached:
        print(f"tulu-jax dpo: reusing the cached reference log-probs in {config.output.run_dir}", file=sys.stderr)
    return table


def run_dpo(config: DPOConfig, sharding_path: str, *, devices: Sequence[Any] | None = None) -> TrainState:
    """Run DPO end to end (resuming from run_dir's latest checkpoint if any); returns the final TrainState.

    Errors in the config, the sharding file or the data surface before anything is compiled.
    """
    from tulu_jax.data.pipeline import PipelineConfig, batch_iterator
    from tulu_jax.data.preference import load_preference_pairs
    from tulu_jax.data.preference_batching import add_reference, preference_dataset

    spec, mesh = setup_mesh(sharding_path, devices)
    check_run_dir(config)
    tokenizer = load_stage_tokenizer(config.tokenizer, config.model)
    model_config = resolve_model_config(config.model, tokenizer)
    accum = resolve_grad_accum(config.train, mesh, spec)
    sources = [s.to_source() for s in config.data.sources]
    pairs, stats = load_preference_pairs(
        sources, tokenizer, max_seq_len=config.data.max_seq_len, template=tokenizer.chat_template,
        seed=config.data.seed, on_error=config.data.on_error, shuffle=config.data.shuffle,
        max_bad_fraction=config.data.max_bad_fraction,
    )
    print(stats.summary(), file=sys.stderr)
    source_name = ", ".join(s.path for s in config.data.sources)

    pipeline = PipelineConfig(
        seq_len=config.data.max_seq_len,
        global_batch_size=config.train.global_batch_size,
        seed=config.data.seed,
        num_epochs=config.train.epochs,
        shuffle=config.data.shuffle,
    )
    dataset = preference_dataset(pairs, pipeline, source_name=source_name)
    num_steps = num_train_steps(len(dataset), config.train)
    optimizer = make_stage_optimizer(config.optim, num_steps)
    state = init_stage_state(config.model, model_config, optimizer, mesh, spec, config.train.seed)

    use_reference = needs_reference(config.dpo.loss_type)
    keys = PAIR_BATCH_KEYS + (REF_KEYS if use_reference else ())
    shardings = pair_batch_shardings(mesh, spec, keys)
    batcher = PairBatcher(shardings, config.train.global_batch_size)
    prepare_batch: Any = batcher
    if use_reference and config.dpo.reference == "cached":
        table = _reference_table(config, state, pairs, model_config, mesh, spec, accum, source_name)
        dataset = add_reference(dataset, table, len(pairs))
    elif use_reference:
        live = LiveReference(
            state.params, state.model_state,
            with_activation_sharding(
                build_reference_fn(state.graphdef, average=uses_average_logps(config.dpo.loss_type),
                                   concat_forward=config.dpo.concat_forward, micro_batches=accum,
                                   batch_sharding=shardings["chosen_input_ids"], out_sharding=shardings[REF_KEYS[0]]),
                mesh, spec),
        )
        prepare_batch = lambda host_batch: live(batcher(host_batch))  # noqa: E731

    step = build_dpo_step(state.graphdef, optimizer, config.dpo, state_shardings=shardings_of(state),
                          batch_shardings=shardings, grad_accum_steps=accum)
    step = with_activation_sharding(step, mesh, spec)
    print(
        f"tulu-jax dpo: {num_steps} steps of {config.train.global_batch_size} pairs × {config.data.max_seq_len} "
        f"tokens per side ({micro_batches_text(accum)}), {config.dpo.loss_type} β={config.dpo.beta}, "
        f"{config.dpo.reference if use_reference else 'no'} reference, on mesh {dict(mesh.shape)}",
        file=sys.stderr,
    )
    return train_and_export(
        state=state,
        train_step=step,
        batches=batch_iterator(dataset, pipeline),
        num_steps=num_steps,
        output=config.output,
        config=config,
        model_config=model_config,
        prepare_batch=prepare_batch,
        tokenizer=tokenizer,
        stage="dpo",
        run_files={"data_report.json": stats.report()},
    )


def main(args: Any) -> int:
    """`tulu-jax dpo`: load the config (all checks first), then run; exit status 0 (also after SIGTERM)."""
    config = load_stage_config(DPOConfig, args.config, args.overrides)
    run_dpo(config, args.sharding)
    return 0


def aot_train_step(config: DPOConfig, mesh: Mesh, spec: ShardingSpec) -> tuple[Any, tuple[Any, Any], str]:
    """The real DPO train step with abstract (sharded ShapeDtypeStruct) arguments on `mesh`, for AOT compilation.

    The batch is train.global_batch_size pairs × data.max_seq_len tokens per side (with reference log-probs unless
    simpo); the model comes from model.path's config.json or, when absent, model.preset. Returns (jitted step,
    (abstract state, abstract batch), a one-line summary). The reference pass (cached) or forward (live) is a
    forward of the same shapes without gradients, so it needs less memory than this step.
    """
    from tulu_jax.stages.common import abstract_stage_state

    model_config = resolve_model_config(config.model, allow_preset_fallback=True)
    accum = resolve_grad_accum(config.train, mesh, spec)
    optimizer = make_stage_optimizer(config.optim, total_steps=1000)  # the schedule's length does not change shapes
    state = abstract_stage_state(model_config, optimizer, mesh, spec)
    keys = PAIR_BATCH_KEYS + (REF_KEYS if needs_reference(config.dpo.loss_type) else ())
    shardings = pair_batch_shardings(mesh, spec, keys)
    step = build_dpo_step(state.graphdef, optimizer, config.dpo, state_shardings=shardings_of(state),
                          batch_shardings=shardings, grad_accum_steps=accum)
    pairs, seq_len = config.train.global_batch_size, config.data.max_seq_len
    batch = {
        key: jax.ShapeDtypeStruct((pairs,) if key in (PAIR_INDEX, *REF_KEYS) else (pairs, seq_len),
                                  jnp.dtype(PAIR_BATCH_DTYPES[key]), sharding=shardings[key])
        for key in keys
    }
    per_device = pairs // (accum * batch_shards(mesh, spec))
    summary = (
        f"dpo step ({config.dpo.loss_type}, concat_forward {config.dpo.concat_forward}): global batch {pairs} pairs × "
        f"{seq_len} tokens per side, {micro_batches_text(accum)} of {per_device} pair(s) per device; model "
        f"{model_config.architecture} hidden {model_config.hidden_size} × {model_config.num_layers} layers, params "
        f"{model_config.param_dtype}, compute {model_config.compute_dtype}, remat {model_config.remat}"
    )
    return step, (state, batch), summary


__all__ = [
    "DPOConfig",
    "DPOSection",
    "LOSS_TYPES",
    "PairBatcher",
    "aot_train_step",
    "build_dpo_step",
    "dpo_loss_fn",
    "main",
    "pair_batch_shardings",
    "pair_denominators",
    "run_dpo",
]
