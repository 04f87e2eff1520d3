"""The DPO stage: the loss against a NumPy per-pair recomputation, concat vs two forwards, sharded = one device,
exact gradient accumulation, learning on the toy preferences, the reference cache's fingerprint (reuse and refusal),
cached = live reference step for step, SIGTERM + resume through the CLI, and the AOT step for a TPU topology.

Everything runs the bundled tiny preference data and tokenizer with the `tiny` preset (hidden 64, 2 layers).
Compiled functions are built once per module and reused.
"""

from __future__ import annotations

import dataclasses
import importlib.util
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
import pytest
from flax import nnx

from tulu_jax import cli
from tulu_jax.data.preference import load_preference_pairs
from tulu_jax.data.preference_batching import PairLogps, make_pair_batches
from tulu_jax.data.rows import Source
from tulu_jax.data.tokenizers import load_tokenizer
from tulu_jax.errors import CheckpointError, ConfigError
from tulu_jax.models.presets import preset_config
from tulu_jax.sharding import load_sharding
from tulu_jax.stages.paths import resolve_path
from tulu_jax.stages.sections import ModelSection, OptimSection
from tulu_jax.stages.setup import init_stage_state
from tulu_jax.stages.dpo import (
    DPOConfig,
    DPOSection,
    STAGE,
    build_dpo_step,
    dpo_loss_fn,
    pair_denominators,
)
from tulu_jax.stages.reference import (
    CACHE_ARRAYS,
    CACHE_FINGERPRINT,
    build_reference_fn,
    compute_reference_logps,
    data_fingerprint,
    load_reference_cache,
    params_fingerprint,
    save_reference_cache,
)
from tulu_jax.train import shardings_of
from tulu_jax.train.batches import PairBatch

from stage_cache import StageCache

REPO = pathlib.Path(__file__).resolve().parent.parent
TINY_CONFIG = REPO / "configs" / "tiny_dpo.yaml"
CPU8 = REPO / "sharding" / "cpu-8.yaml"
SEQ = 72  # the longest toy pair has 66 tokens per side
PAIRS_PER_BATCH = 8
LEARN_STEPS = 30
OPT = OptimSection(lr=3e-3, warmup_ratio=0.0).build(total_steps=LEARN_STEPS)
NORM = DPOSection()  # the recipe: dpo_norm, β = 5


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_path("tulu_jax/assets/tiny_tokenizer"))


@pytest.fixture(scope="module")
def pairs(tokenizer):
    pairs, stats = load_preference_pairs(
        [Source(str(resolve_path("tulu_jax/assets/tiny_preferences.jsonl")))], tokenizer, max_seq_len=SEQ,
        shuffle=False,
    )
    assert stats.kept == len(pairs) == 128 and stats.truncated == 0
    return pairs


@pytest.fixture(scope="module")
def model():
    """The seed-0 tiny model (from the sharded init on one device: cheaper than an eager init)."""
    return initial_state("one").model()


STAGE_CACHE = StageCache(
    lambda spec, m: init_stage_state(ModelSection(preset="tiny"), preset_config("tiny"), OPT, m, spec, seed=0),
    lambda state, spec, m, accum: build_dpo_step(
        state.graphdef, OPT, NORM, state_shardings=shardings_of(state),
        batch_shardings=PairBatch.shardings(m, spec, reference=True), grad_accum_steps=accum,
    ),
)
initial_state, dpo_step = STAGE_CACHE.initial_state, STAGE_CACHE.step


_REFERENCE_FNS: dict = {}


def score(params, model_state, graphdef, pairs) -> PairLogps:
    """Averaged sequence log-probs of every pair under `params` (the no-grad reference pass, one device)."""
    if "fn" not in _REFERENCE_FNS:
        _REFERENCE_FNS["fn"] = build_reference_fn(graphdef, average=True, concat_forward=True)
    batches = make_pair_batches(pairs, SEQ, 64)
    return compute_reference_logps(_REFERENCE_FNS["fn"], params, model_state, batches, len(pairs))


