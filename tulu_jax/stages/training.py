"""`TrainingStage`: the one setup path and run loop every registered stage shares (see `tulu_jax.stages.registry`).

`setup(config, sharding, abstract=...)` builds, in this order and once: the mesh (a sharding file, starting
jax.distributed when multi-process; or a given `(spec, mesh)`, e.g. a TPU topology's), the tokenizer, the model
config, gradient accumulation, the data (`load_data`, stage-specific; errors name file/row/field), the optimizer
(`config.optim.build(num_steps)`), the sharded train state and the frozen models (`frozen`). With `abstract=True`
it reads no data and allocates nothing: state and frozen models are sharded ShapeDtypeStructs, so `aot` compiles
exactly what `run` trains. `run` = `setup` + `build_step` + `batches` + `stages.run_dir.train_and_export`.

A stage subclasses TrainingStage and fills in `name`, `config_class`, `load_data`, `batch_shardings`,
`abstract_batch`, `build_step`, `batches` and `describe` (and `frozen` when its step reads frozen models;
`model_config`, `init_state` and `export` when it trains another model than the causal-LM Decoder).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from jax.sharding import Mesh

from tulu_jax.errors import ConfigError
from tulu_jax.models.activation_sharding import with_activation_sharding
from tulu_jax.models.config import ModelConfig
from tulu_jax.sharding import ShardingSpec, load_sharding, tpu_topology_mesh
from tulu_jax.stages.paths import resolve_path
from tulu_jax.stages.run_dir import export_hf, train_and_export
from tulu_jax.stages.setup import (
    abstract_stage_state,
    check_run_dir,
    init_stage_state,
    load_stage_tokenizer,
    resolve_grad_accum,
    resolve_model_config,
    setup_mesh,
)
from tulu_jax.train import Optimizer, Step, TrainState

PyTree = Any
# Optimizer steps assumed by an abstract setup: the schedule's length does not change any shape.
ABSTRACT_STEPS = 1000


@dataclasses.dataclass
class StageData:
    """A stage's training data: `dataset` (what `batches` iterates), optimizer steps, JSON files for the run dir,
    and whatever else the stage keeps (`extra`, e.g. DPO's tokenized pairs)."""

    dataset: Any
    num_steps: int
    run_files: dict[str, Any] = dataclasses.field(default_factory=dict)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class StageSetup:
    """Everything a stage built before its first step. Abstract setups hold sharded ShapeDtypeStructs in `state` and
    `frozen` and have no tokenizer and no data."""

    config: Any
    spec: ShardingSpec
    mesh: Mesh
    abstract: bool
    model_config: ModelConfig
    grad_accum: int
    optimizer: Optimizer
    state: TrainState
    frozen: PyTree = None
    tokenizer: Any = None
    data: StageData | None = None


def placement(
    sharding: str | os.PathLike[str] | tuple[ShardingSpec, Mesh], *, abstract: bool, devices: Sequence[Any] | None
) -> tuple[ShardingSpec, Mesh]:
    """(spec, mesh): given as a pair, or from a sharding file — its devices for a run, its TPU topology (described
    by libtpu from any host) for an abstract setup."""
    if isinstance(sharding, tuple):
        return sharding
    if not abstract:
        return setup_mesh(sharding, devices)
    resolved = resolve_path(sharding)
    if not resolved.is_file():
        raise ConfigError(f"{sharding}: sharding file not found")
    spec = load_sharding(resolved)
    return spec, tpu_topology_mesh(spec)


class TrainingStage:
    """The shared setup/run of a stage; subclasses provide the stage-specific pieces (module docstring)."""

    name: str
    config_class: type

    # ----------------------------------------------------------------------------------------- stage-specific

    def load_data(self, config: Any, tokenizer: Any, spec: ShardingSpec, mesh: Mesh) -> StageData:
        """Read, validate and tokenize the training data; the number of optimizer steps."""
        raise NotImplementedError

    def frozen(self, setup: StageSetup) -> PyTree:
        """The frozen models the step reads (a mapping name → FrozenModel), or None (the default)."""
        return None

    def batch_shardings(self, setup: StageSetup) -> PyTree:
        """Shardings of one global batch (a prefix tree of the batch)."""
        raise NotImplementedError

    def abstract_batch(self, setup: StageSetup) -> PyTree:
        """One global batch as sharded ShapeDtypeStructs."""
        raise NotImplementedError

    def build_step(self, setup: StageSetup) -> Step:
        """The jitted `(state, batch, frozen) -> (state, metrics)`."""
        raise NotImplementedError

    def batches(self, setup: StageSetup) -> tuple[Any, Callable[[PyTree], PyTree]]:
        """(stateful host-batch iterator, host batch → global batch on the mesh) of a real setup."""
        raise NotImplementedError

    def describe(self, setup: StageSetup) -> str:
        """One line: what one step computes (batch, accumulation, model, dtypes)."""
        raise NotImplementedError

    def train_step(self, setup: StageSetup, step: Step) -> Callable[[TrainState, PyTree], Any]:
        """What the loop calls per batch, `(state, batch) -> (state, metrics)`: the step with the setup's frozen
        models (a stage may wrap it, e.g. to roll out from the state first)."""
        return functools.partial(step, frozen=setup.frozen)

    # ------------------------------------------------------------------- overridable defaults (the LM decoder)

    def model_config(self, config: Any, tokenizer: Any, *, abstract: bool) -> ModelConfig:
        """The run's ModelConfig (`resolve_model_config`: model.path's config.json or the preset)."""
        return resolve_model_config(config.model, tokenizer, allow_preset_fallback=abstract)

    def init_state(
        self, config: Any, model_config: ModelConfig, optimizer: Optimizer, mesh: Mesh, spec: ShardingSpec, *,
        abstract: bool,
    ) -> TrainState:
        """The sharded train state of a Decoder (abstract: ShapeDtypeStructs), from model.path or a fresh init."""
        if abstract:
            return abstract_stage_state(model_config, optimizer, mesh, spec)
        return init_stage_state(config.model, model_config, optimizer, mesh, spec, config.train.seed)

    def export(self, state: TrainState, out_dir: str | os.PathLike[str], tokenizer: Any, dtype: str | None) -> None:
        """Write the final model to `out_dir` (`run_dir.export_hf`: an HF causal LM plus the tokenizer)."""
        export_hf(state, out_dir, tokenizer, dtype)

    # ----------------------------------------------------------------------------------------- shared

    @staticmethod
    def pipeline_config(config: Any) -> Any:
        """The grain pipeline settings of a stage's batches: `data` (length, packing, seed, shuffle) and `train`
        (global batch, epochs)."""
        from tulu_jax.data.pipeline import PipelineConfig

        return PipelineConfig(
            seq_len=config.data.max_seq_len,
            global_batch_size=config.train.global_batch_size,
            packed=config.data.packing,
            seed=config.data.seed,
            num_epochs=config.train.epochs,
            shuffle=config.data.shuffle,
        )

    def setup(
        self, config: Any, sharding: str | os.PathLike[str] | tuple[ShardingSpec, Mesh], *, abstract: bool = False,
        devices: Sequence[Any] | None = None,
    ) -> StageSetup:
        """Build mesh, tokenizer, data, optimizer, state and frozen models once (module docstring)."""
        spec, mesh = placement(sharding, abstract=abstract, devices=devices)
        if not abstract:
            check_run_dir(config)  # may this run write to (or continue) output.run_dir?
        tokenizer = None if abstract else load_stage_tokenizer(config.tokenizer, config.model)
        model_config = self.model_config(config, tokenizer, abstract=abstract)
        accum = resolve_grad_accum(config.train, mesh, spec)
        data = None if abstract else self.load_data(config, tokenizer, spec, mesh)
        optimizer = config.optim.build(ABSTRACT_STEPS if data is None else data.num_steps)
        state = self.init_state(config, model_config, optimizer, mesh, spec, abstract=abstract)
        setup = StageSetup(config, spec, mesh, abstract, model_config, accum, optimizer, state, None, tokenizer, data)
        setup.frozen = self.frozen(setup)
        return setup

    def sharded_step(self, setup: StageSetup) -> Step:
        """`build_step` traced under the activation constraints of the setup's rules (what run and AOT compile)."""
        return with_activation_sharding(self.build_step(setup), setup.mesh, setup.spec)

    def aot(
        self, config: Any, sharding: str | os.PathLike[str] | tuple[ShardingSpec, Mesh]
    ) -> tuple[Step, tuple[Any, ...], str]:
        """The real step with abstract arguments: (step, (state, batch, frozen), summary) for AOT compilation."""
        setup = self.setup(config, sharding, abstract=True)
        return self.sharded_step(setup), (setup.state, self.abstract_batch(setup), setup.frozen), self.describe(setup)

    def run(
        self, config: Any, sharding: str | os.PathLike[str] | tuple[ShardingSpec, Mesh], *,
        devices: Sequence[Any] | None = None,
    ) -> TrainState:
        """Train end to end (resuming from run_dir's latest checkpoint if any), export; returns the final state.
        Errors in the config, the sharding file or the data surface before anything is compiled."""
        setup = self.setup(config, sharding, devices=devices)
        step = self.sharded_step(setup)
        batches, prepare_batch = self.batches(setup)
        print(f"tulu-jax {self.name}: {setup.data.num_steps} steps; {self.describe(setup)}; "
              f"mesh {dict(setup.mesh.shape)}", file=sys.stderr)
        return train_and_export(
            state=setup.state,
            train_step=self.train_step(setup, step),
            batches=batches,
            num_steps=setup.data.num_steps,
            output=config.output,
            config=config,
            model_config=setup.model_config,
            prepare_batch=prepare_batch,
            tokenizer=setup.tokenizer,
            stage=self.name,
            run_files=setup.data.run_files,
            export=self.export,
        )
