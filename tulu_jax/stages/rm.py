"""The reward-model stage (`tulu-jax rm`): preference pairs → a scalar head on the decoder, trained with the
Bradley-Terry loss −log σ(r_c − r_r) (the Tülu 3 RM that initializes RLVR's value model; docs/recipe.md).

Data: exactly DPO's (`DPOStage.load_data`: `data.sources` → tokenized pairs, truncation and drops counted → padded
pair batches, no reference log-probs). A side's reward is the RewardModel's scalar at its last non-padding token,
which is where transformers' `*ForSequenceClassification` pools (the last token that is not `pad_token_id`), so the
data must never contain the pad id (checked, DataError naming the pair).

Model: `model.path` is a causal LM (an SFT export: its backbone, a fresh score head, the LM head dropped) or a reward
model directory (`*ForSequenceClassification`, e.g. to continue training); `model.preset` builds one from scratch.

Loss (`rm_loss_fn`): Σ over the pairs of this micro-batch of −log σ(r_c − r_r) divided by the GLOBAL number of
real pairs (`pair_denominators`, computed once per batch), so gradient accumulation is exact. Metrics (global means
over real pairs): accuracy (r_c > r_r), margin, chosen_reward, rejected_reward.

Export (`output.export_hf`): `save_hf_reward_model` to run_dir/hf with pad_token_id set, plus the tokenizer;
transformers loads it with `AutoModelForSequenceClassification`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from tulu_jax.errors import ConfigError, DataError
from tulu_jax.losses.reward import last_token_values, reward_model_loss
from tulu_jax.models.config import ModelConfig
from tulu_jax.models.reward import RewardModel
from tulu_jax.sharding import ShardingSpec
from tulu_jax.stages import sections
from tulu_jax.stages.dpo import DPODataSection, DPOStage, DPOTrainSection, pair_denominators
from tulu_jax.stages.paths import resolve_path
from tulu_jax.stages.setup import batch_shards, resolve_model_config, variable_shardings
from tulu_jax.stages.training import StageData, StageSetup, TrainingStage
from tulu_jax.train import (
    Optimizer,
    Step,
    TrainState,
    abstract_train_state,
    build_train_step,
    init_train_state,
    shardings_of,
)
from tulu_jax.train.batcher import Batcher
from tulu_jax.train.batches import Batch, PairBatch


@dataclasses.dataclass
class RMSection:
    """`rm`: concat_forward, chosen and rejected in one forward (faster) or two (less activation memory)."""

    concat_forward: bool = True


@dataclasses.dataclass
class RMOptimSection(sections.OptimSection):
    """`optim` of the RM: open-instruct's Tülu 3 RM run used lr 3e-6, linear decay, no warmup."""

    lr: float = 3e-6
    warmup_ratio: float = 0.0


@dataclasses.dataclass
class RMOutputSection(sections.OutputSection):
    """`output` of the RM: run_dir/hf is a `*ForSequenceClassification` checkpoint."""

    run_dir: str = "runs/rm"


@dataclasses.dataclass
class RMConfig:
    """A reward-model run: the shared sections, DPO's `data` and `train` (batches count pairs), plus `rm`, which is
    required (`rm: {}` for the defaults) so that a DPO config (`dpo:`) and an RM config never read as each other."""

    model: sections.ModelSection
    rm: RMSection
    tokenizer: sections.TokenizerSection = dataclasses.field(default_factory=sections.TokenizerSection)
    data: DPODataSection = dataclasses.field(default_factory=DPODataSection)
    optim: RMOptimSection = dataclasses.field(default_factory=RMOptimSection)
    train: DPOTrainSection = dataclasses.field(default_factory=DPOTrainSection)
    output: RMOutputSection = dataclasses.field(default_factory=RMOutputSection)

    def __post_init__(self) -> None:
        if not self.data.sources:
            raise ValueError("'data.sources' lists no data source")


# --------------------------------------------------------------------------------------------------- loss/step


def pair_rewards(model: nnx.Module, batch: PairBatch, *, concat_forward: bool) -> tuple[jax.Array, jax.Array]:
    """The reward [B] of each pair's chosen and rejected side: the model's scalar at the side's last real token.

    concat_forward: one forward over both sides interleaved along the batch (row 2i chosen, 2i+1 rejected: each
    device keeps its own rows); else two forwards.
    """

    def score(side: Batch) -> jax.Array:
        values = model(side.input_ids, positions=side.positions, segment_ids=side.segment_ids)
        return last_token_values(values, side.segment_ids > 0)

    if not concat_forward:
        return score(batch.chosen), score(batch.rejected)
    both = jax.tree.map(lambda c, r: jnp.stack([c, r], axis=1).reshape(-1, c.shape[-1]), batch.chosen, batch.rejected)
    rewards = score(both).reshape(-1, 2)
    return rewards[:, 0], rewards[:, 1]


