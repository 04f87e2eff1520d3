"""`tulu-jax`: a thin dispatcher over the stage modules, which are imported only when their command runs.

    tulu-jax sft --config CONFIG --sharding SHARDING [--set key=value ...] [--resume [--allow-config-change]]
    tulu-jax dpo --config CONFIG --sharding SHARDING [--set key=value ...] [--resume [--allow-config-change]]
    tulu-jax eval --model HF_DIR --data FILE.jsonl [--sharding SHARDING] [...]
    tulu-jax pipeline --config configs/tiny_arith.yaml [--resume [--allow-config-change]] [--set key=value ...]
    tulu-jax distill-compare --config configs/tiny_arith_distill.yaml [--resume] [--set key=value ...]
    tulu-jax compile-check --config CONFIG --sharding SHARDING [--set key=value ...] [--show-shardings]
    tulu-jax compile-check --table [--table-cells JSONL] [--table-doc MD]   (the memory table of docs/memory.md)
    tulu-jax decontaminate --train DATA... --eval DATA... [--ngram 8] [--threshold 0.5] [--out DIR]
    tulu-jax convert to-orbax --hf HF_DIR --out DIR        (HF weights → orbax params checkpoint)
    tulu-jax convert to-hf --run-dir RUN_DIR --out DIR     (a run's checkpoint → HF directory)

A command is one row of COMMANDS: `name: Command("module:function", "help")`, where `function(args) -> int`
receives the parsed arguments (a stage gets `config`, `sharding` and `overrides`) and returns the exit status.
Bad input (a TuluJaxError: config, data, checkpoint) prints one line and exits 1, without a stack trace.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence

from tulu_jax import platform
from tulu_jax.errors import TuluJaxError
from tulu_jax.stages.registry import STAGES


def config_arguments(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    """A stage config, the sharding file, and overrides."""
    parser.add_argument("--config", required=required, help="recipe config YAML (configs/*.yaml)")
    parser.add_argument("--sharding", required=required, help="sharding file YAML (sharding/*.yaml)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set optim.lr=1e-5 (repeat --set for each key)",
    )


def stage_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of every training stage: its config, and whether to continue the run in its run directory
    (the flags set output.resume / output.allow_config_change; tulu_jax.stages.resume has the rules)."""
    config_arguments(parser)
    parser.add_argument("--resume", dest="overrides", action="append_const", const="output.resume=true",
                        help="continue the run in output.run_dir from its latest checkpoint (same config)")
    parser.add_argument("--allow-config-change", dest="overrides", action="append_const",
                        const="output.allow_config_change=true",
                        help="with --resume: accept a changed config; the change is recorded in the run directory")
    parser.add_argument("--strict-resume", dest="overrides", action="append_const", const="output.strict_resume=true",
                        help="stop if the newest checkpoint is corrupt instead of resuming from the newest intact one")


def compile_check_arguments(parser: argparse.ArgumentParser) -> None:
    """A stage's config arguments (optional with --table) plus which stage's train step to compile."""
    config_arguments(parser, required=False)
    parser.add_argument("--stage", default=None, choices=list(STAGES),
                        help="whose train step the config describes (default: the stage whose config it is)")
    parser.add_argument("--show-shardings", action="store_true", help="also list the activation shardings")
    parser.add_argument("--table", action="store_true",
                        help="compile every recipe config on every pod sharding file; print a markdown memory table")
    parser.add_argument("--table-cells", default=None, metavar="JSONL",
                        help="with --table: keep finished rows in this file and compile only the missing ones")
    parser.add_argument("--table-doc", default=None, metavar="MARKDOWN",
                        help="with --table: rewrite the table section of this markdown file after every row")


def convert_arguments(parser: argparse.ArgumentParser) -> None:
    """`convert to-orbax` and `convert to-hf`."""
    sub = parser.add_subparsers(dest="direction", required=True, metavar="{to-orbax,to-hf}")
    to_orbax = sub.add_parser("to-orbax", help="HF weights → an orbax checkpoint of the model parameters")
    to_orbax.add_argument("--hf", required=True, help="HF model directory (config.json + safetensors)")
    to_orbax.add_argument("--out", required=True, help="output directory (params/ + model_config.json)")
    to_orbax.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="parameter dtype")
    to_orbax.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    to_hf = sub.add_parser("to-hf", help="a training run's checkpoint → an HF model directory")
    to_hf.add_argument("--run-dir", required=True, help="the run directory (holds checkpoints/ and model_config.json)")
    to_hf.add_argument("--out", required=True, help="output HF directory")
    to_hf.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    to_hf.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="tensor dtype in the files")
    to_hf.add_argument("--overwrite", action="store_true",
                       help="write into a non-empty --out (its old safetensors files are removed first)")


def pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    """`tulu-jax pipeline`: a pipeline config, where it runs, and whether to continue a run directory."""
    parser.add_argument("--config", required=True, help="pipeline config YAML (configs/tiny_arith.yaml)")
    parser.add_argument("--sharding", default="sharding/cpu-1.yaml", help="sharding file (default: one CPU device)")
    parser.add_argument("--resume", action="store_true", help="continue a run directory: skip finished stages")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="with --resume: accept a changed config; the change is recorded in the run directory")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set sft.optim.lr=1e-3 (repeatable)")


