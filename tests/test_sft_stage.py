"""The SFT stage end to end: the loss against NumPy, packed = padded, exact gradient accumulation, sharded = one
device, checkpoints across meshes, kill/resume and SIGTERM through the CLI, the HF export against transformers,
and `tulu-jax convert` both ways.

Everything runs the bundled tiny data and tokenizer with the `tiny` preset (hidden 64, 2 layers)."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from tulu_jax import cli
from tulu_jax.data.batching import make_batches
from tulu_jax.data.tokenizers import load_tokenizer
from tulu_jax.models import Decoder, load_model
from tulu_jax.models.presets import preset_config
from tulu_jax.sharding import batch_sharding, load_sharding, make_mesh
from tulu_jax.stages.paths import resolve_path
from tulu_jax.stages.sections import ModelSection, OptimSection, SourceSection
from tulu_jax.stages.setup import abstract_stage_state, init_stage_state
from tulu_jax.stages.convert import read_model_config, restore_params
from tulu_jax.stages.sft import SFTDataSection, build_sft_step, prepare_sft_data, sft_denominators, sft_loss_fn
from tulu_jax.train import Checkpointer, Optimizer, shardings_of
from tulu_jax.train.batches import Batch

REPO = pathlib.Path(__file__).resolve().parent.parent
TINY_CONFIG = REPO / "configs" / "tiny_sft.yaml"
CPU8 = REPO / "sharding" / "cpu-8.yaml"
SEQ = 64
OPTIM = OptimSection(lr=1e-2, warmup_ratio=0.0)
# The CLI runs: 2 epochs of 240 rows in batches of 16 = 30 steps, a checkpoint every 3.
RUN_STEPS, SAVE_EVERY = 30, 3
RUN_OVERRIDES = [
    f"output.save_every={SAVE_EVERY}", "output.log_every=1", "output.progress=false", "output.keep_last=3",
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_path("tulu_jax/assets/tiny_tokenizer"))


@pytest.fixture(scope="module")
def rows(tokenizer):
    """16 tokenized rows of the bundled data, each at most SEQ tokens."""
    data = SFTDataSection(sources=[SourceSection(path="tulu_jax/assets/tiny_sft.jsonl", rows=16)], max_seq_len=SEQ)
    rows, report = prepare_sft_data(data, tokenizer, "tulu")
    assert report.kept == len(rows) == 16
    return rows


@pytest.fixture(scope="module")
def batches(rows):
    """The same 8 rows as a padded batch and as a packed one, of one shape [8, 3·SEQ] (one compilation)."""
    padded = make_batches(rows[:8], 3 * SEQ, 8, packed=False)
    packed = make_batches(rows[:8], 3 * SEQ, 8, packed=True)
    assert len(padded) == len(packed) == 1
    assert packed[0]["segment_ids"].max() > 1  # some sequences really hold several rows
    return padded[0], packed[0]


@pytest.fixture(scope="module")
def loss_and_grads():
    """A jitted (batch) -> ({reduction: (loss, aux, grads)}, logits), for the tiny model's seed-0 init."""
    graphdef, params, rest = nnx.split(_initial_state().model(), nnx.Param, ...)

    @jax.jit
    def fn(batch):
        def loss(p, reduction):
            typed = Batch.from_host(batch)
            return sft_loss_fn(reduction)(nnx.merge(graphdef, p, rest), typed, sft_denominators(typed))

        out = {r: jax.value_and_grad(loss, has_aux=True)(params, r) for r in ("sum", "mean")}
        model = nnx.merge(graphdef, params, rest)
        logits = model(batch["input_ids"], positions=batch["positions"], segment_ids=batch["segment_ids"])
        return {r: (loss, aux, grads) for r, ((loss, aux), grads) in out.items()}, logits

    return fn


