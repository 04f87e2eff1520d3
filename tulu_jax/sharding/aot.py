"""Ahead-of-time compilation for a TPU topology from any host (libtpu describes it), and per-device memory reports
against the chip's HBM."""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding

from tulu_jax.errors import ConfigError
from tulu_jax.sharding.spec import ShardingSpec, make_mesh

_GIB = 1024**3
# HBM per device, keyed by `device.device_kind` (an exact match first, then the longest prefix: GPU kinds carry
# suffixes such as "NVIDIA H100 80GB HBM3"). v5p is "TPU v5", v5e "TPU v5 lite", v6e "TPU v6 lite".
HBM_BYTES: dict[str, int] = {
    "TPU v4": 32 * _GIB,
    "TPU v5 lite": 16 * _GIB,
    "TPU v5": 95 * _GIB,
    "TPU v6 lite": 32 * _GIB,
    "NVIDIA H100": 80 * _GIB,
}


class HbmExhaustedError(ConfigError):
    """The compiled program needs more device memory than the target chip has (XLA's RESOURCE_EXHAUSTED)."""


def tpu_topology_mesh(spec: ShardingSpec) -> Mesh:
    """The spec's mesh over the devices of its TPU topology (no TPU needed: libtpu describes it from any host).

    v5e, v5p (megacore) and v6e topologies have one JAX device per chip, so the mesh covers `topology_chip_count`.
    """
    if spec.topology is None:
        raise ConfigError(f"{spec.source}: 'topology' is not set, e.g. topology: v5p:2x2x1")
    if importlib.util.find_spec("libtpu") is None:
        raise ConfigError(
            f"{spec.source}: compiling for TPU topology {spec.topology} needs libtpu: pip install 'tulu-jax[tpu]'"
        )
    from jax.experimental import topologies

    topology = topologies.get_topology_desc(topology_name=spec.topology, platform="tpu")
    return make_mesh(spec, devices=topology.devices)


def _first_device(tree: Any) -> Any:
    for leaf in jax.tree.leaves(tree):
        devices = getattr(leaf, "device_set", None)
        if devices:
            return next(iter(devices))
    return None


def compile_for_topology(fn: Callable[..., Any], args_abstract: Sequence[Any], spec: ShardingSpec) -> Any:
    """Lower and compile `fn` (jitted or not) for abstract arguments whose shardings live on `tpu_topology_mesh`.

    Running out of device memory is a compile-time error for TPU: it is raised as HbmExhaustedError with XLA's
    one-line reason instead of a stack trace.
    """
    jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
    meshes = [
        leaf.sharding.mesh
        for leaf in jax.tree.leaves(args_abstract)
        if isinstance(getattr(leaf, "sharding", None), NamedSharding)
    ]
    # the mesh context lets bare PartitionSpecs inside `fn` (sharding constraints) resolve on the topology mesh
    context = jax.set_mesh(meshes[0]) if meshes else contextlib.nullcontext()
    try:
        with context:
            return jitted.lower(*args_abstract).compile()
    except jax.errors.JaxRuntimeError as e:
        text = str(e)
        if "RESOURCE_EXHAUSTED" not in text:
            raise
        reason = next(line for line in text.splitlines() if "RESOURCE_EXHAUSTED" in line).strip()
        target = spec.topology or spec.source
        raise HbmExhaustedError(
            f"{spec.source}: the program does not fit in device memory on {target}: {reason} "
            "(use more devices on the fsdp/tensor axes, a smaller micro-batch, or remat)"
        ) from None


def _hbm_bytes(device_kind: str | None) -> int | None:
    if device_kind is None:
        return None
    if device_kind in HBM_BYTES:
        return HBM_BYTES[device_kind]
    prefixes = [k for k in HBM_BYTES if device_kind.startswith(k)]
    return HBM_BYTES[max(prefixes, key=len)] if prefixes else None


def memory_report(compiled: Any, device_kind: str | None = None) -> dict[str, Any]:
    """Per-device memory of a compiled program, from `compiled.memory_analysis()`, against the chip's HBM.

    Keys: device_kind, argument/output/alias/temp/generated_code bytes, total_bytes (arguments + outputs − aliased
    (donated) + temporaries + code), hbm_bytes (None for an unknown kind such as CPU) and fits (None if unknown).
    """
    stats = compiled.memory_analysis()
    if stats is None:
        raise ValueError("this backend gives no memory analysis for compiled programs")
    if device_kind is None:
        device = _first_device(compiled.input_shardings) or _first_device(compiled.output_shardings)
        device_kind = device.device_kind if device is not None else None
    report = {
        "device_kind": device_kind,
        "argument_bytes": stats.argument_size_in_bytes,
        "output_bytes": stats.output_size_in_bytes,
        "alias_bytes": stats.alias_size_in_bytes,
        "temp_bytes": stats.temp_size_in_bytes,
        "generated_code_bytes": stats.generated_code_size_in_bytes,
    }
    report["total_bytes"] = (
        report["argument_bytes"] + report["output_bytes"] - report["alias_bytes"] + report["temp_bytes"]
        + report["generated_code_bytes"]
    )
    hbm = _hbm_bytes(device_kind)
    report["hbm_bytes"] = hbm
    report["fits"] = None if hbm is None else report["total_bytes"] <= hbm
    return report