@dataclasses.dataclass(frozen=True)
class Command:
    """A subcommand: `target` is "module:function" (imported when the command runs), `arguments` adds its flags;
    `environment`: defaults for environment variables, set before JAX starts (a variable already set wins)."""

    target: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None] = stage_arguments
    environment: Mapping[str, str] = dataclasses.field(default_factory=dict)


# Commands that compute on this host's CPU whatever the sharding file targets (AOT compilation, conversion).
HOST_CPU = {"JAX_PLATFORMS": "cpu"}
# libtpu, loaded only to describe a TPU topology: it probes for a Cloud TPU VM and logs errors on any other host
# (the first three skip the probe; they do not change topology descriptions, checked for v5p:4x4x2, v5e:2x2 and
# v6e:16x16), and it takes a machine-wide lock that fails a second process compiling at the same time (the last).
QUIET_LIBTPU = {
    "TPU_SKIP_MDS_QUERY": "1",
    "TPU_WORKER_HOSTNAMES": "localhost",
    "TPU_ACCELERATOR_TYPE": "v5p-8",
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
}


COMMANDS: dict[str, Command] = {
    # every registered training stage is a command (tulu_jax.stages.registry.STAGES)
    **{name: Command("tulu_jax.stages.registry:main", entry.help) for name, entry in STAGES.items()},
    "eval": Command(
        "tulu_jax.stages.eval:main", "generate answers to verifiable prompts, score them per dataset",
        lambda p: importlib.import_module("tulu_jax.stages.eval").add_arguments(p),
    ),
    "pipeline": Command(
        "tulu_jax.stages.pipeline:main", "the recipe end to end on a toy world, evaluated after every stage",
        pipeline_arguments,
    ),
    "distill-compare": Command(
        "tulu_jax.stages.distill_compare:main",
        "one student by SFT, offline and on-policy distillation from a pipeline's final model, evaluated",
        pipeline_arguments,
    ),
    "distill-targets": Command(
        "tulu_jax.stages.distill_targets:main", "write a teacher's sparse targets for offline distillation",
    ),
    "compile-check": Command(
        "tulu_jax.stages.compile_check:main",
        "compile a config's train step for its TPU topology; report memory",
        compile_check_arguments,
        environment={**HOST_CPU, **QUIET_LIBTPU},
    ),
    "decontaminate": Command(
        "tulu_jax.data.decontaminate:main", "find and drop training rows that overlap eval items (n-gram matching)",
        lambda p: importlib.import_module("tulu_jax.data.decontaminate").add_arguments(p),
    ),
    "convert": Command(
        "tulu_jax.stages.convert:main", "convert weights: HF → orbax, run checkpoint → HF", convert_arguments,
        environment=HOST_CPU,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command in COMMANDS."""
    parser = argparse.ArgumentParser(prog="tulu-jax", description="The Tülu 3 post-training recipe in JAX.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, command in COMMANDS.items():
        command.arguments(sub.add_parser(name, help=command.help, description=command.help))
    return parser


def configure_platform(sharding_path: str | None, environment: Mapping[str, str] | None = None) -> None:
    """Before JAX starts: apply a command's environment defaults; a CPU sharding file (`platform: cpu`) gets
    JAX_PLATFORMS=cpu and, unless XLA_FLAGS sets a count, as many host devices as its mesh needs, so that
    `--sharding sharding/cpu-8.yaml` just works."""
    if "jax" in sys.modules:  # too late to change the platform of a running JAX
        return
    for key, value in (environment or {}).items():
        if key == "JAX_PLATFORMS":
            platform.choose(value)  # replaces tulu-jax's quiet default, never the user's choice
        else:
            os.environ.setdefault(key, value)
    if environment or sharding_path is None:
        return
    from tulu_jax.config import read_yaml
    from tulu_jax.stages.paths import resolve_path

    path = resolve_path(sharding_path)
    if not path.is_file():
        return  # the stage reports the missing file
    data = read_yaml(path)
    if data.get("platform") != "cpu":
        return
    platform.choose("cpu")
    mesh = data.get("mesh")
    sizes = list(mesh.values()) if isinstance(mesh, dict) else []
    flags = os.environ.get("XLA_FLAGS", "")
    counted = "xla_force_host_platform_device_count" in flags
    if sizes and all(isinstance(s, int) and s > 0 for s in sizes) and not counted:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={math.prod(sizes)}".strip()


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, import the command's module, run it; returns the exit status."""
    args = build_parser().parse_args(argv)
    command = COMMANDS[args.command]
    module_name, function_name = command.target.split(":")
    try:
        configure_platform(getattr(args, "sharding", None), command.environment)  # reads the sharding YAML
        function = getattr(importlib.import_module(module_name), function_name)
        return int(function(args) or 0)
    except TuluJaxError as e:
        print(f"tulu-jax {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
