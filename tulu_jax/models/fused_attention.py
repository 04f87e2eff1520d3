"""Fused attention for training forwards: the Pallas splash kernel on TPU, cuDNN's fused attention on GPU, the
einsum path of `models/attention.py` elsewhere (the reference the kernels are tested against).

`model.attention` (ModelConfig.attention) picks it: `auto` follows the platform of the devices the step runs on
(the active activation-sharding mesh, else JAX's default backend), or `einsum` / `splash` / `cudnn` by name.
`splash` off TPU runs the kernel in Pallas' interpret mode (slow; tests). Under a mesh each kernel runs inside
`shard_map` over the batch axes and the KV-head axis, so every chip attends over its own rows and heads.

- splash: causal, packed rows through segment ids, a sliding window (Gemma's local layers) and logit soft-capping
  are all the kernel's own (`attn_logits_soft_cap`); GQA by running the MQA kernel once per KV head.
- cudnn: `jax.nn.dot_product_attention(implementation="cudnn")` with the layer's boolean mask; cuDNN has no
  logit soft-cap, so soft-capped layers (Gemma 2) take the einsum path.
A padding query (segment 0) attends to the padding keys before it instead of getting the einsum path's uniform
row: its output is never read (losses mask it), and no row is empty, so no NaN reaches the backward pass.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from tulu_jax.errors import ConfigError
from tulu_jax.models.activation_sharding import active_sharding, activation_spec, traced_platform
from tulu_jax.models.attention import attend
from tulu_jax.models.config import ModelConfig

Implementation = Literal["einsum", "splash", "cudnn"]
_BLOCK = 512  # splash tile along the query and key axes (at most the sequence length)
_LANES = 128  # the kernel's tiles are multiples of the TPU's 128 lanes


def resolve_attention(choice: str) -> Implementation:
    """The implementation `choice` means here: `auto` → splash on TPU, cudnn on GPU, einsum elsewhere."""
    if choice != "auto":
        return choice  # type: ignore[return-value]
    return {"tpu": "splash", "gpu": "cudnn"}.get(traced_platform(), "einsum")  # type: ignore[return-value]


def _splash_kernel(length: int, group: int, window: int | None, softcap: float | None, interpret: bool) -> Callable:
    """The MQA splash kernel for one KV head's `group` query heads over `length` positions (masks are static).
    Built per trace, not cached: it holds its mask tables as arrays of the trace that built it."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    shape = (length, length)
    one = sa.CausalMask(shape) if window is None else sa.LocalMask(shape, window_size=(window - 1, 0), offset=0)
    block = min(_BLOCK, length)
    sizes = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    return sa.make_splash_mqa_single_device(sa.MultiHeadMask([one] * group), block_sizes=sizes,
                                            attn_logits_soft_cap=softcap, interpret=interpret)


def splash_attend(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *, window: int | None = None,
                  softcap: float | None = None, interpret: bool = False) -> jax.Array:
    """Causal attention of packed rows with the splash kernel: q [B,T,N,D] (already scaled), k/v [B,T,K,D],
    segment_ids int [B,T] -> [B,T,N,D]; `window`: a query sees keys less than `window` positions back."""
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    b, t, n, d = q.shape
    kv_heads = k.shape[2]
    kernel = _splash_kernel(t, n // kv_heads, window, softcap, interpret)
    qh = q.reshape(b, t, kv_heads, n // kv_heads, d).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, D]
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, D]
    segments = segment_ids.astype(jnp.int32)

    def one_row(qr: jax.Array, kr: jax.Array, vr: jax.Array, seg: jax.Array) -> jax.Array:
        ids = SegmentIds(q=seg, kv=seg)
        return jax.vmap(lambda qk, kk, vk: kernel(qk, kk, vk, segment_ids=ids))(qr, kr, vr)

    out = jax.vmap(one_row)(qh, kh, vh, segments)  # [B, K, G, T, D]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, d).astype(q.dtype)


def cudnn_attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
                 implementation: Literal["cudnn", "xla"] = "cudnn") -> jax.Array:
    """`jax.nn.dot_product_attention` with the boolean mask [B,T,S] (q already scaled, so scale 1); every query
    also sees its own slot, which changes only padding rows (module docstring)."""
    t, s = mask.shape[1:]
    mask = mask | (jnp.arange(t)[:, None] == jnp.arange(s)[None, :])[None]
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=1.0, implementation=implementation)


def _sharded(fn: Callable[..., jax.Array], q: jax.Array, k: jax.Array, v: jax.Array, extra: jax.Array) -> jax.Array:
    """fn(q, k, v, extra) inside shard_map over the batch axes and the KV-head axis of the active mesh (plain call
    without one); `extra` ([B, T] segment ids or a [B, T, S] mask) is split along the batch only."""
    active = active_sharding()
    if active is None:
        return fn(q, k, v, extra)
    mesh, rules = active
    kv_spec = activation_spec(k.shape, ("batch", None, "act_kv_heads", None), mesh, rules)
    batch, heads = kv_spec[0], kv_spec[2]  # q's heads follow k's, so each shard keeps whole GQA groups
    qkv = PartitionSpec(batch, None, heads, None)
    extra_spec = PartitionSpec(batch, *([None] * (extra.ndim - 1)))
    return jax.shard_map(fn, mesh=mesh, in_specs=(qkv, qkv, qkv, extra_spec), out_specs=qkv,
                         check_vma=False)(q, k, v, extra)


def fused_attend(implementation: Implementation, q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array,
                 segment_ids: jax.Array, window: int | None, softcap: float | None) -> jax.Array:
    """One training-forward attention (self-attention over the whole rows) with `implementation`: `mask` [B,T,T]
    is the einsum / cudnn mask (window included), segment_ids [B,T] and `window` describe it to the kernel."""
    if implementation == "splash":
        interpret = traced_platform() != "tpu"
        return _sharded(lambda *a: splash_attend(*a, window=window, softcap=softcap, interpret=interpret),
                        q, k, v, segment_ids)
    if implementation == "cudnn" and softcap is None:
        return _sharded(cudnn_attend, q, k, v, mask)
    return attend(q, k, v, mask, softcap=softcap)


def layer_attend(config: ModelConfig, q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array,
                 segment_ids: jax.Array, sliding: jax.Array) -> jax.Array:
    """The attention of one scanned layer whose kind (`sliding`, a traced bool) picks Gemma's local window: the
    einsum and cuDNN paths read it from `mask`; the splash kernel's masks are static, so a stack with both kinds
    has both kernels under `lax.cond` (only the layer's own runs)."""
    implementation = resolve_attention(config.attention)
    softcap = config.attn_logit_softcap
    if implementation == "splash" and q.shape[1] % _LANES:
        if config.attention == "splash":
            raise ConfigError(f"model.attention=splash: the kernel tiles the sequence by {_LANES} positions, and "
                              f"{q.shape[1]} is not a multiple of {_LANES} (set data.max_seq_len or use einsum)")
        implementation = "einsum"  # auto: a length the kernel cannot tile
    if implementation == "einsum":
        return attend(q, k, v, mask, softcap=softcap)

    def run(window: int | None) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
        return lambda *qkv: fused_attend(implementation, *qkv, mask=mask, segment_ids=segment_ids, window=window,
                                         softcap=softcap)

    if implementation != "splash" or not any(config.sliding_layers):
        return run(None)(q, k, v)
    return jax.lax.cond(sliding, run(config.sliding_window), run(None), q, k, v)
