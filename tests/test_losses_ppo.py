"""PPO/GRPO pieces against float64 references written differently: per-element Python loops (GAE), open-instruct's
reversed loop in torch, the pessimistic-bound form of the clipped objective, torch autograd for the gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tulu_jax.errors import ConfigError
from tulu_jax.losses import (
    explained_variance,
    gae,
    grpo_advantages,
    grpo_nonzero_variance,
    grpo_policy_loss,
    kl_estimate,
    ppo_policy_loss,
    ppo_value_loss,
    token_entropy,
    whiten,
)

B, T = 6, 9
TOL = dict(rtol=1e-6, atol=1e-6)


def response_mask() -> np.ndarray:
    mask = np.zeros((B, T), bool)
    mask[0] = True  # full row
    mask[1, :5] = True  # right padding
    # row 2: all masked
    mask[3, 2:7] = True  # prompt on the left, padding on the right
    mask[4, [0, 1, 4, 5, 6]] = True  # a hole (two turns): the GAE chain restarts
    mask[5, :1] = True  # one token
    return mask


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    f32 = lambda *s: rng.normal(size=s).astype(np.float32)  # noqa: E731
    old_logps = -np.abs(f32(B, T)) - 0.1
    logps = old_logps + 0.3 * f32(B, T)  # ratios spread across both sides of the clip range
    return dict(
        mask=response_mask(),
        rewards=f32(B, T),
        values=f32(B, T),
        old_values=f32(B, T),
        returns=f32(B, T),
        logps=logps,
        old_logps=old_logps,
        ref_logps=old_logps + 0.2 * f32(B, T),
        advantages=f32(B, T),
    )


def np_gae(rewards, values, mask, gamma, lam):
    """Element by element, backwards; a position's successor counts only if it is a response token."""
    adv = np.zeros((B, T))
    for b in range(B):
        for t in reversed(range(T)):
            if not mask[b, t]:
                continue
            has_next = t + 1 < T and mask[b, t + 1]
            next_value = float(values[b, t + 1]) if has_next else 0.0
            next_adv = adv[b, t + 1] if has_next else 0.0
            delta = float(rewards[b, t]) + gamma * next_value - float(values[b, t])
            adv[b, t] = delta + gamma * lam * next_adv
    return adv, np.where(mask, adv + values, 0.0)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0)])
def test_gae_matches_python_loops(data, gamma, lam):
    mask = data["mask"]
    adv, ret = gae(jnp.asarray(data["rewards"]), jnp.asarray(data["values"]), jnp.asarray(mask), gamma=gamma, lam=lam)
    exp_adv, exp_ret = np_gae(data["rewards"], data["values"], mask, gamma, lam)
    assert adv.dtype == jnp.float32 and adv.shape == (B, T)
    np.testing.assert_allclose(np.asarray(adv), exp_adv, **TOL)
    np.testing.assert_allclose(np.asarray(ret), exp_ret, **TOL)
    assert np.all(np.asarray(adv)[~mask] == 0) and np.all(np.asarray(ret)[~mask] == 0)


