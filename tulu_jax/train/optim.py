"""AdamW with a warmup + decay learning-rate schedule and global-norm gradient clipping (the Tülu 3 optimizer).

The schedules reproduce HF `transformers` (`get_linear_schedule_with_warmup`, `get_cosine_schedule_with_warmup`,
`get_constant_schedule_with_warmup`) as open-instruct calls them: `num_warmup_steps = int(warmup_ratio *
total_steps)` (open-instruct's training scripts floor the product; HF `Trainer` rounds it up, a one-step
difference that only shows when `warmup_ratio * total_steps` is fractional). Update `k` (0-based, the
optimizer's step counter before the update) uses `lr * factor(k)`, like torch's `LambdaLR` stepped after each
optimizer step: the very first update of a warmed-up run has learning rate 0.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from tulu_jax.errors import ConfigError
from tulu_jax.pytree import path_name

Schedule = Callable[[jax.Array | int], jax.Array]
SCHEDULES = ("linear", "cosine", "constant")
# Parameters whose path contains "bias" or "norm" (case-insensitive) get no weight decay. open-instruct's
# `no_decay = ["bias", "layer_norm.weight"]` is substring-matched against HF names, so it misses Llama's
# `input_layernorm.weight` and `norm.weight` and decays them; we exclude every norm, the list's evident intent.
# Tülu 3 trains with weight_decay = 0, where the two agree.
_NO_DECAY = re.compile(r"bias|norm", re.IGNORECASE)


class Optimizer(NamedTuple):
    """An optax transformation plus the learning-rate schedule it follows (for logging `lr`)."""

    tx: optax.GradientTransformation
    schedule: Schedule


def warmup_steps(warmup_ratio: float, total_steps: int) -> int:
    """Number of warmup steps as open-instruct computes it: `int(total_steps * warmup_ratio)`."""
    return int(total_steps * warmup_ratio)


def make_schedule(lr: float, *, warmup_ratio: float, total_steps: int, schedule: str = "linear") -> Schedule:
    """Learning rate as a function of the (0-based) update index, matching the HF schedule of the same name.

    linear: `k / W` during warmup, then `(T - k) / max(1, T - W)` down to 0 at `T`;
    cosine: warmup, then `0.5 (1 + cos(pi * progress))`; constant: warmup, then 1. All times `lr`.
    """
    if schedule not in SCHEDULES:
        raise ConfigError(f"optimizer: schedule {schedule!r} is not one of {SCHEDULES}")
    if total_steps < 1:
        raise ConfigError(f"optimizer: total_steps must be >= 1, got {total_steps}")
    if not 0.0 <= warmup_ratio <= 1.0:
        raise ConfigError(f"optimizer: warmup_ratio must be in [0, 1], got {warmup_ratio}")
    num_warmup = warmup_steps(warmup_ratio, total_steps)

    def factor(step: jax.Array | int) -> jax.Array:
        k = jnp.asarray(step, jnp.float32)
        warm = k / max(1, num_warmup)
        decay_span = max(1, total_steps - num_warmup)
        if schedule == "linear":
            after = jnp.maximum(0.0, (total_steps - k) / decay_span)
        elif schedule == "cosine":
            # 0.5 (1 + cos(pi p)) written as cos²(pi p / 2): no cancellation near the end in float32.
            progress = (k - num_warmup) / decay_span
            after = jnp.where(progress < 1.0, jnp.cos(0.5 * math.pi * progress) ** 2, 0.0)
        else:
            after = jnp.ones_like(k)
        return jnp.where(k < num_warmup, warm, after)

    return lambda step: lr * factor(step)


def decay_mask(params: Any) -> Any:
    """True for parameters that get weight decay: every leaf whose path names neither a bias nor a norm."""
    return jax.tree_util.tree_map_with_path(lambda path, _: _NO_DECAY.search(path_name(path)) is None, params)


def make_optimizer(
    lr: float,
    *,
    warmup_ratio: float,
    total_steps: int,
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    clip_norm: float | None = 1.0,
    schedule: str = "linear",
) -> Optimizer:
    """`clip_by_global_norm(clip_norm)` then AdamW (torch semantics: decoupled decay scaled by the lr).

    Defaults are torch's AdamW ones, which open-instruct used. With `weight_decay > 0`, biases and norm
    parameters (any path component containing "bias" or "norm") are excluded, see `decay_mask`.
    `clip_norm=None` disables clipping. Returns `Optimizer(tx, schedule)`; unpack as `tx, schedule = ...`.
    """
    if clip_norm is not None and clip_norm <= 0:
        raise ConfigError(f"optimizer: clip_norm must be positive or None, got {clip_norm}")
    if weight_decay < 0:
        raise ConfigError(f"optimizer: weight_decay must be >= 0, got {weight_decay}")
    lr_fn = make_schedule(lr, warmup_ratio=warmup_ratio, total_steps=total_steps, schedule=schedule)
    adamw = optax.adamw(
        lr_fn, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask if weight_decay else None
    )
    tx = adamw if clip_norm is None else optax.chain(optax.clip_by_global_norm(clip_norm), adamw)
    return Optimizer(tx, lr_fn)
