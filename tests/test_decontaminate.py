"""Decontamination: planted overlaps found exactly, the inverted index against a brute-force scan, the CLI."""

from __future__ import annotations

import json
import random

import pytest

from tulu_jax import cli
from tulu_jax.data.decontaminate import EvalIndex, decontaminate, normalize, row_text
from tulu_jax.errors import DataError

WORDS = [f"w{i}" for i in range(400)]


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def chat(text: str) -> dict:
    return {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "ok"}]}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


def test_normalize_and_row_text():
    assert normalize("Ｆｕｌｌ-width,  MIXED_case:\tx²!") == ["full", "width", "mixed", "case", "x2"]
    assert row_text(chat("q")) == "q"
    assert row_text({"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "p"}]}) == "p"
    assert row_text({"chosen": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "a"}]}) == "c"
    assert row_text({"question": "what?"}) == "what?" and row_text({"text": "doc"}) == "doc"
    with pytest.raises(DataError, match="file f.jsonl, row 3: no prompt text"):
        row_text({"answer": 4}, file="f.jsonl", row=3)


@pytest.fixture()
def planted(tmp_path):
    """Two eval sets, a chat train set and a preference train set, with overlaps planted at known rows."""
    rng = random.Random(0)
    eval_a = [{"question": sentence(rng, 20)} for _ in range(6)] + [{"question": "too short to check"}]
    eval_b = [chat(sentence(rng, 16)) for _ in range(4)]
    train = [chat(sentence(rng, 30)) for _ in range(200)]
    a2 = eval_a[2]["question"].split()
    b1 = eval_b[1]["messages"][0]["content"].split()
    # Row 10 (line 11): eval_a[2] inside a longer prompt, upper-cased and punctuated (normalization finds it).
    train[10] = chat(sentence(rng, 12) + " " + ", ".join(a2).upper() + "! " + sentence(rng, 5))
    # Row 50: the first 12 of eval_b[1]'s 16 words (75% >= 50%); row 77: its first 7 words (no 8-gram at all).
    train[50] = chat(sentence(rng, 9) + " " + " ".join(b1[:12]))
    train[77] = chat(" ".join(b1[:7]) + " " + sentence(rng, 20))
    # Row 99: 9 of eval_a[4]'s 20 words (45% < 50%).
    train[99] = chat(" ".join(eval_a[4]["question"].split()[5:14]) + " " + sentence(rng, 10))
    # The short eval item occurs in row 120: too short for an 8-gram, so unchecked (counted, not matched).
    train[120] = chat("this is too short to check indeed")
    prefs = [{"prompt": [{"role": "user", "content": sentence(rng, 25)}], "chosen": [], "rejected": []}
             for _ in range(20)]
    prefs[3]["prompt"][0]["content"] = eval_a[0]["question"] + " and " + eval_b[3]["messages"][0]["content"]
    paths = {
        "eval_a": write_jsonl(tmp_path / "eval_a.jsonl", eval_a),
        "eval_b": write_jsonl(tmp_path / "eval_b.jsonl", eval_b),
        "train": write_jsonl(tmp_path / "train.jsonl", train),
        "prefs": write_jsonl(tmp_path / "prefs.jsonl", prefs),
    }
    return paths, train, prefs


