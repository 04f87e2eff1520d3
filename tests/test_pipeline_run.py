"""tulu_jax.stages.pipeline_run on the shortened pipeline run of tests/test_pipeline_e2e.py (the session fixture
`uninterrupted`, shared): its artifacts read back, a model evaluated again on the held-out set, and the forks it
refuses. A fork that trains only its later stage is tested where notebooks/dpo_ablation.ipynb makes four of them
(tests/test_notebooks.py), so that the suite trains no fifth."""

from __future__ import annotations

import copy
import json

import pytest

from test_pipeline_e2e import read_jsonl
from tulu_jax.errors import ConfigError
from tulu_jax.stages.pipeline_run import fork, open_run

KEEP = ["base", "sft", "preferences"]


@pytest.mark.slow
def test_a_finished_run_reads_back_its_stages(uninterrupted):
    run_dir = uninterrupted[0]
    run = open_run(run_dir)
    assert run.finished_stages == ["base", "sft", "preferences", "dpo", "rlvr"]
    assert run.model_dir("sft") == run_dir / "sft" / "hf" and (run.model_dir("sft") / "config.json").is_file()
    with pytest.raises(ConfigError, match="'preferences' makes no model"):
        run.model_dir("preferences")
    pairs = read_jsonl(run.data_file("preferences"))
    assert len(pairs) == run.stage_record("preferences")["info"]["pairs"] > 0
    with pytest.raises(ConfigError, match="no data file 'rlhf'"):
        run.data_file("rlhf")
    assert len(run.tokenizer()) == run.config.world.vocab_size
    assert [m["step"] for m in run.metrics("sft")] == list(range(1, 13))
    summary = {r["stage"]: r for r in json.loads((run_dir / "summary.json").read_text())}
    for stage in ("base", "sft", "dpo"):
        result = run.held_out(stage)
        records = read_jsonl(run_dir / stage / "eval.jsonl")
        assert [r.response for r in result.records] == [r["response"] for r in records]
        assert result.overall_accuracy == pytest.approx(summary[stage]["accuracy"])
    assert [(r.stage, r.accuracy) for r in run.summary()] == [(s, summary[s]["accuracy"]) for s in summary]


def test_a_directory_without_a_run_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="not a pipeline run directory"):
        open_run(tmp_path)


@pytest.mark.slow
def test_evaluate_scores_a_model_as_the_pipeline_did(uninterrupted, tmp_path):
    run = open_run(uninterrupted[0])
    result = run.evaluate(run.model_dir("sft"), tmp_path / "again.jsonl")
    stored = run.held_out("sft")
    assert [(r.response, r.reward) for r in result.records] == [(r.response, r.reward) for r in stored.records]
    assert [r["response"] for r in read_jsonl(tmp_path / "again.jsonl")] == [r.response for r in stored.records]


def test_a_fork_refuses_configs_that_did_not_make_the_kept_stages(uninterrupted, tmp_path):
    run = open_run(uninterrupted[0])
    changed = copy.deepcopy(run.config)
    changed.sft["optim"] = {**changed.sft["optim"], "lr": 1.0}
    with pytest.raises(ConfigError, match="differs from .* in 'sft'"):
        fork(uninterrupted[0], tmp_path / "a", keep=KEEP, config=changed)
    with pytest.raises(ConfigError, match="must be the first stages"):
        fork(run, tmp_path / "b", keep=["base", "preferences"])
    changed = copy.deepcopy(run.config)
    changed.world.max_operand += 1
    with pytest.raises(ConfigError, match="'world'"):
        fork(run, tmp_path / "c", keep=["base"], config=changed)
    (tmp_path / "d").mkdir()
    with pytest.raises(ConfigError, match="already exists"):
        fork(run, tmp_path / "d", keep=KEEP)
    assert not any((tmp_path / name).exists() for name in "abc")