def first(table: PairLogps, n: int) -> PairLogps:
    """The reference table of the first n pairs."""
    return PairLogps(table.chosen[:n], table.rejected[:n])


@pytest.fixture(scope="module")
def reference(pairs) -> PairLogps:
    state = initial_state("one")
    return score(state.params, state.model_state, state.graphdef, pairs)


# ------------------------------------------------------------------------------------------------ the loss


def numpy_sequence_logps(model, pairs, side: str, average: bool) -> np.ndarray:
    """log p of each conversation's response tokens, in float64, from a forward of the unpacked conversations
    (HF-style attention mask, not the batch's segment ids) and a NumPy log-softmax."""
    ids = [p[f"{side}_input_ids"] for p in pairs]
    padded, attention_mask = np.zeros((len(ids), SEQ), np.int32), np.zeros((len(ids), SEQ), np.int32)
    for row, seq in enumerate(ids):
        padded[row, : len(seq)], attention_mask[row, : len(seq)] = seq, 1
    logits = np.asarray(forward_with_attention_mask(model, padded, attention_mask), np.float64)
    out = []
    for row, (seq, pair) in enumerate(zip(ids, pairs, strict=True)):
        x = logits[row, : len(seq) - 1]
        logp = x - x.max(-1, keepdims=True)
        logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
        mask = pair[f"{side}_labels"][1:] != -100
        picked = logp[np.arange(len(seq) - 1), seq[1:]]
        out.append(picked[mask].sum() / (mask.sum() if average else 1))
    return np.asarray(out)


@nnx.jit
def forward_with_attention_mask(model, ids, attention_mask):
    return model(ids, attention_mask)


def value_and_grads(model, batch, dpo: DPOSection):
    """(loss, aux) and the parameter gradients of the DPO loss on one batch (plain jax.grad, outside the step)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    loss_fn = dpo_loss_fn(dpo)

    @jax.jit
    def run(p, b):
        return jax.value_and_grad(lambda q: loss_fn(nnx.merge(graphdef, q, rest), b, pair_denominators(b)),
                                  has_aux=True)(p)

    return run(params, PairBatch.from_host(batch))


def toy_reference(n: int, average: bool) -> PairLogps:
    """Reference values that differ from the policy's, so that the losses are not all log 2."""
    chosen = np.linspace(-7, -5, n).astype(np.float32) * (1 if average else 20)
    return PairLogps(chosen, chosen[::-1].copy())


def numpy_dpo(model, pairs, reference: PairLogps, dpo: DPOSection) -> dict[str, float]:
    average = dpo.loss_type == "dpo_norm"
    pc, pr = (numpy_sequence_logps(model, pairs, side, average) for side in ("chosen", "rejected"))
    rewards_c, rewards_r = dpo.beta * (pc - reference.chosen), dpo.beta * (pr - reference.rejected)
    return {
        "loss": np.mean(np.logaddexp(0.0, -(rewards_c - rewards_r))),  # −log σ(z)
        "chosen_reward": rewards_c.mean(),
        "reward_margin": (rewards_c - rewards_r).mean(),
        "reward_accuracy": np.mean(rewards_c > rewards_r),
    }


@pytest.fixture(scope="module")
def concat_loss_and_grads(model, pairs):
    """6 pairs + 2 padding pairs, dpo_norm with one concatenated forward."""
    batch = make_pair_batches(pairs[:6], SEQ, PAIRS_PER_BATCH, reference=toy_reference(6, True))[0]
    return batch, value_and_grads(model, batch, NORM)


