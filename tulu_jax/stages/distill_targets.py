"""`tulu-jax distill-targets`: run a teacher over a dataset once and write sparse targets for `distill.mode: offline`.

It reads the same config as `tulu-jax distill` (student tokenizer, `data`, `distill.teacher`, `distill.targets`):
the data is tokenized exactly as the stage would (`tulu_jax.stages.sft.prepare_sft_data`), the teacher scores
`targets.batch_size` rows at a time on the mesh (a jitted pass with the teacher's parameters as arguments), and each
distilled position keeps K ids and probabilities (T = 1): `top_k`, or `sampled` (K ids without replacement with
probability proportional to the teacher's, Gumbel top-k; Gemma 3's 256 sampled logits) with a key per (seed,
shard, batch). Shards whose file exists (as process 0 sees it) are skipped, so a resumed run writes each shard once;
every process takes part in each pass and process 0 writes. The manifest must match a resumed run's settings.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from tulu_jax.data.batching import build_batch, check_row
from tulu_jax.data.distill_targets import TargetsManifest, distilled_positions, shard_path, write_shard
from tulu_jax.data.vocab import vocabulary_hash
from tulu_jax.errors import ConfigError
from tulu_jax.sharding import batch_sharding
from tulu_jax.stages.distill import DistillConfig
from tulu_jax.stages.sections import load_stage_config
from tulu_jax.stages.setup import batch_shards, load_stage_tokenizer, resolve_model_config, setup_mesh
from tulu_jax.stages.sft import prepare_sft_data
from tulu_jax.stages.teacher import build_teacher, check_teacher_vocabulary, teacher_tokenizer_path
from tulu_jax.train import FrozenModel, shardings_of
from tulu_jax.train.batches import Batch


def sparse_targets(logits: jax.Array, k: int, mode: str, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(ids int32, probs float16) [..., K] of softmax(logits): the K most likely ids, or K ids drawn without
    replacement with probability ∝ p (Gumbel top-k) with their probabilities."""
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    scores = log_p if mode == "top_k" else log_p + jax.random.gumbel(key, log_p.shape)
    _, ids = jax.lax.top_k(scores, k)
    probs = jnp.exp(jnp.take_along_axis(log_p, ids, axis=-1))
    return ids.astype(jnp.int32), probs.astype(jnp.float16)


