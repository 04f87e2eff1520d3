"""`tulu-jax distill-compare` end to end with tiny settings: the shortened pipeline's final model (the session's
`uninterrupted`) teaches a smaller student by SFT, offline sparse targets and on-policy GKD; the table's counts and
intervals are recomputed from the eval files, the rewards from the verifier."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import yaml

from tulu_jax.config import dump_config
from tulu_jax.errors import ConfigError
from tulu_jax.rl.verifiers import verify
from tulu_jax.stages import distill_compare
from tulu_jax.stages.pipeline import load_pipeline_config
from tulu_jax.stages.pipeline_run import open_run
from tulu_jax.stages.summary import wilson_interval

REPO = pathlib.Path(__file__).resolve().parent.parent
ARMS = ("sft", "offline", "on_policy")
STEPS = 3

# configs/tiny_arith_distill.yaml, shrunk to the shortened pipeline (vocabulary 300, `tiny` teacher): a 1-layer
# student of hidden 32, a few steps; every on-policy step answers with the student (λ = 1).
SHORT = {
    "student": {"preset": "tiny", "overrides": {"vocab_size": 300, "hidden_size": 32, "intermediate_size": 64,
                                                "num_layers": 1, "num_heads": 2, "num_kv_heads": 2}},
    "data": {"max_seq_len": 80},
    "optim": {"lr": 3e-3},
    "train": {"global_batch_size": 8, "max_steps": STEPS},
    "output": {"save_every": 2, "log_every": 1},  # checkpoints at 2 and 3: step 2 is evaluated for the curve
    "sft": {"train": {"loss_reduction": "mean"}},
    "distill": {"lambda_on_policy": 1.0, "max_new_tokens": 16,
                "targets": {"k": 16, "rows_per_shard": 128, "batch_size": 40}},
}


def write_config(directory: pathlib.Path, teacher_run: pathlib.Path) -> pathlib.Path:
    path = directory / "short_compare.yaml"
    path.write_text(yaml.safe_dump({**SHORT, "teacher_run": str(teacher_run), "run_dir": str(directory / "run")}))
    return path


def compare(config: pathlib.Path, cache: pathlib.Path, *extra: str) -> str:
    """The console entry point on one CPU device; returns stdout."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_COMPILATION_CACHE_DIR=str(cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    proc = subprocess.run([sys.executable, "-m", "tulu_jax.cli", "distill-compare", "--config", str(config), *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def run_comparison(directory: pathlib.Path, teacher_run: pathlib.Path,
                   cache: pathlib.Path) -> tuple[pathlib.Path, str]:
    """One tiny comparison (the session fixture `short_comparison`): (its run dir, stdout)."""
    return directory / "run", compare(write_config(directory, teacher_run), cache)


def read_jsonl(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_the_table_counts_are_the_eval_files_and_every_arm_ran_the_same_steps(short_comparison, uninterrupted):
    run_dir, out = short_comparison
    teacher_run = uninterrupted[0]
    held_out = read_jsonl(teacher_run / "data" / "eval.jsonl")
    rows = {r["model"]: r for r in json.loads((run_dir / "comparison.json").read_text())}
    assert list(rows) == ["teacher", *ARMS]
    last = open_run(teacher_run).finished_stages[-1]
    assert last == "rlvr" and rows["teacher"]["info"]["stage"] == last  # the shortened pipeline's last model
    for name, row in rows.items():
        directory = teacher_run / last if name == "teacher" else run_dir / name
        records = read_jsonl(directory / "eval.jsonl")
        rewards = [verify("gsm8k", r["response"], truth["ground_truth"]) for r, truth in zip(records, held_out)]
        assert [r["reward"] for r in records] == rewards and len(rewards) == len(held_out)
        correct = sum(x == 1.0 for x in rewards)
        assert (row["correct"], row["total"]) == (correct, len(held_out))
        assert tuple(row["interval"]) == pytest.approx(wilson_interval(correct, len(held_out)))
        assert f"| {correct}/{len(held_out)} | {correct / len(held_out):.3f} |" in out
        if name != "teacher":
            curve = read_jsonl(directory / "eval_curve" / "2.jsonl")
            early = sum(verify("gsm8k", r["response"], t["ground_truth"]) == 1.0 for r, t in zip(curve, held_out))
            assert row["curve"] == [{"step": 2, "correct": early}, {"step": STEPS, "correct": correct}]
            assert [m["step"] for m in read_jsonl(directory / "metrics.jsonl")] == list(range(1, STEPS + 1))
            assert row["info"]["steps"] == STEPS
            assert row["info"]["params"] < rows["teacher"]["info"]["params"] / 2
    assert (run_dir / "comparison.md").read_text().strip() in out
    # offline: one target row per SFT row; on-policy: every step answered by the student
    manifest = json.loads((run_dir / "targets" / "manifest.json").read_text())
    assert (manifest["num_rows"], manifest["k"]) == (len(read_jsonl(teacher_run / "data" / "sft.jsonl")), 16)
    assert [m["on_policy"] for m in read_jsonl(run_dir / "on_policy" / "metrics.jsonl")] == [1.0] * STEPS


@pytest.mark.slow
def test_resume_skips_finished_arms_and_a_second_run_is_refused(short_comparison, pipeline_cache):
    run_dir, out = short_comparison
    config = run_dir.parent / "short_compare.yaml"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    refused = subprocess.run([sys.executable, "-m", "tulu_jax.cli", "distill-compare", "--config", str(config)],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1 and "--resume" in refused.stderr
    assert compare(config, pipeline_cache, "--resume") == out


def test_the_shipped_config_loads_with_the_same_steps_for_every_arm():
    config = distill_compare.load_compare_config("configs/tiny_arith_distill.yaml")
    arms = [distill_compare.arm_config(config, arm, pathlib.Path("t/dpo/hf")) for arm in config.arms]
    assert [type(a).__name__ for a in arms] == ["SFTConfig", "DistillConfig", "DistillConfig"]
    assert [a.distill.mode for a in arms[1:]] == ["offline", "on_policy"]
    assert len({(a.train.max_steps, a.train.global_batch_size, a.train.seed, a.optim.lr) for a in arms}) == 1
    assert {a.data.sources[0].path for a in arms} == {"runs/tiny_arith/data/sft.jsonl"}
    assert arms[0].model.overrides["num_layers"] * 2 == 4  # half the teacher's layers (configs/tiny_arith.yaml)


@pytest.mark.parametrize("changes, message", [
    ({"arms": ["sft", "kd"]}, "'arms'"),
    ({"distill": {"mode": "online"}}, "'distill.mode': set by distill-compare"),
    ({"optim": {"lrr": 1.0}}, "optim.lrr"),
])
def test_bad_configs_fail_before_anything_runs(tmp_path, changes, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**SHORT, "teacher_run": str(tmp_path), **changes}))
    with pytest.raises(ConfigError, match="bad.yaml") as info:
        distill_compare.load_compare_config(str(path))
    assert message in str(info.value)


def test_a_teacher_run_without_a_finished_model_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="not a pipeline run directory"):
        distill_compare.teacher_model_dir(open_run(tmp_path), None)
    config = dump_config(load_pipeline_config("configs/tiny_arith.yaml"))
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "world.json").write_text("{}")
    with pytest.raises(ConfigError, match="no stage is finished with an evaluated model"):
        distill_compare.teacher_model_dir(open_run(tmp_path), None)
