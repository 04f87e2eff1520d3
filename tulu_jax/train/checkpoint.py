"""Checkpoints of a TrainState plus data-iterator state and run metadata, on top of orbax's CheckpointManager.

Layout of one step directory (orbax Composite): `state/` (params, model_state, opt_state, step, rng; sharded
arrays via StandardSave), `data/process_<i>-of-<n>.json` (each process's data-iterator `get_state()`, since every
host of a pod reads its own shard of the data; bytes are base64-encoded) and `metadata/` (a JSON dict, e.g. the
run config). orbax writes each step into a `*.orbax-checkpoint-tmp` folder and renames it when complete (on
object stores it writes a commit marker instead), so an interrupted save is never listed nor restored.

Integrity: `integrity/` records a checksum of every array (computed on device, see `train.integrity`) and each
data file carries the sha256 of its content; `restore` recomputes and compares them, and any unreadable file
(truncated array, missing `_METADATA` or `state/`, bad iterator JSON) or mismatch raises CorruptCheckpointError
naming the checkpoint and what is wrong. `restore_intact` (what a resuming run calls) then warns in one line, sets
the corrupt checkpoint aside as `<step>.corrupt` and falls back to the newest intact one. A state holding NaN or
inf is never saved (TrainingError), so retention never deletes the newest finite checkpoint for a non-finite one.

Restores take an abstract target (sharded `jax.ShapeDtypeStruct`s or live arrays): arrays are read straight into
the target's shardings, which may belong to a different mesh than the one that saved them. Shapes and dtypes are
checked against the checkpoint first, and a mismatch raises CheckpointError naming the parameter.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import json
import os
import sys
from typing import Any, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from tulu_jax.errors import CheckpointError, CorruptCheckpointError, TrainingError
from tulu_jax.finite import nonfinite_leaves
from tulu_jax.pytree import path_name
from tulu_jax.train.integrity import mismatched, tree_checksums
from tulu_jax.train.state import TrainState


@dataclasses.dataclass(frozen=True)
class Restored:
    """What `Checkpointer.restore` returns."""

    step: int
    state: TrainState
    data_state: dict | bytes | None
    metadata: dict


def _trained_arrays(arrays: dict[str, Any]) -> dict[str, Any]:
    """The parameters and optimizer state of every trained model (a MultiTrainState's under `models`)."""
    if "models" in arrays:
        return {name: _trained_arrays(member) for name, member in arrays["models"].items()}
    return {"params": arrays["params"], "opt_state": arrays["opt_state"]}


def _state_dict(state: TrainState) -> dict[str, Any]:
    return state.arrays()  # a TrainState, or a MultiTrainState of several


def _encode_data_state(data_state: dict | bytes | None) -> dict[str, Any]:
    if data_state is None:
        return {"format": "none"}
    if isinstance(data_state, bytes):
        return {"format": "bytes", "value": base64.b64encode(data_state).decode("ascii")}
    if isinstance(data_state, dict):
        return {"format": "json", "value": data_state}
    raise TypeError(f"data-iterator state must be a dict, bytes or None, got {type(data_state).__name__}")


def _content_digest(encoded: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(encoded, sort_keys=True).encode()).hexdigest()


def _decode_data_state(stored: Any) -> dict | bytes | None:
    if not isinstance(stored, dict):
        raise CorruptCheckpointError(f"data-iterator state is a {type(stored).__name__}, not a JSON object")
    digest = stored.pop("sha256", None)
    if digest != _content_digest(stored):
        raise CorruptCheckpointError("data-iterator state does not match its sha256 (edited or damaged)")
    fmt = stored.get("format")
    if fmt == "none":
        return None
    if fmt == "bytes":
        return base64.b64decode(stored["value"])
    if fmt == "json":
        return stored["value"]
    raise CheckpointError(f"data-iterator state has unknown format {fmt!r}")


def _process_file(directory: Any) -> Any:
    return directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"


class DataStateHandler(ocp.CheckpointHandler):
    """orbax handler writing each process's data-iterator state to its own JSON file (any process count)."""

    def save(self, directory: Any, args: "DataStateSave") -> None:
        """Write this process's encoded iterator state."""
        encoded = _encode_data_state(args.state)
        _process_file(directory).write_text(json.dumps({**encoded, "sha256": _content_digest(encoded)}))

    def restore(self, directory: Any, args: "DataStateRestore | None" = None) -> dict | bytes | None:
        """Read this process's iterator state; the checkpoint must come from as many processes as run now."""
        path = _process_file(directory)
        if not path.exists():
            raise CheckpointError(
                f"{path} is missing: the checkpoint's data state was saved by a different number of processes "
                f"than the {jax.process_count()} running now"
            )
        try:
            stored = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CorruptCheckpointError(f"data/{path.name} is not valid JSON ({e})") from None
        return _decode_data_state(stored)


def set_data_state(batches: Any, data_state: dict | bytes, where: str) -> None:
    """`batches.set_state`, its failure (an iterator state that does not fit this data) as one CheckpointError."""
    try:
        batches.set_state(data_state)
    except Exception as e:  # noqa: BLE001 — iterators (grain's among them) raise many types for a bad state
        reason = " ".join(str(e).split())[:300]
        raise CheckpointError(
            f"checkpoint {where}: its data-iterator state does not fit this run's data ({type(e).__name__}: {reason})"
        ) from None


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    """Save args of DataStateHandler."""

    state: dict | bytes | None


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    """Restore args of DataStateHandler."""


def _abstract(leaf: Any) -> jax.ShapeDtypeStruct:
    sharding = getattr(leaf, "sharding", None)
    if sharding is None:
        raise CheckpointError(f"restore target leaf {leaf!r} has no sharding: pass sharded arrays or ShapeDtypeStructs")
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)


