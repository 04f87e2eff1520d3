"""The grain pipeline: determinism, per-epoch shuffles, process sharding, exact resume, packed mode end to end."""

import json

import grain
import numpy as np
import pytest

from tulu_jax.data.batching import BATCH_KEYS, make_batches
from tulu_jax.data.pipeline import PipelineConfig, batch_dataset, batch_iterator, epoch_order
from tulu_jax.errors import ConfigError, DataError

NUM_ROWS, FIRST_ID = 23, 100


@pytest.fixture(scope="module")
def rows():
    """Row i starts with token FIRST_ID + i, so every segment of a batch names its row."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(NUM_ROWS):
        n = int(rng.integers(2, 8))
        ids = [FIRST_ID + i] + rng.integers(1, 50, size=n - 1).tolist()
        prompt = int(rng.integers(0, n - 1))
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def segment_rows(batch, rows):
    """Row indices of the segments in a batch, in order; checks each segment reproduces its row exactly."""
    found = []
    for b in range(batch["input_ids"].shape[0]):
        seg = batch["segment_ids"][b]
        for s in range(1, int(seg.max()) + 1):
            where = np.flatnonzero(seg == s)
            ids = batch["input_ids"][b, where]
            r = int(ids[0]) - FIRST_ID
            row_ids, row_labels = np.asarray(rows[r]["input_ids"]), np.asarray(rows[r]["labels"])
            np.testing.assert_array_equal(ids, row_ids)
            np.testing.assert_array_equal(batch["positions"][b, where], np.arange(len(where)))
            np.testing.assert_array_equal(batch["targets"][b, where[:-1]], row_ids[1:])
            np.testing.assert_array_equal(batch["loss_mask"][b, where], np.append(row_labels[1:] != -100, False))
            found.append(r)
    assert not batch["loss_mask"][batch["segment_ids"] == 0].any()
    return found


def run(rows, config, **kwargs):
    return list(batch_iterator(batch_dataset(rows, config, **kwargs), config))


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert set(x) == set(BATCH_KEYS) == set(y)
        for key in BATCH_KEYS:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_deterministic_by_seed(rows):
    config = PipelineConfig(seq_len=8, global_batch_size=4, seed=3)
    first = run(rows, config, process_index=0, process_count=1)
    assert_same_batches(first, run(rows, config, process_index=0, process_count=1))
    other = run(rows, PipelineConfig(seq_len=8, global_batch_size=4, seed=4), process_index=0, process_count=1)
    order = [r for b in first for r in segment_rows(b, rows)]
    assert order != [r for b in other for r in segment_rows(b, rows)]
    assert sorted(order) == list(range(NUM_ROWS))


def test_epochs_are_shuffled_differently_and_keep_every_row(rows):
    config = PipelineConfig(seq_len=8, global_batch_size=4, num_epochs=2)
    batches = run(rows, config, process_index=0, process_count=1)
    per_epoch = -(-NUM_ROWS // 4)
    assert len(batches) == 2 * per_epoch  # 23 rows → 6 batches per epoch, the last one completed with padding
    epochs = [[r for b in batches[e * per_epoch : (e + 1) * per_epoch] for r in segment_rows(b, rows)] for e in (0, 1)]
    assert all(sorted(e) == list(range(NUM_ROWS)) for e in epochs)
    assert epochs[0] != epochs[1]
    assert epochs[0] == epoch_order(NUM_ROWS, seed=0, epoch=0).tolist()
    assert epochs[1] == epoch_order(NUM_ROWS, seed=0, epoch=1).tolist()
    unshuffled = run(
        rows, PipelineConfig(seq_len=8, global_batch_size=4, shuffle=False), process_index=0, process_count=1
    )
    assert [r for b in unshuffled for r in segment_rows(b, rows)] == list(range(NUM_ROWS))


@pytest.mark.parametrize("packed", [False, True])
def test_two_processes_split_each_global_batch_disjointly(rows, packed):
    config = PipelineConfig(seq_len=12, global_batch_size=4, packed=packed, num_epochs=2, seed=7)
    whole = run(rows, config, process_index=0, process_count=1)
    halves = [run(rows, config, process_index=p, process_count=2) for p in (0, 1)]
    assert len(halves[0]) == len(halves[1]) == len(whole)  # same step count on every process
    for g, h0, h1 in zip(whole, *halves, strict=True):
        assert h0["input_ids"].shape == h1["input_ids"].shape == (2, 12)
        for key in BATCH_KEYS:  # process p holds rows [2p, 2p + 2) of the global batch
            np.testing.assert_array_equal(np.concatenate([h0[key], h1[key]]), g[key])
    per_epoch = len(whole) // 2
    for e in (0, 1):
        seen = [
            {r for b in halves[p][e * per_epoch : (e + 1) * per_epoch] for r in segment_rows(b, rows)} for p in (0, 1)
        ]
        assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(NUM_ROWS))


@pytest.mark.parametrize("packed", [False, True])
def test_resume_from_saved_state_gives_the_remaining_batches(rows, packed):
    config = PipelineConfig(seq_len=12, global_batch_size=4, packed=packed, num_epochs=2, seed=1)
    expected = run(rows, config, process_index=1, process_count=2)
    iterator = batch_iterator(batch_dataset(rows, config, process_index=1, process_count=2), config)
    consumed = [next(iterator) for _ in range(3)]
    assert_same_batches(consumed, expected[:3])
    state = json.loads(json.dumps(iterator.get_state()))  # what a checkpoint stores
    next(iterator)  # the original keeps going; the state must not change after being taken

    fresh = batch_iterator(batch_dataset(rows, config, process_index=1, process_count=2), config)
    fresh.set_state(state)
    assert_same_batches(list(fresh), expected[3:])


def test_orbax_grain_checkpoint_handler_round_trip(rows, tmp_path):
    config = PipelineConfig(seq_len=12, global_batch_size=4, packed=True)
    expected = run(rows, config, process_index=0, process_count=1)
    iterator = batch_iterator(batch_dataset(rows, config, process_index=0, process_count=1), config)
    next(iterator), next(iterator)
    handler = grain.checkpoint.CheckpointHandler()
    handler.save(tmp_path, item=iterator)
    fresh = batch_iterator(batch_dataset(rows, config, process_index=0, process_count=1), config)
    handler.restore(tmp_path, item=fresh)
    assert_same_batches(list(fresh), expected[2:])


def test_packed_end_to_end_matches_packing_the_same_order(rows):
    """Packed pipeline batches equal make_batches(packed=True) on the epoch's shuffled rows, and pack densely."""
    config = PipelineConfig(seq_len=16, global_batch_size=2, packed=True, seed=5)
    batches = run(rows, config, process_index=0, process_count=1)
    shuffled = [rows[r] for r in epoch_order(NUM_ROWS, seed=5, epoch=0)]
    assert_same_batches(batches, make_batches(shuffled, 16, 2, packed=True))
    assert sorted(r for b in batches for r in segment_rows(b, rows)) == list(range(NUM_ROWS))
    padded_steps = len(
        run(rows, PipelineConfig(seq_len=16, global_batch_size=2, seed=5), process_index=0, process_count=1)
    )
    assert len(batches) < padded_steps


