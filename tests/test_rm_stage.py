"""The reward-model stage: the loss against a NumPy recomputation from HF-style pooled rewards, concat vs two
forwards, sharded (8 devices, 2 micro-batches) = one device = 4 micro-batches, learning on separable pairs, the three
initializations (preset, causal-LM export, reward-model export), a CLI run whose export transformers loads as
LlamaForSequenceClassification with the same scores, one-line errors, and the AOT step for a TPU topology.

Tiny everything: the bundled tokenizer, the `tiny` preset (hidden 64, 2 layers). Compiled steps are built once.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from tulu_jax import cli
from tulu_jax.data.preference import load_preference_pairs
from tulu_jax.data.preference_batching import make_pair_batches
from tulu_jax.data.rows import Source
from tulu_jax.data.tokenizers import load_tokenizer
from tulu_jax.errors import DataError
from tulu_jax.models.hf_io import save_hf_checkpoint
from tulu_jax.models.presets import preset_config
from tulu_jax.models.reward import RewardModel
from tulu_jax.sharding import load_sharding
from tulu_jax.stages.paths import resolve_path
from tulu_jax.stages.rm import STAGE, RMConfig, RMSection, build_rm_step, check_pad_token, rm_loss_fn
from tulu_jax.stages.dpo import pair_denominators
from tulu_jax.stages.sections import OptimSection, load_stage_config
from tulu_jax.train import init_train_state, shardings_of
from tulu_jax.stages.setup import variable_shardings
from tulu_jax.train.batches import PairBatch

from stage_cache import StageCache, mesh

REPO = pathlib.Path(__file__).resolve().parent.parent
TINY_CONFIG = REPO / "configs" / "tiny_rm.yaml"
CPU8 = REPO / "sharding" / "cpu-8.yaml"
SEQ = 72  # the longest toy pair has 66 tokens per side
LEARN_STEPS = 24
OPT = OptimSection(lr=3e-3, warmup_ratio=0.0).build(total_steps=LEARN_STEPS)
CONCAT, TWO = RMSection(concat_forward=True), RMSection(concat_forward=False)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_path("tulu_jax/assets/tiny_tokenizer"))


@pytest.fixture(scope="module")
def pairs(tokenizer):
    pairs, stats = load_preference_pairs(
        [Source(str(resolve_path("tulu_jax/assets/tiny_preferences.jsonl")))], tokenizer, max_seq_len=SEQ,
        shuffle=False,
    )
    assert stats.kept == len(pairs) == 128
    return pairs


STAGE_CACHE = StageCache(
    lambda spec, m: init_train_state(lambda rngs: RewardModel(preset_config("tiny").replace(pad_token_id=1), rngs),
                                     OPT, m, variable_shardings(m, spec), seed=0),
    lambda state, spec, m, accum: build_rm_step(
        state.graphdef, OPT, CONCAT, state_shardings=shardings_of(state),
        batch_shardings=PairBatch.shardings(m, spec, reference=False), grad_accum_steps=accum,
    ),
)
initial_state, rm_step = STAGE_CACHE.initial_state, STAGE_CACHE.step


def run_steps(mesh_name: str, accum: int, batches: list) -> tuple[object, list[dict]]:
    spec, m = mesh(mesh_name)
    shardings = PairBatch.shardings(m, spec, reference=False)
    state, step, history = initial_state(mesh_name), rm_step(mesh_name, accum), []
    for host in batches:
        batch = jax.device_put(PairBatch.from_host(host), shardings)
        state, metrics = step(state, batch, None)
        history.append({k: float(v) for k, v in metrics.items()})
    return state, history


def right_padded(pairs: list, side: str) -> tuple[np.ndarray, np.ndarray]:
    """HF-style input: token ids right-padded with the pad id 1, and the attention mask."""
    ids, mask = np.ones((len(pairs), SEQ), np.int32), np.zeros((len(pairs), SEQ), np.int32)
    for row, pair in enumerate(pairs):
        seq = pair[f"{side}_input_ids"]
        ids[row, : len(seq)], mask[row, : len(seq)] = seq, 1
    return ids, mask


@nnx.jit
def pooled_rewards(model, ids, mask):
    return model.sequence_rewards(ids, mask)


# ------------------------------------------------------------------------------------------------ the loss


def test_loss_and_metrics_equal_numpy_from_hf_style_pooled_rewards(pairs):
    """rm_loss_fn on a padded pair batch (last real token by segment ids, half the batch padding pairs) against
    −log σ computed in float64 from rewards pooled HF's way (attention mask); concat = two forwards, gradients too."""
    model = initial_state("one").model()
    few = pairs[:6]
    host = make_pair_batches(few, SEQ, 12)[0]  # 6 real pairs + 6 padding pairs
    rc = np.asarray(pooled_rewards(model, *map(jnp.asarray, right_padded(few, "chosen"))), np.float64)
    rr = np.asarray(pooled_rewards(model, *map(jnp.asarray, right_padded(few, "rejected"))), np.float64)
    assert np.ptp(rc - rr) > 1e-4  # the pairs differ: the comparison can fail
    margin = rc - rr
    expected = {"loss": np.mean(np.log1p(np.exp(-margin))), "accuracy": np.mean(margin > 0),
                "margin": margin.mean(), "chosen_reward": rc.mean(), "rejected_reward": rr.mean()}

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    results = {}
    for name, section in (("concat", CONCAT), ("two", TWO)):
        loss_fn = rm_loss_fn(section)
        batch = PairBatch.from_host(host)
        fn = jax.jit(jax.value_and_grad(
            lambda p, b: loss_fn(nnx.merge(graphdef, p, rest), b, pair_denominators(b)), has_aux=True))
        results[name] = fn(params, batch)
    (loss, aux), grads = results["concat"]
    np.testing.assert_allclose(float(loss), expected["loss"], rtol=1e-5)
    for key in ("accuracy", "margin", "chosen_reward", "rejected_reward"):
        np.testing.assert_allclose(float(aux[key]), expected[key], rtol=1e-5, atol=1e-7, err_msg=key)
    assert int(aux["pairs"]) == 6
    (loss2, _), grads2 = results["two"]
    np.testing.assert_allclose(float(loss2), float(loss), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads2), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)


