"""Fused attention (models/fused_attention.py) against the einsum reference of models/attention.py: the Pallas
splash kernel in interpret mode (causal, packed segments, left padding, a sliding window, a logit soft-cap; values
and gradients), `jax.nn.dot_product_attention` with the cuDNN path's arguments (its XLA implementation: this host
has no GPU), a Gemma-style decoder on the 8-device mesh under shard_map, and the kernel in the TPU compile."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tulu_jax import cli
from tulu_jax.models import Decoder
from tulu_jax.models.activation_sharding import activation_sharding
from tulu_jax.models.attention import attend, segment_causal_mask, window_mask
from tulu_jax.models.fused_attention import cudnn_attend, resolve_attention, splash_attend
from tulu_jax.models.presets import preset_config
from tulu_jax.sharding import DEFAULT_RULES, ShardingSpec, make_mesh

B, T, N, K, D = 2, 128, 4, 2, 16  # the kernel tiles by 128 positions
# Row 0: two packed sequences and trailing padding; row 1: left padding then one sequence.
SEGMENTS = np.array([[1] * 40 + [2] * 60 + [0] * 28, [0] * 20 + [1] * 108], np.int32)


def _qkv(seed: int = 0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(keys[0], (B, T, N, D)) * D**-0.5
    k, v = (jax.random.normal(key, (B, T, K, D)) for key in keys[1:3])
    cotangent = jax.random.normal(keys[3], (B, T, N, D)) * (SEGMENTS != 0)[:, :, None, None]
    return q, k, v, cotangent


def _reference_mask(window: int | None) -> jax.Array:
    mask = segment_causal_mask(jnp.asarray(SEGMENTS))
    return mask if window is None else window_mask(mask, jnp.arange(T), window)


@pytest.mark.parametrize("window, softcap", [(None, None), (24, 2.0)])
def test_splash_kernel_equals_einsum_on_real_tokens(window, softcap):
    q, k, v, cotangent = _qkv()
    real = (SEGMENTS != 0)[:, :, None, None]

    def loss(fn):  # padding queries' outputs are never read: the cotangent is zero there
        return lambda q, k, v: jnp.sum(fn(q, k, v) * cotangent)

    splash = lambda q, k, v: splash_attend(q, k, v, jnp.asarray(SEGMENTS), window=window, softcap=softcap,  # noqa: E731
                                           interpret=True)
    einsum = lambda q, k, v: attend(q, k, v, _reference_mask(window), softcap=softcap)  # noqa: E731
    np.testing.assert_allclose(np.where(real, splash(q, k, v), 0), np.where(real, einsum(q, k, v), 0), atol=1e-5)
    grads = jax.grad(loss(splash), argnums=(0, 1, 2))(q, k, v)
    expected = jax.grad(loss(einsum), argnums=(0, 1, 2))(q, k, v)
    for got, want in zip(grads, expected, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_the_cudnn_path_arguments_give_the_einsum_result():
    # implementation="xla" runs the same call (scale 1 on pre-scaled queries, GQA, boolean mask + own slot) on CPU
    q, k, v, _ = _qkv(1)
    mask = _reference_mask(24)
    real = (SEGMENTS != 0)[:, :, None, None]
    got = cudnn_attend(q, k, v, mask, implementation="xla")
    np.testing.assert_allclose(np.where(real, got, 0), np.where(real, attend(q, k, v, mask), 0), atol=1e-5)


def test_auto_follows_the_platform():
    assert resolve_attention("auto") == "einsum"  # this host: CPU
    assert resolve_attention("splash") == "splash"


def test_a_gemma_decoder_on_the_mesh_gets_the_same_log_probs_and_gradients_from_the_kernel():
    # Gemma 2 shape in small: a sliding and a global layer (both kernels under lax.cond), attention and final
    # soft-caps, GQA; packed rows; fsdp 4 × tensor 2 (one KV head per shard) so the kernel runs under shard_map.
    from flax import nnx

    config = preset_config("gemma2-2b", dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2,
                                            num_heads=4, num_kv_heads=2, head_dim=16, sliding_window=24,
                                            attn_logit_softcap=2.0))
    assert config.sliding_layers == (True, False)
    model = Decoder(config, nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (B, T), 0, 96)
    positions = jnp.asarray(np.concatenate([np.r_[0:40, 0:60, 0:28][None], np.r_[0:20, 0:108][None]]))
    segments = jnp.asarray(SEGMENTS)
    targets = jnp.roll(tokens, -1, axis=1)
    spec = ShardingSpec(mesh={"data": 1, "fsdp": 4, "tensor": 2}, rules=DEFAULT_RULES)
    mesh = make_mesh(spec, jax.devices()[:8])

    def loss(params, attention):
        m = nnx.merge(graphdef, params)
        m.config = dataclasses.replace(config, attention=attention)
        logps = m.token_logps(tokens, targets, positions=positions, segment_ids=segments)
        return jnp.sum(jnp.where(segments != 0, logps, 0.0)), logps

    with activation_sharding(mesh, spec):
        program = str(jax.make_jaxpr(loss, static_argnums=1)(params, "splash"))
    assert "shard_map" in program and "pallas_call" in program  # the kernel, not a fallback
    results = {}
    for attention in ("splash", "einsum"):
        with activation_sharding(mesh, spec):
            (_, logps), grads = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(params, attention)
        results[attention] = (np.where(SEGMENTS != 0, logps, 0.0), grads)
    np.testing.assert_allclose(results["splash"][0], results["einsum"][0], atol=1e-5)
    for got, want in zip(jax.tree.leaves(results["splash"][1]), jax.tree.leaves(results["einsum"][1]), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)
