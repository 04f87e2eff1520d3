"""The RLVR stage (`tulu-jax rlvr`): PPO with verifiable rewards (Tülu 3), or GRPO, on the training mesh.

Data: RLVR rows `{"messages": [prompt turns], "ground_truth", "dataset"}` from `data.sources` (a row without
`ground_truth` or with a `dataset` no verifier serves is one DataError naming file, row and field), rendered with
the generation prompt; prompts longer than `data.max_seq_len` tokens are dropped and counted.

State: a `MultiTrainState` {"policy", "value"} (GRPO: {"policy"}), each with its own AdamW; the value model is the
policy's backbone with a fresh scalar head (`rlvr.value_init: policy`) or an RM export (`reward_model`, whose
hidden size and vocabulary must match the policy's). The frozen reference is the initial policy, a jit argument.

An iteration (`tulu_jax.rl.loop`): rollouts at temperature 1 from the policy's own arrays (no weight copy, so the
weight-sync time is 0 by construction), verifier scores in worker processes, the rollout → `RolloutBatch` program,
then `rlvr.ppo_epochs` passes over `rlvr.num_minibatches` shuffled minibatches. `train.global_batch_size` counts
the rollout SEQUENCES trained per iteration (prompts × group_size; GRPO may sample more prompts,
`rlvr.rollout_prompts`, and train on the groups whose scores differ first); `train.epochs` passes over the prompts
sampled (capped by
`train.max_steps` iterations). The final policy is exported to run_dir/hf (and the value model to run_dir/value_hf
as a sequence-classification model).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import types
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from tulu_jax.errors import ConfigError
from tulu_jax.models.reward import RewardModel, check_value_model_matches, reward_model_from_decoder
from tulu_jax.rl.ppo_step import POLICY, REFERENCE, VALUE, RLVRSection, build_ppo_step, build_prepare_fn
from tulu_jax.sharding import ShardingSpec
from tulu_jax.stages import sections
from tulu_jax.stages.paths import resolve_path
from tulu_jax.stages.setup import _state_from_model, batch_shards, variable_shardings
from tulu_jax.stages.training import ABSTRACT_STEPS, StageData, StageSetup, TrainingStage
from tulu_jax.train import Step, abstract_train_state, freeze, shardings_of
from tulu_jax.train.batches import RolloutBatch
from tulu_jax.train.multi import MultiTrainState
from tulu_jax.train.optim import Optimizer

PyTree = Any


@dataclasses.dataclass
class RLVRDataSection(sections.DataSection):
    """`data` of RLVR: max_seq_len caps the PROMPT (recipe: 2048); prompts are never packed."""

    max_seq_len: int = 2048


@dataclasses.dataclass
class RLVROptimSection(sections.OptimSection):
    """`optim` of RLVR (the policy's; the value model's is the same with `rlvr.value_lr` if set): lr 3e-7 (8B),
    linear decay, no warmup."""

    lr: float = 3e-7
    warmup_ratio: float = 0.0


@dataclasses.dataclass
class RLVRTrainSection(sections.TrainSection):
    """`train` of RLVR: global_batch_size = rollout sequences per iteration (recipe 8B: 224); epochs over the
    prompts; max_steps caps the ITERATIONS."""

    global_batch_size: int = 224
    epochs: int = 1


@dataclasses.dataclass
class RLVROutputSection(sections.OutputSection):
    """`output` of RLVR: save_every counts iterations."""

    run_dir: str = "runs/rlvr"
    save_every: int | None = 10
    log_every: int = 1


@dataclasses.dataclass
class RLVRConfig:
    """A full RLVR run: the shared sections plus `rlvr` (`tulu_jax.rl.ppo_step.RLVRSection`)."""

    model: sections.ModelSection
    tokenizer: sections.TokenizerSection = dataclasses.field(default_factory=sections.TokenizerSection)
    data: RLVRDataSection = dataclasses.field(default_factory=RLVRDataSection)
    optim: RLVROptimSection = dataclasses.field(default_factory=RLVROptimSection)
    train: RLVRTrainSection = dataclasses.field(default_factory=RLVRTrainSection)
    output: RLVROutputSection = dataclasses.field(default_factory=RLVROutputSection)
    rlvr: RLVRSection = dataclasses.field(default_factory=RLVRSection)

    def __post_init__(self) -> None:
        if not self.data.sources:
            raise ValueError("'data.sources' lists no data source")
        if self.train.global_batch_size % self.rlvr.group_size:
            raise ValueError(f"'train.global_batch_size' {self.train.global_batch_size} must be a multiple of "
                             f"'rlvr.group_size' {self.rlvr.group_size}")
        if self.train.global_batch_size % self.rlvr.num_minibatches:
            raise ValueError(f"'train.global_batch_size' {self.train.global_batch_size} must be a multiple of "
                             f"'rlvr.num_minibatches' {self.rlvr.num_minibatches}")
        minibatch = self.train.global_batch_size // self.rlvr.num_minibatches
        if minibatch % self.rlvr.prompt_group:
            raise ValueError(f"'rlvr.share_prompts': a minibatch of {minibatch} "
                             f"sequences (train.global_batch_size / rlvr.num_minibatches) must be whole groups of "
                             f"'rlvr.group_size' {self.rlvr.group_size} (or set rlvr.share_prompts: false)")
        trained, sampled = self.train.global_batch_size // self.rlvr.group_size, rollout_prompts(self)
        if sampled < trained or sampled > trained and self.rlvr.algorithm != "grpo":
            raise ValueError(f"'rlvr.rollout_prompts' {sampled} must be at least the {trained} prompt groups an "
                             "iteration trains on (train.global_batch_size / rlvr.group_size), and more only for "
                             "grpo (it picks groups by their score spread)")
        if rollout_rows(self) % self.rlvr.rollout_chunks:
            raise ValueError(f"the {rollout_rows(self)} rollout sequences per iteration must be a multiple of "
                             f"'rlvr.rollout_chunks' {self.rlvr.rollout_chunks}")


def rollout_prompts(config: RLVRConfig) -> int:
    """Prompts sampled per iteration: `rlvr.rollout_prompts`, else the train.global_batch_size / group_size trained."""
    return config.rlvr.rollout_prompts or config.train.global_batch_size // config.rlvr.group_size


def rollout_rows(config: RLVRConfig) -> int:
    """Sequences sampled per iteration (prompts × group_size)."""
    return rollout_prompts(config) * config.rlvr.group_size


def optimizer_steps(config: RLVRConfig, iterations: int) -> int:
    """Optimizer updates of a run: iterations × PPO epochs × minibatches."""
    return iterations * config.rlvr.ppo_epochs * config.rlvr.num_minibatches


def minibatch_size(config: RLVRConfig) -> int:
    """Rollout sequences per optimizer step."""
    return config.train.global_batch_size // config.rlvr.num_minibatches


def value_optimizer(config: RLVRConfig, steps: int) -> Optimizer:
    """The value model's AdamW: `optim` with `rlvr.value_lr` as its learning rate when set."""
    optim = config.optim if config.rlvr.value_lr is None else dataclasses.replace(config.optim, lr=config.rlvr.value_lr)
    return optim.build(steps)


