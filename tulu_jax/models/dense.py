"""Activation × weight einsums whose weight gradient XLA:CPU runs on its fast matmul library.

The weight gradient of y = x W contracts x over the token axis, x's major axis. XLA:CPU runs a dot on its fast
library (YNNPACK) only when the left operand's contracting axis is its minor one, so it lays x out transposed for
that dot; but when x has other users that need it as it is (the forward matmul, the next layer), layout
assignment keeps one layout and the weight gradient falls back to a generic dot at about half the speed. In the
standard SFT step those are the LM head's and the MLPs' weight gradients, a quarter of the step's FLOPs; the LM head's
alone took 1.5 s of an 11.5 s step (`benchmarks/profile_step.py`). `weight_einsum` computes the same values and
gradients (each gradient is the einsum of the other two operands, accumulated in float32), but hands the
weight-gradient dot its own copy of x (an optimization barrier), which XLA then lays out for the fast library with
one cheap transpose. Other backends lay dots out freely: there it is the
plain einsum, so remat policies and fusions see what they always saw.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from tulu_jax.models.activation_sharding import traced_platform


def _einsum(spec: str, dtype: jnp.dtype | None, x: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.einsum(spec, x, w, preferred_element_type=dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _separate_weight_grad(spec: str, dtype: jnp.dtype | None, x: jax.Array, w: jax.Array) -> jax.Array:
    return _einsum(spec, dtype, x, w)


def _forward(spec: str, dtype: jnp.dtype | None, x: jax.Array, w: jax.Array) -> tuple[jax.Array, tuple]:
    return _einsum(spec, dtype, x, w), (x, w)


def _backward(spec: str, dtype: jnp.dtype | None, residuals: tuple, grad: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, w = residuals
    inputs, out = spec.split("->")
    x_axes, w_axes = inputs.split(",")
    # Each gradient is the einsum of the other two operands (every axis of x and w is in the output or the other).
    dx = jnp.einsum(f"{out},{w_axes}->{x_axes}", grad, w, preferred_element_type=jnp.float32)
    # The barrier makes the weight-gradient dot's x a value of its own, free to take the layout that dot wants.
    dw = jnp.einsum(f"{x_axes},{out}->{w_axes}", jax.lax.optimization_barrier(x), grad,
                    preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_separate_weight_grad.defvjp(_forward, _backward)


def weight_einsum(spec: str, x: jax.Array, w: jax.Array, *, preferred_element_type: jnp.dtype | None = None,
                  separate: bool | None = None) -> jax.Array:
    """`jnp.einsum(spec, x, w)` for an activation `x` and a weight `w`, with the same values and gradients.

    `separate` (default: when the traced step runs on CPU) computes the weight gradient from a separate copy of
    `x` (see the module docstring); False is the plain einsum.
    """
    if "..." in spec or spec.count(",") != 1:
        raise ValueError(f"weight_einsum takes 'x,w->y' with named axes, got {spec!r}")
    if separate is None:
        separate = traced_platform() == "cpu"
    if not separate:
        return _einsum(spec, preferred_element_type, x, w)
    return _separate_weight_grad(spec, preferred_element_type, x, w)
