"""The one registry of training stages, read by the CLI (`tulu-jax <stage>`), `tulu-jax compile-check --stage` and the
pipeline. Adding a stage = one module defining a `Stage` (usually a `tulu_jax.stages.training.TrainingStage`
subclass instance named STAGE) + one line in STAGES.

This module imports no JAX: the CLI builds its parser from STAGES before a command picks the JAX platform; the stage
module is imported when `get_stage` is called.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from tulu_jax.errors import ConfigError

if TYPE_CHECKING:
    from tulu_jax.stages.training import StageSetup
    from tulu_jax.train import Step, TrainState


@runtime_checkable
class Stage(Protocol):
    """What every training stage provides.

    - `name`, `config_class`: the CLI command and its config dataclass (sections from `tulu_jax.stages.sections`).
    - `setup(config, sharding, *, abstract, devices)`: mesh, tokenizer, data, optimizer, sharded state and frozen
      models, built once; `abstract=True` builds sharded ShapeDtypeStructs and reads no data (AOT compilation).
      `sharding` is a sharding file path or an already built `(ShardingSpec, Mesh)`.
    - `build_step(setup)`: the jitted `(state, batch, frozen) -> (state, metrics)`.
    - `abstract_batch(setup)`: one global batch as sharded ShapeDtypeStructs.
    - `aot(config, sharding)`: (step, (state, batch, frozen), summary line) for `.lower(*args).compile()`.
    - `run(config, sharding, *, devices)`: train end to end (resuming from the run dir), export; the final state.
    """

    name: str
    config_class: type

    def setup(self, config: Any, sharding: Any, *, abstract: bool = False, devices: Any = None) -> StageSetup: ...

    def build_step(self, setup: StageSetup) -> Step: ...

    def abstract_batch(self, setup: StageSetup) -> Any: ...

    def aot(self, config: Any, sharding: Any) -> tuple[Step, tuple[Any, ...], str]: ...

    def run(self, config: Any, sharding: Any, *, devices: Any = None) -> TrainState: ...


@dataclasses.dataclass(frozen=True)
class StageEntry:
    """Where a stage lives ("module:attribute", imported on use) and its one-line help for the CLI."""

    target: str
    help: str


STAGES: dict[str, StageEntry] = {
    "sft": StageEntry("tulu_jax.stages.sft:STAGE", "supervised fine-tuning (Tülu 3 SFT)"),
    "dpo": StageEntry("tulu_jax.stages.dpo:STAGE", "preference tuning (Tülu 3 length-normalized DPO)"),
    "distill": StageEntry("tulu_jax.stages.distill:STAGE", "teacher-student distillation (online, offline, on-policy)"),
    "rlvr": StageEntry("tulu_jax.stages.rlvr:STAGE", "RL with verifiable rewards (Tülu 3 PPO, or GRPO)"),
    "rm": StageEntry("tulu_jax.stages.rm:STAGE", "reward-model training on preference pairs (RLVR's value init)"),
}


def get_stage(name: str) -> Stage:
    """The registered stage `name` (its module is imported now); ConfigError naming the known stages otherwise."""
    if name not in STAGES:
        raise ConfigError(f"unknown stage {name!r}; known: {', '.join(STAGES)}")
    module_name, attribute = STAGES[name].target.split(":")
    stage = getattr(importlib.import_module(module_name), attribute)
    if not isinstance(stage, Stage):
        raise TypeError(f"{STAGES[name].target} does not provide the Stage protocol")
    return stage


def main(args: Any) -> int:
    """`tulu-jax <stage> --config C --sharding S [--set k=v ...]`: load the config (every check first), then run;
    exit status 0 (also after SIGTERM, which checkpoints and stops)."""
    from tulu_jax.stages.sections import load_stage_config

    stage = get_stage(args.command)
    config = load_stage_config(stage.config_class, args.config, args.overrides)
    stage.run(config, os.fspath(args.sharding))
    return 0
