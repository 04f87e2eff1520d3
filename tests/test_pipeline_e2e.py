"""`tulu-jax pipeline`: a shortened run of the real stages (same stages, fewer steps) through the console entry
point, its artifacts, a summary recomputed independently from the eval files, kill + `--resume` (inside SFT, and
from a checkpoint of the rlvr stage), and config errors."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tulu_jax.errors import ConfigError, DataError
from tulu_jax.rl.verifiers import verify
from tulu_jax.stages import pipeline

REPO = pathlib.Path(__file__).resolve().parent.parent
STAGES = ("base", "sft", "preferences", "dpo", "rlvr")
MODEL_STAGES = ("base", "sft", "dpo", "rlvr")

# configs/tiny_arith.yaml, shortened: a smaller world and model, a few steps per stage. The SFT stage is long enough
# to be killed between its checkpoints; an under-trained model rarely answers right, so prompts with no correct
# sample pair the reference solution (otherwise there might be no pair at all).
SHORT = {
    "seed": 3,
    "stages": list(STAGES),
    "world": {"train_problems": 200, "eval_problems": 24, "vocab_size": 300},
    "model": {"preset": "tiny", "overrides": {"vocab_size": 300}},
    "base": {"data": {"max_seq_len": 128, "packing": True}, "optim": {"lr": 3e-3},
             "train": {"global_batch_size": 8, "max_steps": 4}, "output": {"save_every": 2, "log_every": 2}},
    "sft": {"data": {"max_seq_len": 80}, "optim": {"lr": 3e-3},
            "train": {"global_batch_size": 8, "max_steps": 12}, "output": {"save_every": 3, "log_every": 3}},
    "preferences": {"prompts": 16, "samples_per_prompt": 2, "max_new_tokens": 24, "batch_size": 32,
                    "reference_when_none_correct": True},
    "dpo": {"data": {"max_seq_len": 80}, "optim": {"lr": 1e-4},
            "train": {"global_batch_size": 8, "max_steps": 3}, "output": {"save_every": 2, "log_every": 1}},
    "rlvr": {"data": {"max_seq_len": 64}, "optim": {"lr": 1e-4}, "train": {"global_batch_size": 8, "max_steps": 2},
             "rlvr": {"algorithm": "grpo", "group_size": 4, "ppo_epochs": 1, "max_new_tokens": 24,
                      "rollout_chunks": 2},
             "output": {"save_every": 1}},
    "eval": {"max_new_tokens": 24, "batch_size": 24},
}


def write_config(directory: pathlib.Path, **changes) -> pathlib.Path:
    path = directory / "short_arith.yaml"
    path.write_text(yaml.safe_dump({**SHORT, "run_dir": str(directory / "run"), **changes}))
    return path


def start(config: pathlib.Path, cache: pathlib.Path, *extra: str) -> subprocess.Popen:
    """The console entry point on one CPU device (the pipeline's default sharding file)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_COMPILATION_CACHE_DIR=str(cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    cmd = [sys.executable, "-m", "tulu_jax.cli", "pipeline", "--config", str(config), *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> tuple[str, str]:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-4000:]
    return out, err


def read_jsonl(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def table_numbers(run_dir: pathlib.Path) -> list[tuple]:
    """(stage, accuracy, mean reward) of every summary row: what must reproduce."""
    return [(r["stage"], r["accuracy"], r["mean_reward"]) for r in json.loads((run_dir / "summary.json").read_text())]


# The `uninterrupted` run (one full shortened pipeline) and its `pipeline_cache` are session fixtures in conftest.py:
# tests/test_pipeline_run.py and the notebooks reuse that run.


@pytest.mark.slow
def test_every_stage_leaves_its_artifacts(uninterrupted):
    run_dir, out, _ = uninterrupted
    assert (run_dir / "tokenizer" / "tokenizer.json").is_file()
    for name in ("pretrain", "sft", "prompts", "eval", "preferences"):
        assert read_jsonl(run_dir / "data" / f"{name}.jsonl")
    for stage in STAGES:
        assert json.loads((run_dir / stage / pipeline.STAGE_FILE).read_text())["stage"] == stage
    for stage in MODEL_STAGES:
        assert (run_dir / stage / "hf" / "model.safetensors").is_file()
        assert (run_dir / stage / "hf" / "config.json").is_file()
        assert list((run_dir / stage / "checkpoints").iterdir())
        assert [m["step"] for m in read_jsonl(run_dir / stage / "metrics.jsonl")][0] == 1
    assert len(read_jsonl(run_dir / "sft" / "metrics.jsonl")) == 12
    assert (run_dir / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| stage | held-out accuracy | 95% interval | wall time | notes |" in out  # rewards are 0/1: no mean reward
    assert (run_dir / "dpo" / "tensorboard").is_dir()
    assert (run_dir / "summary.md").read_text().strip() in out
    rlvr = read_jsonl(run_dir / "rlvr" / "metrics.jsonl")
    assert [m["step"] for m in rlvr] == [1, 2] and all(0.0 <= m["verifier"] <= 1.0 for m in rlvr)
    assert "| rlvr |" in out and "2 iterations; sample reward" in out


@pytest.mark.slow
def test_resume_skips_finished_stages_and_continues_a_checkpointed_rlvr_stage(uninterrupted, pipeline_cache,
                                                                              tmp_path):
    """The finished run with its rlvr stage rolled back to the iteration-1 checkpoint: --resume skips the four
    finished stages, restores rlvr's state, rng and prompt position, and ends where the uninterrupted run did."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted[0], run_dir)
    rlvr = run_dir / "rlvr"
    for name in (pipeline.STAGE_FILE, pipeline.EVAL_FILE):
        (rlvr / name).unlink()
    shutil.rmtree(rlvr / "hf")
    shutil.rmtree(rlvr / "checkpoints" / "2")
    assert sorted(p.name for p in (rlvr / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]
    # --allow-config-change: only run_dir differs (the copy's), as the message records
    _, err = finish(start(write_config(tmp_path), pipeline_cache, "--resume", "--allow-config-change"))
    assert all(f"{stage}: finished before, skipped" in err for stage in STAGES[:-1])
    assert "resumed from checkpoint iteration 1" in err
    assert table_numbers(run_dir) == table_numbers(uninterrupted[0])
    resumed, reference = (read_jsonl(d / "rlvr" / pipeline.EVAL_FILE) for d in (run_dir, uninterrupted[0]))
    assert [dict(r, file=None) for r in resumed] == [dict(r, file=None) for r in reference]


@pytest.mark.slow
def test_the_table_comes_from_the_eval_files_and_the_rewards_from_the_verifier(uninterrupted):
    run_dir, _, _ = uninterrupted
    held_out = read_jsonl(run_dir / "data" / "eval.jsonl")
    summary = {r["stage"]: r for r in json.loads((run_dir / "summary.json").read_text())}
    assert list(summary) == list(STAGES)
    for stage in MODEL_STAGES:
        records = read_jsonl(run_dir / stage / pipeline.EVAL_FILE)
        assert len(records) == len(held_out)
        rewards = [verify("gsm8k", r["response"], row["ground_truth"]) for r, row in zip(records, held_out)]
        assert [r["reward"] for r in records] == rewards  # scored by the verifier, against the held-out answers
        assert summary[stage]["accuracy"] == pytest.approx(sum(x == 1.0 for x in rewards) / len(rewards))
        assert summary[stage]["mean_reward"] == pytest.approx(sum(rewards) / len(rewards))
    assert summary["preferences"]["accuracy"] is None
    pairs = read_jsonl(run_dir / "data" / "preferences.jsonl")
    assert summary["preferences"]["info"]["pairs"] == len(pairs) > 0
    prompts = {r["messages"][0]["content"]: r["ground_truth"] for r in read_jsonl(run_dir / "data" / "prompts.jsonl")}
    for pair in pairs:  # chosen is right and rejected wrong, by the verifier
        truth = prompts[pair["chosen"][0]["content"]]
        assert verify("gsm8k", pair["chosen"][-1]["content"], truth) == 1.0
        assert verify("gsm8k", pair["rejected"][-1]["content"], truth) < 1.0


@pytest.mark.slow
def test_killed_mid_stage_then_resumed_gives_the_same_table(uninterrupted, pipeline_cache, tmp_path):
    config = write_config(tmp_path)
    run_dir = tmp_path / "run"
    proc = start(config, pipeline_cache)
    checkpoints = run_dir / "sft" / "checkpoints"
    deadline = time.monotonic() + 400
    while not (checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())):
        assert proc.poll() is None, proc.stderr.read()[-4000:]
        assert time.monotonic() < deadline, "no SFT checkpoint in time"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "sft" / pipeline.STAGE_FILE).exists()  # killed inside the SFT stage
    base_marker = (run_dir / "base" / pipeline.STAGE_FILE).read_text()

    refused = start(config, pipeline_cache)
    _, err = refused.communicate(timeout=300)
    assert refused.returncode == 1 and "--resume" in err

    _, err = finish(start(config, pipeline_cache, "--resume"))
    assert "base: finished before, skipped" in err
    assert (run_dir / "base" / pipeline.STAGE_FILE).read_text() == base_marker
    assert table_numbers(run_dir) == table_numbers(uninterrupted[0])
    for stage in MODEL_STAGES:  # the same responses, word for word (records differ only in their file path)
        resumed, reference = (read_jsonl(d / stage / pipeline.EVAL_FILE) for d in (run_dir, uninterrupted[0]))
        assert [dict(r, file=None) for r in resumed] == [dict(r, file=None) for r in reference]


# --------------------------------------------------------------------------------------------------- config


def test_the_shipped_config_and_every_stage_config_in_it_load():
    config = pipeline.load_pipeline_config("configs/tiny_arith.yaml")
    assert config.stages == list(STAGES)
    sft = pipeline.stage_config(config, "sft", pathlib.Path("r"), model_path="r/base/hf")
    assert (sft.model.path, sft.data.format, sft.output.run_dir) == ("r/base/hf", "chat", "r/sft")
    assert sft.train.loss_reduction == "sum"
    base = pipeline.stage_config(config, "base", pathlib.Path("r"), model_path=None)
    assert (base.model.preset, base.data.format, base.data.sources[0].path) == ("tiny", "text", "r/data/pretrain.jsonl")
    dpo = pipeline.stage_config(config, "dpo", pathlib.Path("r"), model_path="r/sft/hf")
    assert (dpo.dpo.loss_type, dpo.data.sources[0].path) == ("dpo_norm", "r/data/preferences.jsonl")
    rlvr = pipeline.stage_config(config, "rlvr", pathlib.Path("r"), model_path="r/dpo/hf")
    assert (rlvr.model.path, rlvr.data.sources[0].path, rlvr.rlvr.temperature) == ("r/dpo/hf", "r/data/prompts.jsonl",
                                                                                   1.0)
    ppo = pipeline.load_pipeline_config("configs/tiny_arith.yaml", ("rlvr.rlvr.algorithm=ppo",))
    assert pipeline.stage_config(ppo, "rlvr", pathlib.Path("r"), model_path="r/dpo/hf").rlvr.uses_value


@pytest.mark.parametrize("changes, message", [
    ({"sft": {"optim": {"lrr": 1.0}}}, "optim.lrr"),
    ({"dpo": {"dpo": {"loss_type": "kto"}}}, "dpo.loss_type"),
    ({"sft": {"data": {"sources": []}}}, "'sft.data.sources': set by the pipeline"),
    ({"stages": ["base", "rlhf"]}, "unknown stage"),
    ({"wrold": {}}, "world"),
])
def test_bad_pipeline_configs_fail_before_anything_runs_naming_file_and_key(tmp_path, changes, message):
    path = write_config(tmp_path, **changes)
    with pytest.raises(ConfigError) as info:
        pipeline.load_pipeline_config(str(path))
    assert message in str(info.value) and "short_arith.yaml" in str(info.value)
    assert not (tmp_path / "run").exists()


def test_a_run_dir_made_from_another_world_is_refused(tmp_path):
    config = pipeline.load_pipeline_config(str(write_config(tmp_path)))
    pipeline.build_world(config, tmp_path / "run")
    config.world.max_operand = 5
    with pytest.raises(ConfigError, match="another world"):
        pipeline.build_world(config, tmp_path / "run")


def test_the_world_is_decontaminated_and_a_planted_leak_is_refused(tmp_path):
    config = pipeline.load_pipeline_config(str(write_config(tmp_path)))
    run_dir = tmp_path / "run"
    pipeline.build_world(config, run_dir)
    report = json.loads((run_dir / "decontamination" / "report.json").read_text())
    assert [(t["rows"] > 0, t["removed"]) for t in report["train"]] == [(True, 0)] * 3
    assert report["eval"] == [{"file": str(run_dir / "data" / "eval.jsonl"), "rows": 24, "too_short_to_check": 0}]
    leaked = read_jsonl(run_dir / "data" / "eval.jsonl")[5]
    with open(run_dir / "data" / "sft.jsonl", "a") as f:
        f.write(json.dumps({"messages": [*leaked["messages"], {"role": "assistant", "content": "7"}]}) + "\n")
    with pytest.raises(DataError, match="1 training rows hold a held-out question"):
        pipeline.check_held_out_is_clean(run_dir / "data", tmp_path / "check")
