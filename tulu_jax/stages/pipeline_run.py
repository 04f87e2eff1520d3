"""Reuse a finished pipeline run: read its stages' artifacts, evaluate any model on its held-out set, and fork it.

    from tulu_jax.stages.pipeline_run import open_run
    run = open_run("runs/tiny_arith")               # a directory `tulu-jax pipeline` wrote
    run.model_dir("sft"), run.data_file("preferences"), run.tokenizer(), run.held_out("sft").overall_accuracy
    config = run.fork("runs/dpo_beta5", keep=["base", "sft", "preferences"], config=changed)  # changed: dpo section
    run_pipeline(config, "sharding/cpu-1.yaml", resume=True)   # trains and evaluates dpo only
    run.evaluate("runs/dpo_beta5/dpo/hf")           # any HF model dir on this run's held-out set

`fork` makes a new run directory whose kept stages are links to this run's finished stages (nothing is copied but
the small world files, which later stages may rewrite) and whose pipeline.yaml is the new config. It refuses a
config that would not have produced the kept stages (another world, model, seed, eval settings or kept stage's
section), so every stage of the fork is what its config says. The fork is continued like any run the pipeline
started: `run_pipeline(config, ..., resume=True)`, or `tulu-jax pipeline --config ... --resume`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import yaml

from tulu_jax.config import dump_config, from_dict
from tulu_jax.errors import ConfigError
from tulu_jax.stages.pipeline import (
    PIPELINE_FILE,
    WORLD_FILE,
    PipelineConfig,
    evaluate_held_out,
)
from tulu_jax.stages.summary import EVAL_FILE, METRICS_FILE, STAGE_FILE, SummaryRow, read_jsonl, read_metrics, summarize

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from tulu_jax.stages.eval import EvalResult

FORK_FILE = "fork.json"
# Sections that every stage's result depends on: a fork must keep them.
_SHARED_SECTIONS = ("seed", "world", "model", "eval")


@dataclasses.dataclass(frozen=True)
class PipelineRun:
    """A run directory written by `tulu-jax pipeline` (`open_run` checks it). Its config is the saved
    pipeline.yaml; a stage is finished when `<stage>/stage.json` exists."""

    run_dir: pathlib.Path
    config: PipelineConfig

    @property
    def finished_stages(self) -> list[str]:
        """The configured stages that finished, in pipeline order."""
        return [s for s in self.config.stages if (self.run_dir / s / STAGE_FILE).is_file()]

    def stage_dir(self, stage: str) -> pathlib.Path:
        """Where `stage` wrote (stage.json, metrics.jsonl, eval.jsonl, hf/, checkpoints/); it must be finished."""
        if stage not in self.finished_stages:
            raise ConfigError(f"{self.run_dir}: stage {stage!r} is not finished here "
                              f"(finished: {', '.join(self.finished_stages) or 'none'})")
        return self.run_dir / stage

    def stage_record(self, stage: str) -> dict[str, Any]:
        """The stage's stage.json: wall time, whether a model was made and evaluated, and its facts (`info`)."""
        return json.loads((self.stage_dir(stage) / STAGE_FILE).read_text())

    def model_dir(self, stage: str) -> pathlib.Path:
        """The HF model directory `stage` made (loadable with `tulu_jax.load_model`)."""
        if not self.stage_record(stage)["model_dir"]:
            makers = [s for s in self.finished_stages if self.stage_record(s)["model_dir"]]
            raise ConfigError(f"{self.run_dir}: stage {stage!r} makes no model (stages with one: {', '.join(makers)})")
        return self.run_dir / stage / "hf"

    def data_file(self, name: str) -> pathlib.Path:
        """A data file of the run: "pretrain", "sft", "prompts" (RLVR rows with a reference solution), "eval" (the
        held-out set) or "preferences" (the preferences stage's pairs)."""
        path = self.run_dir / "data" / f"{name}.jsonl"
        if not path.is_file():
            present = sorted(p.stem for p in (self.run_dir / "data").glob("*.jsonl"))
            raise ConfigError(f"{self.run_dir}: no data file {name!r} (present: {', '.join(present)})")
        return path

    @property
    def tokenizer_dir(self) -> pathlib.Path:
        """The world's tokenizer (every model of the run uses it)."""
        return self.run_dir / "tokenizer"

    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The world's tokenizer, loaded."""
        from tulu_jax.data.tokenizers import load_tokenizer

        return load_tokenizer(self.tokenizer_dir)

    def metrics(self, stage: str) -> list[dict[str, Any]]:
        """A training stage's metrics.jsonl rows, one per step."""
        return read_metrics(self.stage_dir(stage) / METRICS_FILE)

    def held_out(self, stage: str) -> EvalResult:
        """The held-out evaluation the pipeline ran after `stage` (read back from `<stage>/eval.jsonl`)."""
        from tulu_jax.stages.eval import EvalRecord, EvalResult

        if not self.stage_record(stage)["evaluated"]:
            raise ConfigError(f"{self.run_dir}: stage {stage!r} was not evaluated (it makes no model)")
        records = [EvalRecord(**r) for r in read_jsonl(self.run_dir / stage / EVAL_FILE)]
        return EvalResult.from_records(records)

    def summary(self) -> list[SummaryRow]:
        """The summary rows of the finished stages (accuracy with its 95% interval, wall time, facts)."""
        return summarize(self.run_dir, self.config.stages)

    def evaluate(self, model_dir: str | os.PathLike[str], out_path: str | os.PathLike[str] | None = None) -> EvalResult:
        """Greedy evaluation of any HF model dir on this run's held-out set with the run's eval settings, as the
        pipeline evaluates its stages; per-example records to `out_path` when given."""
        out = None if out_path is None else pathlib.Path(out_path)
        return evaluate_held_out(self.run_dir, self.config.eval, model_dir, out)

    def fork(self, new_dir: str | os.PathLike[str], keep: Sequence[str], config: PipelineConfig | None = None
             ) -> PipelineConfig:
        """A new run directory that reuses the finished stages `keep` (the first stages of the new config);
        returns the new config (`config`, default this run's, with run_dir = new_dir) for `run_pipeline(...,
        resume=True)`, which then runs only the stages after `keep`. See the module docstring."""
        return fork(self, new_dir, keep, config)


