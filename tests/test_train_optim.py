"""Optimizer and schedule vs HF transformers' schedules and torch's AdamW + clip_grad_norm_ (open-instruct's stack)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import get_linear_schedule_with_warmup

from tulu_jax.errors import ConfigError
from tulu_jax.train import decay_mask, make_optimizer, make_schedule, warmup_steps


def hf_factor(kind: str, k: int, warmup: int, total: int) -> float:
    """HF transformers' schedule lambdas, written out (optimization.py)."""
    if k < warmup:
        return k / max(1, warmup)
    progress = (k - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, (total - k) / max(1, total - warmup))
    if kind == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 2.0 * 0.5 * progress)))
    return 1.0


def test_warmup_steps_floor_like_open_instruct():
    # open-instruct: num_warmup_steps = int(num_training_steps * warmup_ratio)
    assert warmup_steps(0.03, 100) == 3
    assert warmup_steps(0.1, 25) == 2
    assert warmup_steps(0.03, 14676) == 440
    assert warmup_steps(0.0, 10) == 0


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
@pytest.mark.parametrize("ratio,total", [(0.1, 25), (0.03, 200), (0.0, 7)])
def test_schedule_matches_formula(kind, ratio, total):
    lr = 3e-4
    schedule = make_schedule(lr, warmup_ratio=ratio, total_steps=total, schedule=kind)
    warm = int(total * ratio)
    # Training never runs past total_steps (where HF's cosine would rise again; ours stays at 0).
    steps = sorted({0, 1, max(warm - 1, 0), warm, warm + 1, total // 2, total - 2, total - 1, total})
    got = np.asarray(schedule(np.asarray(steps)))
    want = np.asarray([lr * hf_factor(kind, k, warm, total) for k in steps])
    np.testing.assert_allclose(got, want, rtol=5e-6, atol=1e-12)
    if kind != "constant":
        assert float(schedule(total + 3)) == 0.0


def test_linear_schedule_matches_transformers():
    # The lambda that get_linear_schedule_with_warmup hands to torch's LambdaLR (no torch optimizer needed).
    from transformers.optimization import _get_linear_schedule_with_warmup_lr_lambda as hf_linear

    total, ratio, lr = 30, 0.1, 5e-6
    ours = make_schedule(lr, warmup_ratio=ratio, total_steps=total)
    want = [lr * hf_linear(k, num_warmup_steps=int(total * ratio), num_training_steps=total) for k in range(total + 2)]
    np.testing.assert_allclose(np.asarray(ours(np.arange(total + 2))), want, rtol=1e-6, atol=1e-15)


def test_bad_schedule_arguments():
    with pytest.raises(ConfigError, match="schedule"):
        make_schedule(1.0, warmup_ratio=0.1, total_steps=10, schedule="exponential")
    with pytest.raises(ConfigError, match="total_steps"):
        make_schedule(1.0, warmup_ratio=0.1, total_steps=0)
    with pytest.raises(ConfigError, match="clip_norm"):
        make_optimizer(1.0, warmup_ratio=0.1, total_steps=10, clip_norm=0.0)


def test_decay_mask_excludes_biases_and_norms():
    params = {"layer": {"kernel": 0, "bias": 0}, "final_norm": {"scale": 0}, "q_norm": {"scale": 0}, "emb": 0}
    assert decay_mask(params) == {
        "layer": {"kernel": True, "bias": False}, "final_norm": {"scale": False}, "q_norm": {"scale": False},
        "emb": True,
    }


def test_adamw_clip_schedule_match_torch():
    """Six updates of make_optimizer vs torch: clip_grad_norm_ → AdamW (no decay on bias) → HF linear schedule."""
    rng = np.random.default_rng(0)
    init = {"dense": {"kernel": rng.normal(size=(4, 3)), "bias": rng.normal(size=(3,))}}
    # Gradient scales straddle clip_norm=1 so some updates are clipped and some are not.
    grads = [jax.tree.map(lambda x, s=s: s * rng.normal(size=x.shape), init) for s in (3.0, 0.05, 2.0, 0.1, 5.0, 0.2)]
    lr, total, ratio, wd, b1, b2, eps = 1e-2, 6, 0.34, 0.1, 0.8, 0.95, 1e-6

    tx, _ = make_optimizer(lr, warmup_ratio=ratio, total_steps=total, weight_decay=wd, b1=b1, b2=b2, eps=eps)
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), init)
    opt_state = tx.init(params)
    update = jax.jit(tx.update)

    kernel = torch.nn.Parameter(torch.tensor(init["dense"]["kernel"], dtype=torch.float64))
    bias = torch.nn.Parameter(torch.tensor(init["dense"]["bias"], dtype=torch.float64))
    opt = torch.optim.AdamW(
        [{"params": [kernel], "weight_decay": wd}, {"params": [bias], "weight_decay": 0.0}],
        lr=lr, betas=(b1, b2), eps=eps,
    )
    sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=int(total * ratio), num_training_steps=total)
    clipped_any = False
    for g in grads:
        updates, opt_state = update(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g), opt_state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
        kernel.grad = torch.tensor(g["dense"]["kernel"])
        bias.grad = torch.tensor(g["dense"]["bias"])
        norm = float(torch.nn.utils.clip_grad_norm_([kernel, bias], 1.0))
        clipped_any |= norm > 1.0
        opt.step()
        sched.step()
        np.testing.assert_allclose(np.asarray(params["dense"]["kernel"]), kernel.detach().numpy(), rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(params["dense"]["bias"]), bias.detach().numpy(), rtol=2e-5, atol=1e-6)
    assert clipped_any
