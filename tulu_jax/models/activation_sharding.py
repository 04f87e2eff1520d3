"""Activation sharding by logical name: `constrain(x, ("batch", "length", "act_embed"))` inside model code.

The model names its activations' axes the way its parameters are named; the sharding file's `rules` map those
names (`batch`, `length`, `act_embed`, `act_heads`, `act_kv_heads`, `act_mlp`, `act_vocab`) to mesh axes. Without
an active context (`activation_sharding(mesh, rules)`, entered by the stage while its jitted functions trace) the
helper returns its input unchanged, so the model runs as before on one device or in plain `jax.jit`.

Constraining the activations matters at pod scale: without them XLA's sharding propagation may pick, e.g., the
FSDP-sharded hidden axis of the weights for the activations and keep whole-batch float32 logits on every chip.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tulu_jax.sharding import Rules, ShardingSpec, logical_to_spec

_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar("tulu_jax_activation_sharding",
                                                                                    default=None)
_RECORD: contextvars.ContextVar[list[ConstraintRecord] | None] = contextvars.ContextVar("tulu_jax_activation_record",
                                                                                        default=None)


@dataclasses.dataclass(frozen=True)
class ConstraintRecord:
    """One constrained activation as traced: its logical axes, shape, dtype and the PartitionSpec it got."""

    logical_axes: tuple[str | None, ...]
    shape: tuple[int, ...]
    dtype: str
    spec: PartitionSpec

    def line(self) -> str:
        """`f32[32,4096,128256] (batch, length, act_vocab) -> P(('data', 'fsdp'), None, 'tensor')`."""
        dtype = {"float32": "f32", "bfloat16": "bf16", "int32": "i32"}.get(self.dtype, self.dtype)
        axes = ", ".join(str(a) if a is not None else "-" for a in self.logical_axes)
        return f"{dtype}[{','.join(map(str, self.shape))}] ({axes}) -> {self.spec}"


@contextlib.contextmanager
def record_constraints() -> Iterator[list[ConstraintRecord]]:
    """Collect every constraint `constrain` applies while active (tracing order, repeats included)."""
    records: list[ConstraintRecord] = []
    token = _RECORD.set(records)
    try:
        yield records
    finally:
        _RECORD.reset(token)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Rules | ShardingSpec) -> Iterator[None]:
    """While active, `constrain` places activations on `mesh` by the logical `rules` (a dict or a ShardingSpec)."""
    token = _ACTIVE.set((mesh, rules.rules if isinstance(rules, ShardingSpec) else dict(rules)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_sharding() -> tuple[Mesh, Rules] | None:
    """The (mesh, rules) of the active `activation_sharding` context, None outside one."""
    return _ACTIVE.get()


def traced_platform() -> str:
    """Where the step being traced runs: the active mesh's devices (a TPU topology from a CPU host), else JAX's
    default backend."""
    active = active_sharding()
    return active[0].devices.flat[0].platform if active is not None else jax.default_backend()


def activation_spec(shape: Sequence[int], logical_axes: Sequence[str | None], mesh: Mesh,
                    rules: Rules) -> PartitionSpec:
    """The PartitionSpec of an activation; a dimension its mesh axes do not divide stays whole (replicated)."""
    spec = logical_to_spec(logical_axes, rules)
    entries: list[Any] = []
    for size, entry in zip(shape, spec, strict=True):
        axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
        entries.append(entry if axes and size % math.prod(mesh.shape[a] for a in axes) == 0 else None)
    return PartitionSpec(*entries)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """`x` with a sharding constraint from its axes' logical names; unchanged outside `activation_sharding`."""
    active = _ACTIVE.get()
    if active is None:
        return x
    if len(logical_axes) != x.ndim:
        raise ValueError(f"constrain: {len(logical_axes)} logical axes {tuple(logical_axes)} for shape {x.shape}")
    mesh, rules = active
    spec = activation_spec(x.shape, logical_axes, mesh, rules)
    records = _RECORD.get()
    if records is not None:
        records.append(ConstraintRecord(tuple(logical_axes), tuple(x.shape), str(x.dtype), spec))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


class _ActivationSharded:
    """A (jitted) function whose calls and `.lower` enter `activation_sharding(mesh, rules)`; any other attribute
    is the wrapped function's, so it stands in for the jitted step everywhere."""

    def __init__(self, fn: Callable[..., Any], mesh: Mesh, rules: Rules | ShardingSpec):
        self.fn, self.mesh, self.rules = fn, mesh, rules

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with activation_sharding(self.mesh, self.rules):
            return self.fn(*args, **kwargs)

    def lower(self, *args: Any, **kwargs: Any) -> Any:
        """`fn.lower(...)` with the activation constraints in effect (for AOT compilation)."""
        with activation_sharding(self.mesh, self.rules):
            return self.fn.lower(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fn, name)


def with_activation_sharding(fn: Callable[..., Any], mesh: Mesh, rules: Rules | ShardingSpec | Mapping) -> Any:
    """`fn` (e.g. a jitted step) wrapped so that it traces with the activation constraints of `rules` on `mesh`."""
    return _ActivationSharded(fn, mesh, rules)