def open_run(run_dir: str | os.PathLike[str]) -> PipelineRun:
    """The pipeline run in `run_dir` (its config from pipeline.yaml); ConfigError if it holds none."""
    path = pathlib.Path(run_dir)
    saved = path / PIPELINE_FILE
    if not saved.is_file() or not (path / WORLD_FILE).is_file():
        raise ConfigError(f"{path}: not a pipeline run directory (no {PIPELINE_FILE} and {WORLD_FILE}); "
                          "run `tulu-jax pipeline --config ...` first")
    return PipelineRun(path, from_dict(PipelineConfig, yaml.safe_load(saved.read_text()), source=str(saved)))


def _check_fork_config(run: PipelineRun, config: PipelineConfig, keep: Sequence[str]) -> None:
    """Refuse a fork whose kept stages this config would not have produced."""
    keep = list(keep)
    if config.stages[:len(keep)] != keep:
        raise ConfigError(f"fork: kept stages {keep} must be the first stages of the new config's {config.stages}")
    unfinished = [s for s in keep if s not in run.finished_stages]
    if unfinished:
        raise ConfigError(f"fork: {run.run_dir}: stage(s) {unfinished} not finished, cannot be kept")
    old, new = dump_config(run.config), dump_config(config)
    differing = [k for k in (*_SHARED_SECTIONS, *keep) if old.get(k) != new.get(k)]
    if differing:
        raise ConfigError(f"fork: the new config differs from {run.run_dir / PIPELINE_FILE} in "
                          f"{', '.join(repr(k) for k in differing)}, which the kept stages {keep} were made with")


def _link_stage(source: pathlib.Path, target: pathlib.Path, new_model_dir: pathlib.Path | None) -> None:
    """`target`/* → links to `source`/*, except stage.json, rewritten to name the model under `target`."""
    target.mkdir(parents=True)
    for entry in source.iterdir():
        if entry.name != STAGE_FILE:
            (target / entry.name).symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
    record = json.loads((source / STAGE_FILE).read_text())
    record["model_dir"] = None if new_model_dir is None else str(new_model_dir)
    record["forked_from"] = str(source.resolve())
    (target / STAGE_FILE).write_text(json.dumps(record, indent=2))


def fork(run: PipelineRun | str | os.PathLike[str], new_dir: str | os.PathLike[str], keep: Sequence[str],
         config: PipelineConfig | None = None) -> PipelineConfig:
    """`PipelineRun.fork` for a run or its directory. `new_dir` must not exist yet."""
    run = run if isinstance(run, PipelineRun) else open_run(run)
    config = dataclasses.replace(config or run.config, run_dir=str(new_dir))
    _check_fork_config(run, config, keep)
    new = pathlib.Path(new_dir)
    if new.exists():
        raise ConfigError(f"fork: {new} already exists; choose a new directory")
    (new / "data").mkdir(parents=True)
    for path in (run.run_dir / "data").glob("*.jsonl"):  # copies: a re-run stage (preferences) rewrites its file
        shutil.copyfile(path, new / "data" / path.name)
    for name in ("tokenizer", "decontamination"):
        if (run.run_dir / name).is_dir():
            (new / name).symlink_to((run.run_dir / name).resolve(), target_is_directory=True)
    for stage in keep:
        made = run.stage_record(stage)["model_dir"]
        _link_stage(run.run_dir / stage, new / stage, (new / stage / "hf").resolve() if made else None)
    shutil.copyfile(run.run_dir / WORLD_FILE, new / WORLD_FILE)
    (new / PIPELINE_FILE).write_text(yaml.safe_dump(dump_config(config), sort_keys=False))
    (new / FORK_FILE).write_text(json.dumps({"source": str(run.run_dir.resolve()), "kept": list(keep)}, indent=2))
    return config