def rm_loss_fn(rm: RMSection) -> Any:
    """`loss_fn(model, pair batch, denominators, frozen) -> (loss, aux)`: Σ_pairs −log σ(r_c − r_r) / global pairs.

    aux (summed over micro-batches): accuracy, margin, chosen_reward, rejected_reward (global means over real
    pairs), `pairs` and `tokens` (non-padding, both sides).
    """

    def loss_fn(model: nnx.Module, batch: PairBatch, den: Mapping[str, jax.Array], frozen: Any = None):
        chosen, rejected = pair_rewards(model, batch, concat_forward=rm.concat_forward)
        valid = jnp.max(batch.chosen.segment_ids, axis=-1) > 0
        loss, metrics = reward_model_loss(chosen, rejected, pair_mask=valid, num_pairs=den["pairs"])
        aux = {key: value for key, value in metrics.items() if key != "loss"}
        aux["pairs"] = jnp.sum(valid, dtype=jnp.int32)
        aux["tokens"] = sum(jnp.sum(side.segment_ids > 0, dtype=jnp.int32) for side in (batch.chosen, batch.rejected))
        return loss, aux

    return loss_fn


def build_rm_step(
    graphdef: nnx.GraphDef, optimizer: Optimizer, rm: RMSection, *, state_shardings: TrainState,
    batch_shardings: PairBatch, grad_accum_steps: int = 1,
) -> Step:
    """The jitted reward-model step `(state, pair batch, frozen=None) -> (state, metrics)` (run and AOT)."""
    return build_train_step(
        graphdef, rm_loss_fn(rm), optimizer, state_shardings=state_shardings, batch_shardings=batch_shardings,
        grad_accum_steps=grad_accum_steps, denominators_fn=pair_denominators,
    )


# --------------------------------------------------------------------------------------------------- model


def _reward_config_json(section: sections.ModelSection) -> dict[str, Any] | None:
    """model.path's config.json when it declares a `*ForSequenceClassification` reward model, else None."""
    from tulu_jax.models.hf_reward_io import SEQUENCE_CLASSIFICATION

    if section.path is None:
        return None
    path = resolve_path(section.path) / "config.json"
    if not path.is_file():
        return None
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None  # the decoder path reports it
    archs = hf.get("architectures") if isinstance(hf, dict) else None
    return hf if archs and archs[0] in SEQUENCE_CLASSIFICATION.values() else None


def check_pad_token(pairs: list[Mapping[str, np.ndarray]], pad_token_id: int, source: str) -> None:
    """DataError naming the first pair whose tokens contain the pad id (transformers would pool before it)."""
    for index, pair in enumerate(pairs):
        for side in ("chosen", "rejected"):
            if np.any(pair[f"{side}_input_ids"] == pad_token_id):
                raise DataError(
                    f"{source}: pair {index} ({side}) contains the pad token id {pad_token_id}; a reward model is "
                    "scored at the last token that is not the pad token, so the data must never contain it "
                    "(set model.overrides.pad_token_id to an unused token)"
                )


