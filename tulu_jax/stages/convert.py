"""`tulu-jax convert`: HF weights → an orbax parameter checkpoint, and a training run's checkpoint → HF directory.

Both orbax layouts hold the parameters under `params` as the TrainState checkpoints store them (an nnx.State:
every parameter is a `{"value": array}` node), so one reader, `restore_params`, serves the converted directory
(`OUT/params`) and any run checkpoint (`RUN/checkpoints/<step>/state`, read partially: Adam moments are skipped).
A run directory carries `model_config.json` (written by the stage runner) and `tokenizer/`.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import sys
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from tulu_jax.errors import CheckpointError, ConfigError
from tulu_jax.models.config import ModelConfig
from tulu_jax.models.decoder import Decoder
from tulu_jax.stages.run_dir import model_config_dict

MODEL_CONFIG_FILE = "model_config.json"


def read_model_config(directory: str | os.PathLike[str]) -> ModelConfig:
    """The ModelConfig a run (or a `to-orbax` output) saved as model_config.json; errors name the file."""
    path = pathlib.Path(directory) / MODEL_CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: not found (is {directory} a tulu-jax run directory?)")
    try:
        return ModelConfig(**json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        raise CheckpointError(f"{path}: not a ModelConfig ({e})") from None


def restore_params(state_dir: str | os.PathLike[str], config: ModelConfig, shardings: Any = None) -> Decoder:
    """A Decoder whose parameters are read from the `params` subtree of an orbax checkpoint at `state_dir`.

    shardings: a tree like `nnx.state(abstract Decoder, nnx.Param)` of shardings (default: the first device).
    """
    state_dir = pathlib.Path(state_dir).absolute()
    if not state_dir.is_dir():
        raise CheckpointError(f"{state_dir}: no such checkpoint directory")
    with nnx.use_eager_sharding(False):
        graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0))), nnx.Param, ...)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    targets = nnx.to_pure_dict(params)
    sharding_tree = nnx.to_pure_dict(shardings) if shardings is not None else jax.tree.map(lambda _: device, targets)
    template = {
        "params": jax.tree.map(
            lambda x, s: {"value": jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)}, targets, sharding_tree
        )
    }
    try:
        restored = ocp.PyTreeCheckpointer().restore(
            state_dir,
            args=ocp.args.PyTreeRestore(
                item=template,
                restore_args=ocp.checkpoint_utils.construct_restore_args(template),
                partial_restore=True,
            ),
        )
    except Exception as e:  # noqa: BLE001 — orbax and tensorstore raise many types (bare Exception among them)
        reason = " ".join(str(e).split())[:300]
        raise CheckpointError(
            f"{state_dir}: cannot read parameters of the model in {MODEL_CONFIG_FILE} (damaged files or another model: "
            f"{reason})"
        ) from None
    values = jax.tree.map(lambda node: node["value"], restored["params"], is_leaf=lambda n: isinstance(n, dict)
                          and set(n) == {"value"})
    nnx.replace_by_pure_dict(params, values)
    return nnx.merge(graphdef, params, rest)


def hf_to_orbax(
    hf_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], dtype: str | None = None
) -> pathlib.Path:
    """Load an HF directory and write its parameters as an orbax checkpoint `out_dir/params` plus
    `out_dir/model_config.json`; returns the params directory."""
    from tulu_jax.models.hf_io import load_hf_checkpoint

    out = pathlib.Path(out_dir).absolute()
    model = load_hf_checkpoint(hf_dir, dtype=dtype)
    out.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.PyTreeCheckpointer()
    checkpointer.save(out / "params", {"params": nnx.state(model, nnx.Param)}, force=True)
    if jax.process_index() == 0:
        (out / MODEL_CONFIG_FILE).write_text(json.dumps(model_config_dict(model.config), indent=2))
    return out / "params"


def run_checkpoint_to_hf(
    run_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, step: int | None = None,
    dtype: str | None = None,
) -> int:
    """Export checkpoint `step` (default: the latest) of a run as an HF directory, with the run's tokenizer.

    Returns the exported step. A checkpoint whose parameters fail their recorded checksums, or hold NaN/inf, is
    refused (CheckpointError) before anything is written.
    """
    from tulu_jax.models.hf_io import save_hf_checkpoint
    from tulu_jax.train import Checkpointer

    run = pathlib.Path(run_dir)
    config = read_model_config(run)
    checkpointer = Checkpointer(run / "checkpoints")
    try:
        steps = checkpointer.all_steps()
        if not steps:
            raise CheckpointError(f"{run / 'checkpoints'}: no finalized checkpoint")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise CheckpointError(f"{run / 'checkpoints'}: no checkpoint for step {step} (have {steps})")
        model = restore_params(run / "checkpoints" / str(step) / "state", config)
        # A damaged checkpoint is never exported: the parameters must match the checksums saved with them.
        checkpointer.verify(step, {"params": nnx.state(model, nnx.Param)})
    finally:
        checkpointer.close()
    save_hf_checkpoint(model, out_dir, dtype=dtype)
    tokenizer_dir = run / "tokenizer"
    if tokenizer_dir.is_dir() and jax.process_index() == 0:
        for file in tokenizer_dir.iterdir():
            shutil.copy2(file, pathlib.Path(out_dir) / file.name)
    return step


def prepare_out_dir(out_dir: str | os.PathLike[str], overwrite: bool) -> None:
    """Refuse a non-empty output directory unless `overwrite`; with it, first remove the safetensors files and index
    a previous export left there (a stale shard or index would be read together with the new weights)."""
    from tulu_jax.models.hf_io import INDEX_FILE

    out = pathlib.Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise ConfigError(f"--out {out} is not empty: choose a new or empty directory, or pass --overwrite")
    if jax.process_index() == 0:
        for stale in [*out.glob("*.safetensors"), out / INDEX_FILE]:
            stale.unlink(missing_ok=True)


def main(args: Any) -> int:
    """`tulu-jax convert to-orbax|to-hf`."""
    prepare_out_dir(args.out, args.overwrite)
    if args.direction == "to-orbax":
        where = hf_to_orbax(args.hf, args.out, args.dtype)
        print(f"tulu-jax convert: wrote the parameters of {args.hf} to {where}", file=sys.stderr)
    else:
        step = run_checkpoint_to_hf(args.run_dir, args.out, step=args.step, dtype=args.dtype)
        print(f"tulu-jax convert: exported step {step} of {args.run_dir} to {args.out}", file=sys.stderr)
    return 0
