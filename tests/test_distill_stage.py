"""The distillation stage and its offline targets: teacher parameters are arguments of the compiled step (no
parameter-sized constant in the lowered program), the sharded (8 CPU devices, accumulation, chunked logits) step
equals the one-device step, online = offline when the stored targets are top-K with K = vocabulary, the targets
round-trip against a direct teacher pass and a resumed run writes only missing shards, vocabulary mismatches fail
early, on-policy rows are prompt + the student's own sample, and `tulu-jax distill` runs end to end (resume, export).

Tiny models only: the `tiny` preset teacher (hidden 64, 2 layers) and a hidden-32, 1-layer student, on the bundled
chat data (rows cut by `data.sources[].rows`).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tulu_jax.data.distill_targets import TargetRows, distilled_positions, shard_path
from tulu_jax.data.tokenizers import load_tokenizer
from tulu_jax.errors import ConfigError
from tulu_jax.sharding import load_sharding, make_mesh
from tulu_jax.stages.distill import STAGE, DistillConfig
from tulu_jax.stages.distill_on_policy import prompts_of, student_rows
from tulu_jax.stages.distill_targets import write_targets
from tulu_jax.stages.sections import load_stage_config
from tulu_jax.stages.teacher import TEACHER

REPO = pathlib.Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "tiny_distill.yaml"
TOKENIZER = REPO / "tulu_jax" / "assets" / "tiny_tokenizer"
VOCAB = 384  # the tiny preset's vocabulary
BASE = ("data.max_seq_len=64", "train.global_batch_size=8", "distill.logits_chunk=0", "output.progress=false",
        "data.sources=[{path: tulu_jax/assets/tiny_sft.jsonl, rows: 24}]")


def _config(*overrides: str) -> DistillConfig:
    return load_stage_config(DistillConfig, CONFIG, (*BASE, *overrides))


@pytest.fixture(scope="module")
def meshes() -> dict[str, tuple]:
    out = {}
    for name in ("cpu-1", "cpu-8"):
        spec = load_sharding(REPO / "sharding" / f"{name}.yaml")
        out[name] = (spec, make_mesh(spec, jax.devices()[: 1 if name == "cpu-1" else 8]))
    return out


def _first_batch(setup):
    batches, prepare = STAGE.batches(setup)
    return next(batches), prepare


def _step_once(setup, host):
    """(metrics, params) after one step on `host`; the setup's state is donated, so run a copy."""
    step = STAGE.build_step(setup)
    _, prepare = STAGE.batches(setup)
    state = jax.tree.map(jnp.copy, setup.state)
    state, metrics = step(state, prepare(host), setup.frozen)
    return jax.device_get(metrics), jax.device_get(state.params)


def test_teacher_parameters_are_arguments_not_constants(meshes):
    setup = STAGE.setup(_config(), meshes["cpu-8"])
    step = STAGE.build_step(setup)
    lowered = step.lower(setup.state, STAGE.abstract_batch(setup), setup.frozen)
    teacher_leaves = jax.tree.leaves(setup.frozen[TEACHER].params)
    smallest_matrix = min(x.size for x in teacher_leaves if x.ndim >= 2)
    shapes = re.findall(r"stablehlo\.constant dense<[^>]*> : tensor<([0-9x]+)x", lowered.as_text())
    assert max((int(np.prod([int(d) for d in s.split("x")])) for s in shapes), default=0) < smallest_matrix
    # Every teacher array is one of the program's arguments (frozen is the third argument).
    assert len(jax.tree.leaves(lowered.args_info[0][2])) == len(jax.tree.leaves(setup.frozen))


def test_sharded_step_equals_one_device_step(meshes):
    jsd = ("distill.divergence=generalized_jsd", "distill.beta=0.3", "distill.temperature=2.0")
    one = STAGE.setup(_config(*jsd), meshes["cpu-1"])
    eight = STAGE.setup(_config(*jsd, "train.grad_accum_steps=2", "distill.logits_chunk=16"), meshes["cpu-8"])
    host, _ = _first_batch(one)
    m1, p1 = _step_once(one, host)
    m8, p8 = _step_once(eight, host)
    assert m1["tokens"] > 0 and np.isfinite(m1["loss"])
    for key in ("loss", "forward_kl", "grad_norm"):
        np.testing.assert_allclose(m8[key], m1[key], rtol=2e-5, err_msg=key)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), p8, p1)