def numpy_sft_loss(logits: np.ndarray, batch: dict[str, np.ndarray], reduction: str) -> float:
    """Σ −log softmax(logits)[target] over supervised targets / (sequences | supervised tokens), in float64."""
    x = logits.astype(np.float64)
    lse = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
    picked = np.take_along_axis(x, batch["targets"][..., None].astype(np.int64), axis=-1)[..., 0]
    nll = np.where(batch["loss_mask"], lse - picked, 0.0).sum()
    sequences = sum(int(row.max()) for row in batch["segment_ids"])
    return nll / (sequences if reduction == "sum" else batch["loss_mask"].sum())


def test_sft_loss_equals_numpy_recomputation(loss_and_grads, batches, rows):
    padded, _ = batches
    results, logits = loss_and_grads(padded)
    for reduction in ("sum", "mean"):
        loss, aux, _ = results[reduction]
        np.testing.assert_allclose(float(loss), numpy_sft_loss(np.asarray(logits), padded, reduction), rtol=1e-5)
        assert int(aux["supervised_tokens"]) == padded["loss_mask"].sum()
        assert int(aux["tokens"]) == sum(len(r["input_ids"]) for r in rows[:8])
    # the mask is the rows' labels, shifted onto the targets
    assert padded["loss_mask"].sum() == sum(int((r["labels"][1:] != -100).sum()) for r in rows[:8])


def test_packed_and_padded_batches_give_the_same_loss_and_gradients(loss_and_grads, batches):
    (padded, _), (packed, _) = (loss_and_grads(b) for b in batches)
    for reduction in ("sum", "mean"):
        (loss_a, _, grads_a), (loss_b, _, grads_b) = padded[reduction], packed[reduction]
        np.testing.assert_allclose(float(loss_a), float(loss_b), rtol=1e-5)
        for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(grads_a), jax.tree.leaves(grads_b), strict=True):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6,
                                       err_msg=f"{reduction} {path}")


def test_bf16_compute_with_float32_master_weights(loss_and_grads, batches):
    """model.compute_dtype bfloat16: the forward runs in bf16 on float32 masters, gradients come back float32."""
    padded, _ = batches
    master = _initial_state().model()
    _, params, rest = nnx.split(master, nnx.Param, ...)
    bf16_config = master.config.replace(compute_dtype="bfloat16")
    bf16_graphdef = nnx.graphdef(nnx.eval_shape(lambda: Decoder(bf16_config, rngs=nnx.Rngs(0))))

    @jax.jit
    def bf16_loss_and_grads(params):
        def loss(p):
            typed = Batch.from_host(padded)
            return sft_loss_fn("sum")(nnx.merge(bf16_graphdef, p, rest), typed, sft_denominators(typed))[0]

        return jax.value_and_grad(loss)(params)

    half, grads = bf16_loss_and_grads(params)
    full = loss_and_grads(padded)[0]["sum"][0]
    assert {x.dtype for x in jax.tree.leaves(params)} == {x.dtype for x in jax.tree.leaves(grads)} == {
        jnp.dtype(jnp.float32)}
    np.testing.assert_allclose(float(half), float(full), rtol=2e-2)  # bf16 rounding, not a different loss
    assert float(half) != float(full)  # the forward really ran in bfloat16


# ------------------------------------------------------------------------------------------- the real train step


def _mesh(name: str, mesh_shape: dict[str, int] | None = None):
    if name == "one":
        spec = load_sharding(REPO / "sharding" / "cpu-1.yaml")
        return spec, make_mesh(spec, devices=jax.devices()[:1])
    spec = load_sharding(CPU8)
    if mesh_shape is not None:
        spec = dataclasses.replace(spec, mesh=mesh_shape)
    return spec, make_mesh(spec)


# Plain SGD with learning rate 1 (no clipping): one step subtracts the gradient itself, so the parameters after
# the step expose the step's full-batch gradient exactly (Adam's first step, ±lr per entry, would hide it).
SGD = Optimizer(optax.sgd(1.0), lambda step: jnp.float32(1.0))
_CACHE: dict = {}


