"""Preference data: both row shapes, response masks, truncation and identical-pair counts, row errors (file/row/field)
and skip mode, pair batches (masks, pair index, reference lookup, padding), the grain pipeline (shuffle, shares,
exact resume) and the shipped toy preference set."""

from __future__ import annotations

import json
import operator
import pathlib
import re

import numpy as np
import pytest

from tulu_jax.data.batching import IGNORE_INDEX
from tulu_jax.data.pipeline import PipelineConfig, batch_iterator
from tulu_jax.data.preference import load_preference_pairs, tokenize_pair, validate_preference_row
from tulu_jax.data.preference_batching import (
    PAIR_BATCH_KEYS,
    REF_KEYS,
    PairLogps,
    add_reference,
    make_pair_batches,
    preference_dataset,
)
from tulu_jax.data.rows import Source
from tulu_jax.data.sft import tokenize_sft
from tulu_jax.data.tokenizers import load_tokenizer
from tulu_jax.errors import ConfigError, DataError

ASSETS = pathlib.Path(__file__).resolve().parent.parent / "tulu_jax" / "assets"
USER = {"role": "user", "content": "Ava has 3 pens and finds 4 more. How many pens does Ava have now?"}
GOOD = {"role": "assistant", "content": "3 + 4 = 7. The answer is 7."}
BAD = {"role": "assistant", "content": "3 + 4 = 7. The answer is 9."}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ASSETS / "tiny_tokenizer")


def write_jsonl(path: pathlib.Path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_both_row_shapes_tokenize_like_sft_conversations(tokenizer):
    full = {"chosen": [USER, GOOD], "rejected": [USER, BAD]}
    prompted = {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}
    pair_full, truncated = tokenize_pair(full, tokenizer, max_seq_len=512)
    pair_prompted, _ = tokenize_pair(prompted, tokenizer, max_seq_len=512)
    assert not truncated
    for side, message in (("chosen", GOOD), ("rejected", BAD)):
        sft = tokenize_sft([USER, message], tokenizer, max_seq_len=512)
        for key in ("input_ids", "labels"):
            np.testing.assert_array_equal(pair_full[f"{side}_{key}"], sft[key])
            np.testing.assert_array_equal(pair_prompted[f"{side}_{key}"], sft[key])
    # The response mask is exactly the assistant content plus EOS: decode it back.
    labels = pair_full["chosen_labels"]
    response = labels[labels != IGNORE_INDEX]
    assert tokenizer.decode(response) == GOOD["content"] + tokenizer.eos_token
    assert (labels[: len(labels) - len(response)] == IGNORE_INDEX).all()  # prompt and header masked


def test_truncation_drops_empty_responses_and_counts(tmp_path, tokenizer):
    # The rejected side differs from the first token on: truncated pairs stay different (identical ones are dropped).
    bad = {"role": "assistant", "content": "9, since 3 + 4 = 9."}
    short_prompt = {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [GOOD], "rejected": [bad]}
    long_prompt = {"prompt": [{"role": "user", "content": USER["content"] * 3}], "chosen": [GOOD], "rejected": [bad]}
    path = write_jsonl(tmp_path / "p.jsonl", [short_prompt, long_prompt])
    full_short, _ = tokenize_pair(short_prompt, tokenizer, max_seq_len=10**6)
    prompt_len = int(np.argmax(full_short["chosen_labels"] != IGNORE_INDEX))
    max_len = prompt_len + 3  # the short-prompt pair keeps 3 response tokens; the long one keeps none
    pairs, stats = load_preference_pairs([Source(path)], tokenizer, max_seq_len=max_len, shuffle=False)
    assert (stats.kept, stats.dropped_empty, stats.truncated) == (1, 1, 1)
    for side in ("chosen", "rejected"):
        assert len(pairs[0][f"{side}_input_ids"]) == max_len
        np.testing.assert_array_equal(pairs[0][f"{side}_input_ids"], full_short[f"{side}_input_ids"][:max_len])
        assert (pairs[0][f"{side}_labels"] != IGNORE_INDEX).sum() == 3
    assert "1 kept, 1 dropped" in stats.summary() and "1 truncated" in stats.summary()
    assert (stats.report()["kept"], stats.report()["dropped_empty"], stats.report()["truncated"]) == (1, 1, 1)


def test_identical_sides_are_dropped_and_counted(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"chosen": [USER, GOOD], "rejected": [USER, GOOD]},
        {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]},
    ])
    pairs, stats = load_preference_pairs([Source(path)], tokenizer, max_seq_len=512, shuffle=False)
    assert (len(pairs), stats.kept, stats.identical) == (1, 1, 1)
    assert "1 dropped with chosen == rejected" in stats.summary()


