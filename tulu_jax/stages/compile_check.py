"""`tulu-jax compile-check`: compile a stage's real train step for the TPU topology of a sharding file, from any
host (libtpu describes the topology; no TPU needed), and report per-device memory against the chip's HBM.

The step is the one the stage trains with (same builder), lowered with abstract inputs: the sharded TrainState
and a [global batch, data.max_seq_len] batch on the topology's mesh. Running out of HBM is a compile-time error
on TPU, reported as "does NOT fit" with exit status 1, never as a stack trace.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
import time
from typing import Any

from tulu_jax.errors import ConfigError
from tulu_jax.sharding import HbmExhaustedError, compile_for_topology, load_sharding, memory_report, tpu_topology_mesh
from tulu_jax.stages.common import load_stage_config, resolve_path

# stage → (module, config class, function(config, mesh, spec) -> (jitted step, abstract args, summary line)).
STAGES: dict[str, tuple[str, str, str]] = {
    "sft": ("tulu_jax.stages.sft", "SFTConfig", "aot_train_step"),
    "dpo": ("tulu_jax.stages.dpo", "DPOConfig", "aot_train_step"),
}
_GIB = 1024**3


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


def infer_stage(config_path: str, overrides: tuple[str, ...] = ()) -> str:
    """The stage whose config class loads `config_path` with `overrides` (each stage's config has its own keys: a
    DPO config has `dpo:`, an SFT config `train.loss_reduction`); a ConfigError when none or several do."""
    loads, errors = [], []
    for name, (module_name, config_name, _) in STAGES.items():
        try:
            load_stage_config(getattr(importlib.import_module(module_name), config_name), config_path, overrides)
        except ConfigError as e:
            errors.append(f"as {name}: {e}")
        else:
            loads.append(name)
    if len(loads) == 1:
        return loads[0]
    if loads:
        raise ConfigError(f"compile-check: {config_path} is a valid config of stages {loads}: pass --stage")
    raise ConfigError(f"compile-check: {config_path} is no stage's config ({'; '.join(errors)})")


def compile_check(
    stage: str | None, config_path: str, sharding_path: str, overrides: tuple[str, ...] = ()
) -> CompileCheckResult:
    """Build `stage`'s train step (None: the stage the config belongs to) from the config and compile it for the
    sharding file's TPU topology."""
    stage = infer_stage(config_path, overrides) if stage is None else stage
    if stage not in STAGES:
        raise ConfigError(f"compile-check: unknown stage {stage!r}; known: {', '.join(STAGES)}")
    module_name, config_name, builder_name = STAGES[stage]
    module = importlib.import_module(module_name)
    config = load_stage_config(getattr(module, config_name), config_path, overrides)
    resolved = resolve_path(sharding_path)
    if not resolved.is_file():
        raise ConfigError(f"{sharding_path}: sharding file not found")
    spec = load_sharding(resolved)
    mesh = tpu_topology_mesh(spec)
    step, args, summary = getattr(module, builder_name)(config, mesh, spec)
    start = time.perf_counter()
    try:
        compiled = compile_for_topology(step, args, spec)
    except HbmExhaustedError as e:
        return CompileCheckResult(False, None, summary, time.perf_counter() - start, str(e))
    seconds = time.perf_counter() - start
    report = memory_report(compiled)
    return CompileCheckResult(bool(report["fits"]), report, summary, seconds)


def format_result(result: CompileCheckResult, topology: str | None) -> str:
    """The human-readable report: per-device memory by kind, the total against HBM, and the verdict."""
    lines = [result.summary, f"compiled for {topology} in {result.compile_seconds:.1f} s"]
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
    result = compile_check(args.stage, args.config, args.sharding, tuple(args.overrides))
    topology = load_sharding(resolve_path(args.sharding)).topology
    print(format_result(result, topology), file=sys.stdout)
    return 0 if result.fits else 1
