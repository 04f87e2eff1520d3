"""Checkpointer: restore onto a different mesh, shape/dtype mismatch errors, retention, and that an interrupted
save is never listed or restored."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec
from orbax.checkpoint._src.path import atomicity

from test_train_helpers import TinyLM, make_mesh, make_model, variable_shardings
from tulu_jax.errors import CheckpointError
from tulu_jax.train import (
    Checkpointer,
    abstract_train_state,
    init_train_state,
    make_optimizer,
    shardings_of,
    with_shardings,
)

OPT = make_optimizer(1e-2, warmup_ratio=0.0, total_steps=10)
SAVE_MESH = make_mesh((1, 4, 2))  # fsdp 4 × tensor 2
LOAD_MESH = make_mesh((2, 4, 1))  # data 2 × fsdp 4


@functools.cache
def saved_state():
    state = init_train_state(make_model, OPT, SAVE_MESH, variable_shardings(SAVE_MESH), seed=5)
    # Non-trivial optimizer moments and step, so restoring them is actually checked.
    return state.replace(
        opt_state=jax.tree.map(lambda x: x + 0.5 if jnp.issubdtype(x.dtype, jnp.floating) else x + 3, state.opt_state),
        step=state.step + 7,
    )


def abstract_target(make, mesh):
    return abstract_train_state(make, OPT, mesh, variable_shardings(mesh))


def shardings_target(state):
    """A restore target with the shapes, dtypes and shardings of live `state`."""
    return with_shardings(state, shardings_of(state))


def test_restore_on_a_different_mesh(tmp_path):
    state = saved_state()
    ckpt = Checkpointer(tmp_path / "ckpt")
    data_state = b'{"next_index": 12}'
    ckpt.save(7, state, data_state=data_state, metadata={"model": "tiny", "lr": 0.01})
    ckpt.wait()

    restored = Checkpointer(tmp_path / "ckpt").restore(target=abstract_target(make_model, LOAD_MESH))
    assert restored.step == 7 and restored.data_state == data_state
    assert restored.metadata == {"model": "tiny", "lr": 0.01}
    for got, want in zip(jax.tree.leaves(restored.state), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    kernel = restored.state.params["up"]["kernel"][...]
    assert kernel.sharding.mesh.shape == LOAD_MESH.shape
    assert kernel.sharding.spec == PartitionSpec("fsdp", "tensor")
    assert restored.state.opt_state[1][0].mu["up"]["kernel"][...].sharding.mesh.shape == LOAD_MESH.shape
    assert int(restored.state.step) == 7
    ckpt.close()


def test_shape_and_dtype_mismatch_name_the_parameter(tmp_path):
    ckpt = Checkpointer(tmp_path / "ckpt", async_save=False)
    ckpt.save(1, saved_state())
    wider = abstract_target(lambda rngs: TinyLM(rngs, embed=12), LOAD_MESH)
    with pytest.raises(CheckpointError, match=r": params\.embed\.embedding\.value is float32\[16, 8\] on disk .*12\]"):
        ckpt.restore(target=wider)
    bf16 = abstract_target(lambda rngs: TinyLM(rngs, param_dtype=jnp.bfloat16), LOAD_MESH)
    with pytest.raises(CheckpointError, match=r"params\.embed\.embedding\.value is float32\[16, 8\] .* bfloat16"):
        ckpt.restore(target=bf16)
    with pytest.raises(CheckpointError, match="no finalized checkpoint for step 4"):
        ckpt.restore(4, target=abstract_target(make_model, LOAD_MESH))
    ckpt.close()


def test_missing_parameter_is_reported(tmp_path):
    class Smaller(nnx.Module):
        def __init__(self, rngs):
            self.up = nnx.Linear(8, 32, rngs=rngs)

    ckpt = Checkpointer(tmp_path / "ckpt", async_save=False)
    ckpt.save(1, saved_state())
    with pytest.raises(CheckpointError, match=r"unexpected \[.*params\.embed\.embedding\.value"):
        ckpt.restore(target=abstract_target(Smaller, LOAD_MESH))
    ckpt.close()


def test_retention_interval_and_empty_directory(tmp_path):
    state = saved_state()
    ckpt = Checkpointer(tmp_path / "ckpt", max_to_keep=2, save_interval_steps=2, async_save=False)
    with pytest.raises(CheckpointError, match="no finalized checkpoint"):
        ckpt.restore(target=state)
    saved = [step for step in range(1, 7) if ckpt.save(step, state)]
    assert saved == [1, 2, 4, 6]  # orbax always takes the first save, then every save_interval_steps
    assert ckpt.all_steps() == [4, 6]
    assert ckpt.save(7, state, force=True)
    assert ckpt.all_steps() == [6, 7]
    ckpt.close()


def test_interrupted_save_is_not_listed_or_restored(tmp_path, monkeypatch):
    state = saved_state()
    ckpt = Checkpointer(tmp_path / "ckpt", async_save=False)
    ckpt.save(1, state, data_state={"next_index": 1})

    async def preempted(self, *args, **kwargs):  # the process dies before the temporary folder is renamed
        raise RuntimeError("simulated preemption during save")

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", preempted)
    with pytest.raises(RuntimeError, match="simulated preemption"):
        ckpt.save(2, state.replace(step=state.step + 1), data_state={"next_index": 2})
    monkeypatch.undo()

    leftovers = [p.name for p in (tmp_path / "ckpt").iterdir() if p.name.startswith("2")]
    assert leftovers and all(".orbax-checkpoint-tmp" in name for name in leftovers)  # the half-written save
    fresh = Checkpointer(tmp_path / "ckpt")
    assert fresh.all_steps() == [1] and fresh.latest_step() == 1
    restored = fresh.restore(target=shardings_target(state))
    assert restored.step == 1 and restored.data_state == {"next_index": 1}
    fresh.close()


def test_data_state_from_another_process_count_is_an_error(tmp_path):
    state = saved_state()
    ckpt = Checkpointer(tmp_path / "ckpt", async_save=False)
    ckpt.save(1, state, data_state={"next_index": 1})
    data_dir = tmp_path / "ckpt" / "1" / "data"
    (data_dir / "process_0-of-1.json").rename(data_dir / "process_0-of-2.json")  # as if saved by 2 hosts
    with pytest.raises(CheckpointError, match="different number of processes"):
        ckpt.restore(target=shardings_target(state))
    ckpt.close()


def test_a_relative_directory_works_from_the_working_directory(tmp_path, monkeypatch):
    """Configs give run dirs relative to where the command runs (`runs/tiny_sft`); orbax needs absolute paths."""
    monkeypatch.chdir(tmp_path)
    state = saved_state()
    ckpt = Checkpointer("runs/relative/checkpoints", async_save=False)
    assert ckpt.save(3, state)
    assert (tmp_path / "runs/relative/checkpoints/3").is_dir()
    restored = Checkpointer("runs/relative/checkpoints").restore(target=state)
    assert restored.step == 3
