"""Reference log-probs for DPO: the sequence log-probs of both sides of every pair under the frozen reference model.

Two ways, giving the same numbers (docs/recipe.md, DPO):
- cached: one no-grad sharded jitted pass over the data before training (`compute_reference_logps`), stored in the
  run directory as `reference_logps.npz` (chosen, rejected float32 [N], by pair index) plus `reference_logps.json`
  (the fingerprint). A resumed run reuses it; a run whose model, data or settings changed is refused with an error
  naming what changed (`load_or_compute_reference`).
- live: the frozen reference parameters stay on the mesh and are an argument of the train step
  (`frozen["reference"]`), which scores each micro-batch with `pair_sequence_logps` (`tulu_jax.stages.dpo`).
Cached, the train step reads `ref_chosen_logps` / `ref_rejected_logps` [B] from the batch.

The fingerprint: a checksum of the reference parameters computed on device (`params_fingerprint`; the same for a
model loaded from HF or initialized from scratch, whatever the mesh), the model config (all but `remat`), a hash of
every tokenized pair in pair-index order (`data_fingerprint`, which also covers tokenizer, template, truncation
and mixture order) and the settings: max_seq_len, chat template and whether log-probs are averaged (dpo_norm,
simpo) or summed (dpo, ipo).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from tulu_jax.data.preference import SIDES
from tulu_jax.data.preference_batching import PAIR_INDEX, REF_KEYS, PairLogps
from tulu_jax.errors import CheckpointError
from tulu_jax.losses import sequence_logps
from tulu_jax.train.integrity import array_checksums
from tulu_jax.train.batches import Batch, PairBatch
from tulu_jax.train.step import split_micro_batches

PyTree = Any
CACHE_ARRAYS = "reference_logps.npz"
CACHE_FINGERPRINT = "reference_logps.json"


def pair_sequence_logps(
    model: nnx.Module, batch: PairBatch, *, average: bool, concat_forward: bool
) -> tuple[jax.Array, jax.Array]:
    """Sequence log-probs (sum, or mean when `average`, over response tokens) of the chosen and rejected sides, [B].

    concat_forward: one forward over both sides, interleaved along the batch (row 2i chosen, 2i+1 rejected, so
    each device keeps its own rows and no data moves); else two forwards (less activation memory, same numbers).
    """

    def score(side: Batch) -> jax.Array:
        logps = model.token_logps(side.input_ids, side.targets, positions=side.positions, segment_ids=side.segment_ids)
        return sequence_logps(logps, side.loss_mask, average=average)

    if not concat_forward:
        return score(batch.chosen), score(batch.rejected)

    def both(chosen: jax.Array, rejected: jax.Array) -> jax.Array:
        stacked = jnp.stack([chosen, rejected], axis=1)  # [B, 2, T]
        return stacked.reshape(-1, stacked.shape[-1])

    logps = score(jax.tree.map(both, batch.chosen, batch.rejected)).reshape(-1, 2)
    return logps[:, 0], logps[:, 1]


def build_reference_fn(
    graphdef: nnx.GraphDef,
    *,
    average: bool,
    concat_forward: bool,
    micro_batches: int = 1,
    batch_sharding: NamedSharding | None = None,
    out_sharding: jax.sharding.Sharding | None = None,
) -> Callable[[nnx.State, nnx.State, PairBatch], dict[str, jax.Array]]:
    """A jitted no-grad `(params, model_state, pair batch) -> {pair_index, ref_chosen_logps, ref_rejected_logps}` ([B]).

    micro_batches: the batch is scored in that many strided micro-batches (rows i, i+A, ...: the train step's
    split), one after the other, to bound activation memory; results are put back in batch order.
    out_sharding: of the [B] outputs (e.g. replicated, so that every process can read the whole batch's values).
    """

    def forward(params: nnx.State, model_state: nnx.State, batch: PairBatch) -> tuple[jax.Array, ...]:
        model = nnx.merge(graphdef, params, model_state)
        return pair_sequence_logps(model, batch, average=average, concat_forward=concat_forward)

    def fn(params: nnx.State, model_state: nnx.State, batch: PairBatch) -> dict[str, jax.Array]:
        params = jax.lax.stop_gradient(params)
        inputs = PairBatch(batch.chosen, batch.rejected, batch.index)  # the two sides (and the index)
        if micro_batches == 1:
            chosen, rejected = forward(params, model_state, inputs)
        else:
            split = split_micro_batches(inputs, micro_batches, batch_sharding)
            chosen, rejected = jax.lax.map(lambda micro: forward(params, model_state, micro), split)
            # [A, B/A] with micro-batch i holding rows i, i+A, ... → [B] in row order.
            chosen, rejected = chosen.T.reshape(-1), rejected.T.reshape(-1)
        return {PAIR_INDEX: batch.index, REF_KEYS[0]: chosen, REF_KEYS[1]: rejected}

    return jax.jit(fn, out_shardings=out_sharding)


def compute_reference_logps(
    reference_fn: Callable[[nnx.State, nnx.State, PairBatch], dict[str, jax.Array]],
    params: nnx.State,
    model_state: nnx.State,
    batches: Iterable[Mapping[str, np.ndarray]],
    num_pairs: int,
    prepare_batch: Callable[[Mapping[str, np.ndarray]], PairBatch] = PairBatch.from_host,
) -> PairLogps:
    """Score every pair once: the table of reference log-probs by pair index.

    `batches` are host batches covering every pair (e.g. one unshuffled epoch); `prepare_batch` makes them typed
    global arrays; `reference_fn` (from `build_reference_fn`) must return values every process can read (replicated).
    """
    pending = [reference_fn(params, model_state, prepare_batch(batch)) for batch in batches]  # dispatched async
    chosen, rejected = np.full(num_pairs, np.nan, np.float32), np.full(num_pairs, np.nan, np.float32)
    for out in jax.device_get(pending):
        index = np.asarray(out[PAIR_INDEX])
        real = index >= 0
        chosen[index[real]] = out[REF_KEYS[0]][real]
        rejected[index[real]] = out[REF_KEYS[1]][real]
    missing = np.flatnonzero(np.isnan(chosen) | np.isnan(rejected))
    if missing.size:
        raise ValueError(f"the reference pass did not score {missing.size} pairs (e.g. pair {missing[0]})")
    return PairLogps(chosen, rejected)


# --------------------------------------------------------------------------------------------------- fingerprint

def params_fingerprint(params: PyTree) -> str:
    """A hex digest of every parameter's path, shape, dtype and contents (checksummed on device, sharded)."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    sums = jax.device_get(array_checksums([leaf for _, leaf in flat]))
    digest = hashlib.sha256()
    for (path, leaf), checksum in zip(flat, sums, strict=True):
        digest.update(f"{jax.tree_util.keystr(path)}|{leaf.shape}|{leaf.dtype}|".encode())
        digest.update(np.asarray(checksum, np.uint32).tobytes())
    return digest.hexdigest()


def data_fingerprint(pairs: Sequence[Mapping[str, np.ndarray]]) -> str:
    """A hex digest of every tokenized pair (both sides' ids and labels), in pair-index order."""
    digest = hashlib.sha256(f"{len(pairs)} pairs|".encode())
    for pair in pairs:
        for side in SIDES:
            for key in ("input_ids", "labels"):
                values = np.ascontiguousarray(pair[f"{side}_{key}"], np.int32)
                digest.update(f"{values.size}|".encode())
                digest.update(values.tobytes())
    return digest.hexdigest()


def reference_fingerprint(
    *, params: PyTree, model_config: Mapping[str, Any], pairs: Sequence[Mapping[str, np.ndarray]],
    max_seq_len: int, chat_template: str, average: bool,
) -> dict[str, Any]:
    """Everything the cached reference log-probs depend on, as JSON-able data (see the module docstring)."""
    return {
        "model_params": params_fingerprint(params),
        "model_config": {k: v for k, v in dict(model_config).items() if k not in ("remat", "logits_chunk_size", "attention")},
        "data": data_fingerprint(pairs),
        "num_pairs": len(pairs),
        "max_seq_len": max_seq_len,
        "chat_template": chat_template,
        "average_logps": average,
    }


# --------------------------------------------------------------------------------------------------- cache files


def _describe_changes(stored: Mapping[str, Any], current: Mapping[str, Any]) -> str:
    changes = []
    for key in sorted(set(stored) | set(current)):
        old, new = stored.get(key), current.get(key)
        if old == new:
            continue
        if key == "model_config" and isinstance(old, Mapping) and isinstance(new, Mapping):
            fields = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            changes.append(f"model_config ({', '.join(f'{k}: {old.get(k)!r} → {new.get(k)!r}' for k in fields)})")
        elif key in ("model_params", "data"):
            changes.append(f"{key} (different {'weights' if key == 'model_params' else 'tokenized pairs'})")
        else:
            changes.append(f"{key}: {old!r} → {new!r}")
    return "; ".join(changes)


def load_reference_cache(directory: str | os.PathLike[str], fingerprint: Mapping[str, Any]) -> PairLogps | None:
    """The cached log-probs in `directory` if there are any (None otherwise).

    Raises CheckpointError, naming what changed, when they were computed for another model, data or settings, and
    when the cache files are incomplete or do not hold one value per pair.
    """
    directory = pathlib.Path(directory)
    meta_path, arrays_path = directory / CACHE_FINGERPRINT, directory / CACHE_ARRAYS
    if not meta_path.exists():
        return None
    stored = json.loads(meta_path.read_text())
    current = json.loads(json.dumps(dict(fingerprint)))  # the JSON round trip makes tuples lists, like the file
    if stored != current:
        raise CheckpointError(
            f"the cached reference log-probs in {meta_path} were computed for a different run: "
            f"{_describe_changes(stored, current)}. Use a new output.run_dir, or delete {meta_path} and "
            f"{arrays_path} to recompute them (a resumed run must keep the model, data and DPO settings it started with)"
        )
    try:
        with np.load(arrays_path) as arrays:
            table = PairLogps(arrays["chosen"].astype(np.float32), arrays["rejected"].astype(np.float32))
    except (OSError, KeyError, ValueError) as err:
        raise CheckpointError(f"cannot read the cached reference log-probs {arrays_path}: {err}") from None
    expected = (int(fingerprint["num_pairs"]),)
    if table.chosen.shape != expected or table.rejected.shape != expected:
        raise CheckpointError(f"{arrays_path} holds {table.chosen.shape} values, expected {expected}")
    return table


def save_reference_cache(directory: str | os.PathLike[str], fingerprint: Mapping[str, Any], table: PairLogps) -> None:
    """Write the table, then its fingerprint (the fingerprint file marks a complete cache); process 0 only."""
    if jax.process_index() != 0:
        return
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (CACHE_ARRAYS + ".tmp.npz")
    np.savez(tmp, chosen=table.chosen, rejected=table.rejected)
    os.replace(tmp, directory / CACHE_ARRAYS)
    tmp_meta = directory / (CACHE_FINGERPRINT + ".tmp")
    tmp_meta.write_text(json.dumps(dict(fingerprint), indent=2))
    os.replace(tmp_meta, directory / CACHE_FINGERPRINT)


def load_or_compute_reference(
    directory: str | os.PathLike[str], fingerprint: Mapping[str, Any], compute: Callable[[], PairLogps]
) -> tuple[PairLogps, bool]:
    """The cached table when its fingerprint matches, else `compute()` saved with the fingerprint.

    Returns (table, whether it came from the cache). Every process must see the same cache (a shared file system):
    processes that disagree raise instead of diverging (one computing with collectives while another does not).
    """
    table = load_reference_cache(directory, fingerprint)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.assert_equal(np.int32(table is not None), "reference cache found on some processes only")
    if table is not None:
        return table, True
    table = compute()
    save_reference_cache(directory, fingerprint, table)
    return table, False


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    """A fully replicated sharding on `mesh` (for values every process reads)."""
    return NamedSharding(mesh, PartitionSpec())