def assert_matches_numpy(loss, aux, expected, pairs):
    np.testing.assert_allclose(float(loss), expected["loss"], rtol=1e-5)
    for key in ("chosen_reward", "reward_margin"):
        np.testing.assert_allclose(float(aux[key]), expected[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert float(aux["reward_accuracy"]) == expected["reward_accuracy"]
    assert int(aux["pairs"]) == len(pairs)
    assert int(aux["tokens"]) == sum(len(p[f"{s}_input_ids"]) for p in pairs for s in ("chosen", "rejected"))


def test_dpo_norm_loss_equals_numpy_recomputation_per_pair(model, pairs, concat_loss_and_grads):
    _, ((loss, aux), _) = concat_loss_and_grads
    assert_matches_numpy(loss, aux, numpy_dpo(model, pairs[:6], toy_reference(6, True), NORM), pairs[:6])


def test_summed_dpo_loss_equals_numpy_recomputation_per_pair(model, pairs):
    dpo = DPOSection(loss_type="dpo", beta=0.1)
    batch = make_pair_batches(pairs[:6], SEQ, PAIRS_PER_BATCH, reference=toy_reference(6, False))[0]
    loss, aux = nnx.jit(lambda m, b: dpo_loss_fn(dpo)(m, b, pair_denominators(b)))(model, PairBatch.from_host(batch))
    assert_matches_numpy(loss, aux, numpy_dpo(model, pairs[:6], toy_reference(6, False), dpo), pairs[:6])


def test_concat_forward_and_two_forwards_give_the_same_loss_and_gradients(model, concat_loss_and_grads):
    batch, ((loss_a, _), grads_a) = concat_loss_and_grads
    (loss_b, _), grads_b = value_and_grads(model, batch, dataclasses.replace(NORM, concat_forward=False))
    np.testing.assert_allclose(float(loss_a), float(loss_b), rtol=1e-6)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads_a), jax.tree.leaves(grads_b), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4 * np.abs(b).max(), err_msg=str(path))
        assert np.abs(b).max() > 0, path


# ------------------------------------------------------------------------------------------- the real train step


def run_steps(mesh_name: str, accum: int, batches):
    state, history = initial_state(mesh_name), []
    step = dpo_step(mesh_name, accum)
    for batch in batches:
        state, metrics = step(state, PairBatch.from_host(batch))
        history.append(jax.device_get(metrics))
    return history, jax.device_get(nnx.to_pure_dict(state.params))


def assert_same_run(a, b, rtol=1e-5):
    """Every step's metrics to rtol; the final parameters to rtol with atol 1e-5 (Adam divides each gradient
    element by its own magnitude, so an element whose gradient is ~0 turns reduction-order noise into up to
    ~1e-5 of parameter change over 3 steps at lr 3e-3; a real difference would move them by ~lr)."""
    (history_a, params_a), (history_b, params_b) = a, b
    for m_a, m_b in zip(history_a, history_b, strict=True):
        for key in ("loss", "grad_norm", "chosen_reward", "rejected_reward", "reward_margin", "reward_accuracy",
                    "pairs", "tokens"):
            np.testing.assert_allclose(m_a[key], m_b[key], rtol=rtol, atol=1e-6, err_msg=key)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(params_a), jax.tree.leaves(params_b), strict=True):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=1e-5, err_msg=str(path))


@pytest.fixture(scope="module")
def three_batches(pairs, reference):
    """Batches of 8 pairs; the third holds 5 real pairs and 3 padding pairs."""
    return make_pair_batches(pairs[:21], SEQ, PAIRS_PER_BATCH, reference=first(reference, 21))


@pytest.fixture(scope="module")
def one_device_run(three_batches):
    return run_steps("one", 1, three_batches)


def test_sharded_step_with_2_micro_batches_on_8_devices_equals_one_device(one_device_run, three_batches):
    """data × fsdp × tensor = 2 × 2 × 2 devices, each batch split into 2 micro-batches of 4 pairs (one per batch
    shard), against the whole batch on one device: both the sharding and the exact accumulation."""
    assert_same_run(one_device_run, run_steps("eight", 2, three_batches))
    assert [int(m["pairs"]) for m in one_device_run[0]] == [8, 8, 5]


