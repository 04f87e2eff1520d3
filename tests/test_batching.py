"""Padding and packing into the batch contract: hand-built expectations, plan invariants, and packed == padded for
the loss and its gradients under a tiny causal attention model with segment masking."""

from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tulu_jax.data.batching import (
    BATCH_KEYS,
    BatchPlan,
    build_batch,
    check_row,
    make_batches,
    plan_packed,
    plan_padded,
)
from tulu_jax.errors import DataError
from tulu_jax.losses import sft_loss

ROW_A = {"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]}
ROW_B = {"input_ids": [9, 10, 11], "labels": [-100, 10, 11]}


def test_padded_batch_by_hand():
    batch = make_batches([ROW_A, ROW_B], seq_len=5, batch_size=3, packed=False)
    assert len(batch) == 1
    b = batch[0]
    np.testing.assert_array_equal(b["input_ids"], [[5, 6, 7, 8, 0], [9, 10, 11, 0, 0], [0] * 5])
    np.testing.assert_array_equal(b["positions"], [[0, 1, 2, 3, 0], [0, 1, 2, 0, 0], [0] * 5])
    np.testing.assert_array_equal(b["segment_ids"], [[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [0] * 5])
    np.testing.assert_array_equal(b["targets"], [[6, 7, 8, 0, 0], [10, 11, 0, 0, 0], [0] * 5])
    np.testing.assert_array_equal(b["loss_mask"], [[0, 1, 1, 0, 0], [1, 1, 0, 0, 0], [0] * 5])
    assert {k: v.dtype for k, v in b.items()} == {k: (bool if k == "loss_mask" else np.int32) for k in BATCH_KEYS}


def test_packed_batch_by_hand():
    (b,) = make_batches([ROW_A, ROW_B], seq_len=8, batch_size=1, packed=True)
    np.testing.assert_array_equal(b["input_ids"], [[5, 6, 7, 8, 9, 10, 11, 0]])
    np.testing.assert_array_equal(b["positions"], [[0, 1, 2, 3, 0, 1, 2, 0]])
    np.testing.assert_array_equal(b["segment_ids"], [[1, 1, 1, 1, 2, 2, 2, 0]])
    # No target crosses the segment boundary (8 → 9) and the last token of each segment is unsupervised.
    np.testing.assert_array_equal(b["targets"], [[6, 7, 8, 0, 10, 11, 0, 0]])
    np.testing.assert_array_equal(b["loss_mask"], [[0, 1, 1, 0, 1, 1, 0, 0]])


def test_first_fit_places_rows_in_the_first_sequence_with_room():
    # seq_len 10, 2 sequences per batch: 6→s0, 5→s1, 4→s0 (room 4), 3→s1 (room 5→2), 3 fits nowhere → next batch.
    plan = plan_packed(range(5), [6, 5, 4, 3, 3], seq_len=10, batch_size=2)
    assert plan.num_batches == 2
    assert [list(s) for s in plan.sequence_rows(0)] == [[0, 2], [1, 3]]
    assert [list(s) for s in plan.sequence_rows(1)] == [[4], []]
    assert [list(s) for s in plan.sequence_rows(1, first=1)] == [[]]


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 16), min_size=1, max_size=40),
    batch_size=st.integers(1, 5),
    seed=st.integers(0, 2**31),
)
def test_packing_plan_keeps_every_row_once_and_fits(lengths, batch_size, seed):
    seq_len = 16
    order = np.random.default_rng(seed).permutation(len(lengths))
    plan = plan_packed(order, lengths, seq_len, batch_size)
    again = plan_packed(order, lengths, seq_len, batch_size)
    np.testing.assert_array_equal(plan.rows, again.rows)
    np.testing.assert_array_equal(plan.seq_starts, again.seq_starts)
    placed = [r for k in range(plan.num_batches) for seq in plan.sequence_rows(k) for r in seq]
    assert sorted(placed) == list(range(len(lengths)))
    if batch_size == 1:  # a single open sequence: rows stay in stream order
        assert placed == list(order)
    for k in range(plan.num_batches):
        assert all(sum(lengths[r] for r in seq) <= seq_len for seq in plan.sequence_rows(k))
    assert len(plan.seq_starts) - 1 == plan.num_batches * batch_size


def test_padded_plan_and_concatenate():
    p0, p1 = plan_padded([2, 0, 1], batch_size=2), plan_padded([1, 2, 0], batch_size=2)
    both = BatchPlan.concatenate([p0, p1])
    assert both.num_batches == 4
    got = [[list(s) for s in both.sequence_rows(k)] for k in range(4)]
    assert got == [[[2], [0]], [[1], []], [[1], [2]], [[0], []]]
    with pytest.raises(IndexError):
        both.sequence_rows(4)


