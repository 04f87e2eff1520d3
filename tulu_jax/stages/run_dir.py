"""A training stage's run directory and loop: config.yaml, model_config.json, the tokenizer, checkpoints (resume,
periodic, final, SIGTERM), metrics.jsonl with throughput, progress, and the final HF export.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys
from collections.abc import Callable, Mapping
from typing import Any

import jax

from tulu_jax.config import dump_config
from tulu_jax.models.config import ModelConfig
from tulu_jax.stages.sections import OutputSection
from tulu_jax.train import Checkpointer, MetricsWriter, TrainState, run_training
from tulu_jax.train.metrics import ThroughputWriter

PyTree = Any


def prepare_run_dir(output: OutputSection, config: Any, extra: Mapping[str, Any] | None = None) -> pathlib.Path:
    """Create run_dir and save the resolved config there as config.yaml (plus JSON files from `extra`)."""
    import yaml

    run_dir = pathlib.Path(output.run_dir)
    if jax.process_index() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(dump_config(config), sort_keys=False))
        for name, value in (extra or {}).items():
            (run_dir / name).write_text(json.dumps(value, indent=2))
    return run_dir


def model_config_dict(config: ModelConfig) -> dict[str, Any]:
    """A ModelConfig as JSON-able data (the run's model_config.json), readable by `ModelConfig(**d)`."""
    data = dataclasses.asdict(config)
    if data["rope_scaling"] is not None:
        data["rope_scaling"] = dict(data["rope_scaling"])
    if isinstance(data["eos_token_id"], tuple):
        data["eos_token_id"] = list(data["eos_token_id"])
    return data


def export_hf(state: TrainState, out_dir: str | os.PathLike[str], tokenizer: Any | None, dtype: str | None) -> None:
    """Write the state's model as an HF checkpoint (every process calls; process 0 writes) plus the tokenizer."""
    from tulu_jax.models.hf_io import save_hf_checkpoint

    save_hf_checkpoint(state.model(), out_dir, dtype=dtype)
    if tokenizer is not None and jax.process_index() == 0:
        tokenizer.save_pretrained(str(out_dir))


def train_and_export(
    *,
    state: TrainState,
    train_step: Callable[[TrainState, PyTree], tuple[TrainState, dict[str, jax.Array]]],
    batches: Any,
    num_steps: int,
    output: OutputSection,
    config: Any,
    model_config: ModelConfig,
    prepare_batch: Callable[[PyTree], PyTree],
    tokenizer: Any | None,
    stage: str,
    run_files: Mapping[str, Any] | None = None,
    export: Callable[[TrainState, pathlib.Path, Any, str | None], None] = export_hf,
) -> TrainState:
    """The stage loop: the run dir (config.yaml, model_config.json, tokenizer/), checkpoints (resume, periodic,
    final, SIGTERM), metrics.jsonl, progress, then (output.export_hf) the final model and tokenizer in run_dir/hf.
    Returns the final state.

    `batches` is a stateful host-batch iterator (`get_state`/`set_state`); `prepare_batch` turns a host batch
    into global arrays (a `tulu_jax.train.batcher.Batcher`). The stage has called `check_run_dir` first: a run_dir
    that holds a checkpoint is continued only with output.resume (tulu_jax.stages.resume).
    `run_files`: more JSON files for the run dir, name → data (e.g. the data report). `export(state, out_dir,
    tokenizer, dtype)` writes the final model (default `export_hf`, a causal LM).
    """
    model_dict = model_config_dict(model_config)
    run_dir = prepare_run_dir(output, config, {"model_config.json": model_dict, **dict(run_files or {})})
    if tokenizer is not None and jax.process_index() == 0:  # `tulu-jax convert to-hf` copies it next to the weights
        tokenizer.save_pretrained(str(run_dir / "tokenizer"))
    checkpointer = Checkpointer(run_dir / "checkpoints", max_to_keep=output.keep_last)
    writer = ThroughputWriter(MetricsWriter(run_dir / "metrics.jsonl",
                                            run_dir / "tensorboard" if output.tensorboard else None))
    metadata = {"stage": stage, "config": dump_config(config), "model_config": model_dict}
    try:
        state = run_training(
            state,
            train_step,
            batches,
            num_steps=num_steps,
            checkpointer=checkpointer,
            save_every=output.save_every,
            metrics_writer=writer,  # type: ignore[arg-type]  (same write/close interface)
            on_step=writer.on_step,
            log_every=output.log_every,
            metadata=metadata,
            prepare_batch=prepare_batch,
            progress=output.progress,
            max_nonfinite_steps=config.train.max_nonfinite_steps,
            strict_resume=output.strict_resume,
        )
    finally:
        writer.close()
        checkpointer.close()
    if output.export_hf:
        export(state, run_dir / "hf", tokenizer, output.export_dtype or model_config.param_dtype)
        print(f"tulu-jax: exported the trained model to {run_dir / 'hf'}", file=sys.stderr)
    return state