def test_pad_token_inside_the_data_is_one_data_error(pairs):
    check_pad_token(pairs, 1, "toy")  # the tiny tokenizer's pad id never occurs in the data
    bad = [pairs[0], {**pairs[1], "rejected_input_ids": np.append(pairs[1]["rejected_input_ids"], 1)}]
    with pytest.raises(DataError, match=r"toy: pair 1 \(rejected\) contains the pad token id 1"):
        check_pad_token(bad, 1, "toy")


# ------------------------------------------------------------------------------- sharding and accumulation


@pytest.fixture(scope="module")
def two_batches(pairs):
    """16 pairs, then 8 real pairs and 8 padding pairs."""
    return make_pair_batches(pairs[:24], SEQ, 16)


@pytest.fixture(scope="module")
def one_device_run(two_batches):
    return run_steps("one", 1, two_batches)


@pytest.mark.parametrize("mesh_name, accum", [("one", 4), ("eight", 2)])
def test_accumulated_and_sharded_steps_equal_one_device(one_device_run, two_batches, mesh_name, accum):
    """Two optimizer steps: 4 micro-batches on one device, and 2 micro-batches on the 8-device data × fsdp ×
    tensor mesh, against the plain one-device step. The first step starts from the same parameters: its metrics
    agree to float32 rounding. The second gets looser bounds: Adam divides each gradient element by its own
    magnitude, so an element whose gradient is reduction-order noise moves by up to ±lr (3e-3) either way; a wrong
    denominator or a dropped micro-batch shows in the first step's loss and gradient norm already."""
    state, history = run_steps(mesh_name, accum, two_batches)
    ref_state, ref_history = one_device_run
    for step, (got, want) in enumerate(zip(history, ref_history, strict=True)):
        rtol, atol = (2e-6, 1e-7) if step == 0 else (2e-4, 2e-5)
        for key in ("loss", "grad_norm", "accuracy", "margin", "chosen_reward", "rejected_reward", "pairs"):
            np.testing.assert_allclose(got[key], want[key], rtol=rtol, atol=atol, err_msg=f"{key} step {step}")
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-3)
    assert [h["pairs"] for h in ref_history] == [16, 8] and ref_history[1]["loss"] != ref_history[0]["loss"]


# ------------------------------------------------------------------------------------------------ learning


