"""Chunked token log-probs (no full-sequence float32 logits) and activation sharding by logical name.

The reference for every value is the unchunked computation written another way: NumPy log-softmax of the full
logits for values, and jax.grad of the plain `log_softmax(h @ W)[target]` for gradients.
"""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from tulu_jax.models.activation_sharding import activation_sharding, activation_spec, constrain
from tulu_jax.models.config import ModelConfig
from tulu_jax.models.decoder import Decoder
from tulu_jax.models.lm_head import chunked_token_logps
from tulu_jax.sharding import batch_sharding, load_sharding, make_mesh, state_shardings

B, T, H, V = 2, 7, 16, 40
CONFIG = ModelConfig(vocab_size=80, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=8, logits_chunk_size=5)


def _data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.normal(0, 1, (B, T, H)).astype(np.float32), rng.normal(0, 0.5, (H, V)).astype(np.float32),
            rng.integers(0, V, (B, T)).astype(np.int32))


def _numpy_logps_entropy(hidden: np.ndarray, weight: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, ...]:
    logits = hidden.astype(np.float64) @ weight.astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    return picked, -(np.exp(logp) * logp).sum(-1)


def _plain_loss(hidden: jax.Array, weight: jax.Array, targets: jax.Array, scale: jax.Array) -> jax.Array:
    logp = jax.nn.log_softmax(hidden @ weight, axis=-1)
    return jnp.sum(scale * jnp.take_along_axis(logp, targets[..., None], -1)[..., 0])


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])  # 3: the last chunk is padded; 64 > T: one chunk
@pytest.mark.parametrize("vocab_first", [False, True])
def test_chunked_logps_equal_unchunked_in_value_and_gradient(chunk, vocab_first):
    hidden, weight, targets = _data()
    scale = np.random.default_rng(1).normal(size=(B, T)).astype(np.float32)  # a non-uniform upstream gradient
    w_arg = weight.T.copy() if vocab_first else weight

    def chunked_loss(h, w):
        logps = chunked_token_logps(h, w, targets, chunk_size=chunk, vocab_first=vocab_first)
        return jnp.sum(scale * logps), logps

    (_, logps), (g_h, g_w) = jax.jit(jax.value_and_grad(chunked_loss, argnums=(0, 1), has_aux=True))(hidden, w_arg)
    want, _ = _numpy_logps_entropy(hidden, weight, targets)
    np.testing.assert_allclose(np.asarray(logps), want, rtol=0, atol=1e-6)
    want_h, want_w = jax.grad(_plain_loss, argnums=(0, 1))(hidden, weight, targets, scale)
    np.testing.assert_allclose(np.asarray(g_h), np.asarray(want_h), rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(g_w), np.asarray(want_w.T if vocab_first else want_w), rtol=0, atol=1e-6)


def test_entropy_matches_numpy_and_its_gradient_matches_autodiff():
    hidden, weight, targets = _data(2)
    logps, entropy = chunked_token_logps(hidden, weight, targets, chunk_size=3, entropy=True)
    want_logps, want_entropy = _numpy_logps_entropy(hidden, weight, targets)
    np.testing.assert_allclose(np.asarray(logps), want_logps, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(entropy), want_entropy, rtol=0, atol=1e-5)

    def plain(w):
        logp = jax.nn.log_softmax(hidden @ w, axis=-1)
        return -jnp.sum(jnp.exp(logp) * logp)

    got = jax.grad(lambda w: jnp.sum(chunked_token_logps(hidden, w, targets, chunk_size=3, entropy=True)[1]))(weight)
    np.testing.assert_allclose(np.asarray(got), np.asarray(jax.grad(plain)(weight)), rtol=0, atol=1e-5)


def test_softcapped_logps_match_numpy():
    """Gemma 2's final soft-cap: the distribution is over cap · tanh(logits / cap)."""
    hidden, weight, targets = _data(3)
    got = chunked_token_logps(hidden * 4, weight, targets, chunk_size=3, softcap=5.0)
    logits = 5.0 * np.tanh((hidden * 4).astype(np.float64) @ weight / 5.0)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(np.asarray(got), np.take_along_axis(logp, targets[..., None], -1)[..., 0], rtol=0,
                               atol=1e-5)


def _shapes_in(jaxpr: jax.core.Jaxpr) -> set[tuple[int, ...]]:
    """Every intermediate shape of a jaxpr, inside scans, remats and other sub-jaxprs too."""
    shapes = set()
    for eqn in jaxpr.eqns:
        shapes.update(tuple(v.aval.shape) for v in eqn.outvars)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            shapes |= _shapes_in(sub)
    return shapes


