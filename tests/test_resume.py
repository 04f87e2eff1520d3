"""Explicit resume (tulu_jax.stages.resume): refusal without --resume, refusal of a changed config with the keys
listed, the run-length/logging keys that may change, and --allow-config-change recording the change."""

from __future__ import annotations

import json
import pathlib

import pytest
import yaml

from tulu_jax.config import dump_config
from tulu_jax.errors import ConfigError
from tulu_jax.stages.sections import load_stage_config
from tulu_jax.stages.resume import CHANGES_FILE, check_stage_resume, config_changes, is_resumable
from tulu_jax.stages.sft import SFTConfig

TINY_SFT = pathlib.Path(__file__).resolve().parent.parent / "configs" / "tiny_sft.yaml"


def stage_config(run_dir: pathlib.Path, *overrides: str) -> SFTConfig:
    return load_stage_config(SFTConfig, TINY_SFT, [f"output.run_dir={run_dir}", *overrides])


def saved_run(run_dir: pathlib.Path, *overrides: str, step: int = 30) -> SFTConfig:
    """A run directory as a stage leaves it: config.yaml and a finalized checkpoint `step`."""
    config = stage_config(run_dir, *overrides)
    (run_dir / "checkpoints" / str(step)).mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(dump_config(config), sort_keys=False))
    return config


def check(config: SFTConfig) -> None:
    check_stage_resume(config.output, dump_config(config), write=True)


def test_a_new_or_checkpointless_run_dir_needs_no_flag(tmp_path):
    check(stage_config(tmp_path / "new"))
    (tmp_path / "old" / "checkpoints" / "5.orbax-checkpoint-tmp-1").mkdir(parents=True)  # a save that never finished
    check(stage_config(tmp_path / "old"))


def test_an_existing_run_is_refused_without_resume(tmp_path):
    saved_run(tmp_path)
    with pytest.raises(ConfigError, match=r"already holds a run \(a checkpoint at step 30\): pass --resume"):
        check(stage_config(tmp_path))


def test_resume_with_the_same_config_or_a_new_length_and_logging(tmp_path):
    saved_run(tmp_path)
    check(stage_config(tmp_path, "output.resume=true"))
    check(stage_config(tmp_path, "output.resume=true", "train.max_steps=90", "train.epochs=3",
                       "output.log_every=1", "output.save_every=7", "output.keep_last=5", "output.progress=false"))
    assert not (tmp_path / CHANGES_FILE).exists()


def test_resume_with_a_changed_config_lists_every_differing_key(tmp_path):
    saved = saved_run(tmp_path)
    with pytest.raises(ConfigError) as e:
        check(stage_config(tmp_path, "output.resume=true", "optim.lr=1e-3", "train.seed=7", "train.max_steps=9"))
    message = str(e.value)
    assert f"optim.lr: {saved.optim.lr!r} → 0.001" in message and "train.seed: 0 → 7" in message
    assert "max_steps" not in message and "--allow-config-change" in message and "\n" not in message
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["optim"]["lr"] == saved.optim.lr  # untouched


def test_allow_config_change_records_the_change(tmp_path):
    saved = saved_run(tmp_path)
    check(stage_config(tmp_path, "output.resume=true", "output.allow_config_change=true", "optim.lr=1e-3"))
    [record] = [json.loads(line) for line in (tmp_path / CHANGES_FILE).read_text().splitlines()]
    assert record["resumed_from"] == "a checkpoint at step 30"
    assert record["changes"]["optim.lr"] == [saved.optim.lr, 0.001]


def test_config_changes_and_resumable_keys():
    saved = {"optim": {"lr": 1.0, "betas": [0.9, 0.99]}, "train": {"epochs": 2}, "sft": {"train": {"epochs": 1}}}
    new = {"optim": {"lr": 1.0, "betas": [0.9, 0.999]}, "train": {"epochs": 3}, "extra": None}
    assert config_changes(saved, new) == {
        "extra": ("(absent)", None), "optim.betas": ([0.9, 0.99], [0.9, 0.999]), "sft.train.epochs": (1, "(absent)"),
        "train.epochs": (2, 3),
    }
    assert is_resumable("train.epochs") and is_resumable("sft.train.epochs") and is_resumable("output.log_every")
    assert not is_resumable("optim.lr") and not is_resumable("xtrain.epochs") and not is_resumable("train.seed")
