"""`tulu-jax compile-check`: compile a stage's real train step for the TPU topology of a sharding file, from any
host (libtpu describes the topology; no TPU needed), and report per-device memory against the chip's HBM.

The step is the one the stage trains with: the registered stage's own setup (`Stage.aot`, the same path as its run,
in abstract mode) gives the step and its abstract inputs — the sharded TrainState, a global batch and the frozen
models — on the topology's mesh. Running out of HBM is a compile-time error
on TPU, reported as "does NOT fit" with exit status 1, never as a stack trace; so is a sharded state whose
arguments alone exceed the chip's HBM (found without compiling). `--show-shardings` lists the activation
shardings the step was traced with; `--table` compiles the recipe configs on every pod file (memory_table.py).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import sys
import time
from typing import Any

import jax
import numpy as np

from tulu_jax.errors import ConfigError
from tulu_jax.models.activation_sharding import ConstraintRecord, activation_sharding, record_constraints
from tulu_jax.sharding import (
    HBM_BYTES,
    HbmExhaustedError,
    compile_for_topology,
    load_sharding,
    make_mesh,
    memory_report,
    tpu_topology_mesh,
)
from tulu_jax.sharding.roofline import Roofline, cost_analysis
from tulu_jax.stages.paths import resolve_path
from tulu_jax.stages.registry import STAGES, get_stage
from tulu_jax.stages.sections import load_stage_config

_GIB = 1024**3
_MOSAIC = 'custom_call_target="tpu_custom_call"'  # how a Pallas TPU kernel appears in compiled HLO


def _size(nbytes: int) -> str:
    return f"{nbytes / _GIB:8.2f} GiB" if nbytes >= _GIB // 10 else f"{nbytes / 2**20:8.2f} MiB"


@dataclasses.dataclass
class CompileCheckResult:
    """The outcome: `fits` (False also when XLA ran out of memory), the memory report (None when it did not
    compile), the one-line step summary, the compile time and the out-of-memory reason if any."""

    fits: bool
    report: dict[str, Any] | None
    summary: str
    compile_seconds: float
    reason: str | None = None
    flops: float | None = None  # XLA's cost analysis of the compiled per-device program
    bytes_accessed: float | None = None
    roofline: Roofline | None = None  # when the sharding file gives the chip's peaks
    kernel_calls: int = 0  # Mosaic (Pallas TPU kernel) custom calls in the compiled program: the splash attention
    constraints: list[ConstraintRecord] = dataclasses.field(default_factory=list)


def infer_stage(config_path: str, overrides: tuple[str, ...] = ()) -> str:
    """The registered stage whose config class loads `config_path` with `overrides` (each stage's config has its own
    keys: a DPO config has `dpo:`, an SFT config `train.loss_reduction`); a ConfigError when none or several do."""
    loads, errors = [], []
    for name in STAGES:
        try:
            load_stage_config(get_stage(name).config_class, config_path, overrides)
        except ConfigError as e:
            errors.append(f"as {name}: {e}")
        else:
            loads.append(name)
    if len(loads) == 1:
        return loads[0]
    if loads:
        raise ConfigError(f"compile-check: {config_path} is a valid config of stages {loads}: pass --stage")
    raise ConfigError(f"compile-check: {config_path} is no stage's config ({'; '.join(errors)})")


def per_device_bytes(tree: Any) -> int:
    """Σ over the leaves of abstract sharded arrays of one device's shard size."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree))


def _build_step(stage: str, config_path: str, sharding_path: str, overrides: tuple[str, ...],
                mesh_of: Any = tpu_topology_mesh) -> tuple[Any, tuple[Any, ...], str, Any, Any]:
    """(jitted step under its activation constraints, abstract args, summary, mesh, spec) of registered `stage` for
    the config on `mesh_of(spec)`, through the stage's own abstract setup (`Stage.aot`)."""
    registered = get_stage(stage)
    config = load_stage_config(registered.config_class, config_path, overrides)
    resolved = resolve_path(sharding_path)
    if not resolved.is_file():
        raise ConfigError(f"{sharding_path}: sharding file not found")
    spec = load_sharding(resolved)
    mesh = mesh_of(spec)
    step, args, summary = registered.aot(config, (spec, mesh))
    return step, args, summary, mesh, spec


def trace_constraints(stage: str, config_path: str, sharding_path: str,
                      overrides: tuple[str, ...] = ()) -> list[ConstraintRecord]:
    """The activation constraints of `stage`'s train step on the sharding file's mesh, from tracing alone (cheap:
    no compilation). The mesh is the TPU topology's if the file names one, else the first devices of this host."""

    def mesh_of(spec: Any) -> Any:
        if spec.topology is not None:
            return tpu_topology_mesh(spec)
        sizes = [size for size in spec.mesh.values() if size != -1]
        devices = jax.devices() if -1 in spec.mesh.values() else jax.devices()[:math.prod(sizes)]
        return make_mesh(spec, devices)

    step, args, _, mesh, spec = _build_step(stage, config_path, sharding_path, overrides, mesh_of)
    with activation_sharding(mesh, spec), record_constraints() as constraints:
        step.trace(*args)
    return constraints