def _initial_state():
    """The seed-0 TrainState on the host, initialized once by the stage's own sharded init (one device)."""
    if "host" not in _CACHE:
        spec, mesh = _mesh("one")
        state = init_stage_state(ModelSection(preset="tiny"), preset_config("tiny"), SGD, mesh, spec, seed=0)
        _CACHE["host"] = jax.device_get(state)
    return _CACHE["host"]


def _placed(optimizer: Optimizer, mesh_name: str, mesh_shape: dict[str, int] | None = None):
    """The initial state placed (fresh buffers) in the shardings the stage gives it on that mesh."""
    spec, mesh = _mesh(mesh_name, mesh_shape)
    shardings = shardings_of(abstract_stage_state(preset_config("tiny"), optimizer, mesh, spec))
    return jax.device_put(_initial_state(), shardings), shardings, mesh, spec


def _one_step(mesh_name: str, reduction: str, accum: int, batch: dict[str, np.ndarray]):
    """(metrics, gradient) of one real SFT step from the seed-0 init; compiled steps are reused."""
    state, shardings, mesh, spec = _placed(SGD, mesh_name)
    key = (mesh_name, reduction, accum)
    if key not in _CACHE:
        _CACHE[key] = build_sft_step(state.graphdef, SGD, state_shardings=shardings,
                                     batch_sharding=batch_sharding(mesh, spec), reduction=reduction,
                                     grad_accum_steps=accum)
    state, metrics = _CACHE[key](state, Batch.from_host(batch))
    before = nnx.to_pure_dict(_initial_state().params)
    after = jax.device_get(nnx.to_pure_dict(state.params))
    return jax.device_get(metrics), jax.tree.map(lambda p0, p1: p0.astype(np.float64) - p1, before, after)


def _assert_same_step(a, b, rtol=1e-5):
    (metrics_a, grads_a), (metrics_b, grads_b) = a, b
    for key in ("loss", "grad_norm", "nll_sum", "supervised_tokens", "tokens"):
        np.testing.assert_allclose(metrics_a[key], metrics_b[key], rtol=rtol, err_msg=key)
    scale = max(np.abs(g).max() for g in jax.tree.leaves(grads_a))
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(grads_a), jax.tree.leaves(grads_b), strict=True):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=1e-6 * scale, err_msg=str(path))


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_accumulating_4_micro_batches_of_2_equals_one_batch_of_8(rows, reduction):
    batch = make_batches(rows[:8], SEQ, 8, packed=False)[0]
    whole = _one_step("one", reduction, 1, batch)
    _assert_same_step(whole, _one_step("one", reduction, 4, batch))
    # The gradient is the full batch's: the step's grad_norm is the norm of what it subtracted.
    norm = np.sqrt(sum(np.sum(g**2) for g in jax.tree.leaves(whole[1])))
    np.testing.assert_allclose(norm, whole[0]["grad_norm"], rtol=1e-4)


def test_mean_per_micro_batch_step_averages_the_micro_batch_token_means(rows, loss_and_grads):
    """The report's baseline: the step's loss is the mean over its 4 micro-batches (rows i, i+4) of their token means."""
    batch = make_batches(rows[:8], SEQ, 8, packed=False)[0]
    metrics, _ = _one_step("one", "mean_per_micro_batch", 4, batch)
    logits = np.asarray(loss_and_grads(batch)[1])
    means = [numpy_sft_loss(logits[i::4], {k: v[i::4] for k, v in batch.items()}, "mean") for i in range(4)]
    np.testing.assert_allclose(metrics["loss"], np.mean(means), rtol=1e-5)
    assert abs(np.mean(means) - numpy_sft_loss(logits, batch, "mean")) > 1e-4  # not the global token mean


