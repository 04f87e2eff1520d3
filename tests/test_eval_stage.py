"""`tulu-jax eval` / `evaluate`: generation vs transformers, rewards vs verifiers, the table vs its JSONL, bad rows."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys

import numpy as np
import pytest

from tulu_jax import cli
from tulu_jax.data.tokenizers import load_tokenizer
from tulu_jax.errors import DataError
from tulu_jax.rl.verifiers import extract_answer, verify
from tulu_jax.stages.paths import resolve_path
from tulu_jax.stages.eval import (
    IN_MEMORY,
    Completion,
    evaluate,
    load_eval_model,
    load_eval_rows,
    score_completions,
)
from tulu_jax.toy import arith

ASSETS = resolve_path("tulu_jax/assets")
EVAL_FILE = ASSETS / "tiny_eval.jsonl"
MAX_NEW = 12
BATCH = 12  # 32 rows → batches of 12, 12 and 8 (+4 fillers)


def asset_rows() -> list[dict]:
    return [json.loads(line) for line in EVAL_FILE.read_text().splitlines()]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ASSETS / "tiny_tokenizer")


def _tulu_prompt(messages: list[dict]) -> str:
    """The Tülu template written out by hand (docs/recipe.md) for user/system prompts and the generation prompt."""
    return "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + "<|assistant|>\n"


def _hf_greedy(hf, prompts: list[list[int]], eos: int, pad: int) -> list[list[int]]:
    """transformers' greedy generation for a left-padded batch; each row's new tokens up to and with `eos`."""
    import torch

    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=MAX_NEW,
                          eos_token_id=eos, pad_token_id=pad)[:, width:].tolist()
    return [row[:row.index(eos) + 1] if eos in row else row for row in out]


@pytest.fixture(scope="module")
def hf_dir(tokenizer, tmp_path_factory):
    """A tiny random Llama saved as an HF directory with the bundled tokenizer beside it, and the torch model.

    Random weights (std 0.2, so greedy choices are well separated) almost never produce EOS; the lm_head rows of
    EOS and of the token greedy decoding picks most often are swapped, so that some responses stop at EOS.
    """
    import torch
    import transformers

    eos = tokenizer.eos_token_id
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, initializer_range=0.2,
        rope_theta=10000.0, bos_token_id=None, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    prompts = [tokenizer(_tulu_prompt(r["messages"]), add_special_tokens=False)["input_ids"] for r in asset_rows()]
    first_tokens = [row[:4] for row in _hf_greedy(hf, prompts, eos, tokenizer.pad_token_id)]
    counts = np.bincount(np.concatenate(first_tokens), minlength=len(tokenizer))
    counts[eos] = 0
    frequent = int(counts.argmax())
    with torch.no_grad():
        weight = hf.lm_head.weight
        weight[[eos, frequent]] = weight[[frequent, eos]].clone()
    path = tmp_path_factory.mktemp("tiny_llama")
    hf.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return hf, path


@pytest.fixture(scope="module")
def cli_run(hf_dir, tmp_path_factory):
    """`tulu-jax eval` on the shipped eval file: (exit status, stdout, the JSONL records)."""
    out = tmp_path_factory.mktemp("eval") / "records.jsonl"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = cli.main(["eval", "--model", str(hf_dir[1]), "--data", "tulu_jax/assets/tiny_eval.jsonl",
                           "--out", str(out), "--max-new-tokens", str(MAX_NEW), "--batch-size", str(BATCH)])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    return status, stdout.getvalue(), records


@pytest.fixture(scope="module")
def model(hf_dir):
    return load_eval_model(hf_dir[1])


def _parse_table(text: str) -> dict[str, tuple[int, float, float]]:
    """dataset → (n, accuracy, mean_reward) from the printed table."""
    lines = text.strip().splitlines()
    header = lines.index(next(line for line in lines if line.split()[:2] == ["dataset", "n"]))
    table = {}
    for line in lines[header + 1:]:
        parts = line.split()
        if len(parts) != 4:
            break
        table[parts[0]] = (int(parts[1]), float(parts[2]), float(parts[3]))
    return table


# --------------------------------------------------------------------------------------------------- end to end


def test_cli_table_equals_a_recomputation_from_the_jsonl(cli_run):
    status, stdout, records = cli_run
    assert status == 0
    rows = asset_rows()
    assert len(records) == len(rows)
    table = _parse_table(stdout)
    groups: dict[str, list[float]] = {}
    for record in records:
        groups.setdefault(record["dataset"], []).append(record["reward"])
    groups["all"] = [r["reward"] for r in records]
    assert set(table) == {"gsm8k", "math", "ifeval", "all"} == set(groups)
    for name, rewards in groups.items():
        n, accuracy, mean_reward = table[name]
        assert n == len(rewards)
        assert accuracy == pytest.approx(np.mean(np.asarray(rewards) == 1.0), abs=5e-5)
        assert mean_reward == pytest.approx(np.mean(rewards), abs=5e-5)
    finished = sum(r["finished_with_eos"] for r in records)
    assert f"finished with EOS: {finished}/{len(records)}" in stdout
    # The random model passes some instruction checks (no commas) and fails others: the numbers are not all 0 or 1.
    assert 0.0 < table["all"][1] < 1.0


def test_responses_equal_transformers_greedy_generation(cli_run, hf_dir, tokenizer):
    hf, _ = hf_dir
    _, _, records = cli_run
    prompts = [tokenizer(_tulu_prompt(row["messages"]), add_special_tokens=False)["input_ids"] for row in asset_rows()]
    generated = _hf_greedy(hf, prompts, tokenizer.eos_token_id, tokenizer.pad_token_id)
    for i, (row, record, prompt_ids, expected) in enumerate(zip(asset_rows(), records, prompts, generated)):
        assert (record["file"], record["row"]) == (str(EVAL_FILE), i + 1)  # JSONL rows are numbered by line
        assert record["prompt"] == _tulu_prompt(row["messages"])
        finished = expected[-1] == tokenizer.eos_token_id
        assert record["num_prompt_tokens"] == len(prompt_ids)
        assert record["finished_with_eos"] == finished, i
        assert record["num_tokens"] == len(expected), i
        response_ids = expected[:-1] if finished else expected
        assert record["response"] == tokenizer.decode(response_ids, skip_special_tokens=True), i
    finished = [r["finished_with_eos"] for r in records]
    assert any(finished) and not all(finished)  # both kinds of ending are exercised


def test_rewards_and_answers_equal_the_verifiers_run_directly(cli_run):
    _, _, records = cli_run
    for row, record in zip(asset_rows(), records):
        assert record["dataset"] == row["dataset"].lower()
        assert record["ground_truth"] == row["ground_truth"]
        assert record["reward"] == verify(row["dataset"], record["response"], row["ground_truth"], timeout_s=None)
        assert record["extracted_answer"] == extract_answer(row["dataset"], record["response"])


def test_reference_answers_score_one_and_wrong_answers_zero():
    rows, _ = load_eval_rows(EVAL_FILE)
    data = [row.data for row in rows]

    def completions(answer) -> list[Completion]:
        return [Completion(prompt="", response=answer(d), finished_with_eos=True, num_tokens=1, num_prompt_tokens=1)
                for d in data]

    def reference(d: dict) -> str:
        if d["dataset"] == "gsm8k":
            return d["ground_truth"]  # exactly the reference answer
        if d["dataset"] == "MATH":
            return f"The final answer is $\\boxed{{{d['ground_truth']}}}$."
        return "the rain falls on seven grey roofs. Is there anything else I can help with?"

    def wrong(d: dict) -> str:
        if d["dataset"] == "gsm8k":
            return f"The answer is {int(d['ground_truth']) + 1}."
        return "The final answer is $\\boxed{17}$." if d["dataset"] == "MATH" else "NO NEVER"

    right, bad = score_completions(rows, completions(reference)), score_completions(rows, completions(wrong))
    for result, expected in ((right, 1.0), (bad, 0.0)):
        for record, d in zip(result.records, data):
            if d["dataset"] != "ifeval":
                assert record.reward == expected, (record.dataset, record.response)
            assert record.reward == verify(d["dataset"], record.response, d["ground_truth"], timeout_s=None)
        assert result.accuracy["gsm8k"] == result.accuracy["math"] == expected
        metrics = result.metrics()
        ifeval = [r.reward for r in result.records if r.dataset == "ifeval"]
        assert metrics["eval/ifeval/mean_reward"] == pytest.approx(np.mean(ifeval))
        assert metrics["eval/ifeval/accuracy"] == pytest.approx(np.mean(np.asarray(ifeval) == 1.0))
        assert metrics["eval/accuracy"] == pytest.approx(np.mean([r.reward == 1.0 for r in result.records]))
        assert result.num_timeouts == 0
    # "NO NEVER" follows one of two instructions (no commas, but under 5 words): reward 0.5, not accurate.
    assert 0.5 in [r.reward for r in bad.records]
    assert bad.mean_reward_by_dataset["ifeval"] > bad.accuracy["ifeval"]


# --------------------------------------------------------------------------------------------------- bad rows


GOOD = {"messages": [{"role": "user", "content": "Ann has 2 pens and finds 3 more."}], "ground_truth": "5",
        "dataset": "gsm8k"}
BAD_ROWS = [
    ({k: v for k, v in GOOD.items() if k != "dataset"}, "dataset"),
    (dict(GOOD, dataset="trivia"), "dataset"),
    (dict(GOOD, ground_truth="five"), "ground_truth"),
    (dict(GOOD, dataset="ifeval", ground_truth='{"func_name": "validate_nothing"}'), "ground_truth"),
    (dict(GOOD, messages=[{"role": "user", "content": 3}]), "messages[0].content"),
    (dict(GOOD, messages=GOOD["messages"] + [{"role": "assistant", "content": "5"}]), "messages[1].role"),
    ("not an object", None),
]


@pytest.mark.parametrize("bad, field", BAD_ROWS, ids=[f"{i}-{f}" for i, (_, f) in enumerate(BAD_ROWS)])
def test_bad_rows_raise_data_error_naming_file_row_field(tmp_path, bad, field):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (GOOD, GOOD, bad, GOOD)) + "\n")
    with pytest.raises(DataError) as info:
        load_eval_rows(path)
    assert (info.value.file, info.value.row, info.value.field) == (str(path), 3, field)
    # In-memory rows are numbered from 1 too.
    with pytest.raises(DataError) as info:
        load_eval_rows([GOOD, bad])
    assert (info.value.file, info.value.row, info.value.field) == (IN_MEMORY, 2, field)


def test_building_the_cli_parser_does_not_start_jax():
    """`tulu-jax eval --sharding cpu-8.yaml` must be able to set the host device count before JAX is imported."""
    code = ("import sys; from tulu_jax import cli; cli.build_parser().parse_args(['eval', '--model', 'm', "
            "'--data', 'd']); print('jax' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False"]


def test_cli_reports_a_bad_row_before_generating(hf_dir, tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(dict(GOOD, ground_truth="five")) + "\n")
    out = tmp_path / "out.jsonl"
    assert cli.main(["eval", "--model", str(hf_dir[1]), "--data", str(path), "--out", str(out)]) == 1
    assert f"file {path}, row 2, field 'ground_truth'" in capsys.readouterr().err
    assert not out.exists()


def test_skip_mode_counts_bad_rows_and_evaluates_the_rest(model, tokenizer, cli_run, tmp_path):
    good = asset_rows()[:3]
    rows = [good[0], BAD_ROWS[1][0], good[1], BAD_ROWS[2][0], good[2]]
    out = tmp_path / "skip.jsonl"
    result = evaluate(model, tokenizer, rows, on_error="skip", max_new_tokens=MAX_NEW, batch_size=BATCH, out_path=out)
    assert result.num_skipped == 2
    assert [(r.file, r.row) for r in result.records] == [(IN_MEMORY, 1), (IN_MEMORY, 3), (IN_MEMORY, 5)]
    # Greedy answers do not depend on which prompts share a batch: they equal the CLI run's.
    expected = cli_run[2][:3]
    assert [r.response for r in result.records] == [r["response"] for r in expected]
    assert [json.loads(line)["reward"] for line in out.read_text().splitlines()] == [r["reward"] for r in expected]
    with pytest.raises(DataError, match="no rows to evaluate"):
        evaluate(model, tokenizer, rows[1:2], on_error="skip", max_new_tokens=MAX_NEW)


def test_sampling_is_seeded_per_batch(model, tokenizer):
    """Batch i samples with fold_in(key(seed), i): the same seed repeats, another seed differs."""
    import jax

    from tulu_jax.data.sft import tokenize_prompt
    from tulu_jax.models.sampler import generate

    rows = asset_rows()[:3]
    settings = dict(max_new_tokens=MAX_NEW, temperature=1.0, top_k=50, batch_size=BATCH)
    first = evaluate(model, tokenizer, rows, seed=3, **settings)
    again = evaluate(model, tokenizer, rows, seed=3, **settings)
    other = evaluate(model, tokenizer, rows, seed=4, **settings)
    assert [r.response for r in first.records] == [r.response for r in again.records]
    assert [r.response for r in first.records] != [r.response for r in other.records]
    prompts = [tokenize_prompt(r["messages"], tokenizer).tolist() for r in rows]
    direct = generate(model, prompts + [prompts[0]] * (BATCH - 3), max_new_tokens=MAX_NEW, temperature=1.0, top_k=50,
                      eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                      rng=jax.random.fold_in(jax.random.key(3), 0))
    for i, record in enumerate(first.records):
        length, finished = int(direct.lengths[i]), bool(direct.finished_eos[i])
        assert (record.num_tokens, record.finished_with_eos) == (length, finished)
        ids = direct.tokens[i, :length - 1 if finished else length].tolist()
        assert record.response == tokenizer.decode(ids, skip_special_tokens=True)


# --------------------------------------------------------------------------------------------------- sharding


@pytest.mark.slow
def test_sharded_eval_on_8_devices_equals_one_device(hf_dir, tokenizer, cli_run):
    sharded = load_eval_model(hf_dir[1], "sharding/cpu-8.yaml")
    assert len(sharded.embed[...].sharding.device_set) == 8
    result = evaluate(sharded, tokenizer, EVAL_FILE, limit=BATCH, max_new_tokens=MAX_NEW, batch_size=BATCH)
    expected = cli_run[2][:BATCH]
    assert [r.response for r in result.records] == [r["response"] for r in expected]
    assert [r.num_tokens for r in result.records] == [r["num_tokens"] for r in expected]


# --------------------------------------------------------------------------------------------------- shipped data


def test_shipped_eval_file_holds_held_out_arithmetic_and_every_verifier():
    rows = asset_rows()
    gsm8k = [r for r in rows if r["dataset"] == "gsm8k"]
    _, held_out = arith.train_eval_split(0, len(gsm8k), seed=0)
    assert gsm8k == [arith.rlvr_row(p) for p in held_out]
    trained_on = [  # every message of the bundled SFT and DPO data
        m["content"]
        for name in ("tiny_sft.jsonl", "tiny_preferences.jsonl")
        for line in (ASSETS / name).read_text().splitlines()
        for key in ("messages", "prompt", "chosen")
        for m in json.loads(line).get(key, [])
    ]
    assert not [r for r in gsm8k if any(r["messages"][0]["content"] in text for text in trained_on)]
    assert {r["dataset"] for r in rows} == {"gsm8k", "MATH", "ifeval"}
    loaded, stats = load_eval_rows(EVAL_FILE)
    assert len(loaded) == stats.valid == len(rows) and stats.skipped == 0