BAD_ROWS = [
    ('["not", "an", "object"]', None, "expected a JSON object"),
    ({"chosen": [USER, GOOD]}, "rejected", "missing field"),
    ({"chosen": [USER, GOOD], "rejected": "text"}, "rejected", "expected a list of messages"),
    ({"chosen": [USER, {"role": "bot", "content": "x"}], "rejected": [USER, BAD]}, "chosen[1].role", "unknown role"),
    ({"chosen": [USER], "rejected": [USER, BAD]}, "chosen", "no assistant turn"),
    ({"prompt": [USER], "chosen": [GOOD], "rejected": [USER]}, "rejected", "no assistant turn"),
    ({"prompt": [{"role": "user", "content": 3}], "chosen": [GOOD], "rejected": [BAD]}, "prompt[0].content",
     "content must be a string"),
    ("{broken json", None, "not valid JSON"),
    ({"chosen": [USER, GOOD], "rejected": [{"role": "user", "content": "another question"}, BAD]}, "rejected",
     "different prompts (they differ at turn 0)"),
]


@pytest.mark.parametrize("row,field,reason", BAD_ROWS)
def test_malformed_row_names_file_row_and_field(tmp_path, tokenizer, row, field, reason):
    good = {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, row])
    with pytest.raises(DataError, match=re.escape(reason)) as info:
        load_preference_pairs([Source(path)], tokenizer, max_seq_len=512)
    assert (info.value.file, info.value.row, info.value.field) == (path, 2, field)
    assert path in str(info.value) and "row 2" in str(info.value)


def test_skip_mode_counts_every_bad_row(tmp_path, tokenizer):
    good = {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}
    rows = [good] + [row for row, _, _ in BAD_ROWS] + [good]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    pairs, stats = load_preference_pairs([Source(path)], tokenizer, max_seq_len=512, on_error="skip")
    (source,) = stats.sources
    assert (len(pairs), source.rows, source.valid, source.skipped) == (2, len(rows), 2, len(BAD_ROWS))
    assert source.skipped_by_field["rejected"] == 4 and source.skipped_by_field["(row)"] == 2
    assert f"{len(BAD_ROWS)} skipped" in stats.summary()
    # A recipe config stops when more than data.max_bad_fraction of a source is malformed.
    with pytest.raises(DataError, match=f"{len(BAD_ROWS)} of {len(rows)} rows are malformed"):
        load_preference_pairs([Source(path)], tokenizer, max_seq_len=512, on_error="skip", max_bad_fraction=0.01)


def test_template_failure_follows_on_error(tmp_path, tokenizer):
    # A row can validate and still fail in the chat template (here: one that refuses empty turns).
    good = {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}
    template = "{% for m in messages %}{% if m['content'] == '' %}{{ raise_exception('empty') }}{% endif %}" \
               "{{ m['content'] }}{% endfor %}"
    odd = {"prompt": [USER], "chosen": [GOOD], "rejected": [{"role": "assistant", "content": ""}]}
    path = write_jsonl(tmp_path / "p.jsonl", [good, odd])
    with pytest.raises(DataError, match="chat template failed") as info:
        load_preference_pairs([Source(path)], tokenizer, max_seq_len=512, template=template, shuffle=False)
    assert info.value.row == 2
    pairs, stats = load_preference_pairs(
        [Source(path)], tokenizer, max_seq_len=512, template=template, shuffle=False, on_error="skip"
    )
    assert len(pairs) == 1 and stats.tokenization.skipped == 1


