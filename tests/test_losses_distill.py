"""Distillation losses against float64 PyTorch: TRL's GKD `generalized_jsd_loss` (huggingface/trl commit f2cd577,
v1.9.0-26, trl/experimental/gkd/gkd_trainer.py; same formula since the β = 0/1 branches were added) reimplemented
here, soft cross-entropy written as −Σ softmax·log_softmax, sparse targets against a per-entry Python sum.

Tolerances: JAX computes in float32 and torch in float64. Values agree to 1e-6. Gradients agree to 1e-6 of the
largest gradient entry (absolute) and 1e-5 relative: the per-logit gradients are ~1e-3 with cancellations between
O(1/n) terms, so float32's ~6e-8 relative rounding leaves errors of a few 1e-9 (up to ~3e-6 relative on the
smaller entries), which a plain 1e-6 relative test cannot allow for.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tulu_jax.data.vocab import check_same_vocabulary, vocabulary_hash
from tulu_jax.errors import ConfigError
from tulu_jax.losses import generalized_jsd, soft_cross_entropy, sparse_soft_cross_entropy

B, T, V = 4, 7, 13
BETAS = (0.0, 0.1, 0.5, 0.9, 1.0)
VALUE_TOL = dict(rtol=1e-6, atol=1e-6)


def assert_grad_close(actual, expected):
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())


def trl_generalized_jsd_loss(student_logits, teacher_logits, labels, beta, temperature):
    """TRL's GKDTrainer.generalized_jsd_loss(..., reduction="batchmean"), float64."""
    student_log_probs = F.log_softmax(student_logits / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        jsd = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True)
    else:
        beta_t = torch.tensor(beta, dtype=student_log_probs.dtype)
        mixture_log_probs = torch.logsumexp(
            torch.stack([student_log_probs + torch.log1p(-beta_t), teacher_log_probs + torch.log(beta_t)]), dim=0
        )
        kl_teacher = F.kl_div(mixture_log_probs, teacher_log_probs, reduction="none", log_target=True)
        kl_student = F.kl_div(mixture_log_probs, student_log_probs, reduction="none", log_target=True)
        jsd = beta_t * kl_teacher + (1 - beta_t) * kl_student
    mask = labels != -100
    return jsd[mask].sum() / mask.sum().clamp_min(1)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    student = (rng.normal(size=(B, T, V)) * 2).astype(np.float32)
    teacher = (rng.normal(size=(B, T, V)) * 3).astype(np.float32)
    mask = rng.random((B, T)) < 0.7
    mask[1] = False  # a row with nothing to distil (prompt only)
    mask[2, :] = True
    labels = np.where(mask, rng.integers(0, V, size=(B, T)), -100)
    return student, teacher, mask, labels


def torch_value_and_grad(fn, student):
    s = torch.tensor(student, dtype=torch.float64, requires_grad=True)
    value = fn(s)
    value.backward()
    return value.item(), s.grad.numpy()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("beta", BETAS)
def test_generalized_jsd_matches_trl_values_and_gradients(data, beta, temperature):
    student, teacher, mask, labels = data
    expected, expected_grad = torch_value_and_grad(
        lambda s: trl_generalized_jsd_loss(s, torch.tensor(teacher, dtype=torch.float64), torch.tensor(labels),
                                           beta, temperature), student)

    def loss_fn(s):
        return generalized_jsd(s, jnp.asarray(teacher), jnp.asarray(mask), beta=beta, temperature=temperature)

    (loss, metrics), grad = jax.value_and_grad(loss_fn, has_aux=True)(jnp.asarray(student))
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(float(loss), expected, **VALUE_TOL)
    assert_grad_close(np.asarray(grad), expected_grad)
    # The forward KL at T = 1 is reported whatever β and T are: TRL's β = 0 branch at temperature 1.
    forward_t1 = trl_generalized_jsd_loss(torch.tensor(student, dtype=torch.float64),
                                          torch.tensor(teacher, dtype=torch.float64), torch.tensor(labels), 0.0, 1.0)
    np.testing.assert_allclose(float(metrics["forward_kl"]), float(forward_t1), **VALUE_TOL)
    assert int(metrics["tokens"]) == mask.sum()
    assert np.all(np.asarray(grad)[~mask] == 0)