def compile_check(
    stage: str | None, config_path: str, sharding_path: str, overrides: tuple[str, ...] = ()
) -> CompileCheckResult:
    """Build `stage`'s train step (None: the stage the config belongs to) from the config and compile it for the
    sharding file's TPU topology."""
    stage = infer_stage(config_path, overrides) if stage is None else stage
    step, args, summary, mesh, spec = _build_step(stage, config_path, sharding_path, overrides)
    hbm = HBM_BYTES.get(mesh.devices.flat[0].device_kind)
    arguments = per_device_bytes(args)
    if hbm is not None and arguments > hbm:
        reason = (f"the sharded state and batch alone need {arguments / _GIB:.1f} GiB per chip of "
                  f"{hbm / _GIB:.0f} GiB (not compiled)")
        return CompileCheckResult(False, None, summary, 0.0, reason)
    start = time.perf_counter()
    with record_constraints() as constraints:
        try:
            compiled = compile_for_topology(step, args, spec)
        except HbmExhaustedError as e:
            return CompileCheckResult(False, None, summary, time.perf_counter() - start, str(e),
                                      constraints=constraints)
    seconds = time.perf_counter() - start
    report = memory_report(compiled)
    flops, nbytes = cost_analysis(compiled)
    roofline = None
    if None not in (flops, nbytes, spec.peak_bf16_flops, spec.hbm_bandwidth):
        roofline = Roofline(flops, nbytes, spec.peak_bf16_flops, spec.hbm_bandwidth)
    return CompileCheckResult(bool(report["fits"]), report, summary, seconds, flops=flops, bytes_accessed=nbytes,
                              roofline=roofline, kernel_calls=compiled.as_text().count(_MOSAIC),
                              constraints=constraints)


def format_constraints(constraints: list[ConstraintRecord]) -> str:
    """One line per distinct constrained activation (with how many times the step constrains it), sorted."""
    counts = collections.Counter(record.line() for record in constraints)
    return "\n".join(f"  {line}  x{count}" for line, count in sorted(counts.items()))


def format_result(result: CompileCheckResult, topology: str | None) -> str:
    """The human-readable report: per-device memory by kind, the total against HBM, and the verdict."""
    lines = [result.summary, f"compiled for {topology} in {result.compile_seconds:.1f} s"]
    if result.report is not None:
        lines.append(f"Pallas TPU kernel calls (splash attention) in the compiled program: {result.kernel_calls}")
    if result.roofline is not None:
        lines.append(result.roofline.describe())
    elif result.flops is not None:
        lines.append(f"XLA cost analysis: {result.flops / 1e12:.2f} TFLOP per device (loop bodies counted once)")
    if result.report is None:
        lines.append(f"does NOT fit: {result.reason}")
        return "\n".join(lines)
    r = result.report
    lines.append(f"per-device memory on {r['device_kind']}:")
    for label, key in (("arguments", "argument_bytes"), ("temporaries", "temp_bytes"), ("outputs", "output_bytes"),
                       ("aliased (donated)", "alias_bytes"), ("generated code", "generated_code_bytes")):
        lines.append(f"  {label:<18} {_size(r[key])}")
    hbm = r["hbm_bytes"]
    total = f"  {'total':<18} {_size(r['total_bytes'])}"
    lines.append(total + (f" of {hbm / _GIB:.0f} GiB HBM ({100 * r['total_bytes'] / hbm:.0f}%)" if hbm else ""))
    if r["fits"] is None:
        lines.append(f"unknown HBM size for device kind {r['device_kind']!r}: cannot say whether it fits")
    else:
        lines.append("fits" if r["fits"] else "does NOT fit")
    return "\n".join(lines)


def main(args: Any) -> int:
    """`tulu-jax compile-check`: print the report; exit 0 when it fits, 1 when it does not."""
    if args.table:
        from tulu_jax.stages.memory_table import main as table_main

        return table_main(args)
    if args.config is None or args.sharding is None:
        raise ConfigError("compile-check needs --config and --sharding (or --table)")
    result = compile_check(args.stage, args.config, args.sharding, tuple(args.overrides))
    topology = load_sharding(resolve_path(args.sharding)).topology
    print(format_result(result, topology), file=sys.stdout)
    if args.show_shardings:
        print("activation shardings (as traced):\n" + format_constraints(result.constraints), file=sys.stdout)
    return 0 if result.fits else 1