@pytest.mark.slow
def test_worker_process_gives_the_same_batches_and_resumes(rows):
    config = PipelineConfig(seq_len=12, global_batch_size=4, packed=True, num_epochs=2, worker_count=1)
    expected = run(
        rows,
        PipelineConfig(seq_len=12, global_batch_size=4, packed=True, num_epochs=2),
        process_index=0,
        process_count=1,
    )
    iterator = batch_iterator(batch_dataset(rows, config, process_index=0, process_count=1), config)
    try:
        head = [next(iterator) for _ in range(2)]
        state = json.loads(json.dumps(iterator.get_state()))
    finally:
        iterator.close()
    assert_same_batches(head, expected[:2])
    fresh = batch_iterator(batch_dataset(rows, config, process_index=0, process_count=1), config)
    try:
        fresh.set_state(state)
        assert_same_batches(list(fresh), expected[2:])
    finally:
        fresh.close()


def test_bad_row_fails_at_construction_naming_the_file(rows):
    bad = list(rows) + [{"input_ids": [1, 2, 3], "labels": [-100, 7, 3]}]
    with pytest.raises(DataError, match=r"file sft\.jsonl, row 23, field 'labels'"):
        batch_dataset(
            bad,
            PipelineConfig(seq_len=8, global_batch_size=2),
            process_index=0,
            process_count=1,
            source_name="sft.jsonl",
        )
    long = list(rows) + [{"input_ids": list(range(1, 10)), "labels": list(range(1, 10))}]
    with pytest.raises(DataError, match="row 23.*more than the sequence length 8"):
        batch_dataset(
            long, PipelineConfig(seq_len=8, global_batch_size=2, packed=True), process_index=0, process_count=1
        )


def test_config_errors(rows):
    with pytest.raises(ConfigError, match="not divisible"):
        batch_dataset(rows, PipelineConfig(seq_len=8, global_batch_size=3), process_index=0, process_count=2)
    with pytest.raises(ConfigError, match="process_index 2"):
        batch_dataset(rows, PipelineConfig(seq_len=8, global_batch_size=4), process_index=2, process_count=2)
    with pytest.raises(ConfigError, match="global_batch_size"):
        PipelineConfig(seq_len=8, global_batch_size=0)
    with pytest.raises(ConfigError, match="no rows"):
        batch_dataset([], PipelineConfig(seq_len=8, global_batch_size=2), process_index=0, process_count=1)
