"""The `tulu-jax` dispatcher and the stage's early errors: bad configs, bad data and bad batch shapes are reported
in one line naming the key / file / row / field, before anything is compiled."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from tulu_jax import cli
from tulu_jax.errors import ConfigError, TuluJaxError
from tulu_jax.stages import sft, training
from tulu_jax.stages.paths import resolve_path
from tulu_jax.stages.sections import ModelSection
from tulu_jax.stages.setup import resolve_model_config

REPO = pathlib.Path(__file__).resolve().parent.parent
TINY_CONFIG = REPO / "configs" / "tiny_sft.yaml"
CPU8 = str(REPO / "sharding" / "cpu-8.yaml")
BUNDLED_ROWS = resolve_path("tulu_jax/assets/tiny_sft.jsonl")


class _Stop(TuluJaxError):
    """Raised by a patched stage piece: the run got that far."""


@pytest.fixture
def no_compilation(monkeypatch):
    """Any attempt to initialize the model or build the step fails the test: errors must come first."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the stage reached model initialization / compilation")

    monkeypatch.setattr(training, "init_stage_state", forbidden)
    monkeypatch.setattr(sft, "build_sft_step", forbidden)


def write_config(tmp_path: pathlib.Path, text: str) -> pathlib.Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def run_sft(config: pathlib.Path, *sets: str) -> int:
    return cli.main(["sft", "--config", str(config), "--sharding", CPU8, *(a for s in sets for a in ("--set", s))])


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in ("sft", "compile-check", "convert"):
        assert name in out


CALLS: list = []


def fake_stage(args) -> int:
    """A stand-in stage for the dispatcher test."""
    CALLS.append((args.config, args.sharding, args.overrides))
    return 7


def test_a_new_command_is_one_table_row(monkeypatch):
    monkeypatch.setitem(cli.COMMANDS, "fake", cli.Command(f"{__name__}:fake_stage", "a stage added in one line"))
    assert cli.main(["fake", "--config", "c.yaml", "--sharding", "s.yaml", "--set", "a=1", "--set", "b=2"]) == 7
    assert CALLS[-1] == ("c.yaml", "s.yaml", ["a=1", "b=2"])


def test_unknown_key_names_key_and_file(tmp_path, capsys, no_compilation):
    config = write_config(tmp_path, TINY_CONFIG.read_text().replace("  lr: 3.0e-3", "  lrr: 3.0e-3"))
    assert run_sft(config) == 1
    err = capsys.readouterr().err
    assert f"{config}: unknown key 'optim.lrr' (did you mean 'optim.lr'?)" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "edit, sets, message",
    [
        (("global_batch_size: 16", "global_batch_size: 0"), (), "'train.global_batch_size' must be > 0"),
        (("loss_reduction: sum", "loss_reduction: median"), (), "key 'train.loss_reduction' must be one of"),
        (("  preset: tiny\n", ""), (), "'model' needs 'path'"),
        (None, ("train.epochs=two",), "--set train.epochs: key 'train.epochs' expects int"),
        (None, ("optim.betas=[0.9, 1.5]",), "'optim.betas' must be in [0, 1)"),
        (None, ("data.sources=[]",), "'data.sources' lists no data source"),
    ],
)
def test_bad_values_name_the_key(tmp_path, capsys, no_compilation, edit, sets, message):
    text = TINY_CONFIG.read_text()
    if edit is not None:
        assert edit[0] in text
        text = text.replace(*edit)
    config = write_config(tmp_path, text)
    assert run_sft(config, *sets) == 1
    err = capsys.readouterr().err
    assert message in err
    assert str(config) in err or "--set" in err


def test_batch_that_does_not_split_over_the_mesh_fails_before_compiling(capsys, no_compilation):
    # cpu-8 splits the batch 4 ways (data × fsdp): 6 sequences cannot be split, nor 8 into 4 micro-batches.
    assert run_sft(TINY_CONFIG, "train.global_batch_size=6") == 1
    assert "must be a multiple of grad_accum_steps 1 × 4 batch shards" in capsys.readouterr().err
    assert run_sft(TINY_CONFIG, "train.global_batch_size=8", "train.grad_accum_steps=4") == 1
    assert "grad_accum_steps 4 × 4 batch shards" in capsys.readouterr().err