def test_loss_falls_and_accuracy_rises_on_separable_pairs(tokenizer, tmp_path):
    """Chosen answers from one word set, rejected from another, paired every which way: the initial model ranks
    some pairs wrong; after training it ranks every pair right, at a far lower loss."""
    good, bad = ["yes", "sure", "right", "good"], ["no", "wrong", "bad", "never"]
    rows = [{"prompt": [{"role": "user", "content": f"Question {q}?"}],
             "chosen": [{"role": "assistant", "content": good[q % 4]}],
             "rejected": [{"role": "assistant", "content": bad[(q // 4) % 4]}]} for q in range(32)]
    path = tmp_path / "separable.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data, _ = load_preference_pairs([Source(str(path))], tokenizer, max_seq_len=SEQ, shuffle=False)
    batches = make_pair_batches(data, SEQ, 16)
    _, history = run_steps("one", 1, [batches[i % len(batches)] for i in range(LEARN_STEPS)])
    first, last = history[:2], history[-2:]
    assert min(h["accuracy"] for h in first) < 0.9, [h["accuracy"] for h in history]
    assert all(h["accuracy"] == 1.0 for h in last), [h["accuracy"] for h in history]
    assert max(h["loss"] for h in last) < 0.5 * min(h["loss"] for h in first), [h["loss"] for h in history]


# ------------------------------------------------------------------------------------------------ the stage


def rm_config(*overrides: str) -> RMConfig:
    return load_stage_config(RMConfig, TINY_CONFIG, overrides)


def test_initializations_from_a_causal_lm_and_from_a_reward_model(tmp_path):
    """model.path = a causal-LM export: its backbone (LM head dropped), a fresh head; = a reward-model export:
    every tensor, head included."""
    from tulu_jax.models.decoder import Decoder
    from tulu_jax.models.hf_reward_io import save_hf_reward_model

    one = mesh("one")
    lm = Decoder(preset_config("tiny").replace(tie_word_embeddings=False, pad_token_id=1), rngs=nnx.Rngs(3))
    save_hf_checkpoint(lm, tmp_path / "lm")
    state = STAGE.setup(rm_config(f"model.path={tmp_path / 'lm'}"), one).state
    backbone = nnx.state(lm, nnx.Param)
    del backbone["unembed"]
    for a, b in zip(jax.tree.leaves(state.params["decoder"]), jax.tree.leaves(backbone), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert "unembed" not in state.params["decoder"] and state.params["score"][...].shape == (64, 1)

    save_hf_reward_model(state.model(), tmp_path / "rm")
    again = STAGE.setup(rm_config(f"model.path={tmp_path / 'rm'}"), one)
    assert again.model_config.pad_token_id == 1
    for a, b in zip(jax.tree.leaves(again.state.params), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_cli_run_exports_a_sequence_classifier_with_equal_scores(tmp_path, pairs, capsys):
    """`tulu-jax rm` on the 8-device mesh for 4 steps; the export loads in transformers as
    LlamaForSequenceClassification (pad_token_id set) and scores right-padded pairs like the trained state; a
    second run with --resume continues from the final checkpoint instead of training again."""
    run_dir = tmp_path / "run"
    args = ["rm", "--config", str(TINY_CONFIG), "--sharding", str(CPU8), "--set", f"output.run_dir={run_dir}",
            "--set", "train.max_steps=4", "--set", "output.save_every=2"]
    assert cli.main(args) == 0
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(key in metrics[-1] for key in ("accuracy", "margin", "chosen_reward", "rejected_reward"))

    hf = transformers.AutoModelForSequenceClassification.from_pretrained(run_dir / "hf").eval()
    assert type(hf).__name__ == "LlamaForSequenceClassification" and hf.config.pad_token_id == 1
    from tulu_jax.models.hf_reward_io import load_hf_reward_model

    ours_model = load_hf_reward_model(run_dir / "hf")
    ids, mask = right_padded(pairs[:8], "chosen")
    with torch.no_grad():  # no attention mask: HF must find each row's end from pad_token_id alone
        theirs = hf(input_ids=torch.tensor(ids, dtype=torch.long)).logits[:, 0].numpy()
    ours = np.asarray(pooled_rewards(ours_model, jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
    assert np.ptp(ours) > 1e-4

    capsys.readouterr()
    assert cli.main([*args, "--resume"]) == 0
    assert "resumed from checkpoint step 4" in capsys.readouterr().err


def test_bad_config_key_is_one_line(capsys):
    assert cli.main(["rm", "--config", str(TINY_CONFIG), "--sharding", str(CPU8), "--set", "rm.margin=1"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "rm.margin" in err, err


def test_compile_check_tells_rm_configs_from_dpo_configs():
    from tulu_jax.stages.compile_check import infer_stage

    assert [infer_stage(str(REPO / "configs" / name)) for name in ("tiny_rm.yaml", "tulu3_8b_rm.yaml")] == ["rm"] * 2
    assert infer_stage(str(REPO / "configs" / "tiny_dpo.yaml")) == "dpo"


def test_configs_load_with_the_recipe_values():
    recipe = load_stage_config(RMConfig, REPO / "configs" / "tulu3_8b_rm.yaml", ())
    assert (recipe.optim.lr, recipe.optim.warmup_ratio, recipe.train.global_batch_size, recipe.train.epochs,
            recipe.data.max_seq_len) == (3e-6, 0.0, 256, 1, 2048)
    assert rm_config().data.sources[0].path == "tulu_jax/assets/tiny_preferences.jsonl"


def test_aot_step_compiles_for_a_tpu_topology():
    """The RM step of the tiny config, compiled from this CPU host for v5p:2x2x1 (what compile-check runs)."""
    assert importlib.util.find_spec("libtpu") is not None, "libtpu is not installed: install the `tpu` extra"
    from tulu_jax.sharding import compile_for_topology, memory_report, tpu_topology_mesh

    spec = load_sharding(REPO / "sharding" / "v5p-8.yaml")
    step, args, summary = STAGE.aot(rm_config(f"data.max_seq_len={SEQ}", "train.grad_accum_steps=2"),
                                    (spec, tpu_topology_mesh(spec)))
    assert "16 pairs" in summary and "2 micro-batches of 2 pair(s) per device" in summary
    report = memory_report(compile_for_topology(step, args, spec))
    assert report["fits"] and report["total_bytes"] > 0