def test_sharded_step_on_8_devices_equals_one_device(rows):
    batch = make_batches(rows[:8], SEQ, 8, packed=False)[0]
    _assert_same_step(_one_step("one", "sum", 1, batch), _one_step("eight", "sum", 1, batch))


def test_checkpoint_from_fsdp4_tensor2_restores_on_data2_fsdp4(tmp_path):
    optimizer = OPTIM.build(total_steps=10)  # AdamW: moments to save and restore
    config = preset_config("tiny")
    spec_a, mesh_a = _mesh("a", {"data": 1, "fsdp": 4, "tensor": 2})
    abstract_a = abstract_stage_state(config, optimizer, mesh_a, spec_a)
    rng = np.random.default_rng(0)
    opt_state = jax.tree.map(  # random moments and a count of 7, so that every part of the state is compared
        lambda x: rng.standard_normal(x.shape).astype(x.dtype) if np.issubdtype(x.dtype, np.floating)
        else np.full(x.shape, 7, x.dtype), abstract_a.opt_state)
    host = _initial_state()
    state = jax.device_put(
        abstract_a.replace(params=host.params, model_state=host.model_state, opt_state=opt_state,
                           step=np.int32(7), rng=host.rng),
        shardings_of(abstract_a),
    )
    assert state.params["layers"]["q_proj"][...].sharding.spec == PartitionSpec(None, "fsdp", "tensor", None)
    expected = jax.device_get((nnx.to_pure_dict(state.params), state.opt_state, state.step))
    checkpointer = Checkpointer(tmp_path / "ckpt")
    checkpointer.save(7, state, data_state={"next_index": 7}, force=True)
    checkpointer.wait()

    spec_b, mesh_b = _mesh("b", {"data": 2, "fsdp": 4, "tensor": 1})
    target = abstract_stage_state(config, optimizer, mesh_b, spec_b)
    restored = checkpointer.restore(target=target)
    checkpointer.close()
    assert restored.step == 7 and restored.data_state == {"next_index": 7}
    got = jax.device_get((nnx.to_pure_dict(restored.state.params), restored.state.opt_state, restored.state.step))
    for x, y in zip(jax.tree.leaves(expected), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(x, y)
    q_proj = restored.state.params["layers"]["q_proj"][...]
    assert q_proj.sharding.mesh.shape == {"data": 2, "fsdp": 4, "tensor": 1}
    assert q_proj.sharding.spec == target.params["layers"]["q_proj"].sharding.spec


# ------------------------------------------------------------------------------------------- through the CLI


def read_metrics(run_dir: pathlib.Path) -> dict[int, dict]:
    """step → metrics row; a step written twice (after a resume) keeps its later row."""
    rows = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[row["step"]] = row
    return rows


def sft_args(run_dir: pathlib.Path, *extra: str) -> list[str]:
    sets = [*RUN_OVERRIDES, f"output.run_dir={run_dir}", *extra]
    return ["sft", "--config", str(TINY_CONFIG), "--sharding", str(CPU8), *(a for s in sets for a in ("--set", s))]


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory):
    """A persistent compilation cache shared by this module's CLI runs: one compiles, the others reuse."""
    return tmp_path_factory.mktemp("jax_cache")


