"""`tulu-jax compile-check`: the real SFT train step compiled for a TPU topology (v5p:2x2x1) from this CPU host,
with its per-device memory against the chip's HBM, and a plain "does NOT fit" (exit 1) when it cannot fit."""

from __future__ import annotations

import math
import pathlib

import jax
import numpy as np
import pytest

from tulu_jax import cli
from tulu_jax.errors import ConfigError
from tulu_jax.sharding import load_sharding, tpu_topology_mesh
from tulu_jax.stages import sft
from tulu_jax.stages.sections import load_stage_config
from tulu_jax.stages import compile_check as compile_check_module
from tulu_jax.stages.compile_check import compile_check, format_result

REPO = pathlib.Path(__file__).resolve().parent.parent
TINY_CONFIG = str(REPO / "configs" / "tiny_sft.yaml")
V5P_8 = str(REPO / "sharding" / "v5p-8.yaml")


@pytest.fixture(autouse=True)
def quiet_libtpu(monkeypatch):
    """What the CLI sets before JAX starts (here JAX already runs in-process): no Cloud TPU VM probing."""
    for key, value in cli.QUIET_LIBTPU.items():
        monkeypatch.setenv(key, value)


def per_device_bytes(tree) -> int:
    """Σ over leaves of one device's shard size, from the abstract arrays' shardings."""
    return sum(
        math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)
    )


