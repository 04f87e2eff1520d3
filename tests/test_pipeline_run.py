"""tulu_jax.stages.pipeline_run on the shortened pipeline run of tests/test_pipeline_e2e.py (the session fixture
`uninterrupted`, shared): its artifacts read back, a model evaluated again on the held-out set, and a fork that
trains only its later stage, leaving the source run untouched."""

from __future__ import annotations

import copy
import json
import os
import pathlib

import pytest
import yaml

from test_pipeline_e2e import finish, read_jsonl, start
from tulu_jax.config import dump_config
from tulu_jax.errors import ConfigError
from tulu_jax.stages.pipeline_run import FORK_FILE, fork, open_run

KEEP = ["base", "sft", "preferences"]


def snapshot(run_dir: pathlib.Path) -> dict[str, bytes]:
    """Every file's bytes under run_dir (following no links): what must not change when the run is reused."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and not p.is_symlink()}


@pytest.mark.slow
def test_a_finished_run_reads_back_its_stages(uninterrupted):
    run_dir = uninterrupted[0]
    run = open_run(run_dir)
    assert run.finished_stages == ["base", "sft", "preferences", "dpo"]
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


@pytest.mark.slow
def test_a_fork_trains_only_the_stages_after_the_kept_ones(uninterrupted, pipeline_cache, tmp_path):
    source_dir = uninterrupted[0]
    before = snapshot(source_dir)
    run = open_run(source_dir)
    changed = copy.deepcopy(run.config)
    changed.dpo["dpo"] = {"loss_type": "ipo", "beta": 0.5}
    changed.dpo["train"] = {**changed.dpo["train"], "max_steps": 2}
    config = run.fork(tmp_path / "fork", keep=KEEP, config=changed)
    fork_dir = pathlib.Path(config.run_dir)
    assert fork_dir == tmp_path / "fork"
    assert os.path.islink(fork_dir / "sft" / "hf") and os.path.islink(fork_dir / "sft" / "checkpoints")  # no copies
    assert json.loads((fork_dir / FORK_FILE).read_text())["kept"] == KEEP

    config_file = tmp_path / "fork.yaml"
    config_file.write_text(yaml.safe_dump(dump_config(config)))
    _, err = finish(start(config_file, pipeline_cache, "--resume"))
    for stage in KEEP:
        assert f"{stage}: finished before, skipped" in err
    forked = open_run(fork_dir)
    assert forked.finished_stages == ["base", "sft", "preferences", "dpo"]
    dpo_config = yaml.safe_load((fork_dir / "dpo" / "config.yaml").read_text())
    assert dpo_config["dpo"]["loss_type"] == "ipo" and dpo_config["dpo"]["beta"] == 0.5
    assert pathlib.Path(dpo_config["model"]["path"]).resolve() == (source_dir / "sft" / "hf").resolve()
    assert [m["step"] for m in forked.metrics("dpo")] == [1, 2]
    assert len(forked.held_out("dpo").records) == len(read_jsonl(run.data_file("eval")))
    for stage in ("base", "sft"):
        assert forked.held_out(stage).overall_accuracy == run.held_out(stage).overall_accuracy
    assert snapshot(source_dir) == before  # the source run is untouched


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