def build_target_fn(teacher: FrozenModel, k: int, mode: str, batch_shardings: Any) -> Any:
    """Jitted `(teacher, batch, key) -> (ids, probs)` [B, T, K], the teacher's arrays as arguments. The targets
    come back replicated: every process can read them (a multi-host run; they are K / V of the logits' size)."""

    def fn(frozen: FrozenModel, batch: Batch, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits = frozen.model()(batch.input_ids, positions=batch.positions, segment_ids=batch.segment_ids)
        return sparse_targets(logits, k, mode, key)

    replicated = NamedSharding(batch_shardings.mesh, PartitionSpec())
    return jax.jit(fn, in_shardings=(shardings_of(teacher), batch_shardings, replicated),
                   out_shardings=(replicated, replicated))


def missing_shards(directory: pathlib.Path, num_shards: int) -> list[int]:
    """The shards without a file, as process 0 sees them: every process of a multi-host run computes the same
    shards (their passes hold collectives), and process 0 is the one that writes."""
    missing = np.array([not shard_path(directory, s).is_file() for s in range(num_shards)])
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        missing = np.asarray(multihost_utils.broadcast_one_to_all(missing))
    return [int(s) for s in np.flatnonzero(missing)]


def _check_manifest(directory: pathlib.Path, manifest: TargetsManifest) -> None:
    """A resumed run must be the same run: ConfigError naming the first differing field."""
    if not (directory / "manifest.json").is_file():
        return
    old = TargetsManifest.load(directory)
    for field in dataclasses.fields(TargetsManifest):
        if getattr(old, field.name) != getattr(manifest, field.name):
            raise ConfigError(
                f"{directory}: existing targets have {field.name}={getattr(old, field.name)!r}, this run "
                f"{getattr(manifest, field.name)!r}; write to a new distill.targets.path"
            )


def write_targets(config: DistillConfig, sharding: str | os.PathLike[str], devices: Any = None) -> dict[str, int]:
    """Write every missing shard of `config.distill.targets.path`; returns {"written": n, "skipped": m}."""
    distill, targets = config.distill, config.distill.targets
    spec, mesh = setup_mesh(sharding, devices)
    tokenizer = load_stage_tokenizer(config.tokenizer, config.model)
    student = resolve_model_config(config.model, tokenizer)
    teacher_config, teacher = build_teacher(distill.teacher, tokenizer, mesh, spec, abstract=False,
                                            seed=config.train.seed)
    check_teacher_vocabulary(student, teacher_config, tokenizer,
                             teacher_tokenizer_path(distill.teacher, distill.teacher_tokenizer))
    if targets.k > teacher_config.vocab_size:
        raise ConfigError(f"distill.targets.k {targets.k} exceeds the vocabulary ({teacher_config.vocab_size})")
    if targets.batch_size % batch_shards(mesh, spec):
        raise ConfigError(f"distill.targets.batch_size {targets.batch_size} must be a multiple of the "
                          f"{batch_shards(mesh, spec)} batch shards of {spec.source}")
    rows, report = prepare_sft_data(config.data, tokenizer, config.tokenizer.chat_template)
    print(report.summary(), file=sys.stderr)
    directory = pathlib.Path(targets.path)
    manifest = TargetsManifest(
        teacher=distill.teacher.path or f"preset:{distill.teacher.preset}", tokenizer_hash=vocabulary_hash(tokenizer),
        k=targets.k, mode=targets.mode, rows_per_shard=targets.rows_per_shard, num_rows=len(rows),
        format=config.data.format,
    )
    _check_manifest(directory, manifest)
    if jax.process_index() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        manifest.save(directory)
    matrix = batch_sharding(mesh, spec)
    target_fn = build_target_fn(teacher, targets.k, targets.mode, matrix)
    seq_len, size = config.data.max_seq_len, targets.batch_size
    missing = missing_shards(directory, manifest.num_shards)
    counts = {"written": 0, "skipped": manifest.num_shards - len(missing)}
    for s in missing:
        shard_rows = rows[s * targets.rows_per_shard: (s + 1) * targets.rows_per_shard]
        out = []
        for b in range(0, len(shard_rows), size):
            chunk = shard_rows[b: b + size]
            checked = [[check_row(r, index=b + i, seq_len=seq_len)] for i, r in enumerate(chunk)]
            host = build_batch(checked + [[]] * (size - len(chunk)), seq_len)
            batch = jax.tree.map(lambda x: jax.device_put(x, matrix), Batch.from_host(host))
            key = jax.random.fold_in(jax.random.key(targets.seed), s * 1_000_003 + b)
            ids, probs = (np.asarray(x) for x in target_fn(teacher, batch, key))
            for i, row in enumerate(chunk):
                where = distilled_positions(row["labels"])
                out.append({**row, "teacher_ids": ids[i, where], "teacher_probs": probs[i, where]})
        if jax.process_index() == 0:
            write_shard(directory, s, out)
        counts["written"] += 1
    print(f"tulu-jax distill-targets: {counts['written']} shard(s) written, {counts['skipped']} already complete, "
          f"{len(rows)} rows, K={targets.k} ({targets.mode}) in {directory}", file=sys.stderr)
    return counts


def main(args: Any) -> int:
    """`tulu-jax distill-targets --config C --sharding S [--set k=v ...]`."""
    write_targets(load_stage_config(DistillConfig, args.config, args.overrides), os.fspath(args.sharding))
    return 0