class RMStage(TrainingStage):
    """The reward model as a registered stage (`tulu_jax.stages.registry`): DPO's pair data, a RewardModel state,
    the step of `build_rm_step`, a `*ForSequenceClassification` export."""

    name = "rm"
    config_class = RMConfig

    def model_config(self, config: RMConfig, tokenizer: Any, *, abstract: bool) -> ModelConfig:
        """A causal LM's or a reward model's config.json (or the preset), with pad_token_id set (the tokenizer's
        when the checkpoint has none): the export needs it to pool like this stage."""
        hf = _reward_config_json(config.model)
        if hf is None:
            model_config = resolve_model_config(config.model, tokenizer, allow_preset_fallback=abstract)
        else:
            from tulu_jax.models.hf_reward_io import _CAUSAL

            fields = dict(config.model.overrides, param_dtype=config.model.param_dtype,
                          compute_dtype=config.model.compute_dtype, remat=config.model.remat,
                          attention=config.model.attention)
            try:
                model_config = ModelConfig.from_hf_config(
                    {**hf, "architectures": [_CAUSAL[hf["architectures"][0]]]},
                    source=f"{config.model.path}/config.json", **fields)
            except TypeError as e:  # an unknown override field
                raise ConfigError(f"model.overrides: {e}") from None
        if model_config.pad_token_id is None and tokenizer is not None:
            model_config = model_config.replace(pad_token_id=tokenizer.pad_token_id)
        if model_config.pad_token_id is None and not abstract:
            raise ConfigError("the reward model needs a pad token id (neither the checkpoint nor the tokenizer has "
                              "one): set model.overrides.pad_token_id")
        return model_config

    def init_state(
        self, config: RMConfig, model_config: ModelConfig, optimizer: Optimizer, mesh: Mesh, spec: ShardingSpec, *,
        abstract: bool,
    ) -> TrainState:
        """A RewardModel state in its shardings: from scratch (preset), from a causal LM's backbone (fresh head)
        or from a reward model directory."""
        shard_fn = variable_shardings(mesh, spec)
        make = lambda rngs: RewardModel(model_config, rngs)  # noqa: E731
        if abstract:
            return abstract_train_state(make, optimizer, mesh, shard_fn)
        if config.model.path is None:
            return init_train_state(make, optimizer, mesh, shard_fn, config.train.seed)
        from tulu_jax.models.decoder import Decoder
        from tulu_jax.models.hf_io import load_hf_checkpoint
        from tulu_jax.models.hf_reward_io import load_hf_reward_model
        from tulu_jax.models.reward import reward_model_from_decoder
        from tulu_jax.stages.setup import _state_from_model

        path = resolve_path(config.model.path)
        fields = dict(config.model.overrides, param_dtype=model_config.param_dtype,
                      compute_dtype=model_config.compute_dtype, remat=model_config.remat,
                      attention=model_config.attention, pad_token_id=model_config.pad_token_id)
        with nnx.use_eager_sharding(False):
            if _reward_config_json(config.model) is not None:
                shardings = shard_fn(nnx.state(nnx.eval_shape(lambda: RewardModel(model_config, nnx.Rngs(0)))))
                model = load_hf_reward_model(path, shardings=shardings, overrides=fields)
            else:
                shardings = shard_fn(nnx.state(nnx.eval_shape(lambda: Decoder(model_config, rngs=nnx.Rngs(0)))))
                decoder = load_hf_checkpoint(path, shardings=shardings, overrides=fields)
                model = reward_model_from_decoder(decoder, nnx.Rngs(config.train.seed))
        return _state_from_model(model, optimizer, mesh, shard_fn, config.train.seed)

    def export(self, state: TrainState, out_dir: str | os.PathLike[str], tokenizer: Any, dtype: str | None) -> None:
        """`save_hf_reward_model` (pad_token_id from the model config) plus the tokenizer."""
        from tulu_jax.models.hf_reward_io import save_hf_reward_model

        save_hf_reward_model(state.model(), out_dir, dtype=dtype)
        if tokenizer is not None and jax.process_index() == 0:
            tokenizer.save_pretrained(str(out_dir))

    def load_data(self, config: RMConfig, tokenizer: Any, spec: ShardingSpec, mesh: Mesh) -> StageData:
        """DPO's tokenized pairs and padded pair batches; DataError if a pair contains the pad token."""
        data = DPOStage.load_data(self, config, tokenizer, spec, mesh)  # type: ignore[arg-type]
        pad = self.model_config(config, tokenizer, abstract=False).pad_token_id
        check_pad_token(data.extra["pairs"], pad, data.extra["source_name"])
        return data

    def batch_shardings(self, setup: StageSetup) -> PairBatch:
        """Pair batches without reference log-probs."""
        return PairBatch.shardings(setup.mesh, setup.spec, reference=False)

    abstract_batch = DPOStage.abstract_batch  # train.global_batch_size pairs × data.max_seq_len tokens per side

    def build_step(self, setup: StageSetup) -> Step:
        """`build_rm_step` with the setup's state, shardings and accumulation."""
        return build_rm_step(
            setup.state.graphdef, setup.optimizer, setup.config.rm, state_shardings=shardings_of(setup.state),
            batch_shardings=self.batch_shardings(setup), grad_accum_steps=setup.grad_accum,
        )

    def batches(self, setup: StageSetup) -> tuple[Any, Batcher]:
        """The pair-batch iterator (checkpointed with the run) and the Batcher placing its batches."""
        from tulu_jax.data.pipeline import batch_iterator

        config = setup.config
        batcher = Batcher(self.batch_shardings(setup), config.train.global_batch_size, typed=PairBatch.from_host)
        return batch_iterator(setup.data.dataset, self.pipeline_config(config)), batcher

    def describe(self, setup: StageSetup) -> str:
        """The global batch, the micro-batches per device, the model and its dtypes."""
        config, model = setup.config, setup.model_config
        pairs, seq_len = config.train.global_batch_size, config.data.max_seq_len
        per_device = pairs // (setup.grad_accum * batch_shards(setup.mesh, setup.spec))
        return (
            f"rm step (−log σ(r_c − r_r), concat_forward {config.rm.concat_forward}): global batch {pairs} pairs × "
            f"{seq_len} tokens per side, {setup.grad_accum} micro-batches of {per_device} pair(s) per device; "
            f"reward model {model.architecture} hidden {model.hidden_size} × {model.num_layers} layers + score "
            f"head, params {model.param_dtype}, compute {model.compute_dtype}, remat {model.remat}"
        )


STAGE = RMStage()

__all__ = ["RMConfig", "RMSection", "RMStage", "STAGE", "build_rm_step", "check_pad_token", "pair_rewards",
           "rm_loss_fn"]