@pytest.mark.slow
def test_thirty_steps_raise_preference_accuracy_and_margin(pairs, reference):
    """From the seed-0 tiny model, 30 steps of 8 pairs over the first 32 toy pairs (correct vs wrong final answer),
    dpo_norm β 5: the policy comes to prefer every chosen response over its rejected one."""
    learned, table = pairs[:32], first(reference, 32)
    batches = make_pair_batches(learned, SEQ, PAIRS_PER_BATCH, reference=table)
    state, step = initial_state("one"), dpo_step("one", 1)
    history = []
    for i in range(LEARN_STEPS):
        state, metrics = step(state, PairBatch.from_host(batches[i % len(batches)]))
        history.append(jax.device_get(metrics))
    # Before training the policy is the reference: every margin is 0 (up to float noise between the two passes).
    assert abs(history[0]["reward_margin"]) < 1e-4
    trained = score(state.params, state.model_state, state.graphdef, learned)
    margins = NORM.beta * ((trained.chosen - table.chosen) - (trained.rejected - table.rejected))
    assert np.mean(margins > 0) >= 0.9 and np.mean(margins) > 0.5, (np.mean(margins > 0), np.mean(margins))
    assert np.mean([m["loss"] for m in history[-8:]]) < np.log(2) - 0.1  # log 2: the loss of the reference itself


# --------------------------------------------------------------------------------------- the reference cache


def test_params_fingerprint_is_mesh_independent_and_sees_one_ulp(pairs):
    one, eight = initial_state("one"), initial_state("eight")
    assert params_fingerprint(one.params) == params_fingerprint(eight.params)
    plain = nnx.to_pure_dict(one.params)
    changed = jax.tree.map(lambda x: x, plain)
    changed["embed"] = plain["embed"].at[3, 5].set(jnp.nextafter(plain["embed"][3, 5], jnp.inf))
    assert params_fingerprint(changed) != params_fingerprint(plain)
    assert data_fingerprint(pairs) == data_fingerprint([dict(p) for p in pairs])
    edited = [dict(p) for p in pairs]
    edited[7]["rejected_input_ids"] = edited[7]["rejected_input_ids"].copy()
    edited[7]["rejected_input_ids"][-2] += 1
    assert data_fingerprint(edited) != data_fingerprint(pairs)
    assert data_fingerprint(pairs[::-1]) != data_fingerprint(pairs)  # the pair index is part of the key


def test_reference_cache_reuse_and_refusal(tmp_path):
    fingerprint = {"model_params": "aa", "model_config": {"rope_theta": 10000.0, "vocab_size": 384}, "data": "dd",
                   "num_pairs": 3, "max_seq_len": 72, "chat_template": "tulu", "average_logps": True}
    table = PairLogps(np.array([-1.0, -2.0, -3.0], np.float32), np.array([-4.0, -5.0, -6.0], np.float32))
    assert load_reference_cache(tmp_path, fingerprint) is None
    save_reference_cache(tmp_path, fingerprint, table)
    loaded = load_reference_cache(tmp_path, fingerprint)
    np.testing.assert_array_equal(loaded.chosen, table.chosen)
    np.testing.assert_array_equal(loaded.rejected, table.rejected)
    changes = {
        "model_params": ("bb", "model_params (different weights)"),
        "data": ("ee", "data (different tokenized pairs)"),
        "max_seq_len": (2048, "max_seq_len: 72 → 2048"),
        "average_logps": (False, "average_logps: True → False"),
        "model_config": ({"rope_theta": 5e5, "vocab_size": 384}, "model_config (rope_theta: 10000.0 → 500000.0)"),
    }
    for key, (value, message) in changes.items():
        with pytest.raises(CheckpointError, match="different run") as info:
            load_reference_cache(tmp_path, {**fingerprint, key: value})
        assert message in str(info.value) and str(tmp_path / CACHE_FINGERPRINT) in str(info.value)
    (tmp_path / CACHE_ARRAYS).write_bytes(b"not an npz")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_reference_cache(tmp_path, fingerprint)


