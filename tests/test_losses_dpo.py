"""DPO-family losses against an independent float64 NumPy implementation (docs/recipe.md, DPO section)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tulu_jax.errors import ConfigError
from tulu_jax.losses import LOSS_TYPES, dpo_loss, needs_reference, sequence_logps, uses_average_logps

P = 16


def np_log_sigmoid(z: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -z)


def np_sigmoid(z: np.ndarray) -> np.ndarray:
    return np.exp(np_log_sigmoid(z))


def np_dpo(pc, pr, rc, rr, *, beta, loss_type, eps=0.0, ratio=0.3):
    """Returns (loss per pair, chosen reward, rejected reward, d loss / d policy_chosen)."""
    pc, pr, rc, rr = (np.asarray(a, np.float64) for a in (pc, pr, rc, rr))
    if loss_type == "simpo":
        z = beta * (pc - pr) - ratio * beta
        chosen, rejected = beta * pc, beta * pr
    else:
        z = beta * ((pc - pr) - (rc - rr))
        chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    if loss_type == "ipo":
        ell = z / beta
        return (ell - 1 / (2 * beta)) ** 2, chosen, rejected, 2 * (ell - 1 / (2 * beta))
    loss = -(1 - eps) * np_log_sigmoid(z) - eps * np_log_sigmoid(-z)
    dloss_dz = -(1 - eps) * np_sigmoid(-z) + eps * np_sigmoid(z)
    return loss, chosen, rejected, beta * dloss_dz


@pytest.fixture(scope="module")
def pairs():
    """Sequence log-probs on a 1/64 grid (exact in float32), with extreme ±1e4 gaps in the first four pairs."""
    rng = np.random.default_rng(0)
    pc, pr, rc, rr = (rng.integers(-64 * 80, 0, size=P).astype(np.float32) / 64 for _ in range(4))
    pc[0], pr[0] = 0.0, -1e4  # policy strongly prefers chosen
    pc[1], pr[1] = -1e4, 0.0  # policy strongly prefers rejected
    rc[2], rr[2] = -1e4, 0.0
    rc[3], rr[3] = 0.0, -1e4
    return pc, pr, rc, rr


CASES = [(t, eps) for t in LOSS_TYPES for eps in (0.0, 0.1) if not (t == "ipo" and eps)]


@pytest.mark.parametrize("loss_type,eps", CASES)
@pytest.mark.parametrize("beta", [0.1, 5.0])
def test_loss_and_metrics_match_numpy(pairs, loss_type, eps, beta):
    pc, pr, rc, rr = pairs
    ratio = 0.3
    loss, metrics = dpo_loss(
        *map(jnp.asarray, pairs), beta=beta, loss_type=loss_type, label_smoothing=eps, gamma_beta_ratio=ratio
    )
    exp_loss, chosen, rejected, _ = np_dpo(pc, pr, rc, rr, beta=beta, loss_type=loss_type, eps=eps, ratio=ratio)
    assert loss.dtype == jnp.float32 and loss.shape == (P,)
    np.testing.assert_allclose(np.asarray(loss), exp_loss, rtol=1e-6, atol=1e-6)
    # Means over pairs whose ±1e3 terms cancel: float32 summation error scales with the largest term.
    expected_metrics = {
        "loss": exp_loss,
        "chosen_reward": chosen,
        "rejected_reward": rejected,
        "reward_margin": chosen - rejected,
        "reward_accuracy": (chosen > rejected).astype(np.float64),
    }
    for key, values in expected_metrics.items():
        atol = 1e-6 * np.abs(values).max()
        np.testing.assert_allclose(float(metrics[key]), values.mean(), rtol=1e-6, atol=atol, err_msg=key)


@pytest.mark.parametrize("loss_type,eps", CASES)
def test_gradients_finite_and_analytic_at_extreme_gaps(pairs, loss_type, eps):
    pc, pr, rc, rr = pairs
    beta = 5.0

    def total(pc_):
        loss, _ = dpo_loss(pc_, *map(jnp.asarray, (pr, rc, rr)), beta=beta, loss_type=loss_type, label_smoothing=eps)
        return loss.sum()

    grad = np.asarray(jax.grad(total)(jnp.asarray(pc)))
    assert np.isfinite(grad).all()
    _, _, _, expected = np_dpo(pc, pr, rc, rr, beta=beta, loss_type=loss_type, eps=eps)
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)


def test_sequence_logps_sum_and_mean_with_fully_masked_rows():
    rng = np.random.default_rng(1)
    token = (-rng.random((5, 7)) * 10).astype(np.float32)
    mask = rng.random((5, 7)) < 0.5
    mask[2] = False
    mask[4] = True
    token_with_junk = token.copy()
    token_with_junk[~mask] = -np.inf  # masked positions must not leak, even if non-finite
    summed = np.asarray(sequence_logps(jnp.asarray(token_with_junk), jnp.asarray(mask), average=False))
    mean = np.asarray(sequence_logps(jnp.asarray(token_with_junk), jnp.asarray(mask), average=True))
    exp_sum = (token.astype(np.float64) * mask).sum(-1)
    np.testing.assert_allclose(summed, exp_sum, rtol=1e-6)
    np.testing.assert_allclose(mean, exp_sum / np.maximum(mask.sum(-1), 1), rtol=1e-6)
    assert mean[2] == 0.0 and summed[2] == 0.0

    grad = jax.grad(lambda t: sequence_logps(t, jnp.asarray(mask), average=True).sum())(jnp.asarray(token_with_junk))
    grad = np.asarray(grad)
    assert np.isfinite(grad).all() and np.all(grad[2] == 0.0)
    np.testing.assert_allclose(grad[4], np.full(7, 1 / 7), rtol=1e-6)


def test_dpo_norm_differs_from_dpo_exactly_by_length_normalization():
    """Chosen: 2 tokens (-1, -3); rejected: 4 tokens of -2; reference assigns log-prob 0 everywhere."""
    token = jnp.asarray([[-1.0, -3.0, 0.0, 0.0], [-2.0, -2.0, -2.0, -2.0]])
    mask = jnp.asarray([[True, True, False, False], [True, True, True, True]])
    ref = jnp.zeros(1)
    beta = 5.0
    results = {}
    for loss_type in ("dpo", "dpo_norm"):
        seq = sequence_logps(token, mask, average=uses_average_logps(loss_type))
        results[loss_type] = float(dpo_loss(seq[:1], seq[1:], ref, ref, beta=beta, loss_type=loss_type)[0][0])
    # dpo: ℓ = (-4) - (-8) = 4, loss = log(1 + e^{-20}); dpo_norm: ℓ = (-2) - (-2) = 0, loss = log 2.
    np.testing.assert_allclose(results["dpo"], np.log1p(np.exp(-20.0)), rtol=1e-6)
    np.testing.assert_allclose(results["dpo_norm"], np.log(2.0), rtol=1e-6)


def test_pair_mask_drops_padding_pairs_from_loss_and_metrics(pairs):
    pc, pr, rc, rr = pairs
    valid = np.arange(P) % 3 != 0
    loss, metrics = dpo_loss(*map(jnp.asarray, pairs), beta=0.5, loss_type="dpo", pair_mask=jnp.asarray(valid))
    sub_loss, sub_metrics = dpo_loss(*(jnp.asarray(a[valid]) for a in pairs), beta=0.5, loss_type="dpo")
    assert np.all(np.asarray(loss)[~valid] == 0.0)
    np.testing.assert_allclose(np.asarray(loss)[valid], np.asarray(sub_loss), rtol=1e-7)
    for key, value in sub_metrics.items():
        np.testing.assert_allclose(float(metrics[key]), float(value), rtol=1e-6, err_msg=key)


def test_simpo_ignores_the_reference(pairs):
    pc, pr, rc, rr = pairs
    with_ref = dpo_loss(*map(jnp.asarray, pairs), beta=2.0, loss_type="simpo")[0]
    without = dpo_loss(jnp.asarray(pc), jnp.asarray(pr), beta=2.0, loss_type="simpo")[0]
    np.testing.assert_array_equal(np.asarray(with_ref), np.asarray(without))


def test_loss_type_helpers():
    assert [uses_average_logps(t) for t in LOSS_TYPES] == [False, True, True, False]
    assert [needs_reference(t) for t in LOSS_TYPES] == [True, True, False, True]
    with pytest.raises(ConfigError, match="'kto'"):
        uses_average_logps("kto")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"loss_type": "dpo", "beta": 0.0}, "beta"),
        ({"loss_type": "dpo", "beta": 1.0, "label_smoothing": 0.7}, "label_smoothing"),
        ({"loss_type": "ipo", "beta": 1.0, "label_smoothing": 0.1}, "ipo"),
        ({"loss_type": "sigmoid", "beta": 1.0}, "'sigmoid'"),
    ],
)
def test_bad_hyperparameters_raise(kwargs, match):
    x = jnp.zeros(2)
    with pytest.raises(ConfigError, match=match):
        dpo_loss(x, x, x, x, **kwargs)


def test_missing_reference_raises():
    x = jnp.zeros(2)
    with pytest.raises(ConfigError, match="reference"):
        dpo_loss(x, x, beta=1.0, loss_type="dpo_norm")
