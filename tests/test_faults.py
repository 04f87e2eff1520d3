"""Fault injection: non-finite steps, damaged checkpoints, killed saves, model folders asking to run code, bad
verifier ground truths, and the one-line errors that replace tracebacks. Each test injects the fault for real
(NaN batches, flipped/truncated/deleted files, SIGKILL, a .py file that would leave a marker) and checks what
survives."""

from __future__ import annotations

import functools
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from test_train_helpers import (
    CountingBatches,
    batch_sharding,
    loss_fn,
    make_mesh,
    make_model,
    sequences_denominator,
    variable_shardings,
)
from tulu_jax import cli
from tulu_jax.data.tokenizers import load_tokenizer
from tulu_jax.errors import CheckpointError, ConfigError, CorruptCheckpointError, DataError, TrainingError
from tulu_jax.rl.verifiers import check_ground_truth, score_batch, verify
from tulu_jax.rl.verifiers.registry import get_verifier
from tulu_jax.rl.verifiers.timeout import WorkerPool
from tulu_jax.train import (
    Checkpointer,
    TrainState,
    build_train_step,
    init_train_state,
    make_optimizer,
    run_training,
    shardings_of,
    with_shardings,
)

MESH = make_mesh((2, 2, 2))


# --------------------------------------------------------------------------------------------------- NaN guard


def poisoned_loss(model, batch, denominators, frozen=None):
    """The helpers' loss, times `scale` (a per-row float: inf poisons the loss and the gradients)."""
    loss, aux = loss_fn(model, batch, denominators)
    return loss * jnp.max(batch["scale"]), aux


class PoisonedBatches(CountingBatches):
    """CountingBatches whose batches from index `start` on have scale inf (NaN/inf loss and gradients)."""

    def __init__(self, start: int):
        super().__init__()
        self.start = start

    def __next__(self):
        poisoned = self.index >= self.start
        batch = super().__next__()
        return {**batch, "scale": np.full((batch["input_ids"].shape[0],), np.inf if poisoned else 1.0, np.float32)}


@functools.cache
def guarded_setup(accum: int):
    optimizer = make_optimizer(1e-2, warmup_ratio=0.0, total_steps=20)
    state = init_train_state(make_model, optimizer, MESH, variable_shardings(MESH), seed=0)
    step = build_train_step(
        state.graphdef, poisoned_loss, optimizer, state_shardings=shardings_of(state),
        batch_shardings=batch_sharding(MESH), grad_accum_steps=accum, denominators_fn=sequences_denominator,
    )
    return state, step