# ------------------------------------------------------------------------------------------- through the CLI

RUN_STEPS = 16  # one epoch of 128 pairs in batches of 8
RUN_OVERRIDES = ["train.epochs=1", "train.global_batch_size=8", f"data.max_seq_len={SEQ}", "output.save_every=4",
                 "output.log_every=1", "output.progress=false", "output.keep_last=2", "output.export_hf=false"]


def dpo_args(run_dir: pathlib.Path, *extra: str) -> list[str]:
    sets = [*RUN_OVERRIDES, f"output.run_dir={run_dir}", *extra]
    return ["dpo", "--config", str(TINY_CONFIG), "--sharding", str(CPU8), *(a for s in sets for a in ("--set", s))]


def read_metrics(run_dir: pathlib.Path) -> dict[int, dict]:
    """step → metrics row; a step written twice (after a resume) keeps its later row."""
    rows = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[row["step"]] = row
    return rows


def cli_config(path: pathlib.Path, *overrides: str) -> DPOConfig:
    from tulu_jax.stages.sections import load_stage_config

    return load_stage_config(DPOConfig, path, overrides)


def test_configs_load_with_the_recipe_values():
    config = cli_config(TINY_CONFIG)
    assert (config.dpo.loss_type, config.dpo.beta, config.dpo.reference) == ("dpo_norm", 5.0, "cached")
    for name, lr in (("tulu3_8b_dpo.yaml", 5e-7), ("tulu3_70b_dpo.yaml", 2e-7)):
        recipe = cli_config(REPO / "configs" / name)
        assert (recipe.dpo.loss_type, recipe.dpo.beta, recipe.optim.lr) == ("dpo_norm", 5.0, lr)  # docs/recipe.md, DPO
        assert (recipe.optim.warmup_ratio, recipe.optim.weight_decay, recipe.optim.schedule) == (0.1, 0.0, "linear")
        assert (recipe.train.global_batch_size, recipe.train.epochs, recipe.data.max_seq_len) == (128, 1, 2048)
    with pytest.raises(ConfigError, match="packing"):
        cli_config(TINY_CONFIG, "data.packing=true")
    with pytest.raises(ConfigError, match="label_smoothing"):
        cli_config(TINY_CONFIG, "dpo.loss_type=ipo", "dpo.label_smoothing=0.1")


@pytest.fixture(scope="module")
def live_run(tmp_path_factory):
    """The uninterrupted tiny run with a live reference, through the CLI entry point in this process."""
    run_dir = tmp_path_factory.mktemp("live") / "run"
    assert cli.main(dpo_args(run_dir, "dpo.reference=live")) == 0
    return run_dir


def start_cli(run_dir: pathlib.Path, cache: pathlib.Path, resume: bool = False) -> subprocess.Popen:
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    cmd = [sys.executable, "-m", "tulu_jax.cli", *dpo_args(run_dir), *(["--resume"] if resume else [])]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def checkpoint_steps(run_dir: pathlib.Path) -> list[int]:
    ckpt = run_dir / "checkpoints"
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.is_dir() else []


@dataclasses.dataclass
class InterruptedRun:
    run_dir: pathlib.Path
    stopped_at: int  # the step of the SIGTERM checkpoint
    first_err: str
    second_err: str
    table_after_first: bytes