def test_gae_equals_open_instruct_reversed_loop_on_right_padded_rows():
    """open-instruct (ppo_vllm_thread_ray_gtrl.py): values and rewards zeroed past the response, then
    `nextvalues = values[:, t+1] if t < T-1 else 0; delta = r_t + γ·nextvalues − v_t;
    lastgaelam = delta + γλ·lastgaelam`.
    Responses start at position 0 and are right-padded there, so both must agree on every position."""
    rng = np.random.default_rng(1)
    lengths = np.array([9, 5, 1, 7, 3, 8])
    mask = np.arange(T)[None, :] < lengths[:, None]
    rewards, values = rng.normal(size=(B, T)), rng.normal(size=(B, T))
    gamma, lam = 1.0, 0.95
    r = torch.tensor(np.where(mask, rewards, 0.0))
    v = torch.tensor(np.where(mask, values, 0.0))
    lastgaelam, reversed_adv = 0.0, []
    for t in reversed(range(T)):
        nextvalues = v[:, t + 1] if t < T - 1 else 0.0
        delta = r[:, t] + gamma * nextvalues - v[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        reversed_adv.append(lastgaelam)
    expected = torch.stack(reversed_adv[::-1], dim=1).numpy()
    adv, ret = gae(
        jnp.asarray(rewards, jnp.float32), jnp.asarray(values, jnp.float32), jnp.asarray(mask), gamma=gamma, lam=lam
    )
    np.testing.assert_allclose(np.asarray(adv), expected, rtol=1e-5, atol=1e-5)  # float32 inputs of float64 data
    np.testing.assert_allclose(np.asarray(ret)[mask], (expected + v.numpy())[mask], rtol=1e-5, atol=1e-5)


def test_whiten_matches_numpy_unbiased(data):
    x, mask = data["advantages"], data["mask"]
    sel = x[mask].astype(np.float64)
    expected = (x - sel.mean()) / np.sqrt(sel.var(ddof=1) + 1e-8)
    out = np.asarray(whiten(jnp.asarray(x), jnp.asarray(mask)))
    np.testing.assert_allclose(out[mask], expected[mask], **TOL)
    assert np.all(out[~mask] == 0)
    kept_mean = np.asarray(whiten(jnp.asarray(x), jnp.asarray(mask), shift_mean=False))
    np.testing.assert_allclose(kept_mean[mask], expected[mask] + sel.mean(), **TOL)
    # A single token or none: finite, no division by zero.
    assert np.isfinite(np.asarray(whiten(jnp.asarray(x), jnp.asarray(np.eye(B, T, dtype=bool)[:1].repeat(B, 0))))).all()
    assert np.all(np.asarray(whiten(jnp.asarray(x), jnp.zeros((B, T), bool))) == 0)


def test_kl_estimators_match_their_definitions(data):
    lp, ref = data["logps"].astype(np.float64), data["ref_logps"].astype(np.float64)
    ratio = np.exp(ref) / np.exp(lp)  # π_ref/π, the k3 form of Schulman's note
    expected = {"k1": lp - ref, "k2": 0.5 * (np.log(np.exp(lp) / np.exp(ref))) ** 2, "k3": (ratio - 1) - np.log(ratio)}
    for kind, value in expected.items():
        out = kl_estimate(jnp.asarray(data["logps"]), jnp.asarray(data["ref_logps"]), kind)
        np.testing.assert_allclose(np.asarray(out), value, **TOL)
    assert np.all(np.asarray(kl_estimate(jnp.asarray(lp), jnp.asarray(ref), "k3")) >= 0)
    with pytest.raises(ConfigError, match="'k4'"):
        kl_estimate(jnp.asarray(lp), jnp.asarray(ref), "k4")


def np_policy(logps, old_logps, adv, mask, clip, n):
    """The pessimistic bound written per sign of A: A ≥ 0 caps ρ at 1+ε, A < 0 floors it at 1−ε."""
    ratio = np.exp(logps.astype(np.float64) - old_logps)
    per_token = np.where(adv >= 0, -adv * np.minimum(ratio, 1 + clip), -adv * np.maximum(ratio, 1 - clip))
    clipped = ((adv > 0) & (ratio > 1 + clip)) | ((adv < 0) & (ratio < 1 - clip))
    approx_kl = 0.5 * (logps.astype(np.float64) - old_logps) ** 2
    return (per_token * mask).sum() / n, (clipped * mask).sum() / n, (approx_kl * mask).sum() / n


def torch_policy(logps, old_logps, adv, mask, clip, n):
    lp = torch.tensor(logps, dtype=torch.float64, requires_grad=True)
    ratio = torch.exp(lp - torch.tensor(old_logps, dtype=torch.float64))
    a = torch.tensor(adv, dtype=torch.float64)
    losses = torch.max(-a * ratio, -a * torch.clamp(ratio, 1 - clip, 1 + clip))
    loss = (losses * torch.tensor(mask, dtype=torch.float64)).sum() / n
    loss.backward()
    return lp.grad.numpy()


@pytest.mark.parametrize("clip", [0.2, 0.05])
def test_ppo_policy_loss_value_metrics_and_gradient(data, clip):
    mask = data["mask"]
    args = [jnp.asarray(data[k]) for k in ("logps", "old_logps", "advantages")]
    loss, metrics = ppo_policy_loss(*args, jnp.asarray(mask), clip=clip)
    n = mask.sum()
    exp_loss, exp_clipfrac, exp_kl = np_policy(data["logps"], data["old_logps"], data["advantages"], mask, clip, n)
    np.testing.assert_allclose(float(loss), exp_loss, **TOL)
    np.testing.assert_allclose(float(metrics["clipfrac"]), exp_clipfrac, **TOL)
    np.testing.assert_allclose(float(metrics["approx_kl"]), exp_kl, **TOL)
    assert 0 < float(metrics["clipfrac"]) < 1  # the data exercises both branches

    grad = jax.grad(lambda lp: ppo_policy_loss(lp, *args[1:], jnp.asarray(mask), clip=clip)[0])(args[0])
    expected = torch_policy(data["logps"], data["old_logps"], data["advantages"], mask, clip, n)
    np.testing.assert_allclose(np.asarray(grad), expected, **TOL)


def test_ppo_value_loss_value_clipfrac_and_gradient(data):
    mask, clip = data["mask"], 0.2
    v, v_old, ret = (data[k].astype(np.float64) for k in ("values", "old_values", "returns"))
    v_clipped = np.minimum(np.maximum(v, v_old - clip), v_old + clip)
    err, err_clipped = (v - ret) ** 2, (v_clipped - ret) ** 2
    n = mask.sum()
    exp_loss = 0.5 * (np.where(err > err_clipped, err, err_clipped) * mask).sum() / n
    loss, metrics = ppo_value_loss(*(jnp.asarray(data[k]) for k in ("values", "old_values", "returns")),
                                   jnp.asarray(mask), clip=clip)
    np.testing.assert_allclose(float(loss), exp_loss, **TOL)
    np.testing.assert_allclose(float(metrics["clipfrac"]), ((err_clipped > err) * mask).sum() / n, **TOL)

    tv = torch.tensor(v, requires_grad=True)
    tv_clipped = torch.clamp(tv, torch.tensor(v_old - clip), torch.tensor(v_old + clip))
    t_loss = 0.5 * (torch.max((tv - torch.tensor(ret)) ** 2, (tv_clipped - torch.tensor(ret)) ** 2)
                    * torch.tensor(mask, dtype=torch.float64)).sum() / n
    t_loss.backward()
    grad = jax.grad(lambda x: ppo_value_loss(x, jnp.asarray(data["old_values"]), jnp.asarray(data["returns"]),
                                             jnp.asarray(mask), clip=clip)[0])(jnp.asarray(data["values"]))
    np.testing.assert_allclose(np.asarray(grad), tv.grad.numpy(), **TOL)


def test_accumulation_over_micro_batches_with_global_num_tokens_is_exact(data):
    """3 micro-batches of 2 rows (one of them holds the all-masked row) with the global token count add up to the
    full batch: losses, metrics and gradients of the policy, value and GRPO losses."""
    mask = jnp.asarray(data["mask"])
    n = int(data["mask"].sum())
    a = {k: jnp.asarray(v) for k, v in data.items()}

    def losses(lp, v, sl, num_tokens):
        pol = ppo_policy_loss(lp, a["old_logps"][sl], a["advantages"][sl], mask[sl], num_tokens=num_tokens)
        val = ppo_value_loss(v, a["old_values"][sl], a["returns"][sl], mask[sl], num_tokens=num_tokens)
        grpo = grpo_policy_loss(lp, a["old_logps"][sl], a["ref_logps"][sl], a["advantages"][sl, 0], mask[sl],
                                kl_coef=0.1, num_tokens=num_tokens)
        total = pol[0] + val[0] + grpo[0]
        return total, {**{f"pol_{k}": x for k, x in pol[1].items()}, **{f"val_{k}": x for k, x in val[1].items()},
                       **{f"grpo_{k}": x for k, x in grpo[1].items()}}

    def run(sl, num_tokens):
        grad_fn = jax.value_and_grad(losses, argnums=(0, 1), has_aux=True)
        return grad_fn(a["logps"][sl], a["values"][sl], sl, num_tokens)

    (full, full_metrics), (g_lp, g_v) = run(slice(0, B), None)
    total, metrics, grads_lp, grads_v = 0.0, {}, [], []
    for i in range(3):
        (loss_i, metrics_i), (glp_i, gv_i) = run(slice(2 * i, 2 * i + 2), n)
        total += float(loss_i)
        metrics = {k: metrics.get(k, 0.0) + float(x) for k, x in metrics_i.items()}
        grads_lp.append(np.asarray(glp_i))
        grads_v.append(np.asarray(gv_i))
    np.testing.assert_allclose(total, float(full), rtol=1e-6)
    for k, x in full_metrics.items():
        np.testing.assert_allclose(metrics[k], float(x), rtol=1e-6, atol=1e-7, err_msg=k)
    np.testing.assert_allclose(np.concatenate(grads_lp), np.asarray(g_lp), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(np.concatenate(grads_v), np.asarray(g_v), rtol=1e-6, atol=1e-8)


def test_garbage_off_the_mask_leaks_into_neither_loss_nor_gradient(data):
    mask = data["mask"]
    poison = lambda x: jnp.asarray(np.where(mask, x, np.nan))  # noqa: E731
    lp = poison(data["logps"])
    old = jnp.asarray(np.where(mask, data["old_logps"], -np.inf))
    for loss_fn, args in (
        (lambda x: ppo_policy_loss(x, old, poison(data["advantages"]), jnp.asarray(mask))[0], lp),
        (lambda x: ppo_value_loss(x, poison(data["old_values"]), poison(data["returns"]), jnp.asarray(mask))[0],
         poison(data["values"])),
        (lambda x: grpo_policy_loss(x, old, poison(data["ref_logps"]), jnp.ones(B), jnp.asarray(mask))[0], lp),
    ):
        loss, grad = jax.value_and_grad(loss_fn)(args)
        assert np.isfinite(float(loss)) and np.isfinite(np.asarray(grad)).all()
        assert np.all(np.asarray(grad)[~mask] == 0)
    adv, ret = gae(poison(data["rewards"]), poison(data["values"]), jnp.asarray(mask))
    assert np.isfinite(np.asarray(adv)).all() and np.isfinite(np.asarray(ret)).all()
    assert np.isfinite(np.asarray(whiten(poison(data["advantages"]), jnp.asarray(mask)))).all()


def test_everything_masked_gives_zero_not_nan(data):
    empty = jnp.zeros((B, T), bool)
    loss, grad = jax.value_and_grad(
        lambda x: ppo_policy_loss(x, jnp.asarray(data["old_logps"]), jnp.asarray(data["advantages"]), empty)[0]
    )(jnp.asarray(data["logps"]))
    assert float(loss) == 0.0 and np.all(np.asarray(grad) == 0)
    v_loss, v_metrics = ppo_value_loss(*(jnp.asarray(data[k]) for k in ("values", "old_values", "returns")), empty)
    assert float(v_loss) == 0.0 and float(v_metrics["clipfrac"]) == 0.0


def test_grpo_advantages_per_group_against_loops():
    rng = np.random.default_rng(3)
    group_size = 4
    rewards = rng.integers(0, 3, size=20).astype(np.float32) * 5
    rewards[8:12] = 10.0  # a zero-variance group
    expected_std, expected_none = np.zeros(20), np.zeros(20)
    for start in range(0, 20, group_size):
        group = rewards[start:start + group_size].astype(np.float64)
        mean = sum(group) / group_size
        std = np.sqrt(sum((g - mean) ** 2 for g in group) / group_size)  # population std
        for i, g in enumerate(group):
            expected_none[start + i] = g - mean
            expected_std[start + i] = (g - mean) / (std + 1e-8)
    np.testing.assert_allclose(np.asarray(grpo_advantages(jnp.asarray(rewards), group_size)), expected_std, **TOL)
    np.testing.assert_allclose(np.asarray(grpo_advantages(jnp.asarray(rewards), group_size, scale="none")),
                               expected_none, **TOL)

    keep, dropped = grpo_nonzero_variance(jnp.asarray(rewards), group_size)
    varied = [len(set(rewards[s:s + group_size].tolist())) > 1 for s in range(0, 20, group_size)]
    assert np.asarray(keep).tolist() == [v for v in varied for _ in range(group_size)]
    assert int(dropped) == varied.count(False) >= 1
    assert not np.asarray(keep)[8:12].any()


def test_grpo_policy_loss_is_clipped_loss_plus_k3_term(data):
    mask = data["mask"]
    seq_adv = np.linspace(-1.5, 1.5, B).astype(np.float32)
    token_adv = np.repeat(seq_adv[:, None], T, 1)
    n = mask.sum()
    clipped, _, _ = np_policy(data["logps"], data["old_logps"], token_adv, mask, 0.2, n)
    d = data["logps"].astype(np.float64) - data["ref_logps"]
    k3 = ((np.exp(-d) - 1 + d) * mask).sum() / n
    loss, metrics = grpo_policy_loss(*(jnp.asarray(data[k]) for k in ("logps", "old_logps", "ref_logps")),
                                     jnp.asarray(seq_adv), jnp.asarray(mask), kl_coef=0.04)
    np.testing.assert_allclose(float(loss), clipped + 0.04 * k3, **TOL)
    np.testing.assert_allclose(float(metrics["kl"]), k3, **TOL)
    np.testing.assert_allclose(float(metrics["policy_loss"]), clipped, **TOL)


@pytest.mark.parametrize("call", [
    lambda r: grpo_advantages(r, 3),
    lambda r: grpo_nonzero_variance(r, 0),
    lambda r: grpo_advantages(r, 2, scale="mad"),
    lambda r: grpo_advantages(r.reshape(2, 4), 2),
])
def test_grpo_bad_arguments_raise_config_error(call):
    with pytest.raises(ConfigError, match="grpo"):
        call(jnp.arange(8.0))


def test_sharded_batch_gives_the_one_device_numbers(data):
    """GAE → whitening (a statistic of the WHOLE batch) → both losses and their gradients, jitted with the rows split
    over 4 of the 8 CPU devices (data × fsdp), equal the one-device computation."""
    from jax.sharding import NamedSharding, PartitionSpec

    from tulu_jax.sharding import load_sharding, make_mesh

    rows = np.r_[0:B, 0, 3]  # 8 rows: divisible by data × fsdp
    a = {k: np.asarray(v)[rows] for k, v in data.items()}

    @jax.jit
    def step(a):
        adv, ret = gae(a["rewards"], a["old_values"], a["mask"])
        adv = whiten(adv, a["mask"])

        def total(lp, v):
            return (ppo_policy_loss(lp, a["old_logps"], adv, a["mask"])[0]
                    + 0.1 * ppo_value_loss(v, a["old_values"], ret, a["mask"])[0])

        return jax.value_and_grad(total, argnums=(0, 1))(a["logps"], a["values"])

    mesh = make_mesh(load_sharding("sharding/cpu-8.yaml"))
    rows_sharded = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None))
    loss, (g_lp, g_v) = step(jax.device_put(a, jax.devices()[0]))
    s_loss, (s_lp, s_v) = step(jax.device_put(a, rows_sharded))
    assert s_lp.sharding.num_devices == 8
    np.testing.assert_allclose(float(s_loss), float(loss), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(s_lp), np.asarray(g_lp), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(np.asarray(s_v), np.asarray(g_v), rtol=1e-6, atol=1e-8)


def test_explained_variance_and_entropy_metrics(data):
    mask = data["mask"]
    v, r = data["values"].astype(np.float64)[mask], data["returns"].astype(np.float64)[mask]
    expected = 1 - np.var(r - v) / np.var(r)
    out = explained_variance(jnp.asarray(data["values"]), jnp.asarray(data["returns"]), jnp.asarray(mask))
    np.testing.assert_allclose(float(out), expected, **TOL)
    perfect = explained_variance(jnp.asarray(data["returns"]), jnp.asarray(data["returns"]), jnp.asarray(mask))
    assert float(perfect) == 1.0
    constant = explained_variance(jnp.asarray(data["values"]), jnp.ones((B, T)), jnp.asarray(mask))
    assert float(constant) == 0.0

    logits = np.random.default_rng(4).normal(size=(3, 4, 7)) * 3
    p = torch.softmax(torch.tensor(logits), -1)
    expected_entropy = torch.distributions.Categorical(probs=p).entropy().numpy()
    np.testing.assert_allclose(np.asarray(token_entropy(jnp.asarray(logits, jnp.float32))), expected_entropy, **TOL)
    uniform = token_entropy(jnp.zeros((2, 7)))
    np.testing.assert_allclose(np.asarray(uniform), np.log(7), rtol=1e-6)


def test_per_sequence_advantages_are_refused_where_tokens_are_expected():
    """[B] against a [B, T] mask would broadcast over T (silently wrong when B == T): a clear error instead."""
    square = jnp.ones((4, 4), bool)
    with pytest.raises(ValueError, match=r"advantages has shape \(4,\)"):
        ppo_policy_loss(jnp.zeros((4, 4)), jnp.zeros((4, 4)), jnp.ones(4), square)
    with pytest.raises(ValueError, match="returns has shape"):
        ppo_value_loss(jnp.zeros((4, 4)), jnp.zeros((4, 4)), jnp.zeros((4, 3)), square)