def start_cli(run_dir: pathlib.Path, cache: pathlib.Path, *extra: str, resume: bool = False) -> subprocess.Popen:
    """`tulu-jax sft` (the console script's entry point) on the tiny config, in a subprocess."""
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    cmd = [sys.executable, "-m", "tulu_jax.cli", *sft_args(run_dir, *extra), *(["--resume"] if resume else [])]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, jax_cache):
    """The uninterrupted tiny run (with the final HF export); returns its run dir."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    proc = start_cli(run_dir, jax_cache)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "tokenized 240 rows: 240 kept" in err and "exported the trained model to" in err
    return run_dir


def checkpoint_steps(run_dir: pathlib.Path) -> list[int]:
    ckpt = run_dir / "checkpoints"
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.is_dir() else []


def wait_for_checkpoint(run_dir: pathlib.Path, after: int, proc: subprocess.Popen, timeout: float = 150) -> int:
    """Poll until a finalized checkpoint newer than `after` exists (orbax renames finished ones into place)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = checkpoint_steps(run_dir)
        if steps and steps[-1] > after:
            return steps[-1]
        if proc.poll() is not None:
            pytest.fail(f"tulu-jax sft exited early ({proc.returncode}): {proc.stderr.read()}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail("no new checkpoint in time")


@pytest.mark.slow
def test_sigterm_then_sigkill_then_resume_reproduces_the_uninterrupted_run(reference_run, jax_cache, tmp_path):
    run_dir, cache, no_export = tmp_path / "run", jax_cache, "output.export_hf=false"

    # SIGTERM once a checkpoint exists: the step finishes, a checkpoint is written, exit status 0.
    proc = start_cli(run_dir, cache, no_export)
    wait_for_checkpoint(run_dir, 0, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "SIGTERM received; saved checkpoint step" in err
    after_sigterm = checkpoint_steps(run_dir)[-1]
    assert after_sigterm < RUN_STEPS, "the run ended before SIGTERM arrived"

    # Resume, then SIGKILL once a newer checkpoint exists: nothing gets to clean up.
    proc = start_cli(run_dir, cache, no_export, resume=True)
    killed_after = wait_for_checkpoint(run_dir, after_sigterm, proc)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert f"resumed from checkpoint step {after_sigterm}" in err

    # The same command again finishes the run.
    proc = start_cli(run_dir, cache, no_export, resume=True)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "resumed from checkpoint step" in err and checkpoint_steps(run_dir)[-1] == RUN_STEPS

    resumed, reference = read_metrics(run_dir), read_metrics(reference_run)
    assert sorted(resumed) == sorted(reference) == list(range(1, RUN_STEPS + 1))
    assert killed_after < RUN_STEPS
    for step in range(1, RUN_STEPS + 1):
        for key in ("loss", "grad_norm", "lr"):
            np.testing.assert_allclose(resumed[step][key], reference[step][key], rtol=1e-6, err_msg=f"{key} {step}")


def test_run_dir_holds_config_metrics_and_data_report(reference_run):
    metrics = read_metrics(reference_run)
    assert sorted(metrics) == list(range(1, RUN_STEPS + 1))
    first, last = metrics[1], metrics[RUN_STEPS]
    for key in ("loss", "lr", "grad_norm", "supervised_tokens", "tokens", "tokens_per_s"):
        assert np.isfinite(first[key]) and np.isfinite(last[key]), key
    early = np.mean([metrics[s]["loss"] for s in range(1, 4)])
    late = np.mean([metrics[s]["loss"] for s in range(RUN_STEPS - 4, RUN_STEPS + 1)])
    assert late < 0.6 * early  # the toy model learns
    for row in metrics.values():  # the recipe's loss sums over the batch's 16 padded sequences; this is per token
        assert row["loss_per_token"] == pytest.approx(row["loss"] * 16 / row["supervised_tokens"], rel=1e-5)
    assert list((reference_run / "tensorboard").glob("events.out.tfevents.*"))  # output.tensorboard: true
    report = json.loads((reference_run / "data_report.json").read_text())
    assert report["rows"] == 240 and report["kept"] + report["no_supervised_tokens"] == 240
    assert report["truncated"] > 0  # max_seq_len 128 cuts the longest rows
    saved = (reference_run / "config.yaml").read_text()
    assert "run_dir: " + str(reference_run) in saved and "save_every: 3" in saved


def test_a_rerun_in_the_run_dir_is_refused_unless_resumed_with_the_same_config(reference_run, capsys):
    saved = (reference_run / "config.yaml").read_text()
    assert cli.main(sft_args(reference_run)) == 1
    err = capsys.readouterr().err
    assert f"{reference_run} already holds a run (a checkpoint at step {RUN_STEPS}): pass --resume" in err
    assert cli.main([*sft_args(reference_run, "optim.lr=1e-3"), "--resume"]) == 1
    err = capsys.readouterr().err
    assert "--resume: the config differs" in err and "optim.lr: " in err and "→ 0.001" in err
    assert (reference_run / "config.yaml").read_text() == saved


def test_hf_export_loads_in_transformers_and_reproduces_our_logits(reference_run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_dir = reference_run / "hf"
    ours = restore_params(reference_run / "checkpoints" / str(RUN_STEPS) / "state", read_model_config(reference_run))
    theirs = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    text = tok.apply_chat_template([{"role": "user", "content": "Ann has 3 pens, gets 4 more. How many?"}],
                                   tokenize=False, add_generation_prompt=True)
    ids = np.asarray([tok(text, add_special_tokens=False)["input_ids"]], dtype=np.int32)
    with torch.no_grad():
        expected = theirs(torch.from_numpy(ids).long()).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(ids))), expected, atol=2e-4, rtol=1e-4)


