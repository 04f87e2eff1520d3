"""RLVR reward shaping against hand-computed arrays."""

import jax.numpy as jnp
import numpy as np
import pytest

from tulu_jax.losses import last_token_index, last_token_values
from tulu_jax.rl.rewards import grpo_token_advantages, groups_with_spread_first, sequence_scores, token_rewards


def test_sequence_scores_alpha_and_non_stop_penalty_replacing_the_score():
    verifier = jnp.array([1.0, 0.0, 1.0, 0.0, 0.5])
    finished = jnp.array([True, True, False, False, True])
    np.testing.assert_array_equal(np.asarray(sequence_scores(verifier, finished)), [10.0, 0.0, -10.0, -10.0, 5.0])
    np.testing.assert_array_equal(
        np.asarray(sequence_scores(verifier, finished, alpha=1.0, non_stop_penalty=-3.0)), [1.0, 0.0, -3.0, -3.0, 0.5]
    )
    np.testing.assert_array_equal(
        np.asarray(sequence_scores(verifier, finished, non_stop_penalty=None)), [10.0, 0.0, 10.0, 0.0, 5.0]
    )


def test_last_token_index_and_values():
    mask = jnp.array([[1, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0], [1, 0, 1, 0], [1, 1, 1, 1]], bool)
    assert np.asarray(last_token_index(mask)).tolist() == [2, 2, -1, 2, 3]
    values = jnp.arange(20.0).reshape(5, 4)
    assert np.asarray(last_token_values(values, mask)).tolist() == [2.0, 6.0, 0.0, 14.0, 19.0]


def test_token_rewards_kl_penalty_plus_score_at_the_last_response_token():
    mask = jnp.array([[1, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]], bool)
    kl = jnp.array([[0.2, -0.4, 1.0, 9.0], [5.0, 0.1, 0.3, 9.0], [1.0, 1.0, 1.0, 1.0]])
    rewards = token_rewards(jnp.array([10.0, -10.0, 10.0]), kl, mask, kl_coef=0.05)
    expected = [
        [-0.01, 0.02, -0.05 + 10.0, 0.0],
        [0.0, -0.005, -0.015 - 10.0, 0.0],
        [0.0, 0.0, 0.0, 0.0],  # no response token: nothing to reward
    ]
    np.testing.assert_allclose(np.asarray(rewards), expected, rtol=1e-6, atol=1e-7)
    assert rewards.dtype == jnp.float32


def test_grpo_token_advantages_drop_and_count_zero_variance_groups():
    # Two prompts × G = 3: the first group varies (10, 0, 0), the second is all correct (10, 10, 10).
    scores = jnp.array([10.0, 0.0, 0.0, 10.0, 10.0, 10.0])
    mask = jnp.array([[1, 1, 0]] * 3 + [[1, 0, 0]] * 3, bool)
    advantages, loss_mask, dropped = grpo_token_advantages(scores, mask, 3)
    std = np.sqrt(((10 - 10 / 3) ** 2 + 2 * (10 / 3) ** 2) / 3)  # population std of (10, 0, 0) = 4.714...
    a_hi, a_lo = (10 - 10 / 3) / (std + 1e-8), (0 - 10 / 3) / (std + 1e-8)  # √2 and −1/√2
    expected = [[a_hi, a_hi, 0], [a_lo, a_lo, 0], [a_lo, a_lo, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0]]
    np.testing.assert_allclose(np.asarray(advantages), expected, rtol=1e-6)
    np.testing.assert_allclose(a_hi, np.sqrt(2), rtol=1e-6)
    assert np.asarray(loss_mask).tolist() == [[True, True, False]] * 3 + [[False, False, False]] * 3
    assert int(dropped) == 1

    kept, kept_mask, none_dropped = grpo_token_advantages(scores, mask, 3, scale="none", drop_zero_variance=False)
    assert int(none_dropped) == 0 and np.array_equal(np.asarray(kept_mask), np.asarray(mask))
    np.testing.assert_allclose(np.asarray(kept)[:3, 0], [20 / 3, -10 / 3, -10 / 3], rtol=1e-6)
    assert np.all(np.asarray(kept)[3:] == 0)  # centred: all equal scores give 0


@pytest.mark.parametrize("group_size", [4, 0])
def test_grpo_token_advantages_needs_whole_groups(group_size):
    from tulu_jax.errors import ConfigError

    with pytest.raises(ConfigError, match="group_size"):
        grpo_token_advantages(jnp.zeros(6), jnp.ones((6, 2), bool), group_size)


def test_groups_with_spread_first_keeps_informative_groups_in_rollout_order_then_fills():
    scores = np.array([1, 1, 0, 0, 0, 0, 1, 0, 5, 5, -10, 0], np.float32)  # groups of 2: [1,1] [0,0] [0,0] [1,0] ...
    informative, flat = [], []
    for g in range(len(scores) // 2):
        (informative if scores[2 * g] != scores[2 * g + 1] else flat).append(g)
    assert informative == [3, 5] and flat == [0, 1, 2, 4]
    for keep in (1, 2, 3, 6):
        groups = (informative + flat)[:keep]
        expected = [2 * g + i for g in groups for i in range(2)]
        rows, with_spread = groups_with_spread_first(scores, 2, keep)
        np.testing.assert_array_equal(rows, expected)
        assert with_spread == len(informative)
    with pytest.raises(ValueError, match="cannot keep 7 groups"):
        groups_with_spread_first(scores, 2, 7)