def metrics_lines(run_dir: pathlib.Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


@pytest.fixture(scope="module")
def interrupted_cached_run(tmp_path_factory):
    """The tiny run with a cached reference through the CLI in a subprocess: SIGTERM once the first step is logged
    (the step in flight finishes, a checkpoint is written, exit 0), then the same command resumes and finishes."""
    root = tmp_path_factory.mktemp("interrupted")
    run_dir, cache = root / "run", root / "jax_cache"
    proc = start_cli(run_dir, cache)
    deadline = time.monotonic() + 240
    while not metrics_lines(run_dir):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no step before exit or timeout: {proc.communicate()[1]}")
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, first_err = proc.communicate(timeout=120)
    assert proc.returncode == 0, first_err
    stopped = checkpoint_steps(run_dir)[-1]
    table = (run_dir / CACHE_ARRAYS).read_bytes()
    proc = start_cli(run_dir, cache, resume=True)
    _, second_err = proc.communicate(timeout=300)
    assert proc.returncode == 0, second_err
    return InterruptedRun(run_dir, stopped, first_err, second_err, table)


@pytest.mark.slow
def test_sigterm_then_resume_reuses_the_cached_reference(interrupted_cached_run):
    run = interrupted_cached_run
    assert "scoring 128 pairs with the reference model" in run.first_err and "SIGTERM received" in run.first_err
    assert run.stopped_at < RUN_STEPS, "the run ended before SIGTERM arrived"
    assert f"resumed from checkpoint step {run.stopped_at}" in run.second_err
    assert "reusing the cached reference log-probs" in run.second_err and "scoring" not in run.second_err
    assert (run.run_dir / CACHE_ARRAYS).read_bytes() == run.table_after_first
    assert checkpoint_steps(run.run_dir)[-1] == RUN_STEPS
    report = json.loads((run.run_dir / "data_report.json").read_text())
    assert (report["kept"], report["dropped_empty"], report["identical"]) == (128, 0, 0)


@pytest.mark.slow
def test_interrupted_cached_run_equals_the_uninterrupted_live_run(interrupted_cached_run, live_run):
    """Cached and live references give the same losses step for step, and the resume continues exactly."""
    cached, live = read_metrics(interrupted_cached_run.run_dir), read_metrics(live_run)
    assert sorted(cached) == sorted(live) == list(range(1, RUN_STEPS + 1))
    for step in range(1, RUN_STEPS + 1):
        for key in ("loss", "grad_norm", "lr", "chosen_reward", "rejected_reward", "reward_margin", "reward_accuracy"):
            np.testing.assert_allclose(cached[step][key], live[step][key], rtol=1e-5, atol=1e-7,
                                       err_msg=f"{key} {step}")
    assert live[RUN_STEPS]["reward_margin"] != 0.0  # the policy moved away from the reference
    assert not (live_run / CACHE_ARRAYS).exists()


@pytest.mark.slow
def test_cached_reference_of_another_model_is_refused(interrupted_cached_run, capsys):
    """Through the CLI: another initial model (train.seed=1, let past the resume check's config comparison) meets the
    run's cache; every other kind of change is refused by the same comparison (test_reference_cache_reuse_and_refusal)."""
    run_dir = interrupted_cached_run.run_dir
    before = (run_dir / CACHE_ARRAYS).read_bytes()
    assert cli.main([*dpo_args(run_dir, "train.seed=1"), "--resume", "--allow-config-change"]) == 1
    err = capsys.readouterr().err
    assert "cached reference log-probs" in err and "model_params (different weights)" in err
    assert (run_dir / CACHE_ARRAYS).read_bytes() == before


# ------------------------------------------------------------------------------------------- compile-check


def test_aot_step_compiles_for_a_tpu_topology():
    """The DPO step of the tiny config, compiled from this CPU host for v5p:2x2x1 (what compile-check runs)."""
    assert importlib.util.find_spec("libtpu") is not None, "libtpu is not installed: install the `tpu` extra"
    from tulu_jax.sharding import compile_for_topology, memory_report, tpu_topology_mesh

    spec = load_sharding(REPO / "sharding" / "v5p-8.yaml")
    config = cli_config(TINY_CONFIG, f"data.max_seq_len={SEQ}", "train.grad_accum_steps=2")
    step, args, summary = STAGE.aot(config, (spec, tpu_topology_mesh(spec)))
    assert "16 pairs" in summary and "2 micro-batches of 2 pair(s) per device" in summary
    report = memory_report(compile_for_topology(step, args, spec))
    assert report["fits"] and report["total_bytes"] > 0
