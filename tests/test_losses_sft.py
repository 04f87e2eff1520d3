"""token_logps and sft_loss against float64 NumPy recomputations; exact gradient accumulation for all reductions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tulu_jax.errors import ConfigError
from tulu_jax.losses import count_sequences, sft_loss, token_logps

B, T, D, V = 8, 6, 5, 11


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_token_logps(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    return np.take_along_axis(np_log_softmax(logits), targets[..., None], -1)[..., 0]


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(B, T, D)).astype(np.float32)
    w = rng.normal(size=(D, V)).astype(np.float32)
    targets = rng.integers(0, V, size=(B, T)).astype(np.int32)
    mask = rng.random((B, T)) < 0.6
    mask[3] = False  # a row with no supervised token
    mask[5, :] = True
    return x, w, targets, mask


def test_token_logps_matches_numpy_including_huge_logits():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, 4, V)).astype(np.float32)
    logits[1] *= 1e4  # would overflow a naive exp
    targets = rng.integers(0, V, size=(3, 4)).astype(np.int32)
    out = token_logps(jnp.asarray(logits), jnp.asarray(targets))
    assert out.dtype == jnp.float32 and out.shape == (3, 4)
    np.testing.assert_allclose(np.asarray(out), np_token_logps(logits, targets), rtol=1e-5, atol=1e-5)
    assert np.isfinite(np.asarray(out)).all()


def test_token_logps_bfloat16_inputs_computed_in_float32():
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.normal(size=(2, 3, V)) * 4, jnp.bfloat16)
    targets = rng.integers(0, V, size=(2, 3)).astype(np.int32)
    out = token_logps(logits, jnp.asarray(targets))
    assert out.dtype == jnp.float32
    # Reference on the bf16-rounded values: the only rounding allowed is the input's own.
    ref = np_token_logps(np.asarray(logits.astype(jnp.float32)), targets)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-6, atol=1e-6)
    grad = jax.grad(lambda z: token_logps(z, jnp.asarray(targets)).sum())(logits)
    assert grad.dtype == jnp.bfloat16


def test_token_logps_custom_gradient_matches_analytic_and_autodiff():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(2, 5, V)).astype(np.float32) * 3
    targets = rng.integers(0, V, size=(2, 5)).astype(np.int32)
    weights = rng.normal(size=(2, 5)).astype(np.float32)

    def f(z):
        return jnp.sum(jnp.asarray(weights) * token_logps(z, jnp.asarray(targets)))

    grad = np.asarray(jax.grad(f)(jnp.asarray(logits)))
    onehot = np.eye(V)[targets]
    expected = weights[..., None].astype(np.float64) * (onehot - np.exp(np_log_softmax(logits)))
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)

    def f_autodiff(z):
        lp = jnp.take_along_axis(jax.nn.log_softmax(z), jnp.asarray(targets)[..., None], -1)[..., 0]
        return jnp.sum(jnp.asarray(weights) * lp)

    np.testing.assert_allclose(grad, np.asarray(jax.grad(f_autodiff)(jnp.asarray(logits))), rtol=1e-5, atol=1e-6)


def np_sft(logits, targets, mask, reduction, num_sequences, num_tokens):
    nll = -(np_token_logps(logits, targets) * mask).sum()
    return nll / max(num_sequences if reduction == "sum" else num_tokens, 1)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_sft_loss_default_denominators_match_numpy(data, reduction):
    x, w, targets, mask = data
    logits = np.einsum("btd,dv->btv", x, w)
    loss, metrics = sft_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask), reduction=reduction)
    rows_with_tokens = int(mask.any(-1).sum())  # 7: row 3 has none
    expected = np_sft(logits, targets, mask, reduction, rows_with_tokens, int(mask.sum()))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert int(metrics["supervised_tokens"]) == int(mask.sum())
    np.testing.assert_allclose(float(metrics["nll_sum"]), -(np_token_logps(logits, targets) * mask).sum(), rtol=1e-5)


def test_sft_loss_counts_packed_sequences_from_segment_ids(data):
    x, w, targets, mask = data
    logits = jnp.asarray(np.einsum("btd,dv->btv", x, w))
    segment_ids = np.zeros((B, T), np.int32)
    segment_ids[:, :2], segment_ids[:, 2:5] = 1, 2  # two packed sequences per row
    segment_ids[7] = 0  # an all-padding row
    assert int(count_sequences(jnp.asarray(segment_ids))) == 14
    loss, metrics = sft_loss(logits, jnp.asarray(targets), jnp.asarray(mask), segment_ids=jnp.asarray(segment_ids))
    np.testing.assert_allclose(float(loss), float(metrics["nll_sum"]) / 14, rtol=1e-6)


def test_sft_loss_empty_mask_is_zero_not_nan(data):
    x, w, targets, _ = data
    logits = jnp.asarray(np.einsum("btd,dv->btv", x, w))
    empty = jnp.zeros((B, T), bool)
    for reduction in ("sum", "mean", "mean_per_micro_batch"):
        loss, grad = jax.value_and_grad(
            lambda z, r=reduction: sft_loss(z, jnp.asarray(targets), empty, reduction=r)[0]
        )(logits)
        assert float(loss) == 0.0 and np.all(np.asarray(grad) == 0.0)


def test_sft_loss_rejects_unknown_reduction(data):
    _, _, targets, mask = data
    with pytest.raises(ConfigError, match="reduction 'avg'"):
        sft_loss(jnp.zeros((B, T, V)), jnp.asarray(targets), jnp.asarray(mask), reduction="avg")


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_gradient_accumulation_4x2_equals_full_batch_of_8(data, reduction):
    """Micro-batch losses computed with the GLOBAL denominators add up to the full-batch loss and gradient."""
    x, w, targets, mask = data

    @jax.jit
    def loss_and_grad(w_, x_, t_, m_, n_seq, n_tok):
        def f(w__):
            return sft_loss(x_ @ w__, t_, m_, reduction=reduction, num_sequences=n_seq, num_tokens=n_tok)[0]

        return jax.value_and_grad(f)(w_)

    n_seq, n_tok = int(mask.any(-1).sum()), int(mask.sum())
    full_loss, full_grad = loss_and_grad(w, x, targets, mask, n_seq, n_tok)
    acc_loss, acc_grad = 0.0, np.zeros_like(w)
    for i in range(4):
        sl = slice(2 * i, 2 * i + 2)
        loss_i, grad_i = loss_and_grad(w, x[sl], targets[sl], mask[sl], n_seq, n_tok)
        acc_loss, acc_grad = acc_loss + float(loss_i), acc_grad + np.asarray(grad_i)
    np.testing.assert_allclose(acc_loss, float(full_loss), rtol=1e-6)
    np.testing.assert_allclose(acc_grad, np.asarray(full_grad), rtol=1e-5, atol=1e-7)

    # And both equal the float64 NumPy value and the analytic gradient x^T (softmax − onehot) · mask / denominator.
    logits = np.einsum("btd,dv->btv", x.astype(np.float64), w.astype(np.float64))
    np.testing.assert_allclose(float(full_loss), np_sft(logits, targets, mask, reduction, n_seq, n_tok), rtol=1e-5)
    denom = n_seq if reduction == "sum" else n_tok
    dlogits = (np.exp(np_log_softmax(logits)) - np.eye(V)[targets]) * mask[..., None] / denom
    np.testing.assert_allclose(np.asarray(full_grad), np.einsum("btd,btv->dv", x, dlogits), rtol=1e-4, atol=1e-6)


def test_mean_per_micro_batch_averages_each_micro_batch_token_mean(data):
    """HF's default under accumulation: mean over 4 micro-batches of (Σ NLL_i / tokens_i), loss and gradient.

    The NumPy side computes the micro-batch means directly, in float64; the gradient is the analytic one,
    Σ_i x_i^T (softmax − onehot) · mask_i / (tokens_i · 4).
    """
    x, w, targets, mask = data
    grad_fn = jax.jit(jax.value_and_grad(
        lambda w_, x_, t_, m_: sft_loss(x_ @ w_, t_, m_, reduction="mean_per_micro_batch", num_micro_batches=4)[0]
    ))
    acc_loss, acc_grad = 0.0, np.zeros_like(w, dtype=np.float64)
    for i in range(4):
        sl = slice(2 * i, 2 * i + 2)
        loss_i, grad_i = grad_fn(w, x[sl], targets[sl], mask[sl])
        acc_loss, acc_grad = acc_loss + float(loss_i), acc_grad + np.asarray(grad_i)

    logits = np.einsum("btd,dv->btv", x.astype(np.float64), w.astype(np.float64))
    nll = -np_token_logps(logits, targets) * mask
    micro_means = [nll[2 * i : 2 * i + 2].sum() / mask[2 * i : 2 * i + 2].sum() for i in range(4)]
    np.testing.assert_allclose(acc_loss, np.mean(micro_means), rtol=1e-5)
    tokens = np.repeat([mask[2 * i : 2 * i + 2].sum() for i in range(4)], 2)[:, None, None]
    dlogits = (np.exp(np_log_softmax(logits)) - np.eye(V)[targets]) * mask[..., None] / (tokens * 4)
    np.testing.assert_allclose(acc_grad, np.einsum("btd,btv->dv", x, dlogits), rtol=1e-4, atol=1e-6)
    # Micro-batches hold different numbers of tokens here, so this is not the global token mean.
    assert abs(np.mean(micro_means) - nll.sum() / mask.sum()) > 1e-3
    # With one micro-batch it is the global token mean.
    one = sft_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(targets), jnp.asarray(mask),
                   reduction="mean_per_micro_batch")[0]
    np.testing.assert_allclose(float(one), nll.sum() / mask.sum(), rtol=1e-5)