def test_online_equals_offline_with_full_vocabulary_targets(meshes, tmp_path):
    targets = (f"distill.targets.path={tmp_path}", f"distill.targets.k={VOCAB}", "distill.targets.rows_per_shard=10")
    counts = write_targets(_config(*targets), REPO / "sharding" / "cpu-8.yaml", devices=jax.devices())
    assert counts == {"written": 3, "skipped": 0}
    online = STAGE.setup(_config(*targets), meshes["cpu-8"])
    offline = STAGE.setup(_config(*targets, "distill.mode=offline"), meshes["cpu-8"])
    assert offline.frozen is None
    host_on, _ = _first_batch(online)
    host_off, _ = _first_batch(offline)
    for key in ("input_ids", "loss_mask", "segment_ids"):
        np.testing.assert_array_equal(host_off[key], host_on[key])
    m_on, p_on = _step_once(online, host_on)
    m_off, p_off = _step_once(offline, host_off)
    # float16 probabilities on disk: equal to ~1e-4 relative.
    np.testing.assert_allclose(m_off["loss"], m_on["loss"], rtol=2e-4)
    np.testing.assert_allclose(m_off["teacher_mass"], 1.0, atol=2e-3)
    np.testing.assert_allclose(m_off["grad_norm"], m_on["grad_norm"], rtol=5e-3)


def test_targets_round_trip_and_resume(tmp_path):
    config = _config(f"distill.targets.path={tmp_path}", "distill.targets.k=8", "distill.targets.rows_per_shard=10",
                     "distill.targets.batch_size=8")
    sharding = REPO / "sharding" / "cpu-8.yaml"
    assert write_targets(config, sharding, devices=jax.devices()) == {"written": 3, "skipped": 0}
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert (manifest["k"], manifest["mode"], manifest["rows_per_shard"], manifest["num_rows"]) == (8, "top_k", 10, 24)
    rows = TargetRows(tmp_path)

    # Direct teacher pass, one row at a time, unpadded.
    spec = load_sharding(REPO / "sharding" / "cpu-1.yaml")
    setup = STAGE.setup(config, (spec, make_mesh(spec, jax.devices()[:1])))
    teacher = setup.frozen[TEACHER].model()
    for i in (0, 13, 23):
        row = rows[i]
        logits = teacher(jnp.asarray(row["input_ids"])[None])[0]
        probs = np.asarray(jax.nn.softmax(logits, axis=-1))[distilled_positions(row["labels"])]
        order = np.argsort(-probs, axis=-1, kind="stable")[:, :8]
        np.testing.assert_array_equal(row["teacher_ids"], order)
        np.testing.assert_allclose(row["teacher_probs"], np.take_along_axis(probs, order, -1), rtol=1e-3)
        assert row["teacher_ids"].dtype == np.int32 and row["teacher_probs"].dtype == np.float16

    before = {i: shard_path(tmp_path, i).stat().st_mtime_ns for i in range(3)}
    kept = dict(np.load(shard_path(tmp_path, 1)))
    shard_path(tmp_path, 1).unlink()
    assert write_targets(config, sharding, devices=jax.devices()) == {"written": 1, "skipped": 2}
    for i in (0, 2):
        assert shard_path(tmp_path, i).stat().st_mtime_ns == before[i]
    again = dict(np.load(shard_path(tmp_path, 1)))
    for key, value in kept.items():
        np.testing.assert_array_equal(again[key], value)
    assert not list(tmp_path.glob(".*tmp*"))
    with pytest.raises(ConfigError, match="k=8"):
        write_targets(_config(f"distill.targets.path={tmp_path}", "distill.targets.k=16",
                              "distill.targets.rows_per_shard=10"), sharding, devices=jax.devices())


def test_vocabulary_mismatch_is_one_clear_error(meshes, tmp_path):
    with pytest.raises(ConfigError, match="vocabulary has 384 entries and the teacher's 512"):
        STAGE.setup(_config("distill.teacher.overrides={vocab_size: 512}"), meshes["cpu-1"])
    other = load_tokenizer(TOKENIZER)
    other.add_tokens(["<extra-token>"])
    other.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="number tokens differently"):
        STAGE.setup(_config(f"distill.teacher_tokenizer={tmp_path}"), meshes["cpu-1"])