@pytest.fixture(scope="module")
def tiny_model() -> Decoder:
    return Decoder(CONFIG, nnx.Rngs(0))


def test_decoder_token_logps_match_full_logits_and_never_hold_them(tiny_model):
    rng = np.random.default_rng(3)
    ids = rng.integers(0, CONFIG.vocab_size, (2, 12)).astype(np.int32)
    targets = np.roll(ids, -1, axis=1)
    graphdef, params = nnx.split(tiny_model)

    def full(p):
        logits = nnx.merge(graphdef, p)(ids)
        return jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits, -1), targets[..., None], -1))

    def chunked(p):
        return jnp.sum(nnx.merge(graphdef, p).token_logps(ids, targets))

    want_value, want_grad = jax.jit(jax.value_and_grad(full))(params)
    got_value, got_grad = jax.jit(jax.value_and_grad(chunked))(params)
    np.testing.assert_allclose(float(got_value), float(want_value), rtol=1e-6)
    for got, want in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-6)

    # The chunked program holds [2, 5, V] logits at most (chunks of 5 positions), never [2, 12, V].
    shapes = _shapes_in(jax.make_jaxpr(jax.grad(chunked))(params).jaxpr)
    assert (2, 5, CONFIG.vocab_size) in shapes
    assert (2, 12, CONFIG.vocab_size) not in shapes and (2, 15, CONFIG.vocab_size) not in shapes
    assert (2, 12, CONFIG.vocab_size) in _shapes_in(jax.make_jaxpr(jax.grad(full))(params).jaxpr)


def test_prefill_last_only_is_the_last_row_of_the_full_logits(tiny_model):
    ids = np.random.default_rng(4).integers(0, CONFIG.vocab_size, (2, 6)).astype(np.int32)
    positions = np.broadcast_to(np.arange(6, dtype=np.int32), ids.shape)
    key_mask = np.ones((2, 8), bool)
    full, cache_full = tiny_model.forward_cached(ids, positions, tiny_model.init_cache(2, 8), key_mask)
    last, cache_last = tiny_model.forward_cached(ids, positions, tiny_model.init_cache(2, 8), key_mask,
                                                 last_only=True)
    assert last.shape == (2, 1, CONFIG.vocab_size)
    np.testing.assert_allclose(np.asarray(last[:, 0]), np.asarray(full[:, -1]), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(cache_last.k), np.asarray(cache_full.k))


# --- activation sharding --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def spec8():
    return load_sharding("sharding/cpu-8.yaml")


@pytest.fixture(scope="module")
def mesh8(spec8):
    return make_mesh(spec8)


def test_constrain_is_a_no_op_outside_the_context_and_follows_the_rules_inside(mesh8, spec8):
    x = jnp.ones((4, 6, 8))
    assert constrain(x, ("batch", "length", "act_mlp")) is x
    assert activation_spec((4, 6, 8), ("batch", "length", "act_mlp"), mesh8, spec8.rules) == \
        P(("data", "fsdp"), None, "tensor")
    # A dimension its mesh axes do not divide stays whole instead of failing.
    assert activation_spec((3, 6, 8), ("batch", "length", "act_mlp"), mesh8, spec8.rules) == P(None, None, "tensor")

    with activation_sharding(mesh8, spec8):
        y = jax.jit(lambda a: constrain(a * 2, ("batch", "length", "act_mlp")))(x)
    assert y.sharding.spec == P(("data", "fsdp"), None, "tensor")
    with pytest.raises(ValueError, match="2 logical axes"):
        with activation_sharding(mesh8, spec8):
            constrain(x, ("batch", "length"))