def test_planted_overlaps_are_found_exactly(planted, tmp_path):
    paths, train, prefs = planted
    out = tmp_path / "out"
    report = decontaminate([paths["train"], paths["prefs"]], [paths["eval_a"], paths["eval_b"]], out)
    found = {(m["train_file"], m["train_row"], m["eval_file"], m["eval_row"]) for m in read_jsonl(out / "matches.jsonl")}
    assert found == {
        (paths["train"], 11, paths["eval_a"], 3),  # JSONL rows are numbered by line, from 1
        (paths["train"], 51, paths["eval_b"], 2),
        (paths["prefs"], 4, paths["eval_a"], 1),
        (paths["prefs"], 4, paths["eval_b"], 4),
    }
    overlap = {m["train_row"]: m["overlap"] for m in read_jsonl(out / "matches.jsonl") if m["eval_file"] == paths["eval_b"]}
    assert overlap == {51: 0.75, 4: 1.0}
    t, p = report["train"]
    assert (t["rows"], t["kept"], t["removed"]) == (200, 198, 2)
    assert t["overlapping_rows"] == {paths["eval_a"]: 1, paths["eval_b"]: 1}
    assert (p["rows"], p["removed"], p["overlapping_rows"]) == (20, 1, {paths["eval_a"]: 1, paths["eval_b"]: 1})
    assert report["eval"][0] == {"file": paths["eval_a"], "rows": 7, "too_short_to_check": 1}
    assert read_jsonl(out / "train.jsonl") == [r for i, r in enumerate(train) if i not in (10, 50)]
    assert read_jsonl(out / "prefs.jsonl") == [r for i, r in enumerate(prefs) if i != 3]
    assert json.loads((out / "report.json").read_text()) == report
    # A stricter threshold keeps row 50 (75% of eval_b[1]); a looser one takes row 99 too (45% of eval_a[4]).
    strict = decontaminate([paths["train"]], [paths["eval_a"], paths["eval_b"]], tmp_path / "s", threshold=0.8)
    loose = decontaminate([paths["train"]], [paths["eval_a"], paths["eval_b"]], tmp_path / "l", threshold=0.4)
    assert (strict["train"][0]["removed"], loose["train"][0]["removed"]) == (1, 3)


def brute_force_overlap(train_text: str, eval_text: str, n: int) -> float:
    """The definition, directly: the fraction of the eval item's words inside some n-gram the train text also has."""
    t, e = normalize(train_text), normalize(eval_text)
    train_grams = {tuple(t[i:i + n]) for i in range(len(t) - n + 1)}
    covered = [False] * len(e)
    for i in range(len(e) - n + 1):
        if tuple(e[i:i + n]) in train_grams:
            covered[i:i + n] = [True] * n
    return sum(covered) / len(e)


@pytest.mark.parametrize("n", [3, 8])
def test_inverted_index_equals_a_brute_force_scan(n):
    """Random texts over a 12-word vocabulary (so partial overlaps of every size occur), all thresholds."""
    rng = random.Random(n)
    vocab = WORDS[:12]
    evals = [" ".join(rng.choice(vocab) for _ in range(rng.randint(n, 30))) for _ in range(15)]
    index = EvalIndex(n)
    for i, text in enumerate(evals):
        index.add(text, file="eval", row=i)
    for _ in range(60):
        train = " ".join(rng.choice(vocab) for _ in range(rng.randint(1, 60)))
        for threshold in (0.2, 0.5, 1.0):
            got = {m.item.row: m.overlap for m in index.matches(train, threshold)}
            expected = {i: brute_force_overlap(train, e, n) for i, e in enumerate(evals)}
            assert got == pytest.approx({i: v for i, v in expected.items() if v >= threshold})


def test_cli_writes_the_outputs_and_reports_bad_rows(planted, tmp_path, capsys):
    paths, _, _ = planted
    out = tmp_path / "cli"
    assert cli.main(["decontaminate", "--train", paths["train"], "--eval", paths["eval_a"], paths["eval_b"],
                     "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"train {paths['train']}: 200 rows, 2 removed, 198 kept" in printed
    assert f"overlaps {paths['eval_b']}: 1 rows" in printed
    assert {p.name for p in out.iterdir()} == {"train.jsonl", "matches.jsonl", "report.json"}
    bad = write_jsonl(tmp_path / "bad.jsonl", [chat("fine"), {"answer": 1}])
    assert cli.main(["decontaminate", "--train", bad, "--eval", paths["eval_a"], "--out", str(out)]) == 1
    assert f"file {bad}, row 2: no prompt text" in capsys.readouterr().err
    assert cli.main(["decontaminate", "--train", paths["train"], paths["train"], "--eval", paths["eval_a"],
                     "--out", str(out)]) == 1
    assert "distinct names" in capsys.readouterr().err
