"""The README runs as written: its Python API block against a toy model, and the toy commands of its "Commands"
section in order, in a fresh directory (the commands that need a TPU pod or libtpu's AOT compiler are checked as far
as this host allows: their configs load and compile-check picks the stage from the config)."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest

from tulu_jax import cli
from tulu_jax.config import dump_config
from tulu_jax.stages.sections import load_stage_config
from tulu_jax.stages.compile_check import infer_stage
from tulu_jax.stages.registry import get_stage

REPO = pathlib.Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def code_blocks(section: str, language: str) -> list[str]:
    """The fenced `language` blocks of README section `## <section>` (up to the next `## ` heading)."""
    body = README.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", body, re.S)


def commands(block: str) -> list[list[str]]:
    """The shell commands of a block, continuation lines joined, comments dropped."""
    return [shlex.split(line, comments=True) for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def test_the_python_block_runs_against_a_toy_model(tiny_hf_dir, tmp_path, monkeypatch):
    [block] = code_blocks("Python API", "python")
    (tmp_path / "runs" / "tiny_sft").mkdir(parents=True)
    (tmp_path / "runs" / "tiny_sft" / "hf").symlink_to(tiny_hf_dir)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(block, "README.md (Python API)", "exec"), scope)
    batch, width = scope["input_ids"].shape
    assert batch == 2 and scope["logits"].shape == (2, width, 384) and scope["logits"].dtype == np.float32
    out, pad = scope["out"], scope["model"].config.pad_token_id
    assert out.tokens.shape == out.logprobs.shape == (2, 32) and scope["reward"] == 1.0
    for tokens, logprobs, length in zip(out.tokens, out.logprobs, out.lengths):  # what follows a stop, as stated
        assert (tokens[length:] == pad).all() and (logprobs[length:] == 0).all()
    assert len(scope["answers"]) == 2


def test_the_pod_commands_name_real_keys_and_stages():
    """The 8B commands: their --set keys load with the configs; compile-check infers each config's stage."""
    for block in code_blocks("Commands", "bash"):
        for argv in commands(block):
            if argv[0] != "tulu-jax":
                continue
            args = cli.build_parser().parse_args(argv[1:])
            if args.command in ("sft", "dpo"):
                config = load_stage_config(get_stage(args.command).config_class, args.config, args.overrides)
                assert dump_config(config)["data"]["sources"], argv
            elif args.command == "compile-check":
                assert infer_stage(args.config) == "dpo"


@pytest.mark.slow
def test_the_toy_commands_run_in_order_on_a_fresh_directory(tmp_path):
    """Every toy command of the first "Commands" block, as written (eval on fewer prompts; compile-check aside:
    test_compile_check.py), from a fresh directory laid out like a clone: configs/, sharding/, tulu_jax/."""
    for name in ("configs", "sharding", "tulu_jax"):
        (tmp_path / name).symlink_to(REPO / name)
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    env.pop("XLA_FLAGS", None)  # the sharding file asks for its 8 CPU devices
    toy = commands(code_blocks("Commands", "bash")[0])
    assert [argv[1] for argv in toy] == ["sft", "eval", "dpo", "sft", "convert", "decontaminate", "compile-check"]
    for argv in toy[:-1]:
        shorter = ["--limit", "8"] if argv[1] == "eval" else []  # 8 of the 32 prompts: the same code path
        proc = subprocess.run([sys.executable, "-m", "tulu_jax.cli", *argv[1:], *shorter], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{shlex.join(argv)}:\n{proc.stderr[-3000:]}"
    runs = tmp_path / "runs"
    assert (runs / "tiny_sft" / "eval" / "tiny_eval.jsonl").is_file() and (runs / "tiny_dpo" / "hf").is_dir()
    steps = [json.loads(line)["step"] for line in (runs / "tiny_sft" / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 45  # 3 epochs of 15 batches: the resumed run went on for the third
    assert (tmp_path / "exported" / "tiny_sft" / "model.safetensors").is_file()
    assert (runs / "decontaminated" / "tiny_sft.jsonl").is_file()