def check_value_model_path(config: RLVRConfig, policy: Any) -> str:
    """The RM export's directory; ConfigError (naming it) unless it exists and its hidden size and vocabulary
    match the policy's — checked on config.json, before any weight is read."""
    path = resolve_path(config.rlvr.value_model_path)
    config_json = path / "config.json"
    if not config_json.is_file():
        raise ConfigError(f"rlvr.value_model_path: {config.rlvr.value_model_path} has no config.json")
    hf = json.loads(config_json.read_text())
    shape = types.SimpleNamespace(vocab_size=hf.get("vocab_size"), hidden_size=hf.get("hidden_size"))
    check_value_model_matches(policy, shape, source=f"rlvr.value_model_path {config.rlvr.value_model_path}")
    return str(path)


class RLVRStage(TrainingStage):
    """RLVR as a registered stage: prompts with verifiable answers, a policy (+ value) MultiTrainState, the PPO/GRPO
    step of `tulu_jax.rl.ppo_step` over rollout minibatches, the iteration loop of `tulu_jax.rl.loop`."""

    name = "rlvr"
    config_class = RLVRConfig

    def load_data(self, config: RLVRConfig, tokenizer: Any, spec: ShardingSpec, mesh: Mesh) -> StageData:
        """Validated rows and their tokenized prompts; the number of iterations and optimizer steps."""
        from tulu_jax.rl.loop import load_prompts

        prompts = load_prompts(config, tokenizer)
        iterations = math.ceil(config.train.epochs * len(prompts.rows) / rollout_prompts(config))
        if config.train.max_steps is not None:
            iterations = min(iterations, config.train.max_steps)
        return StageData(prompts, optimizer_steps(config, iterations), {"data_report.json": prompts.report},
                         {"iterations": iterations})

    def frozen(self, setup: StageSetup) -> PyTree:
        """The reference: the initial policy, frozen (its own buffers: the step donates the policy's)."""
        return {REFERENCE: freeze(setup.state, copy=not setup.abstract)}

    def setup(self, config: RLVRConfig, sharding: Any, *, abstract: bool = False, devices: Any = None) -> StageSetup:
        """The shared setup (policy state, reference), then the value model and the MultiTrainState."""
        setup = super().setup(config, sharding, abstract=abstract, devices=devices)
        shard_fn = variable_shardings(setup.mesh, setup.spec)
        steps = ABSTRACT_STEPS if setup.data is None else setup.data.num_steps
        members = {POLICY: setup.state}
        if config.rlvr.uses_value:
            optimizer = value_optimizer(config, steps)
            if abstract:
                members[VALUE] = abstract_train_state(lambda rngs: RewardModel(setup.model_config, rngs), optimizer,
                                                      setup.mesh, shard_fn)
            else:
                members[VALUE] = self._value_state(config, setup, optimizer, shard_fn)
        step, rng = setup.state.step, setup.state.rng
        if not abstract:  # the run's own buffers: the step donates the state, and a buffer may be donated once
            step, rng = jax.tree.map(jnp.copy, (step, rng))
        setup.state = MultiTrainState(models=members, step=step, rng=rng)  # type: ignore[assignment]
        return setup

    @staticmethod
    def optimizers(setup: StageSetup) -> dict[str, Optimizer]:
        """Each trained model's optimizer (the value model's rebuilt like the setup built it)."""
        config = setup.config
        if not config.rlvr.uses_value:
            return {POLICY: setup.optimizer}
        steps = ABSTRACT_STEPS if setup.data is None else setup.data.num_steps
        return {POLICY: setup.optimizer, VALUE: value_optimizer(config, steps)}

    @staticmethod
    def _value_state(config: RLVRConfig, setup: StageSetup, optimizer: Optimizer, shard_fn: Any) -> Any:
        seed = config.train.seed + 1
        if config.rlvr.value_init == "reward_model":
            from tulu_jax.models.hf_reward_io import load_hf_reward_model

            path = check_value_model_path(config, setup.model_config)
            with nnx.use_eager_sharding(False):
                abstract = nnx.eval_shape(lambda: RewardModel(setup.model_config, nnx.Rngs(0)))
            model = load_hf_reward_model(path, shardings=shard_fn(nnx.state(abstract)), overrides=dict(
                param_dtype=setup.model_config.param_dtype, compute_dtype=setup.model_config.compute_dtype,
                remat=setup.model_config.remat, attention=setup.model_config.attention))
            check_value_model_matches(setup.model_config, model.config, source=f"rlvr.value_model_path {path}")
        else:
            model = reward_model_from_decoder(setup.state.model(), nnx.Rngs(seed))
        return _state_from_model(model, optimizer, setup.mesh, shard_fn, seed)

    def batch_shardings(self, setup: StageSetup) -> RolloutBatch:
        """Every [B, T] field along the batch axes."""
        from tulu_jax.sharding import batch_sharding

        sharding = batch_sharding(setup.mesh, setup.spec)
        return RolloutBatch(*([sharding] * len(RolloutBatch.__dataclass_fields__)))

    def abstract_batch(self, setup: StageSetup) -> RolloutBatch:
        """One minibatch: global_batch_size / num_minibatches sequences × (max prompt + max response) tokens."""
        import numpy as np

        config = setup.config
        rows, length = minibatch_size(config), config.data.max_seq_len + config.rlvr.response_width
        shardings = self.batch_shardings(setup)
        dtypes = dict(tokens=np.int32, positions=np.int32, segment_ids=np.int32, response_mask=np.bool_)
        return RolloutBatch(**{name: jax.ShapeDtypeStruct((rows, length), np.dtype(dtypes.get(name, np.float32)),
                                                          sharding=getattr(shardings, name))
                               for name in RolloutBatch.__dataclass_fields__})

    def build_prepare(self, setup: StageSetup, rl: RLVRSection | None = None) -> Any:
        """`build_prepare_fn` (the rollout → `RolloutBatch` program) on the setup's states and batch layout, for
        the config's RLVR section or another `rl` (e.g. the same with the old log-probs recomputed)."""
        rl = rl or setup.config.rlvr
        state = setup.state
        shardings = shardings_of(state)
        value = state.models.get(VALUE)
        return build_prepare_fn(
            state.models[POLICY].graphdef, None if value is None else value.graphdef, rl,
            model_shardings={name: (s.params, s.model_state) for name, s in shardings.models.items()},
            frozen_shardings=shardings_of(setup.frozen), batch_sharding=self.batch_shardings(setup).tokens)

    def build_step(self, setup: StageSetup) -> Step:
        """`build_ppo_step` with the setup's states, shardings and accumulation."""
        config = setup.config
        shards = batch_shards(setup.mesh, setup.spec)
        if minibatch_size(config) % (setup.grad_accum * shards):
            raise ConfigError(
                f"a minibatch of {minibatch_size(config)} sequences (train.global_batch_size / rlvr.num_minibatches) "
                f"must be a multiple of grad_accum_steps {setup.grad_accum} × {shards} batch shards")
        if minibatch_size(config) % (setup.grad_accum * config.rlvr.prompt_group):
            raise ConfigError(
                f"'rlvr.share_prompts': a micro-batch of {minibatch_size(config) // setup.grad_accum} sequences "
                f"(minibatch / grad_accum_steps) must be whole groups of 'rlvr.group_size' {config.rlvr.group_size}")
        chunk = rollout_rows(config) // config.rlvr.rollout_chunks
        if chunk % shards:
            raise ConfigError(f"a rollout chunk of {chunk} sequences (rollout sequences / rlvr.rollout_chunks) "
                              f"must be a multiple of the {shards} batch shards")
        return build_ppo_step(self.optimizers(setup), config.rlvr, state_shardings=shardings_of(setup.state),
                              batch_shardings=self.batch_shardings(setup), frozen_shardings=shardings_of(setup.frozen),
                              grad_accum_steps=setup.grad_accum)

    def describe(self, setup: StageSetup) -> str:
        """The algorithm, the rollout batch, the minibatches and the models."""
        config, model, rl = setup.config, setup.model_config, setup.config.rlvr
        value = f"value model ({rl.value_init})" if rl.uses_value else "no value model"
        sampled = (f" (of {rollout_rows(config)} sampled, groups with a score spread first)"
                   if rollout_rows(config) > config.train.global_batch_size else "")
        shared = f" (each prompt run once for its {rl.prompt_group} responses)" if rl.prompt_group > 1 else ""
        return (
            f"rlvr {rl.algorithm} step (β={rl.kl_coef}, clip {rl.clip}, {value}, frozen reference): rollout batch "
            f"{config.train.global_batch_size} sequences{sampled} × ({config.data.max_seq_len} prompt + "
            f"{rl.max_new_tokens} response) tokens{shared}, {rl.ppo_epochs} epochs × {rl.num_minibatches} "
            f"minibatches of {minibatch_size(config)}, {setup.grad_accum} micro-batches each; model "
            f"{model.architecture} hidden {model.hidden_size} × {model.num_layers} layers, params {model.param_dtype}, compute "
            f"{model.compute_dtype}; the rollout sampler (with its KV cache) and the rollout → batch program "
            "(reference, old log-probs, values) are separate programs, not in this step"
        )

    def run(self, config: RLVRConfig, sharding: Any, *, devices: Any = None) -> MultiTrainState:
        """Train end to end (resuming from run_dir's latest checkpoint if any), export; the final state."""
        from tulu_jax.rl.loop import RLVRLoop

        setup = self.setup(config, sharding, devices=devices)
        loop = RLVRLoop(setup, self.build_step(setup), self.batch_shardings(setup))
        print(f"tulu-jax rlvr: {setup.data.extra['iterations']} iterations, {setup.data.num_steps} optimizer steps; "
              f"{self.describe(setup)}; mesh {dict(setup.mesh.shape)}", file=sys.stderr)
        return loop.run(setup.data.extra["iterations"])


STAGE = RLVRStage()

__all__ = ["RLVRConfig", "RLVRStage", "STAGE", "check_value_model_path", "minibatch_size", "optimizer_steps"]