@pytest.fixture(scope="module")
def tiny_result():
    """The tiny config's SFT step compiled for v5p:2x2x1 (4 chips), once for the module."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in cli.QUIET_LIBTPU.items():
            mp.setenv(key, value)
        return compile_check("sft", TINY_CONFIG, V5P_8)


def test_tiny_sft_step_compiles_for_v5p_and_reports_memory(tiny_result, monkeypatch, capsys):
    # The command prints the result of the real compilation (reused here) and exits 0 when it fits.
    monkeypatch.setattr(compile_check_module, "compile_check", lambda *args: tiny_result)
    assert cli.main(["compile-check", "--config", TINY_CONFIG, "--sharding", V5P_8]) == 0
    out = capsys.readouterr().out
    assert out == format_result(tiny_result, "v5p:2x2x1") + "\n"
    assert "compiled for v5p:2x2x1" in out and "per-device memory on TPU v5:" in out
    # model.attention auto on a TPU topology: the splash kernel, as Mosaic custom calls in the compiled HLO
    assert tiny_result.kernel_calls > 0
    assert f"Pallas TPU kernel calls (splash attention) in the compiled program: {tiny_result.kernel_calls}" in out
    for label in ("arguments", "temporaries", "outputs", "total"):
        assert f"  {label}" in out
    assert "of 95 GiB HBM" in out and out.rstrip().endswith("fits")
    # 16 sequences over the 4 chips' batch shards: 4 per device in one micro-batch
    assert "global batch 16 × 128 tokens, 1 micro-batch of 4 sequence(s) per device" in out


def test_memory_report_accounts_for_the_sharded_state_and_batch(tiny_result):
    config = load_stage_config(sft.SFTConfig, TINY_CONFIG)
    spec = load_sharding(V5P_8)
    _, (state, batch, frozen), _ = sft.STAGE.aot(config, (spec, tpu_topology_mesh(spec)))
    assert frozen is None  # SFT reads no frozen model
    report = tiny_result.report
    assert tiny_result.fits and report["device_kind"] == "TPU v5" and report["hbm_bytes"] == 95 * 2**30
    # The state is donated (aliased to the new state); the rest of the arguments is this device's batch shard.
    assert report["argument_bytes"] - report["alias_bytes"] == per_device_bytes(batch) == 4 * 128 * (4 * 4 + 1)
    assert report["alias_bytes"] >= per_device_bytes(state)  # TPU tiles small arrays: padded, never smaller
    assert report["total_bytes"] == (report["argument_bytes"] + report["output_bytes"] - report["alias_bytes"]
                                     + report["temp_bytes"] + report["generated_code_bytes"])


def test_a_step_that_does_not_fit_says_so_and_exits_1(capsys):
    # 1024 sequences of 4096 tokens per chip without remat: ~180 GiB of activations even with the splash kernel.
    argv = ["compile-check", "--config", TINY_CONFIG, "--sharding", V5P_8,
            "--set", "train.global_batch_size=4096", "--set", "data.max_seq_len=4096"]
    assert cli.main(argv) == 1
    captured = capsys.readouterr()
    assert "does NOT fit" in captured.out and "RESOURCE_EXHAUSTED" in captured.out
    assert "Traceback" not in captured.out + captured.err


def test_the_stage_is_inferred_from_the_config(tmp_path):
    for name, stage in (("tiny_sft", "sft"), ("tiny_dpo", "dpo"), ("tulu3_8b_sft", "sft"), ("tulu3_8b_dpo", "dpo"),
                        ("tiny_rm", "rm"), ("tulu3_8b_rm", "rm"), ("tiny_rlvr", "rlvr"), ("tulu3_8b_rlvr", "rlvr"),
                        ("tiny_distill", "distill"), ("gemma2_9b_distill", "distill")):
        assert compile_check_module.infer_stage(str(REPO / "configs" / f"{name}.yaml")) == stage
    with pytest.raises(ConfigError, match=r"no stage's config \(as sft: .*unknown key 'run_dir'"):
        compile_check_module.infer_stage(str(REPO / "configs" / "tiny_arith.yaml"))
    minimal = tmp_path / "minimal.yaml"  # the keys both stages' configs have: both accept it
    minimal.write_text("model:\n  preset: tiny\ndata:\n  sources: [{path: d.jsonl}]\n")  # several stages accept it
    with pytest.raises(ConfigError, match=r"valid config of stages \['sft', 'dpo', 'rlvr'\]: pass --stage"):
        compile_check_module.infer_stage(str(minimal))


def test_a_sharding_file_without_topology_is_a_config_error(capsys):
    cpu8 = str(REPO / "sharding" / "cpu-8.yaml")
    assert cli.main(["compile-check", "--config", TINY_CONFIG, "--sharding", cpu8]) == 1
    assert "'topology' is not set" in capsys.readouterr().err


def test_the_roofline_of_the_compiled_step_from_xla_cost_analysis(tiny_result):
    r = tiny_result.roofline
    spec = load_sharding(V5P_8)  # the chip's peaks come from the sharding file
    assert (r.peak_flops, r.bandwidth) == (spec.peak_bf16_flops, spec.hbm_bandwidth) == (459e12, 2765e9)
    assert r.flops == tiny_result.flops > 0 and r.bytes_accessed == tiny_result.bytes_accessed > 0
    assert r.bound_seconds == max(r.flops / 459e12, r.bytes_accessed / 2765e9)
    # the best MFU is the arithmetic intensity over the chip's ridge point, capped at 1
    assert r.best_mfu == pytest.approx(min(1.0, (r.flops / r.bytes_accessed) / (459e12 / 2765e9)))
    assert r.describe() in format_result(tiny_result, "v5p:2x2x1")
    assert "HBM bandwidth-bound" in r.describe()  # a 64-wide model moves far more bytes than it multiplies


def test_roofline_arithmetic_and_every_pod_file_names_its_chip_peaks():
    from tulu_jax.sharding.roofline import Roofline

    compute_bound = Roofline(flops=2e12, bytes_accessed=1e9, peak_flops=1e12, bandwidth=1e9)
    assert (compute_bound.bound_seconds, compute_bound.best_mfu) == (2.0, 1.0)
    assert "compute-bound" in compute_bound.describe() and "best MFU 100%" in compute_bound.describe()
    memory_bound = Roofline(flops=1e12, bytes_accessed=4e9, peak_flops=1e12, bandwidth=1e9)
    assert (memory_bound.bound_seconds, memory_bound.best_mfu) == (4.0, 0.25)
    for path in sorted((REPO / "sharding").glob("*.yaml")):
        spec = load_sharding(path)
        if spec.platform in ("tpu", "gpu"):
            assert spec.peak_bf16_flops and spec.hbm_bandwidth, path.name
    with pytest.raises(ConfigError, match="'hbm_bandwidth' must be a positive number"):
        load_sharding(V5P_8, ["hbm_bandwidth=0"])