class Checkpointer:
    """Saves and restores TrainStates (plus iterator state and metadata) under `directory/<step>/`.

    Keeps the last `max_to_keep` checkpoints. `save(..., force=False)` only writes on multiples of
    `save_interval_steps`. Saves are asynchronous by default: the device-to-host copy happens inside `save`, the
    file writing in the background; `wait()` blocks until it is on disk.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int | None = 3,
        save_interval_steps: int = 1,
        async_save: bool = True,
    ):
        # Local or cloud storage (gs://...); orbax wants local paths absolute.
        self.directory = epath.Path(directory if "://" in os.fspath(directory) else os.path.abspath(directory))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            save_interval_steps=save_interval_steps,
            enable_async_checkpointing=async_save,
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": DataStateHandler(),
                "metadata": ocp.JsonCheckpointHandler(),
                "integrity": ocp.JsonCheckpointHandler(),
            },
        )

    def all_steps(self) -> list[int]:
        """Steps of the finalized checkpoints on disk, ascending."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest finalized step, or None when there is no checkpoint."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def save(
        self,
        step: int,
        state: TrainState,
        *,
        data_state: dict | bytes | None = None,
        metadata: dict | None = None,
        force: bool = False,
    ) -> bool:
        """Save `state` as checkpoint `step`; returns whether a save was started (interval policy unless `force`).

        Raises TrainingError, saving nothing, when a parameter or optimizer array holds NaN or inf.
        """
        if not force and not self._manager.should_save(step):
            return False
        arrays = _state_dict(state)
        bad = nonfinite_leaves(_trained_arrays(arrays))
        if bad:
            latest = self.latest_step()
            newest = f"the newest checkpoint is {self.directory}/{latest}" if latest is not None else "no checkpoint"
            raise TrainingError(
                f"step {step}: refusing to save a non-finite state ({len(bad)} arrays hold NaN/inf, e.g. {bad[0]}); "
                + newest
            )
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(arrays),
                data=DataStateSave(data_state),
                metadata=ocp.args.JsonSave(dict(metadata or {})),
                integrity=ocp.args.JsonSave({"checksums": tree_checksums(arrays)}),
            ),
            force=force,
        )

    def _check_target(self, step: int, target: dict[str, Any]) -> None:
        stored_tree = self._manager.item_metadata(step)["state"].tree
        stored = {
            path_name(path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(stored_tree)[0]
            if hasattr(leaf, "shape")
        }
        wanted = {path_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]}
        missing, unexpected = sorted(wanted.keys() - stored.keys()), sorted(stored.keys() - wanted.keys())
        if missing or unexpected:
            raise CheckpointError(
                f"checkpoint {self.directory}/{step} does not match the model: missing {missing[:10]}, "
                f"unexpected {unexpected[:10]}"
            )
        mismatches = [
            f"{name} is {stored[name].dtype}{list(stored[name].shape)} on disk but the model expects "
            f"{leaf.dtype}{list(leaf.shape)}"
            for name, leaf in sorted(wanted.items(), key=lambda item: not item[0].startswith("params."))
            if tuple(stored[name].shape) != tuple(leaf.shape) or np.dtype(stored[name].dtype) != np.dtype(leaf.dtype)
        ]
        if mismatches:
            raise CheckpointError(
                f"checkpoint {self.directory}/{step}: {len(mismatches)} arrays do not match the model: "
                + "; ".join(mismatches[:5])
            )

    def restore(self, step: int | None = None, *, target: TrainState) -> Restored:
        """Restore checkpoint `step` (default: the latest) into the shapes, dtypes and shardings of `target`.

        `target` is a TrainState of sharded jax.Arrays or sharded jax.ShapeDtypeStructs (see
        `state.with_shardings`); its shardings may come from a different mesh than the saved ones. Raises
        CorruptCheckpointError when a file is unreadable or an array fails its checksum, CheckpointError when
        the checkpoint does not fit `target`.
        """
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointError(f"no finalized checkpoint in {self.directory}")
        elif step not in self.all_steps():
            raise CheckpointError(f"no finalized checkpoint for step {step} in {self.directory}")
        abstract = jax.tree.map(_abstract, _state_dict(target))
        with self._reading(step):
            self._check_target(step, abstract)
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract),
                    data=DataStateRestore(),
                    metadata=ocp.args.JsonRestore(),
                    integrity=ocp.args.JsonRestore(),
                ),
            )
        self._verify(step, self._checksums_of(step, restored["integrity"]), restored["state"])
        state = target.with_arrays(restored["state"])
        return Restored(
            step=step,
            state=state,
            data_state=restored["data"],
            metadata=dict(restored["metadata"] or {}),
        )

    def recorded_checksums(self, step: int) -> dict[str, str]:
        """The array checksums written with checkpoint `step` (CorruptCheckpointError when unreadable)."""
        with self._reading(step):
            record = self._manager.restore(step, args=ocp.args.Composite(integrity=ocp.args.JsonRestore()))
        return self._checksums_of(step, record["integrity"])

    def verify(self, step: int, arrays: dict[str, Any]) -> None:
        """CorruptCheckpointError unless every array of `arrays` (a tree named like the saved state, e.g. a
        partial `{"params": ...}` restore) matches the checksum recorded with checkpoint `step`."""
        self._verify(step, self.recorded_checksums(step), arrays)

    def _checksums_of(self, step: int, record: Any) -> dict[str, str]:
        if not isinstance(record, dict) or not isinstance(record.get("checksums"), dict):
            raise CorruptCheckpointError(f"checkpoint {self.directory}/{step}: the integrity record is malformed")
        return record["checksums"]

    def _verify(self, step: int, checksums: dict[str, str], arrays: dict[str, Any]) -> None:
        bad = mismatched(checksums, arrays)
        if bad:
            raise CorruptCheckpointError(
                f"checkpoint {self.directory}/{step}: {len(bad)} arrays do not match their recorded checksums "
                f"(damaged files), e.g. {bad[0]}"
            )

    @contextlib.contextmanager
    def _reading(self, step: int) -> Iterator[None]:
        """Turn any failure to read checkpoint `step`'s files into one CorruptCheckpointError naming it."""
        try:
            yield
        except CorruptCheckpointError as e:  # from the data handler, which does not know the step
            raise CorruptCheckpointError(f"checkpoint {self.directory}/{step}: {e}") from None
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 — orbax and tensorstore raise many types for damaged files
            reason = " ".join(str(e).split())[:300] or type(e).__name__
            raise CorruptCheckpointError(
                f"checkpoint {self.directory}/{step} is unreadable ({type(e).__name__}: {reason})"
            ) from None

    def restore_intact(self, *, target: TrainState, strict: bool = False) -> Restored:
        """Restore the newest intact checkpoint: each corrupt newer one gets a one-line warning on stderr and is
        set aside as `<step>.corrupt`. `strict`: the first corrupt checkpoint is an error instead. Raises
        CorruptCheckpointError when none is intact (nothing is set aside then)."""
        failures: list[tuple[int, CorruptCheckpointError]] = []
        for step in reversed(self.all_steps()):
            try:
                restored = self.restore(step, target=target)
            except CorruptCheckpointError as e:
                if strict:
                    raise CorruptCheckpointError(f"{e} (--strict-resume: not falling back)") from None
                print(f"tulu-jax: warning: {e}; trying the previous checkpoint", file=sys.stderr)
                failures.append((step, e))
                continue
            for bad_step, _ in failures:
                self._set_aside(bad_step)
            return restored
        raise CorruptCheckpointError(
            f"no intact checkpoint in {self.directory}: " + "; ".join(str(e) for _, e in failures)
        )

    def _set_aside(self, step: int) -> None:
        """Rename a corrupt step directory out of orbax's view (kept for inspection; a new save may reuse `step`)."""
        if jax.process_index() == 0:
            source = self.directory / str(step)
            target = self.directory / f"{step}.corrupt"
            suffix = 1
            while target.exists():
                suffix += 1
                target = self.directory / f"{step}.corrupt{suffix}"
            source.rename(target)
            print(f"tulu-jax: warning: set {source} aside as {target}", file=sys.stderr)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"tulu_jax.checkpoint.set_aside.{step}")
        self._manager.reload()

    def wait(self) -> None:
        """Block until every started save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves and release orbax's resources."""
        self._manager.close()