def test_convert_checkpoint_to_hf_and_hf_to_orbax(reference_run, tmp_path, capsys):
    # A run checkpoint → HF directory: the final step's weights equal the run's own final export.
    out = tmp_path / "hf"
    assert cli.main(["convert", "to-hf", "--run-dir", str(reference_run), "--out", str(out)]) == 0
    exported, converted = load_model(reference_run / "hf"), load_model(out)
    for x, y in zip(jax.tree.leaves(nnx.state(exported)), jax.tree.leaves(nnx.state(converted)), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert (out / "tokenizer.json").is_file()

    # An earlier step differs; HF → orbax params → back gives the HF weights.
    early = tmp_path / "hf_early"
    assert cli.main(["convert", "to-hf", "--run-dir", str(reference_run), "--out", str(early),
                     "--step", str(RUN_STEPS - SAVE_EVERY)]) == 0
    orbax_dir = tmp_path / "orbax"
    assert cli.main(["convert", "to-orbax", "--hf", str(early), "--out", str(orbax_dir)]) == 0
    roundtrip = restore_params(orbax_dir / "params", read_model_config(orbax_dir))
    early_model = load_model(early)
    leaves = zip(jax.tree.leaves(nnx.state(early_model)), jax.tree.leaves(nnx.state(roundtrip)), strict=True)
    for x, y in leaves:
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert not np.array_equal(np.asarray(early_model.embed[...]), np.asarray(exported.embed[...]))

    # Into a non-empty directory only with --overwrite, which first removes the weight files an export left there.
    argv = ["convert", "to-hf", "--run-dir", str(reference_run), "--out", str(out), "--step", str(RUN_STEPS - SAVE_EVERY)]
    assert cli.main(argv) == 1
    assert f"--out {out} is not empty: choose a new or empty directory, or pass --overwrite" in capsys.readouterr().err
    stale = [out / "model-00002-of-00002.safetensors", out / "model.safetensors.index.json"]
    for path in stale:
        path.write_text("{}")
    assert cli.main([*argv, "--overwrite"]) == 0
    assert not any(path.exists() for path in stale)
    for x, y in zip(jax.tree.leaves(nnx.state(early_model)), jax.tree.leaves(nnx.state(load_model(out))), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_convert_errors_name_the_problem(reference_run, tmp_path, capsys):
    assert cli.main(["convert", "to-hf", "--run-dir", str(tmp_path), "--out", str(tmp_path / "x")]) == 1
    assert "model_config.json: not found" in capsys.readouterr().err
    assert cli.main(["convert", "to-hf", "--run-dir", str(reference_run), "--out", str(tmp_path / "y"),
                     "--step", "4"]) == 1
    assert "no checkpoint for step 4" in capsys.readouterr().err
