"""A CPU host starts silently: no libtpu probe ("Failed to find host bounds ... unexpected worker hostname") and no
"PyTorch was not found" advice, through the Python API and the CLI; and how tulu_jax.platform picks JAX_PLATFORMS."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

from tulu_jax import platform
from tulu_jax.stages.eval import default_out_path

REPO = pathlib.Path(__file__).resolve().parent.parent
NOISE = ("Failed to find host bounds", "unexpected worker hostname", "PyTorch was not found", "InitGoogle")
HIDE_TORCH = "import sys; sys.modules['torch'] = None; "  # as on an install without the test extra


def run_python(code: str, cwd: pathlib.Path = REPO) -> subprocess.CompletedProcess:
    """`python -c code` in a fresh process with a user's default environment: no JAX_PLATFORMS, XLA_FLAGS or TPU_*
    variables (JAX and its imports set TPU_SKIP_MDS_QUERY and TF_CPP_MIN_LOG_LEVEL here, which quieten libtpu)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_", "TPU_", "LIBTPU", "TF_CPP"))}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def assert_quiet(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr
    assert not [line for line in proc.stderr.splitlines() if any(n in line for n in NOISE)], proc.stderr


# Whether libtpu.so is mapped into the process: what prints the noise (when no other process holds libtpu's lock).
LIBTPU_LOADED = "print('libtpu' in open('/proc/self/maps').read())"


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="the noise comes from libtpu (tpu/test extra)")
def test_without_tulu_jax_jax_loads_libtpu_and_transformers_advises():
    """The control: in this environment bare JAX does load libtpu, and transformers prints its advice."""
    proc = run_python(HIDE_TORCH + f"import jax; jax.devices(); import transformers; {LIBTPU_LOADED}")
    assert proc.stdout.split() == ["True"] and "PyTorch was not found" in proc.stderr


def test_the_python_api_starts_silently(tiny_hf_dir):
    proc = run_python(HIDE_TORCH + f"""
import numpy as np, tulu_jax, jax
model = tulu_jax.load_model({str(tiny_hf_dir)!r})
print(model(np.ones((1, 4), np.int32)).shape, jax.default_backend())
{LIBTPU_LOADED}
""")
    assert_quiet(proc)
    assert proc.stdout.split() == ["(1,", "4,", "384)", "cpu", "False"]


def test_tulu_jax_eval_starts_silently_and_writes_beside_the_model(tiny_hf_dir, tmp_path):
    """Run from another directory: without --out the records go to the model's eval/, not the working directory."""
    data = REPO / "tulu_jax" / "assets" / "tiny_eval.jsonl"
    args = ["eval", "--model", str(tiny_hf_dir), "--data", str(data), "--max-new-tokens", "4", "--limit", "4"]
    proc = run_python(HIDE_TORCH + f"from tulu_jax.cli import main; main({args!r}); {LIBTPU_LOADED}", cwd=tmp_path)
    assert_quiet(proc)
    assert proc.stdout.splitlines()[-1] == "False"
    assert len((tiny_hf_dir / "eval" / "tiny_eval.jsonl").read_text().splitlines()) == 4
    assert list(tmp_path.iterdir()) == []


def test_eval_default_output_is_the_run_dir_for_a_run_export(tmp_path):
    (tmp_path / "run" / "hf").mkdir(parents=True)
    (tmp_path / "run" / "config.yaml").write_text("{}")
    assert default_out_path(tmp_path / "run" / "hf", "d/x.jsonl") == tmp_path / "run" / "eval" / "x.jsonl"
    assert default_out_path(tmp_path / "llama", "x.parquet") == tmp_path / "llama" / "eval" / "x.jsonl"


def test_a_platform_the_user_chose_is_kept(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    platform.choose("cuda")  # a command's choice never overrides the user's
    assert os.environ["JAX_PLATFORMS"] == "cpu"


def _pci(root: pathlib.Path, *devices: tuple[str, str]) -> pathlib.Path:
    for i, (vendor, device) in enumerate(devices):
        (root / f"0000:00:0{i}.0").mkdir(parents=True)
        (root / f"0000:00:0{i}.0" / "vendor").write_text(vendor + "\n")
        (root / f"0000:00:0{i}.0" / "device").write_text(device + "\n")
    return root


def test_tpu_chips_are_found_by_their_pci_ids(tmp_path):
    assert not platform.has_tpu_chips(str(_pci(tmp_path / "nic", ("0x1ae0", "0x0042"), ("0x10de", "0x2330"))))
    assert platform.has_tpu_chips(str(_pci(tmp_path / "v5p", ("0x1ae0", "0x0042"), ("0x1ae0", "0x0062"))))
    assert not platform.has_tpu_chips(str(tmp_path / "absent"))