def test_on_policy_rows_are_prompt_plus_sample():
    host = {"input_ids": np.array([[5, 6, 7, 8, 9, 0], [0] * 6], np.int32),
            "loss_mask": np.array([[0, 0, 1, 1, 0, 0], [0] * 6], bool)}
    prompts = prompts_of(host)
    np.testing.assert_array_equal(prompts[0], [5, 6, 7])  # the token before the first supervised target included
    assert prompts[1] is None
    sequences = student_rows(prompts, np.array([[20, 21, 2, 0], [0, 0, 0, 0]]), np.array([3, 1]), seq_len=5)
    ids, labels = sequences[0][0]
    np.testing.assert_array_equal(ids, [5, 6, 7, 20, 21])  # cut to seq_len
    np.testing.assert_array_equal(labels, [-100, -100, -100, 20, 21])
    assert sequences[1] == []


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tulu_jax.cli", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=900)


@pytest.mark.slow
def test_cli_on_policy_run_resumes_and_exports(tmp_path):
    run_dir = tmp_path / "run"
    common = ("distill", "--config", str(CONFIG), "--sharding", "sharding/cpu-8.yaml",
              *(f for s in (*BASE, "distill.mode=on_policy", "distill.lambda_on_policy=1.0",
                            "distill.max_new_tokens=8", f"output.run_dir={run_dir}", "output.save_every=1")
                for f in ("--set", s)))
    first = _cli(*common, "--set", "train.max_steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    second = _cli(*common, "--set", "train.max_steps=3", "--resume")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from checkpoint step 2" in second.stderr
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(m["on_policy"] == 1.0 and np.isfinite(m["loss"]) and m["tokens"] > 0 for m in metrics)
    assert (run_dir / "hf" / "config.json").is_file()
    bad = _cli(*common, "--set", "distill.teacher.overrides={vocab_size: 512}", "--set", f"output.run_dir={tmp_path}/b")
    assert bad.returncode == 1 and "512" in bad.stderr and "Traceback" not in bad.stderr


def test_sampled_targets_are_distinct_ids_drawn_by_teacher_probability():
    from tulu_jax.stages.distill_targets import sparse_targets

    logits = jax.random.normal(jax.random.key(0), (2, 3, 50)) * 2.0
    p = np.asarray(jax.nn.softmax(logits, axis=-1))
    ids, probs = sparse_targets(logits, 10, "sampled", jax.random.key(1))
    ids = np.asarray(ids)
    assert all(len(set(row)) == 10 for row in ids.reshape(-1, 10))
    np.testing.assert_allclose(np.asarray(probs, np.float32), np.take_along_axis(p, ids, -1), rtol=1e-3)
    # K = 1 is one Gumbel-max draw: each id's frequency over many keys is its teacher probability.
    draws = jax.vmap(lambda key: sparse_targets(logits[0, 0], 1, "sampled", key)[0][0])(
        jax.random.split(jax.random.key(2), 20000))
    frequency = np.bincount(np.asarray(draws), minlength=50) / 20000
    np.testing.assert_allclose(frequency, p[0, 0], atol=4 * np.sqrt(p[0, 0].max() / 20000) + 1e-3)


def test_text_format_distils_every_token(meshes, tmp_path):
    texts = ["the cat sat on the mat", "two plus three is five", "a b c d e f g"]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    setup = STAGE.setup(_config("data.format=text", f"data.sources=[{{path: {tmp_path / 'docs.jsonl'}}}]",
                                "train.global_batch_size=4"), meshes["cpu-1"])
    host, _ = _first_batch(setup)
    lengths = (host["segment_ids"] > 0).sum(axis=1)
    # Every position but each document's last (whose next token is outside it) is distilled.
    np.testing.assert_array_equal(host["loss_mask"].sum(axis=1), np.maximum(lengths - 1, 0))
    metrics, _ = _step_once(setup, host)
    assert metrics["tokens"] == host["loss_mask"].sum()