def test_validator_accepts_both_shapes():
    validate_preference_row({"chosen": [USER, GOOD], "rejected": [USER, BAD]})
    validate_preference_row({"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]})
    multi = {"prompt": [USER, GOOD, USER], "chosen": [GOOD], "rejected": [BAD, USER, GOOD]}
    validate_preference_row(multi)


# ----------------------------------------------------------------------------------------------------- batches


def random_pairs(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Pair i's chosen side starts with token 100 + i and its rejected side with 200 + i."""
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(n):
        pair = {}
        for side, first in (("chosen", 100), ("rejected", 200)):
            length = int(rng.integers(3, 9))
            ids = np.concatenate([[first + i], rng.integers(1, 50, length - 1)]).astype(np.int32)
            prompt = int(rng.integers(1, length - 1))
            pair[f"{side}_input_ids"] = ids
            pair[f"{side}_labels"] = np.where(np.arange(length) >= prompt, ids, IGNORE_INDEX).astype(np.int32)
        pairs.append(pair)
    return pairs


def check_pair_batch(batch, pairs, reference=None):
    """Every real row reproduces its pair (ids, positions, targets, masks); padding rows are empty."""
    assert set(batch) == set(PAIR_BATCH_KEYS) | (set(REF_KEYS) if reference is not None else set())
    for b, index in enumerate(batch["pair_index"]):
        for side in ("chosen", "rejected"):
            seg = batch[f"{side}_segment_ids"][b]
            if index < 0:
                assert not seg.any() and not batch[f"{side}_loss_mask"][b].any()
                continue
            ids, labels = pairs[index][f"{side}_input_ids"], pairs[index][f"{side}_labels"]
            n = len(ids)
            np.testing.assert_array_equal(batch[f"{side}_input_ids"][b, :n], ids)
            np.testing.assert_array_equal(seg, np.arange(seg.size) < n)
            np.testing.assert_array_equal(batch[f"{side}_positions"][b, :n], np.arange(n))
            np.testing.assert_array_equal(batch[f"{side}_targets"][b, : n - 1], ids[1:])
            np.testing.assert_array_equal(batch[f"{side}_loss_mask"][b, :n], np.append(labels[1:] != IGNORE_INDEX, False))
            assert not batch[f"{side}_loss_mask"][b, n:].any()
        if reference is not None:
            expected = (reference.chosen[index], reference.rejected[index]) if index >= 0 else (0.0, 0.0)
            assert (batch["ref_chosen_logps"][b], batch["ref_rejected_logps"][b]) == expected


def test_pair_batches_follow_the_batch_contract():
    pairs = random_pairs(5)
    reference = PairLogps(np.arange(5, dtype=np.float32) - 10, np.arange(5, dtype=np.float32) - 20)
    batches = make_pair_batches(pairs, seq_len=10, batch_size=2, reference=reference)
    assert len(batches) == 3 and batches[-1]["pair_index"].tolist() == [4, -1]
    for batch in batches:
        assert batch["chosen_input_ids"].shape == (2, 10) and batch["pair_index"].dtype == np.int32
        check_pair_batch(batch, pairs, reference)


def test_pair_batch_errors_name_the_side():
    pairs = random_pairs(3)
    pairs[1]["rejected_labels"] = pairs[1]["rejected_labels"][:-1]
    with pytest.raises(DataError, match="len\\(input_ids\\)") as info:
        make_pair_batches(pairs, seq_len=10, batch_size=2, source="prefs.jsonl")
    assert (info.value.file, info.value.row, info.value.field) == ("prefs.jsonl", 1, "rejected_labels")
    with pytest.raises(DataError, match="more than the sequence length"):
        make_pair_batches(random_pairs(3), seq_len=4, batch_size=2)
    with pytest.raises(ConfigError, match="one per pair"):
        make_pair_batches(random_pairs(3), seq_len=10, batch_size=2, reference=PairLogps(np.zeros(2), np.zeros(3)))


def run_pipeline(pairs, config, reference=None, process_index=0, process_count=1):
    dataset = preference_dataset(pairs, config, process_index=process_index, process_count=process_count)
    if reference is not None:
        dataset = add_reference(dataset, reference, len(pairs))
    return list(batch_iterator(dataset, config))


def test_pipeline_shuffles_per_epoch_covers_every_pair_and_resumes_exactly():
    pairs = random_pairs(11)
    reference = PairLogps(np.linspace(-3, -1, 11).astype(np.float32), np.linspace(-5, -2, 11).astype(np.float32))
    config = PipelineConfig(seq_len=10, global_batch_size=4, num_epochs=2, seed=5)
    batches = run_pipeline(pairs, config, reference=reference)
    assert len(batches) == 6  # 11 pairs → 3 batches per epoch, the last one padded
    for batch in batches:
        check_pair_batch(batch, pairs, reference)
    epochs = [np.concatenate([b["pair_index"] for b in batches[e * 3 : (e + 1) * 3]]) for e in (0, 1)]
    assert all(sorted(e[e >= 0].tolist()) == list(range(11)) for e in epochs)
    assert epochs[0].tolist() != epochs[1].tolist()
    again = run_pipeline(pairs, config, reference=reference)
    assert all(np.array_equal(a["pair_index"], b["pair_index"]) for a, b in zip(batches, again, strict=True))

    iterator = batch_iterator(preference_dataset(pairs, config, process_index=0, process_count=1), config)
    next(iterator), next(iterator)
    state = json.loads(json.dumps(iterator.get_state()))
    resumed = batch_iterator(preference_dataset(pairs, config, process_index=0, process_count=1), config)
    resumed.set_state(state)
    rest = list(resumed)
    assert len(rest) == 4
    for got, want in zip(rest, batches[2:], strict=True):
        for key in PAIR_BATCH_KEYS:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_process_shares_split_each_global_batch():
    pairs = random_pairs(9)
    config = PipelineConfig(seq_len=10, global_batch_size=4, seed=1)
    whole = run_pipeline(pairs, config, process_index=0, process_count=1)
    shares = [run_pipeline(pairs, config, process_index=p, process_count=2) for p in (0, 1)]
    for k, batch in enumerate(whole):
        for key in PAIR_BATCH_KEYS:
            np.testing.assert_array_equal(np.concatenate([shares[0][k][key], shares[1][k][key]]), batch[key])
    with pytest.raises(ConfigError, match="packing"):
        preference_dataset(pairs, PipelineConfig(seq_len=10, global_batch_size=4, packed=True), process_index=0,
                           process_count=1)
    with pytest.raises(ConfigError, match="divisible"):
        preference_dataset(pairs, config, process_index=0, process_count=3)


# ----------------------------------------------------------------------------------------------- shipped asset


OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def final_answer(text: str) -> int:
    return int(re.fullmatch(r".*The answer is (\d+)\.", text).group(1))


def test_shipped_toy_preferences_prefer_the_correct_answer(tokenizer):
    path = str(ASSETS / "tiny_preferences.jsonl")
    pairs, stats = load_preference_pairs([Source(path)], tokenizer, max_seq_len=128, shuffle=False)
    assert stats.kept == stats.sources[0].rows == 128 and stats.dropped_empty == stats.truncated == stats.identical == 0
    shapes = set()
    for line in pathlib.Path(path).read_text().splitlines():
        row = json.loads(line)
        shapes.add("prompt" in row)
        chosen, rejected = row["chosen"][-1]["content"], row["rejected"][-1]["content"]
        # The chosen solution's last equation computes its answer; the rejected one keeps the work, not the answer.
        *_, (a, op, b, c) = re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)", chosen)
        assert OPS[op](int(a), int(b)) == int(c) == final_answer(chosen)
        assert final_answer(rejected) != final_answer(chosen)
        assert rejected.rsplit("The answer is", 1)[0] == chosen.rsplit("The answer is", 1)[0]
    assert shapes == {True, False}  # both row shapes are exercised