def host(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


@pytest.mark.parametrize("accum", [1, 2])
def test_a_nonfinite_step_leaves_parameters_and_optimizer_state_unchanged(accum):
    state, step = guarded_setup(accum)
    good, bad = PoisonedBatches(start=1), PoisonedBatches(start=0)
    before = host((state.params, state.opt_state))
    skipped_state, metrics = step(jax.tree.map(jnp.copy, state), next(bad))
    assert int(metrics["skipped_nonfinite"]) == 1 and not np.isfinite(float(metrics["loss"]))
    assert int(skipped_state.step) == int(state.step) + 1  # the batch was consumed
    for got, want in zip(host((skipped_state.params, skipped_state.opt_state)), before, strict=True):
        np.testing.assert_array_equal(got, want)
    updated, metrics = step(skipped_state, next(good))
    assert int(metrics["skipped_nonfinite"]) == 0 and np.isfinite(float(metrics["loss"]))
    assert any(not np.array_equal(a, b) for a, b in zip(host(updated.params), before[: len(host(updated.params))]))


def test_consecutive_nonfinite_steps_stop_the_run_and_every_checkpoint_is_finite(tmp_path):
    state, step = guarded_setup(1)
    checkpointer = Checkpointer(tmp_path / "ckpt", max_to_keep=1, async_save=False)
    with pytest.raises(TrainingError) as caught:
        run_training(jax.tree.map(jnp.copy, state), step, PoisonedBatches(start=4), num_steps=20,
                     checkpointer=checkpointer, save_every=2, metrics_writer=None, log_every=1, progress=False)
    # Steps 5, 6, 7 were skipped; the save at step 6 held step 4's (finite) parameters.
    message = str(caught.value)
    assert message.startswith("step 7: 3 consecutive non-finite steps") and "\n" not in message
    assert f"newest finite checkpoint is {tmp_path / 'ckpt'}/6" in message
    assert checkpointer.all_steps() == [6]
    restored = checkpointer.restore(target=with_shardings(state, shardings_of(state)))
    assert all(np.isfinite(x).all() for x in host(restored.state.params))
    checkpointer.close()


def test_a_nonfinite_state_is_never_saved(tmp_path):
    state, _ = guarded_setup(1)
    leaves, treedef = jax.tree.flatten(state.params)
    nan_state = state.replace(params=jax.tree.unflatten(treedef, [leaves[0].at[0].set(jnp.inf), *leaves[1:]]))
    checkpointer = Checkpointer(tmp_path / "ckpt", async_save=False)
    with pytest.raises(TrainingError, match=r"step 3: refusing to save a non-finite state \(1 arrays hold NaN/inf"):
        checkpointer.save(3, nan_state, force=True)
    assert checkpointer.all_steps() == []
    checkpointer.close()


# --------------------------------------------------------------------------------------------------- checkpoints


def big_state(seed: int) -> TrainState:
    """A state with one 256×256 array: large enough that orbax stores its bytes in a data file of their own."""
    w = jax.random.normal(jax.random.key(seed), (256, 256), jnp.float32)
    return TrainState(graphdef=None, params={"w": w}, model_state={}, opt_state={"mu": w * 0.5},
                      step=jnp.int32(seed), rng=jnp.zeros(2, jnp.uint32))


def target_of(state: TrainState) -> TrainState:
    return with_shardings(state, shardings_of(state))


def largest_file(step_dir: pathlib.Path) -> pathlib.Path:
    return max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def flip_bytes(step_dir: pathlib.Path) -> None:
    path = largest_file(step_dir)
    data = bytearray(path.read_bytes())
    for pos in range(len(data) // 3, len(data) // 3 + 64):
        data[pos] ^= 0x5A
    path.write_bytes(bytes(data))


def truncate(step_dir: pathlib.Path) -> None:
    path = largest_file(step_dir)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def edit_data_state(step_dir: pathlib.Path) -> None:
    path = next((step_dir / "data").glob("process_*.json"))
    stored = json.loads(path.read_text())
    stored["value"]["index"] += 5  # valid JSON, wrong position
    path.write_text(json.dumps(stored))


CORRUPTIONS = {
    "flipped bytes": (flip_bytes, "checksums"),
    "truncated array file": (truncate, "unreadable"),
    "missing _METADATA": (lambda d: (d / "state" / "_METADATA").unlink(), "unreadable"),
    "missing state/": (lambda d: shutil.rmtree(d / "state"), "unreadable"),
    "bad iterator JSON": (lambda d: next((d / "data").glob("process_*.json")).write_text("{not json"), "JSON"),
    "edited iterator state": (edit_data_state, "sha256"),
    "missing integrity record": (lambda d: shutil.rmtree(d / "integrity"), "unreadable"),
}


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """Checkpoints 1 and 2 of big states, saved once and copied by each test."""
    root = tmp_path_factory.mktemp("ckpts") / "ckpt"
    checkpointer = Checkpointer(root, async_save=False)
    for step in (1, 2):
        checkpointer.save(step, big_state(step), data_state={"index": step})
    checkpointer.close()
    return root


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_a_corrupt_newest_checkpoint_warns_and_falls_back(kind, two_checkpoints, tmp_path, capsys):
    root = tmp_path / "ckpt"
    shutil.copytree(two_checkpoints, root)
    corrupt, reason = CORRUPTIONS[kind]
    corrupt(root / "2")
    checkpointer = Checkpointer(root)
    with pytest.raises(CorruptCheckpointError, match=f"checkpoint {root}/2[ :].*{reason}.*strict-resume"):
        checkpointer.restore_intact(target=target_of(big_state(2)), strict=True)
    restored = checkpointer.restore_intact(target=target_of(big_state(2)))
    assert restored.step == 1 and restored.data_state == {"index": 1}
    np.testing.assert_array_equal(np.asarray(restored.state.params["w"]), np.asarray(big_state(1).params["w"]))
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("tulu-jax: warning:")]
    assert len(warnings) == 2 and f"{root}/2" in warnings[0] and reason in warnings[0]
    assert checkpointer.all_steps() == [1] and (root / "2.corrupt").is_dir()  # set aside, not deleted
    checkpointer.close()


def test_no_intact_checkpoint_is_one_error(two_checkpoints, tmp_path):
    root = tmp_path / "ckpt"
    shutil.copytree(two_checkpoints, root)
    flip_bytes(root / "1")
    truncate(root / "2")
    checkpointer = Checkpointer(root)
    with pytest.raises(CorruptCheckpointError, match=f"no intact checkpoint in {root}: .*/2[ :].*/1[ :]"):
        checkpointer.restore_intact(target=target_of(big_state(2)))
    assert checkpointer.all_steps() == [1, 2]  # nothing set aside when nothing can be resumed
    checkpointer.close()


def test_strict_resume_flag_sets_the_config_key():
    for command in ("sft", "dpo"):
        args = cli.build_parser().parse_args([command, "--config", "c.yaml", "--sharding", "s.yaml", "--set", "a=1",
                                              "--strict-resume"])
        assert args.overrides == ["a=1", "output.strict_resume=true"]


def test_a_tampered_iterator_state_that_passes_its_digest_is_one_error(tmp_path):
    """An iterator that cannot take the stored state (e.g. a different data file) stops with one line."""
    state, step = guarded_setup(1)
    checkpointer = Checkpointer(tmp_path / "ckpt", async_save=False)
    checkpointer.save(1, state, data_state={"wrong": "shape"}, force=True)
    with pytest.raises(CheckpointError, match=r"ckpt/1: its data-iterator state does not fit this run's data \("):
        run_training(state, step, PoisonedBatches(start=99), num_steps=2, checkpointer=checkpointer,
                     save_every=None, metrics_writer=None, progress=False)
    checkpointer.close()


# --------------------------------------------------------------------------------------------------- remote code

EVIL_CODE = """import pathlib
pathlib.Path(__file__).with_name("MARKER").write_text("the folder's code ran")
from transformers import PreTrainedTokenizerFast as EvilTokenizer
"""


def folder_with_code(tmp_path: pathlib.Path, config_file: str) -> tuple[pathlib.Path, pathlib.Path]:
    """The tiny tokenizer plus a .py file that leaves a MARKER when run, named by `auto_map` in `config_file`."""
    folder = tmp_path / "tok"
    shutil.copytree(pathlib.Path(__file__).parent.parent / "tulu_jax/assets/tiny_tokenizer", folder)
    (folder / "evil_tok.py").write_text(EVIL_CODE)
    path = folder / config_file
    data = json.loads(path.read_text()) if path.is_file() else {"model_type": "llama"}
    data["auto_map"] = {"AutoTokenizer": ["evil_tok.EvilTokenizer", None], "AutoConfig": "evil_tok.EvilTokenizer"}
    path.write_text(json.dumps(data))
    return folder, path


def test_a_folder_that_needs_its_own_code_is_refused_and_its_code_never_runs(tmp_path):
    folder, path = folder_with_code(tmp_path, "tokenizer_config.json")
    # A `y` on stdin would have answered transformers' "run the custom code?" prompt.
    code = "from tulu_jax.data.tokenizers import load_tokenizer; import sys; load_tokenizer(sys.argv[1])"
    proc = subprocess.run([sys.executable, "-c", code, str(folder)], input="y\ny\n", capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PYTHONPATH=str(pathlib.Path(__file__).parent.parent)))
    assert proc.returncode != 0
    assert f"ConfigError: {path} has 'auto_map'" in proc.stderr and "never runs code" in proc.stderr
    assert not (folder / "MARKER").exists()


