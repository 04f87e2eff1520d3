"""Where a run goes: a `sharding/*.yaml` file → device mesh, logical axis rules → NamedSharding, sharded init,
multi-process start-up, and ahead-of-time compilation for a TPU topology from any host.

Parameters carry logical axis names only (`nnx.with_partitioning(init, ("embed", "mlp"))`, which Flax 0.12 stores
as the Variable's `out_sharding` metadata); a sharding file maps each logical name to a mesh axis, a list of mesh
axes, or null (replicated).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import importlib.util
import math
import os
import pathlib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from tulu_jax.config import load_config
from tulu_jax.errors import ConfigError

Rules = Mapping[str, str | Sequence[str] | None]

__all__ = [
    "ShardingSpec",
    "HbmExhaustedError",
    "HBM_BYTES",
    "load_sharding",
    "make_mesh",
    "logical_to_spec",
    "named_sharding",
    "batch_sharding",
    "state_shardings",
    "init_sharded",
    "initialize_distributed",
    "topology_chip_count",
    "tpu_topology_mesh",
    "compile_for_topology",
    "memory_report",
]

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
_TOPOLOGY_RE = re.compile(r"^[a-z][a-z0-9]*:\d+(x\d+)*$")


class HbmExhaustedError(ConfigError):
    """The compiled program needs more device memory than the target chip has (XLA's RESOURCE_EXHAUSTED)."""


@dataclasses.dataclass
class ShardingSpec:
    """A sharding file: the mesh (ordered axis → size, at most one -1 for "the rest") and logical-axis rules."""

    mesh: dict[str, int]
    rules: dict[str, str | list[str] | None]
    topology: str | None = None  # TPU topology for AOT compilation, e.g. "v5p:2x2x1"
    platform: Literal["cpu", "gpu", "tpu"] | None = None
    source: str = dataclasses.field(default="<ShardingSpec>", init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.mesh:
            raise ConfigError("'mesh' must name at least one axis")
        for name, size in self.mesh.items():
            if not name.isidentifier():
                raise ConfigError(f"mesh axis name 'mesh.{name}' is not an identifier")
            if size != -1 and size < 1:
                raise ConfigError(f"'mesh.{name}' must be a positive size or -1, got {size}")
        if sum(size == -1 for size in self.mesh.values()) > 1:
            raise ConfigError("at most one mesh axis may be -1 ('the rest of the devices')")
        axes = list(self.mesh)
        for logical, target in self.rules.items():
            for axis in [target] if isinstance(target, str) else target or []:
                if axis not in self.mesh:
                    close = difflib.get_close_matches(axis, axes, n=1)
                    hint = f"did you mean '{close[0]}'?" if close else f"mesh axes: {', '.join(axes)}"
                    raise ConfigError(f"'rules.{logical}' names unknown mesh axis '{axis}' ({hint})")
        if self.topology is not None:
            if not _TOPOLOGY_RE.match(self.topology):
                raise ConfigError(f"'topology' must look like 'v5p:2x2x1', got {self.topology!r}")
            if self.platform not in (None, "tpu"):
                raise ConfigError(f"'topology' is a TPU topology but 'platform' is {self.platform!r}")
            chips = topology_chip_count(self.topology)
            try:
                _resolve_mesh(self.mesh, chips)
            except ConfigError as e:
                raise ConfigError(f"topology {self.topology} has {chips} chips: {e}") from None

    def mesh_shape(self, num_devices: int) -> tuple[int, ...]:
        """The mesh sizes for `num_devices` devices, resolving a -1 axis; ConfigError if they do not fit."""
        try:
            return _resolve_mesh(self.mesh, num_devices)
        except ConfigError as e:
            raise ConfigError(f"{self.source}: {e}") from None


def _resolve_mesh(mesh: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    fixed = math.prod(size for size in mesh.values() if size != -1)
    if -1 in mesh.values():
        if num_devices % fixed:
            raise ConfigError(f"mesh {dict(mesh)} needs a device count divisible by {fixed}, got {num_devices}")
        return tuple(num_devices // fixed if size == -1 else size for size in mesh.values())
    if fixed != num_devices:
        raise ConfigError(f"mesh {dict(mesh)} has {fixed} devices, but there are {num_devices}")
    return tuple(mesh.values())


def load_sharding(path: str | os.PathLike, overrides: Sequence[str] = ()) -> ShardingSpec:
    """Load and validate a sharding YAML; errors name the file and the offending key."""
    spec = load_config(ShardingSpec, path, overrides)
    spec.source = str(path)
    return spec


def topology_chip_count(topology: str) -> int:
    """Chips in a TPU topology name: "v5p:4x4x2" → 32."""
    return math.prod(int(n) for n in topology.split(":", 1)[1].split("x"))


def make_mesh(spec: ShardingSpec, devices: Sequence[Any] | None = None) -> Mesh:
    """A Mesh with the spec's axes (all AxisType.Auto) over `devices` (default: every device of every process)."""
    count = len(devices) if devices is not None else jax.device_count()
    shape = spec.mesh_shape(count)
    names = tuple(spec.mesh)
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names), devices=devices)


def _rules_of(rules: Rules | ShardingSpec) -> Rules:
    return rules.rules if isinstance(rules, ShardingSpec) else rules


def logical_to_spec(logical_axes: Sequence[str | None], rules: Rules | ShardingSpec) -> PartitionSpec:
    """Map logical axis names to a PartitionSpec; a mesh axis already used by an earlier dimension is dropped."""
    rules = _rules_of(rules)
    used: set[str] = set()
    entries: list[str | tuple[str, ...] | None] = []
    for logical in logical_axes:
        if logical is None:
            entries.append(None)
            continue
        if logical not in rules:
            close = difflib.get_close_matches(logical, list(rules), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"no sharding rule for logical axis '{logical}'{hint}: add 'rules.{logical}'")
        target = rules[logical]
        axes = [target] if isinstance(target, str) else list(target or [])
        kept = [a for a in dict.fromkeys(axes) if a not in used]
        used.update(kept)
        entries.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*entries)


def named_sharding(mesh: Mesh, rules: Rules | ShardingSpec, logical_axes: Sequence[str | None]) -> NamedSharding:
    """NamedSharding on `mesh` for an array whose dimensions have the given logical names."""
    return NamedSharding(mesh, logical_to_spec(logical_axes, rules))


def batch_sharding(mesh: Mesh, rules: Rules | ShardingSpec) -> NamedSharding:
    """Sharding of a [B, T] batch array (logical axes ('batch', 'length'))."""
    return named_sharding(mesh, rules, ("batch", "length"))


def _path_str(path: tuple) -> str:
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
    return ".".join(parts)


def _variable_logical_axes(var: nnx.Variable) -> tuple[Any, ...] | None:
    names = var.get_metadata().get("out_sharding")
    return tuple(names) if names else None


def state_shardings(abstract_state: Any, mesh: Mesh, rules: Rules | ShardingSpec) -> Any:
    """NamedShardings for every leaf of an nnx State (or any pytree holding nnx Variables), e.g. from nnx.eval_shape.

    A Variable with logical names (its `out_sharding` metadata) is sharded by the rules; anything else (scalars,
    RNG keys, unnamed variables) is replicated. Optimizer moments copy their parameter's metadata, so they are
    sharded like it. Variables keep their place in the tree, so the result can be passed as jit's out_shardings.
    """
    rules = _rules_of(rules)
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(path: tuple, leaf: Any) -> Any:
        if not isinstance(leaf, nnx.Variable):
            return replicated
        names = _variable_logical_axes(leaf)
        if names is None:
            return leaf.replace(replicated)
        shape = tuple(getattr(leaf.get_value(), "shape", ()))
        where = _path_str(path)
        if len(names) != len(shape):
            raise ValueError(f"variable '{where}' has shape {shape} but {len(names)} logical axes {names}")
        spec = logical_to_spec(names, rules)
        for dim, (size, entry) in enumerate(zip(shape, spec, strict=True)):
            axes = (entry,) if isinstance(entry, str) else entry or ()
            parts = math.prod(mesh.shape[a] for a in axes)
            if size % parts:
                raise ConfigError(
                    f"variable '{where}' dimension {dim} ('{names[dim]}', size {size}) cannot be split over mesh "
                    f"axes {axes} of total size {parts}: change 'rules.{names[dim]}' or the mesh"
                )
        return leaf.replace(NamedSharding(mesh, spec))

    return jax.tree_util.tree_map_with_path(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def init_sharded(make_model: Callable[[], nnx.Module], mesh: Mesh, rules: Rules | ShardingSpec) -> nnx.Module:
    """Build `make_model()` directly into its shardings: one jitted init, so no host ever holds the full model.

    Eager variable sharding (Flax's default, which needs a mesh context) is turned off while tracing: the
    out_shardings computed from the logical names place every array instead. The optimizer of a sharded `model`
    is built the same way: `init_sharded(lambda: nnx.Optimizer(model, tx, wrt=nnx.Param), mesh, rules)`.
    """
    with nnx.use_eager_sharding(False):
        graphdef, abstract_state = nnx.split(nnx.eval_shape(make_model))
    shardings = state_shardings(abstract_state, mesh, rules)

    @functools.partial(jax.jit, out_shardings=shardings)
    def init() -> Any:
        with nnx.use_eager_sharding(False):
            return nnx.state(make_model())

    return nnx.merge(graphdef, init())


def _env_int(name: str) -> int | None:
    text = os.environ.get(name)
    if text is None or not text.strip():
        return None
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"environment variable {name} must be an integer, got {text!r}") from None


_GOOGLE_PCI_VENDOR = "0x1ae0"
_PCI_ACCELERATOR_CLASS = "0x12"  # PCI base class "processing accelerator" (a Google NIC is class 0x02)


def _local_tpu_chips(pci_root: str = "/sys/bus/pci/devices") -> int:
    """TPU chips attached to this host: Google PCI devices of the processing-accelerator class (Linux sysfs)."""
    chips = 0
    for device in pathlib.Path(pci_root).glob("*"):
        try:
            vendor = (device / "vendor").read_text().strip()
            device_class = (device / "class").read_text().strip()
        except OSError:
            continue
        chips += vendor == _GOOGLE_PCI_VENDOR and device_class.startswith(_PCI_ACCELERATOR_CLASS)
    return chips


def initialize_distributed(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> bool:
    """Start jax.distributed when this is a multi-process run; returns whether it is (False: single process).

    Settings come from the arguments, else TULU_JAX_COORDINATOR / TULU_JAX_NUM_PROCESSES / TULU_JAX_PROCESS_ID,
    else JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID; with none of them, a host with TPU chips
    lets JAX detect the pod slice itself. Call it before any other JAX computation. On CPU, cross-process
    collectives use gloo (JAX's default, selected explicitly so a changed default cannot break multi-host CPU runs).
    """
    if jax.distributed.is_initialized():
        return True
    coordinator = coordinator or os.environ.get("TULU_JAX_COORDINATOR") or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None:
        num_processes = _env_int("TULU_JAX_NUM_PROCESSES")
        num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    if process_id is None:
        process_id = _env_int("TULU_JAX_PROCESS_ID")
        process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
    if not any(v is not None for v in given.values()):
        if _local_tpu_chips() == 0:
            return False
        jax.distributed.initialize()  # Cloud TPU: coordinator, process count and id come from the TPU metadata
        return True
    if num_processes == 1:
        return False
    missing = [name for name, value in given.items() if value is None]
    if missing:
        raise ConfigError(
            f"a multi-process run needs coordinator, num_processes and process_id; missing {', '.join(missing)} "
            "(flags, or TULU_JAX_COORDINATOR / TULU_JAX_NUM_PROCESSES / TULU_JAX_PROCESS_ID)"
        )
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ConfigError(f"process_id {process_id} must be in [0, num_processes={num_processes})")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
    return True


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