def test_sharded_token_logps_and_gradients_match_one_device_without_replicating_the_embedding(mesh8, spec8,
                                                                                               capfd):
    """fsdp × tensor × data on 8 devices, with every activation constrained: the same log-probs, entropies and
    gradients as one device, and XLA compiles the vocabulary-sharded embedding lookup without replicating it."""
    from tulu_jax.models.activation_sharding import with_activation_sharding

    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Decoder(CONFIG, nnx.Rngs(0))))
    rng = np.random.default_rng(5)
    values = jax.tree.map(lambda a: rng.normal(0, 0.1, a.shape).astype(a.dtype), abstract)
    sharded = jax.device_put(values, state_shardings(abstract, mesh8, spec8))
    ids = rng.integers(0, CONFIG.vocab_size, (4, 12)).astype(np.int32)
    targets = np.roll(ids, -1, axis=1)

    def loss(params, ids, targets):
        logps, entropy = nnx.merge(graphdef, params).token_logps(ids, targets, entropy=True)
        return jnp.sum(logps) + jnp.sum(entropy), (logps, entropy)

    fn = jax.value_and_grad(loss, has_aux=True)
    rows = batch_sharding(mesh8, spec8)
    capfd.readouterr()
    (_, (logps, entropy)), grads = with_activation_sharding(jax.jit(fn), mesh8, spec8)(
        sharded, jax.device_put(ids, rows), jax.device_put(targets, rows))
    assert "rematerialization" not in capfd.readouterr().err
    (_, (want_logps, want_entropy)), want_grads = jax.jit(fn)(jax.device_put(values, jax.devices()[0]), ids, targets)
    assert logps.sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_allclose(np.asarray(logps), np.asarray(want_logps), rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(entropy), np.asarray(want_entropy), rtol=0, atol=1e-5)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5)


def _grouped_rows(config: ModelConfig, rows: int, group: int, prompt: int, response: int, seed: int = 0):
    """Rows in groups sharing a left-padded prompt, then responses of 1..response tokens (padding after)."""
    rng = np.random.default_rng(seed)
    prompt_len = np.repeat(rng.integers(2, prompt + 1, rows // group), group)
    prompt_mask = np.arange(prompt)[None] >= (prompt - prompt_len)[:, None]
    prompt_ids = np.repeat(rng.integers(1, config.vocab_size, (rows // group, prompt)), group, axis=0) * prompt_mask
    lengths = rng.integers(1, response + 1, rows)
    response_mask = np.arange(response)[None] < lengths[:, None]
    response_ids = rng.integers(1, config.vocab_size, (rows, response)) * response_mask
    tokens = jnp.asarray(np.concatenate([prompt_ids, response_ids], 1), jnp.int32)
    segments = jnp.asarray(np.concatenate([prompt_mask, response_mask], 1), jnp.int32)
    return tokens, jnp.maximum(jnp.cumsum(segments, 1) - 1, 0), segments, response_mask


@pytest.mark.parametrize("overrides", [{}, {"layer_types": ("sliding_attention", "full_attention"),
                                            "sliding_window": 5, "final_logit_softcap": 3.0}])
def test_shared_prompt_logps_equal_the_whole_rows_in_value_and_gradient(overrides):
    """GRPO's groups through `shared_prompt_token_logps` (each prompt once, responses attending to it) give the
    log-probs, entropies and parameter gradients of `token_logps` over the whole rows on every response token."""
    import dataclasses

    config = dataclasses.replace(CONFIG, **overrides)
    graphdef, params = nnx.split(Decoder(config, nnx.Rngs(0)))
    prompt, response = 9, 6
    tokens, positions, segments, mask = _grouped_rows(config, 8, 4, prompt, response)
    weights = jnp.asarray(np.random.default_rng(1).normal(size=mask.shape) * mask, jnp.float32)

    def whole(p):
        logps, ent = nnx.merge(graphdef, p).token_logps(tokens, jnp.pad(tokens[:, 1:], ((0, 0), (0, 1))),
                                                        positions=positions, segment_ids=segments, entropy=True)
        return logps[:, prompt - 1:-1], ent[:, prompt - 1:-1]

    def shared(p):
        return nnx.merge(graphdef, p).shared_prompt_token_logps(tokens, positions, segments, prompt_width=prompt,
                                                                group_size=4, entropy=True)

    (a, a_ent), (b, b_ent) = whole(params), shared(params)
    np.testing.assert_allclose(np.asarray(b)[mask], np.asarray(a)[mask], atol=2e-6)
    np.testing.assert_allclose(np.asarray(b_ent)[mask], np.asarray(a_ent)[mask], atol=2e-6)
    grad_a = jax.grad(lambda p: jnp.sum(whole(p)[0] * weights))(params)
    grad_b = jax.grad(lambda p: jnp.sum(shared(p)[0] * weights))(params)
    for (path, x), (_, y) in zip(jax.tree_util.tree_flatten_with_path(grad_a)[0],
                                 jax.tree_util.tree_flatten_with_path(grad_b)[0]):
        np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    with pytest.raises(ValueError, match="groups of 3"):
        nnx.merge(graphdef, params).shared_prompt_token_logps(tokens, positions, segments, prompt_width=prompt,
                                                              group_size=3)