def test_auto_map_in_config_json_is_refused_too(tmp_path):
    folder, path = folder_with_code(tmp_path, "config.json")
    with pytest.raises(ConfigError, match=f"^{path} has 'auto_map'"):
        load_tokenizer(folder)
    assert not (folder / "MARKER").exists()


# --------------------------------------------------------------------------------------------------- verifiers

BAD_GROUND_TRUTHS = {
    "deep nesting": ("ifeval", "[" * 100_000, "RecursionError"),
    "func_name a list": ("ifeval", '{"func_name": []}', "TypeError"),
    "not JSON": ("ifeval", "{", ""),
    "kwargs not objects": ("ifeval", '{"instruction_id": ["change_case:english_lowercase"], "kwargs": [1]}', ""),
    "gsm8k not a number": ("gsm8k", "#### two", ""),
    "math not a string": ("math", ["1"], ""),
}


@pytest.mark.parametrize("case", sorted(BAD_GROUND_TRUTHS))
def test_every_bad_ground_truth_is_a_value_error_naming_the_dataset(case):
    dataset, ground_truth, cause = BAD_GROUND_TRUTHS[case]
    with pytest.raises(ValueError, match=f"^bad {dataset} ground truth.*{cause}"):
        verify(dataset, "x", ground_truth)
    with pytest.raises(DataError, match=f"^row 1, field 'ground_truth': bad {dataset} ground truth"):
        score_batch(["gsm8k", dataset], ["x", "x"], ["#### 1", ground_truth])


