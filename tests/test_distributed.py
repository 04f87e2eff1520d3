"""Multi-process JAX over loopback: two real processes, one global mesh, collectives across them, and the RLVR
rollout batch assembled from the rows each process builds (`tulu_jax.rl.rollout.place_process_rows`).

This is the code path of a multi-host TPU pod (jax.distributed + a mesh over every process's devices), run on
CPU with gloo collectives; the expected values are recomputed with NumPy in the test process.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tulu_jax.errors import ConfigError
from tulu_jax.sharding import initialize_distributed

REPO = pathlib.Path(__file__).resolve().parent.parent
ROWS, COLS = 4, 3  # rows each process contributes to the global [8, 3] batch

WORKER = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from tulu_jax.sharding import batch_sharding, initialize_distributed, load_sharding, make_mesh

started = initialize_distributed()  # settings from the TULU_JAX_* environment
spec = load_sharding(sys.argv[1])
mesh = make_mesh(spec)
pid = jax.process_index()
rows, cols = int(sys.argv[2]), int(sys.argv[3])
local = np.arange(rows * cols, dtype=np.float32).reshape(rows, cols) + 1000 * pid
batch = jax.make_array_from_process_local_data(batch_sharding(mesh, spec), local)
replicated = NamedSharding(mesh, P())
total = jax.jit(jnp.sum, out_shardings=replicated)(batch)                   # all-reduce across processes
gathered = jax.jit(lambda a: a, out_shardings=replicated)(batch)            # all-gather across processes
from tulu_jax.rl.rollout import local_rows, place_process_rows
full = np.arange(2 * rows * cols, dtype=np.int32).reshape(2 * rows, cols)  # a rollout batch's prompt block
asked = []
placed = place_process_rows(batch_sharding(mesh, spec), 2 * rows, lambda r: asked.append(r.tolist()) or full[r])
placed_gathered = jax.jit(lambda a: a, out_shardings=replicated)(placed)
devices = jax.shard_map(lambda: jax.lax.psum(jnp.ones(()), tuple(spec.mesh)), mesh=mesh, in_specs=(),
                        out_specs=P())()                                     # psum over the whole global mesh
print(json.dumps({
    "started": started, "process": pid, "processes": jax.process_count(),
    "local_devices": jax.local_device_count(), "global_devices": jax.device_count(),
    "mesh": dict(mesh.shape), "total": float(total), "devices": float(devices),
    "gathered": np.asarray(gathered).tolist(), "global_shape": list(batch.shape),
    "asked": asked[0], "placed": np.asarray(placed_gathered).tolist(), "local": local_rows(placed).tolist(),
}))
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_share_one_mesh(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = free_port()
    procs = []
    for pid in range(2):
        env = {
            **os.environ,
            "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
            "TULU_JAX_COORDINATOR": f"127.0.0.1:{port}",
            "TULU_JAX_NUM_PROCESSES": "2",
            "TULU_JAX_PROCESS_ID": str(pid),
        }
        procs.append(subprocess.Popen(
            [sys.executable, str(script), str(REPO / "sharding" / "cpu-8.yaml"), str(ROWS), str(COLS)],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))
    deadline = time.monotonic() + 180
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outputs.append((proc.returncode, out, err))
    finally:
        for proc in procs:  # a process left waiting for a dead peer must not outlive the test
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for rc, out, err in outputs:
        assert rc == 0, f"worker failed (rc {rc}):\n{out}\n{err[-4000:]}"

    results = [json.loads(out.strip().splitlines()[-1]) for _, out, _ in outputs]
    blocks = [np.arange(ROWS * COLS, dtype=np.float32).reshape(ROWS, COLS) + 1000 * pid for pid in range(2)]
    expected_rows = sorted(map(tuple, np.concatenate(blocks).tolist()))
    assert sorted(r["process"] for r in results) == [0, 1]
    for r in results:
        assert r["started"] is True and r["processes"] == 2
        assert (r["local_devices"], r["global_devices"]) == (4, 8)
        assert r["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
        assert r["global_shape"] == [2 * ROWS, COLS]
        assert r["devices"] == 8.0
        assert r["total"] == pytest.approx(float(sum(b.sum() for b in blocks)))
        # every process sees the other's rows after the all-gather
        assert sorted(map(tuple, r["gathered"])) == expected_rows
    assert results[0]["gathered"] == results[1]["gathered"]
    # RLVR prompt placement: each process built only its own rows of the rollout batch, and together they make it.
    full = np.arange(2 * ROWS * COLS).reshape(2 * ROWS, COLS)
    asked = [r["asked"] for r in sorted(results, key=lambda r: r["process"])]
    assert [len(a) for a in asked] == [ROWS, ROWS] and sorted(asked[0] + asked[1]) == list(range(2 * ROWS))
    for r in results:
        assert r["placed"] == full.tolist() and r["local"] == full[r["asked"]].tolist()


ENV_KEYS = [
    f"{prefix}{name}"
    for prefix in ("TULU_JAX_", "JAX_")
    for name in ("COORDINATOR", "COORDINATOR_ADDRESS", "NUM_PROCESSES", "PROCESS_ID")
]


@pytest.fixture
def clean_env(monkeypatch):
    for key in ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_single_process_is_a_no_op(clean_env):
    assert initialize_distributed() is False  # no settings, and this host has no TPU chips
    assert initialize_distributed("127.0.0.1:1234", num_processes=1, process_id=0) is False
    clean_env.setenv("TULU_JAX_NUM_PROCESSES", "1")
    assert initialize_distributed() is False


def test_incomplete_settings_are_errors(clean_env):
    with pytest.raises(ConfigError, match="missing process_id"):
        initialize_distributed("127.0.0.1:1234", num_processes=2)
    clean_env.setenv("TULU_JAX_COORDINATOR", "127.0.0.1:1234")
    with pytest.raises(ConfigError, match="missing num_processes, process_id"):
        initialize_distributed()
    clean_env.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ConfigError, match="environment variable JAX_NUM_PROCESSES must be an integer, got 'two'"):
        initialize_distributed()
    with pytest.raises(ConfigError, match=r"process_id 2 must be in \[0, num_processes=2\)"):
        initialize_distributed("127.0.0.1:1234", num_processes=2, process_id=2)


def test_tpu_chips_are_counted_from_pci_sysfs(tmp_path):
    """A Cloud TPU VM is recognized by its Google PCI devices with TPU device ids (not its Google NIC, not a GPU)."""
    from tulu_jax.platform import tpu_chip_count

    devices = {"0000:00:04.0": ("0x1ae0", "0x0062"), "0000:00:05.0": ("0x1ae0", "0x006f"),
               "0000:00:06.0": ("0x1ae0", "0x0042"), "0000:00:07.0": ("0x10de", "0x2330")}
    for name, (vendor, device) in devices.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "vendor").write_text(vendor + "\n")
        (tmp_path / name / "device").write_text(device + "\n")
    (tmp_path / "0000:00:08.0").mkdir()  # unreadable entries are skipped
    assert tpu_chip_count(str(tmp_path)) == 2
    assert tpu_chip_count(str(tmp_path / "absent")) == 0


def test_no_private_jax_imports():
    """Start-up and everything else use JAX's public API only (jax._src moves between releases)."""
    offenders = [str(path.relative_to(REPO)) for path in (REPO / "tulu_jax").rglob("*.py")
                 if "jax._src" in path.read_text(encoding="utf-8")]
    assert offenders == []