def _data_with_a_bad_row(tmp_path: pathlib.Path) -> pathlib.Path:
    lines = BUNDLED_ROWS.read_text().splitlines()[:6]
    row = json.loads(lines[2])
    row["messages"][1]["role"] = "bot"
    lines[2] = json.dumps(row)
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_malformed_row_names_file_row_and_field(tmp_path, capsys, no_compilation):
    data = _data_with_a_bad_row(tmp_path)
    assert run_sft(TINY_CONFIG, f"data.sources=[{{path: {data}}}]") == 1
    err = capsys.readouterr().err
    assert f"file {data}, row 3, field 'messages[1].role': unknown role 'bot'" in err
    assert "Traceback" not in err


def test_on_error_skip_reports_the_counts(tmp_path, capsys, monkeypatch):
    def stop(*args, **kwargs):
        raise _Stop("stopped after the data")

    monkeypatch.setattr(training, "init_stage_state", stop)
    data = _data_with_a_bad_row(tmp_path)
    assert run_sft(TINY_CONFIG, f"data.sources=[{{path: {data}}}]", "data.on_error=skip",
                   "data.max_bad_fraction=0.2", "train.global_batch_size=4") == 1
    err = capsys.readouterr().err
    assert f"{data}: 6 rows, 5 valid, 1 skipped (messages[1].role: 1) at rows 3, 5 selected" in err
    assert "tokenized 5 rows: 5 kept" in err
    assert "stopped after the data" in err


def test_rows_without_supervised_tokens_and_truncation_are_counted(tmp_path):
    from tulu_jax.data.tokenizers import load_tokenizer
    from tulu_jax.stages.sections import SourceSection

    rows = [
        {"messages": [{"role": "user", "content": "a long question " * 20}, {"role": "assistant", "content": "yes"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x " * 40}]},
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer = load_tokenizer(resolve_path("tulu_jax/assets/tiny_tokenizer"))
    data = sft.SFTDataSection(sources=[SourceSection(path=str(path), weight=2.0)], max_seq_len=24, shuffle=False)
    kept, report = sft.prepare_sft_data(data, tokenizer, "tulu")
    # Each row twice (weight 2): the first loses its answer to truncation, the third is cut but keeps some.
    assert (report.rows, report.kept, report.no_supervised_tokens, report.truncated) == (6, 4, 2, 2)
    assert all(len(r["input_ids"]) <= 24 for r in kept)


def test_model_config_errors(tmp_path):
    from tulu_jax.data.tokenizers import load_tokenizer

    with pytest.raises(ConfigError, match="unknown model preset 'llama3.1-8' \\(did you mean 'llama3.1-8b'\\?\\)"):
        resolve_model_config(ModelSection(preset="llama3.1-8"))
    tokenizer = load_tokenizer(resolve_path("tulu_jax/assets/tiny_tokenizer"))
    with pytest.raises(ConfigError, match="the tokenizer has 384 tokens but the model's vocab_size is 100"):
        resolve_model_config(ModelSection(preset="tiny", overrides={"vocab_size": 100}), tokenizer)
    with pytest.raises(ConfigError, match="has no config.json"):
        resolve_model_config(ModelSection(path=str(tmp_path)))
    # compile-check may fall back to the preset's shapes when the placeholder path is absent
    fallback = resolve_model_config(ModelSection(path=str(tmp_path / "absent"), preset="tiny"),
                                    allow_preset_fallback=True)
    assert fallback.hidden_size == 64
    scratch = resolve_model_config(ModelSection(preset="tiny", compute_dtype="bfloat16"), tokenizer)
    assert (scratch.eos_token_id, scratch.pad_token_id, scratch.compute_dtype) == (0, 1, "bfloat16")


def test_bundled_assets_resolve_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_path("tulu_jax/assets/tiny_sft.jsonl").is_file()
    assert resolve_path("tulu_jax/assets/tiny_tokenizer").is_dir()
    assert resolve_path("elsewhere.yaml") == pathlib.Path("elsewhere.yaml")


def test_cpu_sharding_file_sets_the_host_device_count_before_jax_starts():
    code = (
        "import os, sys; from tulu_jax import cli; cli.configure_platform(sys.argv[1]); "
        "print(os.environ['JAX_PLATFORMS'], os.environ['XLA_FLAGS'], 'jax' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    out = subprocess.run([sys.executable, "-c", code, CPU8], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["cpu", "--xla_force_host_platform_device_count=8", "False"]