@pytest.mark.parametrize(
    "row,field,match",
    [
        ({"input_ids": [1, 2]}, "labels", "missing"),
        ({"input_ids": [1, 2], "labels": [1]}, "labels", "length 1"),
        ({"input_ids": [], "labels": []}, "input_ids", "empty"),
        ({"input_ids": [1, 2, 3], "labels": [-100, 5, 3]}, "labels", "label 5 at position 1"),
        ({"input_ids": [1.0, 2.0], "labels": [1, 2]}, "input_ids", "1-D list of ints"),
        ({"input_ids": [1, -2], "labels": [1, -100]}, "input_ids", "out of range"),
        ({"input_ids": list(range(9)), "labels": list(range(9))}, "input_ids", "more than the sequence length 8"),
    ],
)
def test_bad_rows_raise_data_error_naming_file_row_field(row, field, match):
    with pytest.raises(DataError, match=match) as info:
        check_row(row, index=17, source="train.jsonl", seq_len=8)
    assert (info.value.file, info.value.row, info.value.field) == ("train.jsonl", 17, field)
    assert "train.jsonl" in str(info.value) and "row 17" in str(info.value)


def test_make_batches_reports_the_offending_row():
    with pytest.raises(DataError, match="row 1"):
        make_batches([ROW_A, {"input_ids": list(range(1, 30)), "labels": [-100] * 29}], 8, 2, packed=True)


def test_build_batch_rejects_overfull_sequence():
    row = check_row(ROW_A, index=0)
    with pytest.raises(ValueError, match="more than seq_len 6"):
        build_batch([[row, row]], seq_len=6)


# ---- packed == padded under a tiny causal attention model -------------------------------------------------------

V, H, MAX_POS = 23, 16, 16


def init_params(key):
    ks = jax.random.split(key, 6)
    shapes = {"embed": (V, H), "pos": (MAX_POS, H), "wq": (H, H), "wk": (H, H), "wv": (H, H), "wo": (H, V)}
    return {name: 0.3 * jax.random.normal(k, shape) for k, (name, shape) in zip(ks, shapes.items(), strict=True)}


def tiny_model(params, batch):
    """One causal attention layer: attention only inside a segment, positions restart per segment."""
    x = params["embed"][batch["input_ids"]] + params["pos"][batch["positions"]]
    q, k, v = x @ params["wq"], x @ params["wk"], x @ params["wv"]
    seg = batch["segment_ids"]
    t = jnp.arange(seg.shape[1])
    allowed = (t[:, None] >= t[None, :]) & (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0)
    scores = jnp.where(allowed, jnp.einsum("bqh,bkh->bqk", q, k) / np.sqrt(H), -1e9)
    h = x + jnp.einsum("bqk,bkh->bqh", jax.nn.softmax(scores, axis=-1), v)
    return h @ params["wo"]


@jax.jit
def loss_and_grad(params, batch, num_sequences):
    def f(p):
        loss, _ = sft_loss(tiny_model(p, batch), batch["targets"], batch["loss_mask"], num_sequences=num_sequences)
        return loss

    return jax.value_and_grad(f)(params)


@pytest.fixture(scope="module")
def rows():
    rng = np.random.default_rng(0)
    out = []
    for _ in range(7):
        n = int(rng.integers(2, 10))
        ids = rng.integers(1, V, size=n)
        prompt = int(rng.integers(0, n - 1))
        out.append({"input_ids": ids.tolist(), "labels": [-100] * prompt + ids[prompt:].tolist()})
    return out


def token_multiset(batches):
    keep = lambda b: b["segment_ids"] > 0  # noqa: E731
    return Counter(
        (int(i), int(p), int(t), bool(m))
        for b in batches
        for i, p, t, m in zip(
            b["input_ids"][keep(b)],
            b["positions"][keep(b)],
            b["targets"][keep(b)],
            b["loss_mask"][keep(b)],
            strict=True,
        )
    )


def test_packed_and_padded_give_same_tokens_loss_and_gradients(rows):
    padded = make_batches(rows, seq_len=12, batch_size=len(rows), packed=False)
    packed = make_batches(rows, seq_len=12, batch_size=2, packed=True)
    assert len(padded) == 1 and len(packed) >= 2
    assert sum(int(b["segment_ids"].max(-1).sum()) for b in packed) == len(rows)
    assert max(int(b["segment_ids"].max()) for b in packed) >= 2  # some sequence really holds several rows
    assert token_multiset(padded) == token_multiset(packed)

    params = init_params(jax.random.key(0))
    n = len(rows)  # global number of sequences: the recipe's "sum" denominator
    ref_loss, ref_grad = loss_and_grad(params, padded[0], n)
    acc_loss, acc_grad = 0.0, jax.tree.map(jnp.zeros_like, params)
    for batch in packed:
        loss, grad = loss_and_grad(params, batch, n)
        acc_loss, acc_grad = acc_loss + loss, jax.tree.map(jnp.add, acc_grad, grad)
    assert float(ref_loss) > 0
    np.testing.assert_allclose(float(acc_loss), float(ref_loss), rtol=1e-5)
    for name in params:
        np.testing.assert_allclose(np.asarray(acc_grad[name]), np.asarray(ref_grad[name]), rtol=1e-5, atol=1e-5)