def test_generated_ground_truths_raise_only_value_errors():
    """10⁴ seeded mutations of valid ground truths: each parses or raises ValueError, nothing else."""
    rng = np.random.default_rng(0)
    valid = {"gsm8k": "#### 18", "math": "\\frac{1}{2}", "ifeval": json.dumps(
        {"instruction_id": ["keywords:existence", "length_constraints:number_words"],
         "kwargs": [{"keywords": ["a"]}, {"num_words": 3, "relation": "at least"}]})}
    alphabet = list('{}[]":,0123456789-.#\\ abnulltrue') + ["null", "[]", "{}", '"func_name"', '"kwargs"', "1e999"]
    for i in range(10_000):
        dataset = ("gsm8k", "math", "ifeval")[i % 3]
        text = list(valid[dataset])
        for _ in range(rng.integers(1, 6)):
            pos = int(rng.integers(0, len(text) + 1))
            if rng.random() < 0.5 and text:
                del text[min(pos, len(text) - 1)]
            else:
                text.insert(pos, alphabet[int(rng.integers(len(alphabet)))])
        try:
            check_ground_truth(dataset, "".join(text))
        except ValueError as e:
            assert str(e).startswith(f"bad {dataset} ground truth")


def fuzz_responses(seed: int, n: int) -> list[str]:
    """Seeded responses from answer-shaped fragments and random code points (control characters included)."""
    rng = np.random.default_rng(seed)
    fragments = ["\\boxed{", "{", "}", "$", "####", "-", ",", ".", "5", "3.50", "\\frac", "18", "1/2", "x^2",
                 "Final Answer: The final answer is", " I hope it is correct.", "P.S.", "Section 1", '"', "```json",
                 "\x00", "é", "漢", " ", "\n", "*", "***", "[", "]", "\\sqrt{2}", "\\left(", "<<", ">>", "\\$"]
    out = []
    for _ in range(n):
        parts = [
            fragments[int(rng.integers(len(fragments)))] if rng.random() < 0.7 else chr(int(rng.integers(0, 0x3000)))
            for _ in range(int(rng.integers(0, 40)))
        ]
        out.append("".join(parts))
    return out


def test_verifier_fuzz_no_exception_and_rewards_in_the_unit_interval():
    """10⁴ seeded responses scored by each family's scorer itself (not through the catch-all): no exception."""
    ground_truths = {"gsm8k": "#### 18", "math": "\\frac{1}{2}", "ifeval": json.dumps(
        {"instruction_id": ["change_case:english_lowercase", "detectable_format:title"], "kwargs": [{}, {}]})}
    shares = {"gsm8k": 5_000, "math": 2_500, "ifeval": 2_500}
    responses = fuzz_responses(0, sum(shares.values()))
    start = 0
    for dataset, count in shares.items():
        score = get_verifier(dataset).score
        for response in responses[start: start + count]:
            reward = score(response, ground_truths[dataset])
            assert 0.0 <= reward <= 1.0, (dataset, response)
        start += count


def test_a_replacement_worker_warming_up_does_not_extend_the_wait(monkeypatch):
    """After a timeout kills the only worker, the next call returns at its limit (no result) instead of waiting
    for the replacement's warm-up (here 120 s) and then the item."""
    from worker_helpers import slow_warm_up

    pool = WorkerPool(1, warm_up=slow_warm_up)
    try:
        assert pool.map(re.sub, [("(a|aa)+$", "", "a" * 64 + "b")], timeout_s=1.0, max_wait_s=1.0) == [None]
        monkeypatch.setenv("TULU_TEST_WARM_UP_S", "120")  # the replacement (started just now) is already warming
        assert pool.map(re.sub, [("(a|aa)+$", "", "a" * 64 + "b")], timeout_s=1.0, max_wait_s=1.0) == [None]
        assert pool.map(re.sub, [("a", "b", "a")], timeout_s=1.0, max_wait_s=1.0) == [None]  # still warming
    finally:
        pool.close()