def test_generalized_jsd_ends_are_the_two_kls_and_the_interior_tends_to_zero_there(data):
    student, teacher, mask, _ = data
    s, t, m = jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(mask)
    log_s, log_t = (F.log_softmax(torch.tensor(x, dtype=torch.float64), -1).numpy() for x in (student, teacher))
    forward = ((np.exp(log_t) * (log_t - log_s)).sum(-1) * mask).sum() / mask.sum()
    reverse = ((np.exp(log_s) * (log_s - log_t)).sum(-1) * mask).sum() / mask.sum()
    np.testing.assert_allclose(float(generalized_jsd(s, t, m, beta=0.0)[0]), forward, rtol=1e-5)
    np.testing.assert_allclose(float(generalized_jsd(s, t, m, beta=1.0)[0]), reverse, rtol=1e-5)
    # Why the branches exist: the mixture formula vanishes near the ends instead of reaching the KLs.
    assert float(generalized_jsd(s, t, m, beta=1e-4)[0]) < 1e-2 * forward
    assert float(generalized_jsd(s, t, m, beta=1 - 1e-4)[0]) < 1e-2 * reverse


def test_temperature_squared_scaling_is_opt_in(data):
    student, teacher, mask, _ = data
    args = (jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(mask))
    plain = float(generalized_jsd(*args, beta=0.5, temperature=2.0)[0])
    scaled = float(generalized_jsd(*args, beta=0.5, temperature=2.0, scale_by_temperature_squared=True)[0])
    np.testing.assert_allclose(scaled, 4 * plain, rtol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_soft_cross_entropy_matches_torch_and_has_the_forward_kl_gradient(data, temperature):
    student, teacher, mask, labels = data
    t64 = torch.tensor(teacher, dtype=torch.float64)
    m64 = torch.tensor(mask, dtype=torch.float64)

    def torch_sce(s):
        per_token = -(F.softmax(t64 / temperature, -1) * F.log_softmax(s / temperature, -1)).sum(-1)
        return (per_token * m64).sum() / m64.sum()

    expected, expected_grad = torch_value_and_grad(torch_sce, student)
    (loss, metrics), grad = jax.value_and_grad(
        lambda s: soft_cross_entropy(s, jnp.asarray(teacher), jnp.asarray(mask), temperature=temperature),
        has_aux=True)(jnp.asarray(student))
    np.testing.assert_allclose(float(loss), expected, **VALUE_TOL)
    assert_grad_close(np.asarray(grad), expected_grad)
    # Same gradient as TRL's forward KL (β = 0) at the same temperature: they differ by the teacher entropy only.
    _, kl_grad = torch_value_and_grad(
        lambda s: trl_generalized_jsd_loss(s, t64, torch.tensor(labels), 0.0, temperature), student)
    assert_grad_close(np.asarray(grad), kl_grad)
    assert float(metrics["forward_kl"]) > 0


def np_sparse(student, ids, probs, mask):
    """Per entry: renormalize the K probabilities, then −Σ q_k log softmax(student)[id_k]."""
    s = student.astype(np.float64)
    log_sm = s - s.max(-1, keepdims=True)
    log_sm = log_sm - np.log(np.exp(log_sm).sum(-1, keepdims=True))
    total = 0.0
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            z = float(sum(probs[b, t]))
            total -= sum(float(p) / z * log_sm[b, t, i] for i, p in zip(ids[b, t], probs[b, t]))
    return total / mask.sum()


@pytest.mark.parametrize("k", [1, 4, V])
def test_sparse_soft_cross_entropy_against_loops(data, k):
    student, teacher, mask, _ = data
    rng = np.random.default_rng(k)
    ids = np.stack([rng.permutation(V)[:k] for _ in range(B * T)]).reshape(B, T, k).astype(np.int32)
    probs = np.take_along_axis(np.asarray(jax.nn.softmax(jnp.asarray(teacher))), ids, -1).astype(np.float16)
    (loss, metrics), grad = jax.value_and_grad(
        lambda s: sparse_soft_cross_entropy(s, jnp.asarray(ids), jnp.asarray(probs), jnp.asarray(mask)),
        has_aux=True)(jnp.asarray(student))
    np.testing.assert_allclose(float(loss), np_sparse(student, ids, probs.astype(np.float64), mask), **VALUE_TOL)
    expected_mass = (probs.astype(np.float64).sum(-1) * mask).sum() / mask.sum()
    np.testing.assert_allclose(float(metrics["teacher_mass"]), expected_mass, rtol=1e-5)
    assert np.all(np.asarray(grad)[~mask] == 0)


def test_sparse_with_every_id_equals_dense_soft_cross_entropy(data):
    student, teacher, mask, _ = data
    rng = np.random.default_rng(7)
    ids = np.stack([rng.permutation(V) for _ in range(B * T)]).reshape(B, T, V).astype(np.int32)
    probs = np.take_along_axis(np.asarray(jax.nn.softmax(jnp.asarray(teacher))), ids, -1)
    s, m = jnp.asarray(student), jnp.asarray(mask)
    sparse, sparse_grad = jax.value_and_grad(
        lambda x: sparse_soft_cross_entropy(x, jnp.asarray(ids), jnp.asarray(probs), m)[0])(s)
    dense, dense_grad = jax.value_and_grad(lambda x: soft_cross_entropy(x, jnp.asarray(teacher), m)[0])(s)
    np.testing.assert_allclose(float(sparse), float(dense), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(sparse_grad), np.asarray(dense_grad), rtol=1e-5, atol=1e-8)


@functools.partial(jax.jit, static_argnames=("name", "default_denominator"))
def distill_value_and_grad(name, student, teacher, mask, ids, probs, num_tokens, default_denominator=False):
    n = None if default_denominator else num_tokens
    losses = {
        "jsd": lambda x: generalized_jsd(x, teacher, mask, beta=0.3, temperature=2.0, num_tokens=n),
        "sce": lambda x: soft_cross_entropy(x, teacher, mask, num_tokens=n),
        "sparse": lambda x: sparse_soft_cross_entropy(x, ids, probs, mask, num_tokens=n),
    }
    return jax.value_and_grad(losses[name], has_aux=True)(student)


def test_micro_batches_and_sequence_chunks_add_up_with_global_num_tokens(data):
    student, teacher, mask, _ = data
    ids = np.argsort(-teacher, -1)[..., :5].astype(np.int32)
    probs = np.take_along_axis(np.asarray(jax.nn.softmax(jnp.asarray(teacher))), ids, -1)
    arrays = (student, teacher, mask, ids, probs)
    n = int(mask.sum())
    rows = [np.s_[0:1], np.s_[1:3], np.s_[3:4]]
    chunks = [np.s_[:, 0:3], np.s_[:, 3:7]]  # a chunked-vocabulary-projection caller slices the sequence
    for name in ("jsd", "sce", "sparse"):
        metric = "forward_kl" if name != "sparse" else "teacher_mass"
        (full, full_metrics), full_grad = distill_value_and_grad(name, *arrays, n, default_denominator=True)
        for pieces in (rows, chunks):
            total, metric_sum, grad = 0.0, 0.0, np.zeros_like(student)
            for sl in pieces:
                (loss_i, metrics_i), grad_i = distill_value_and_grad(name, *(x[sl] for x in arrays), n)
                total += float(loss_i)
                metric_sum += float(metrics_i[metric])
                grad[sl] = np.asarray(grad_i)
            np.testing.assert_allclose(total, float(full), rtol=1e-6, err_msg=name)
            np.testing.assert_allclose(metric_sum, float(full_metrics[metric]), rtol=1e-6, err_msg=name)
            np.testing.assert_allclose(grad, np.asarray(full_grad), rtol=1e-5, atol=1e-9, err_msg=name)


def test_padding_garbage_and_bfloat16_inputs(data):
    student, teacher, mask, _ = data
    poisoned = np.where(mask[..., None], student, np.nan).astype(np.float32)
    for beta in BETAS:
        loss, grad = jax.value_and_grad(
            lambda s, b=beta: generalized_jsd(s, jnp.asarray(teacher), jnp.asarray(mask), beta=b)[0]
        )(jnp.asarray(poisoned))
        assert np.isfinite(float(loss)) and np.isfinite(np.asarray(grad)).all()
    empty = jnp.zeros((B, T), bool)
    loss, metrics = soft_cross_entropy(jnp.asarray(student), jnp.asarray(teacher), empty)
    assert float(loss) == 0.0 and float(metrics["forward_kl"]) == 0.0
    # bfloat16 logits are upcast: the result equals float32 math on the bf16-rounded values.
    s16, t16 = jnp.asarray(student, jnp.bfloat16), jnp.asarray(teacher, jnp.bfloat16)
    loss16, _ = generalized_jsd(s16, t16, jnp.asarray(mask))
    loss32, _ = generalized_jsd(s16.astype(jnp.float32), t16.astype(jnp.float32), jnp.asarray(mask))
    assert loss16.dtype == jnp.float32 and float(loss16) == float(loss32)


def test_bad_arguments_raise_config_errors(data):
    student, teacher, mask, _ = data
    s, t, m = jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(mask)
    with pytest.raises(ConfigError, match="beta must be in"):
        generalized_jsd(s, t, m, beta=1.5)
    with pytest.raises(ConfigError, match="temperature"):
        soft_cross_entropy(s, t, m, temperature=0.0)
    with pytest.raises(ConfigError, match="same vocabulary"):
        generalized_jsd(s, t[..., :-1], m)
    with pytest.raises(ConfigError, match="sparse targets"):
        sparse_soft_cross_entropy(s, jnp.zeros((B, T, 3), jnp.int32), jnp.zeros((B, T, 4)), m)


def test_vocabulary_check_names_sizes_and_tokenizers(tmp_path):
    from transformers import AutoTokenizer

    from tulu_jax.data.tokenizers import load_tokenizer

    tiny = "tulu_jax/assets/tiny_tokenizer"
    check_same_vocabulary(512, 512)
    with pytest.raises(ConfigError, match="151936 entries and the teacher's 152064"):
        check_same_vocabulary(151936, 152064)
    # A copy with another chat template and max length numbers tokens the same way.
    same = load_tokenizer(tiny)
    same.model_max_length, same.chat_template = 17, "{{ messages }}"
    same.save_pretrained(tmp_path / "same")
    assert vocabulary_hash(tmp_path / "same") == vocabulary_hash(tiny)
    check_same_vocabulary(512, 512, student_tokenizer=tmp_path / "same", teacher_tokenizer=tiny)
    # One added token changes the numbering.
    other = AutoTokenizer.from_pretrained(tiny)
    other.add_tokens(["<extra_token>"])
    with pytest.raises(ConfigError, match="number tokens differently"):
        check_same_vocabulary(512, 512, student_tokenizer=other, teacher_tokenizer=tiny)


def test_logits_sharded_over_batch_and_vocabulary_give_the_one_device_numbers():
    from jax.sharding import NamedSharding, PartitionSpec

    from tulu_jax.sharding import load_sharding, make_mesh

    rng = np.random.default_rng(5)
    student, teacher = (rng.normal(size=(8, 3, 16)).astype(np.float32) * 2 for _ in range(2))
    mask = rng.random((8, 3)) < 0.7
    ids = np.argsort(-teacher, -1)[..., :4].astype(np.int32)
    probs = np.take_along_axis(np.asarray(jax.nn.softmax(jnp.asarray(teacher))), ids, -1)

    @jax.jit
    def both(student, teacher, mask, ids, probs):
        def total(s):
            jsd = generalized_jsd(s, teacher, mask, beta=0.5, temperature=2.0)[0]
            return jsd + sparse_soft_cross_entropy(s, ids, probs, mask)[0]

        return jax.value_and_grad(total)(student)

    mesh = make_mesh(load_sharding("sharding/cpu-8.yaml"))
    logits_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None, "tensor"))
    rows_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    loss, grad = both(student, teacher, mask, ids, probs)
    s_loss, s_grad = both(*(jax.device_put(x, logits_sharding) for x in (student, teacher)),
                          jax.device_put(mask, rows_sharding), *(jax.device_put(x, rows_sharding) for x in (ids, probs)))
    assert s_grad.sharding.num_devices == 8
    np.testing.assert_allclose(float(s_loss), float(loss), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(s_grad), np.asarray(grad), rtol=1e-5, atol=1e-8)
