"""Sharding files: the `sharding/*.yaml` schema, the default logical-axis rules, the device mesh, and the map from
logical axis names to PartitionSpec / NamedSharding.

Parameters carry logical axis names only (`nnx.with_partitioning(init, ("embed", "mlp"))`, which Flax 0.12 stores
as the Variable's `out_sharding` metadata); a sharding file maps each logical name to a mesh axis, a list of mesh
axes, or null (replicated). `DEFAULT_RULES` holds the rules every file starts from, so a file lists only the rules
that differ for its hardware (and a new logical axis, e.g. a value head's, is added here once).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from tulu_jax.config import load_config
from tulu_jax.errors import ConfigError

Rules = Mapping[str, str | Sequence[str] | None]

# The rules of a sharding file that does not set them, for a mesh with axes data, fsdp and tensor.
DEFAULT_RULES: dict[str, str | list[str] | None] = {
    # parameters
    "vocab": "tensor",
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "layers": None,  # the stacked-layer axis stays whole: scan walks it
    # activations
    "batch": ["data", "fsdp"],
    "length": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
}
_TOPOLOGY_RE = re.compile(r"^[a-z][a-z0-9]*:\d+(x\d+)*$")


@dataclasses.dataclass
class ShardingSpec:
    """A sharding file: the mesh (ordered axis → size, at most one -1 for "the rest") and logical-axis rules.

    Built directly, `rules` is complete as given; `load_sharding` adds `DEFAULT_RULES` under a file's own rules.
    """

    mesh: dict[str, int]
    rules: dict[str, str | list[str] | None] = dataclasses.field(default_factory=dict)
    topology: str | None = None  # TPU topology for AOT compilation, e.g. "v5p:2x2x1"
    platform: Literal["cpu", "gpu", "tpu"] | None = None
    # One chip's peak dense bfloat16 FLOP/s and HBM bytes/s (the vendor's figures; the roofline of compile-check)
    peak_bf16_flops: float | None = None
    hbm_bandwidth: float | None = None
    source: str = dataclasses.field(default="<ShardingSpec>", init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.mesh:
            raise ConfigError("'mesh' must name at least one axis")
        for name, size in self.mesh.items():
            if not name.isidentifier():
                raise ConfigError(f"mesh axis name 'mesh.{name}' is not an identifier")
            if size != -1 and size < 1:
                raise ConfigError(f"'mesh.{name}' must be a positive size or -1, got {size}")
        for key in ("peak_bf16_flops", "hbm_bandwidth"):
            if getattr(self, key) is not None and not getattr(self, key) > 0:
                raise ConfigError(f"'{key}' must be a positive number, got {getattr(self, key)}")
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
    """Load and validate a sharding YAML, its rules on top of `DEFAULT_RULES`; errors name the file and the key."""
    own = load_config(ShardingSpec, path, overrides)
    try:
        spec = dataclasses.replace(own, rules={**DEFAULT_RULES, **own.rules})
    except ConfigError as e:  # only a default rule can fail here: the file's own rules were checked above
        hint = "a default rule of tulu_jax.sharding.DEFAULT_RULES: set it in the file"
        raise ConfigError(f"{path}: {e} ({hint})") from None
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