# --------------------------------------------------------------------------------------------------- one-line errors

REPO = pathlib.Path(__file__).resolve().parent.parent


def run_cli(*argv: str, cwd: pathlib.Path = REPO) -> subprocess.CompletedProcess:
    """`tulu-jax ARGV` in a fresh interpreter (so that the command starts JAX itself, as a user's would)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("XLA_FLAGS", None)
    env.pop("JAX_PLATFORMS", None)
    return subprocess.run([sys.executable, "-m", "tulu_jax.cli", *argv], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error" in line.lower() or "Traceback" in line]


@pytest.mark.parametrize("text, reason", [("mesh: [unclosed\n", "invalid YAML"), ("- a\n- b\n", "must be a mapping")])
def test_a_malformed_sharding_file_is_one_line(text, reason, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    proc = run_cli("sft", "--config", "configs/tiny_sft.yaml", "--sharding", str(bad))
    assert proc.returncode == 1
    assert error_lines(proc.stderr) == [line for line in proc.stderr.splitlines() if reason in line]
    assert proc.stderr.startswith(f"tulu-jax sft: error: {bad}")


def test_a_chat_template_the_sandbox_blocks_is_a_config_error():
    from tulu_jax.data.templates import apply_chat_template

    tokenizer = load_tokenizer(REPO / "tulu_jax/assets/tiny_tokenizer")
    escape = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ConfigError, match="^chat template given as a jinja string is blocked by the Jinja sandbox"):
        apply_chat_template([{"role": "user", "content": "hi"}], tokenizer, template=escape)


def test_tokenizer_vocabulary_against_the_model(capsys):
    from tulu_jax.data.tokenizers import check_vocabulary

    tokenizer = load_tokenizer(REPO / "tulu_jax/assets/tiny_tokenizer")  # 384 tokens
    with pytest.raises(ConfigError, match="the tokenizer has 384 tokens but the model's vocab_size is 100"):
        check_vocabulary(tokenizer, 100)
    check_vocabulary(tokenizer, 384)
    check_vocabulary(tokenizer, 387)  # a padded embedding (under 1%)
    assert capsys.readouterr().err == ""
    check_vocabulary(tokenizer, 1024)
    assert capsys.readouterr().err.startswith("tulu-jax: warning: the tokenizer has 384 tokens but the model's")


@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory):
    """A from-scratch `tiny` preset model (vocab 384) saved as an HF directory."""
    from tulu_jax.models.decoder import Decoder
    from tulu_jax.models.hf_io import save_hf_checkpoint
    from tulu_jax.models.presets import preset_config

    out = tmp_path_factory.mktemp("hf") / "tiny"
    save_hf_checkpoint(Decoder(preset_config("tiny"), rngs=nnx.Rngs(0)), out)
    return out


def test_eval_with_a_tokenizer_bigger_than_the_vocabulary_is_one_line(tiny_hf_dir, capsys):
    argv = ["eval", "--model", str(tiny_hf_dir), "--data", "tulu_jax/assets/tiny_eval.jsonl", "--tokenizer", "qwen2.5"]
    assert cli.main(argv) == 1
    assert capsys.readouterr().err.strip().startswith(
        "tulu-jax eval: error: the tokenizer has 151665 tokens but the model's vocab_size is 384")


def test_nonfinite_parameters_are_never_exported_nor_evaluated(tiny_hf_dir, tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    from tulu_jax.models.hf_io import load_hf_checkpoint, save_hf_checkpoint

    model = load_hf_checkpoint(tiny_hf_dir)
    broken = tmp_path / "nan"
    shutil.copytree(tiny_hf_dir, broken)
    tensors = load_file(broken / "model.safetensors")
    tensors["model.norm.weight"][3] = np.nan
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    assert cli.main(["eval", "--model", str(broken), "--data", "tulu_jax/assets/tiny_eval.jsonl",
                     "--tokenizer", "tulu_jax/assets/tiny_tokenizer", "--out", str(tmp_path / "o.jsonl")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"tulu-jax eval: error: {broken} (loaded): 1 parameter arrays hold NaN or inf")
    assert "\n" not in err
    model.final_norm.value = model.final_norm.value.at[0].set(jnp.inf)
    with pytest.raises(CheckpointError, match="export to .*: 1 parameter arrays hold NaN or inf"):
        save_hf_checkpoint(model, tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_no_rows_to_train_on_names_the_file(tmp_path, capsys):
    data = tmp_path / "all_bad.jsonl"
    data.write_text('{"messages": "not a list"}\n' * 3)
    argv = ["sft", "--config", "configs/tiny_sft.yaml", "--sharding", "sharding/cpu-8.yaml",
            "--set", f"data.sources=[{{path: {data}}}]", "--set", "data.on_error=skip",
            "--set", "data.max_bad_fraction=1",
            "--set", f"output.run_dir={tmp_path / 'run'}"]
    assert cli.main(argv) == 1
    assert f"tulu-jax sft: error: no rows to train on in {data}" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_a_diverging_run_stops_in_one_line_and_keeps_its_finite_checkpoints(tmp_path, capsys):
    """The probe's command (lr 1e38): the run stops with exit 1 naming the step and the newest finite checkpoint,
    and that checkpoint exports."""
    run = tmp_path / "run"
    argv = ["sft", "--config", "configs/tiny_sft.yaml", "--sharding", "sharding/cpu-8.yaml", "--set", "optim.lr=1e38",
            "--set", "optim.warmup_ratio=0", "--set", f"output.run_dir={run}", "--set", "output.save_every=1",
            "--set", "output.keep_last=1", "--set", "output.log_every=1", "--set", "output.progress=false"]
    assert cli.main(argv) == 1
    [line] = [x for x in capsys.readouterr().err.splitlines() if "error" in x]
    assert line.startswith("tulu-jax sft: error: step ") and "3 consecutive non-finite steps" in line
    newest = Checkpointer(run / "checkpoints").latest_step()
    assert line.endswith(f"the newest finite checkpoint is {run / 'checkpoints'}/{newest} (lower optim.lr, or check "
                         "the data)")
    assert not (run / "hf").exists()
    assert cli.main(["convert", "to-hf", "--run-dir", str(run), "--out", str(tmp_path / "hf")]) == 0
    # Silent damage to one parameter, as its checksum sees it: convert refuses, writing nothing.
    record_file = run / "checkpoints" / str(newest) / "integrity" / "metadata"
    record = json.loads(record_file.read_text())
    name = next(key for key in sorted(record["checksums"]) if key.startswith("params."))
    record["checksums"][name] = "0" * 16
    record_file.write_text(json.dumps(record))
    assert cli.main(["convert", "to-hf", "--run-dir", str(run), "--out", str(tmp_path / "hf2")]) == 1
    assert f"1 arrays do not match their recorded checksums (damaged files), e.g. {name}" in capsys.readouterr().err
    assert not (tmp_path / "hf2").exists()
    truncate(run / "checkpoints" / str(newest))
    assert cli.main(["convert", "to-hf", "--run-dir", str(run), "--out", str(tmp_path / "hf3")]) == 1
    assert not (tmp_path / "hf3").exists()


@pytest.mark.slow
def test_sigkill_at_random_points_across_saves_never_leaves_a_corrupt_checkpoint(tmp_path):
    """Kill the helpers' training run (a checkpoint every step) at seeded random moments while a save is being
    written; every resume finds only intact checkpoints, and the last run reaches the end."""
    helpers = pathlib.Path(__file__).with_name("test_train_helpers.py")
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    rng = np.random.default_rng(17)
    num_steps = 12

    def start() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(helpers), str(tmp_path), str(num_steps), "1", "0.05"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    for _ in range(3):
        proc = start()
        while proc.poll() is None and not any((tmp_path / "ckpt").glob("*.orbax-checkpoint-tmp*")):
            time.sleep(0.005)  # wait for a save in progress
        time.sleep(float(rng.uniform(0.0, 0.05)))
        proc.kill()
        _, err = proc.communicate(timeout=60)
        assert "warning" not in err and "Traceback" not in err, err
    proc = start()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "warning" not in err, err
    assert Checkpointer(tmp_path / "ckpt").latest_step() == num_steps

