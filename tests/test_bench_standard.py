"""benchmarks/standard.py: the harness's entry point runs the public step builders and sampler and prints one JSON
line with the harness's keys (a tiny model; no figure is checked, only that each is measured)."""
import json
import math
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_standard_tiny_prints_the_harness_keys() -> None:
    env = {**os.environ, "XLA_FLAGS": ""}  # one plain CPU device, as the harness runs it
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "standard.py"), "--json", "--tiny",
                           "--parts", "sft,gen", "--warmup", "0", "--steps", "2"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stdout
    out = json.loads(lines[0])
    assert out["ceiling_gflops"] > 0 and out["peak_rss_gib"] > 0
    sft, gen = out["sft"], out["gen"]
    assert "error" not in sft and "error" not in gen, (sft, gen)
    for key in ("step_s_median", "tokens_per_s", "achieved_gflops", "mfu", "compile_s"):
        assert sft[key] > 0, key
    assert len(sft["step_s_all"]) == 2 and math.isfinite(sft["loss_last"])
    for key in ("gen_s_median", "new_tokens_per_s", "achieved_gflops", "prefill_s", "decode_bytes"):
        assert gen[key] > 0, key
    assert len(gen["gen_s_all"]) == 2 and "bandwidth_fraction" in gen


def test_standard_rejects_an_unknown_part() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "standard.py"), "--parts", "sft,nope"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "nope" in proc.stderr


def test_profile_step_tiny_reads_the_trace_back() -> None:
    env = {**os.environ, "XLA_FLAGS": ""}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "profile_step.py"), "--tiny", "--parts", "sft"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sft = json.loads(proc.stdout.strip().splitlines()[-1])["sft"]
    assert 0 < sft["matmul_wall_s"] <= sft["any_op_wall_s"] <= sft["step_wall_s"]
    assert sft["thread_s_by_op"] and sft["matmul_bound_tokens_per_s"] >= sft["tokens_per_s"]


def test_interval_union_counts_overlaps_once() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from profile_step import interval_union

    assert interval_union([(0, 2), (1, 3), (5, 6), (5.5, 5.7)]) == 4
    assert interval_union([]) == 0


def test_decode_matmuls_tiny_prints_a_rate_per_row_count() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "decode_matmuls.py"), "--tiny", "--rows", "2,4"],
                          capture_output=True, text=True, env={**os.environ, "XLA_FLAGS": ""}, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for rows in ("rows_2", "rows_4"):
        assert out[rows]["ms_per_step"] > 0 and out[rows]["weight_bytes"] > 0 and out[rows]["gflops"] > 0
