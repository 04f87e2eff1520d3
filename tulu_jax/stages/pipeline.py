"""`tulu-jax pipeline`: the recipe's stages end to end on a verifiable toy world, each measured on held-out prompts.

    tulu-jax pipeline --config configs/tiny_arith.yaml [--sharding sharding/cpu-1.yaml] [--resume] [--set k=v ...]

The world (`tulu_jax.toy.arith`): seeded arithmetic word problems with exact answers, split into train and held-out
sets, and a byte-level BPE trained on them. The stages, in `stages` order, are ordinary runs of the real code paths:

- `base`: a decoder trained from scratch by next-token prediction on plain-text documents of problems and
  solutions (the SFT stage with `data.format: text`), standing in for a pretrained base model;
- `sft`: SFT from the base model on chat demonstrations (assistant-only labels, sum loss);
- `preferences`: on-policy preference data as Tülu 3 builds it: sample several responses per prompt from the
  latest model, score them with the GSM8K verifier, pair a correct response (chosen) with an incorrect one;
- `dpo`: length-normalized DPO from the latest model on those pairs;
- `rlvr`: RLVR (GRPO or PPO, `tulu_jax.stages.rlvr`) from the latest model on the train prompts, rewarded by the
  GSM8K verifier (its `rlvr` section holds the stage's data/optim/train/rlvr/output sections).

After every stage that makes a model, `tulu_jax.stages.eval.evaluate` scores it (greedy) on the held-out set and
writes `<stage>/eval.jsonl`. The summary table is computed from those files; `summary.json`, `summary.md` and
`summary.png` (losses, DPO rewards, accuracy with 95% intervals: `tulu_jax.stages.summary`) go to the run directory.

A stage is finished when its `<stage>/stage.json` exists (written last). `--resume` skips finished stages, and the
stage that was cut off resumes from its latest checkpoint; without `--resume` a run directory that holds a finished
stage or a checkpoint is refused, and with it a changed config is refused unless `--allow-config-change`
(`tulu_jax.stages.resume`). STEPS composes the pipeline: a step runs a training stage of `tulu_jax.stages.registry`
on a data file of the world (RLVR joins this way), or is a function of the run (the preferences step).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import pathlib
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import yaml

from tulu_jax.config import dump_config, from_dict, load_config
from tulu_jax.errors import ConfigError, DataError
from tulu_jax.stages.paths import resolve_path
from tulu_jax.stages.registry import get_stage
from tulu_jax.stages.resume import check_resume, parts_state
from tulu_jax.stages.sections import ModelSection
from tulu_jax.stages.summary import (
    EVAL_FILE,
    METRICS_FILE,
    STAGE_FILE,
    SummaryRow,
    summarize,
    training_info,
    write_summary,
)

PIPELINE_FILE = "pipeline.yaml"
WORLD_FILE = "world.json"
# Chat specials are single tokens, like a real model's: a prompt never merges into them.
SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>")
# Keys of a training stage's config that the pipeline owns.
_OWNED = {"model": None, "tokenizer": None, "data": ("sources", "format"),
          "output": ("run_dir", "resume", "allow_config_change")}


# --------------------------------------------------------------------------------------------------- config


@dataclasses.dataclass
class WorldSection:
    """The toy world: problem counts (train, held-out eval), operand size and the tokenizer's vocabulary size."""

    train_problems: int = 3000
    eval_problems: int = 200
    max_operand: int = 9
    vocab_size: int = 320


@dataclasses.dataclass
class PreferenceSection:
    """On-policy pairs: `samples_per_prompt` responses to each of `prompts` train prompts, sampled at
    `temperature`/`top_p` in batches of `batch_size`; a prompt gives one pair when it has a correct and an incorrect
    response. `reference_when_none_correct`: a prompt with no correct sample pairs its reference solution (chosen)
    with an incorrect sample, as Tülu 3 mixes other models' completions into its on-policy pairs."""

    prompts: int = 1000
    samples_per_prompt: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 48
    batch_size: int = 64
    reference_when_none_correct: bool = False


@dataclasses.dataclass
class EvalSection:
    """Held-out evaluation after each model-making stage: greedy, up to `max_new_tokens` per response."""

    max_new_tokens: int = 48
    batch_size: int = 100


@dataclasses.dataclass
class PipelineConfig:
    """A pipeline run. `model`: the base model's shape (a preset with overrides). `base`, `sft`, `dpo`: the `data`,
    `optim`, `train`, `output` (and for dpo `dpo`) sections of those stages' configs (`configs/tiny_sft.yaml` shows
    them); the pipeline sets their model, tokenizer, data sources and run directories."""

    model: ModelSection
    run_dir: str = "runs/tiny_arith"
    seed: int = 0
    stages: list[str] = dataclasses.field(default_factory=lambda: ["base", "sft", "preferences", "dpo"])
    world: WorldSection = dataclasses.field(default_factory=WorldSection)
    base: dict[str, Any] = dataclasses.field(default_factory=dict)
    sft: dict[str, Any] = dataclasses.field(default_factory=dict)
    preferences: PreferenceSection = dataclasses.field(default_factory=PreferenceSection)
    dpo: dict[str, Any] = dataclasses.field(default_factory=dict)
    rlvr: dict[str, Any] = dataclasses.field(default_factory=dict)
    eval: EvalSection = dataclasses.field(default_factory=EvalSection)

    def __post_init__(self) -> None:
        unknown = [s for s in self.stages if s not in STEPS]
        if unknown:
            raise ValueError(f"'stages': unknown stage(s) {unknown}; known: {', '.join(STEPS)}")
        if len(set(self.stages)) != len(self.stages):
            raise ValueError(f"'stages' repeats a stage: {self.stages}")


def load_pipeline_config(path: str, overrides: tuple[str, ...] = ()) -> PipelineConfig:
    """Load and check a pipeline config, including every training stage's config (before anything runs)."""
    resolved = resolve_path(path)
    if not resolved.is_file():
        raise ConfigError(f"{path}: config file not found")
    config = load_config(PipelineConfig, resolved, overrides)
    for name in config.stages:
        if STEPS[name].stage is not None:
            stage_config(config, name, pathlib.Path(config.run_dir), model_path=None, source=str(path))
    return config


def _check_owned(section: Mapping[str, Any], stage: str, source: str) -> None:
    for key, fields in _OWNED.items():
        if key not in section:
            continue
        owned = [key] if fields is None else [f"{key}.{f}" for f in fields if f in (section[key] or {})]
        if owned:
            keys = ", ".join(f"'{stage}.{k}'" for k in owned)
            raise ConfigError(f"{source}: {keys}: set by the pipeline, remove it")


def stage_config(
    config: PipelineConfig, stage: str, run_dir: pathlib.Path, model_path: str | None, *, source: str = "pipeline"
) -> Any:
    """The full config of training stage `stage`: its section of the pipeline config plus what the pipeline sets
    (model: `model_path`'s HF export, else the base shape; tokenizer; data sources; run dir; seeds). A bad key is a
    ConfigError naming `source` (the config file) and the stage."""
    spec = STEPS[stage]
    section = copy.deepcopy(getattr(config, stage))
    _check_owned(section, stage, source)
    model = dump_config(config.model) if model_path is None else {"path": model_path}
    if model_path is not None:  # dtypes and remat carry over; the shape comes from the checkpoint
        model.update({k: getattr(config.model, k) for k in ("param_dtype", "compute_dtype", "remat", "attention")})
    data = dict(section.pop("data", {}) or {})
    data["sources"] = [{"path": str(run_dir / "data" / spec.data_file)}]
    data.setdefault("seed", config.seed)
    if spec.data_format is not None:
        data["format"] = spec.data_format
    train = dict(section.pop("train", {}) or {})
    train.setdefault("seed", config.seed)
    output = dict(section.pop("output", {}) or {})
    output["run_dir"] = str(run_dir / stage)
    full = {
        "model": model,
        "tokenizer": {"path": str(run_dir / "tokenizer"), "chat_template": "tulu"},
        "data": data,
        "train": train,
        "output": output,
        **section,
    }
    return from_dict(get_stage(spec.stage).config_class, full, source=f"{source} ({stage})")


# --------------------------------------------------------------------------------------------------- world


def build_world(config: PipelineConfig, run_dir: pathlib.Path) -> dict[str, Any]:
    """Write the toy world into run_dir: data/{pretrain,sft,prompts,eval}.jsonl and tokenizer/. Deterministic in the
    config; a run directory made with another world is refused (world.json records it)."""
    from tulu_jax.data.tokenizers import train_tiny_bpe
    from tulu_jax.toy import arith

    world = {"seed": config.seed, **dataclasses.asdict(config.world)}
    marker = run_dir / WORLD_FILE
    if marker.is_file():
        stored = json.loads(marker.read_text())
        if stored != world:
            raise ConfigError(f"{run_dir} holds another world {stored}; this config makes {world} (use a new run_dir)")
        return world
    w = config.world
    train, held_out = arith.train_eval_split(w.train_problems, w.eval_problems, config.seed,
                                             max_operand=w.max_operand)
    data = run_dir / "data"
    data.mkdir(parents=True, exist_ok=True)
    files = {
        "pretrain.jsonl": [{"text": d} for d in arith.pretrain_documents(train, config.seed)],
        "sft.jsonl": [arith.sft_row(p) for p in train],
        "prompts.jsonl": [{**arith.rlvr_row(p), "reference": p.solution} for p in train],
        "eval.jsonl": [arith.rlvr_row(p) for p in held_out],
    }
    for name, rows in files.items():
        (data / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    check_held_out_is_clean(data, run_dir / "decontamination")
    tokenizer = train_tiny_bpe(arith.corpus_texts(train), w.vocab_size, SPECIAL_TOKENS, split_digits=True)
    tokenizer.save_pretrained(str(run_dir / "tokenizer"))
    marker.write_text(json.dumps(world, indent=2))  # last: the world is complete
    return world


def check_held_out_is_clean(data: pathlib.Path, out: pathlib.Path) -> None:
    """Decontamination, the recipe's first step: no training row may hold a held-out question (8-gram matching,
    report in `out`). The world is templated, so distinct problems share most of their words: the check asks for
    the whole question (threshold 1.0), where the recipe's 0.5 would flag most rows of the same template."""
    from tulu_jax.data.decontaminate import decontaminate

    train = [str(data / f"{name}.jsonl") for name in ("pretrain", "sft", "prompts")]
    report = decontaminate(train, [str(data / "eval.jsonl")], out, threshold=1.0)
    removed = sum(t["removed"] for t in report["train"])
    if removed:
        raise DataError(f"{removed} training rows hold a held-out question: see {out / 'matches.jsonl'}")
    print(f"tulu-jax pipeline: decontamination: no training row holds a held-out question ({out})", file=sys.stderr)


# --------------------------------------------------------------------------------------------------- stages


@dataclasses.dataclass(frozen=True)
class StageContext:
    """What a stage gets: the pipeline config, the run directory, the sharding file, the latest model (an HF
    directory, None before the first model), the devices to run on (None: all) and the pipeline's resume flags."""

    config: PipelineConfig
    run_dir: pathlib.Path
    sharding: str
    model_dir: pathlib.Path | None
    devices: Any = None
    resume: bool = False  # the pipeline runs with --resume: a stage cut off before continues from its checkpoint
    allow_config_change: bool = False

    def stage_dir(self, name: str) -> pathlib.Path:
        """Where stage `name` writes."""
        return self.run_dir / name


@dataclasses.dataclass(frozen=True)
class StageOutput:
    """What a stage made: its model (an HF directory, or None) and facts for the summary (JSON-able)."""

    model_dir: pathlib.Path | None
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class PipelineStep:
    """A step of the pipeline: a training stage of the registry (`stage`, e.g. "sft") run on `data_file` under
    run_dir/data in `data_format`, or a function of the run (`run`, e.g. on-policy preferences)."""

    stage: str | None = None
    data_file: str = ""
    data_format: str | None = None
    run: Callable[[StageContext], StageOutput] | None = None

    def __call__(self, name: str, ctx: StageContext) -> StageOutput:
        """Run step `name`: the registered stage from the latest model, or the function."""
        if self.run is not None:
            return self.run(ctx)
        model_path = None if ctx.model_dir is None else str(ctx.model_dir)
        config = stage_config(ctx.config, name, ctx.run_dir, model_path)
        config.output.resume, config.output.allow_config_change = ctx.resume, ctx.allow_config_change
        get_stage(self.stage).run(config, ctx.sharding, devices=ctx.devices)
        return StageOutput(ctx.stage_dir(name) / "hf", training_info(ctx.stage_dir(name) / METRICS_FILE))


def _preferences(ctx: StageContext) -> StageOutput:
    """Sample from the latest model, verify, pair a correct response with an incorrect one per prompt."""
    import numpy as np

    from tulu_jax.data.tokenizers import load_tokenizer
    from tulu_jax.models.hf_io import load_hf_checkpoint
    from tulu_jax.rl.verifiers import verify
    from tulu_jax.rl.completions import generate_completions
    from tulu_jax.stages.eval import load_eval_rows

    if ctx.model_dir is None:
        raise ConfigError("the preferences stage needs a model: put a training stage before it in 'stages'")
    p = ctx.config.preferences
    rows, _ = load_eval_rows(ctx.run_dir / "data" / "prompts.jsonl", limit=p.prompts)
    model = load_hf_checkpoint(ctx.model_dir)
    tokenizer = load_tokenizer(ctx.run_dir / "tokenizer")
    repeated = [row for row in rows for _ in range(p.samples_per_prompt)]
    completions = generate_completions(
        model, tokenizer, repeated, max_new_tokens=p.max_new_tokens, temperature=p.temperature, top_p=p.top_p,
        batch_size=p.batch_size, seed=ctx.config.seed, progress=True,
    )
    rng = np.random.default_rng(ctx.config.seed)
    pairs, all_correct, none_correct, rewards = [], 0, 0, []
    for i, row in enumerate(rows):
        group = completions[i * p.samples_per_prompt:(i + 1) * p.samples_per_prompt]
        scores = [verify("gsm8k", c.response, row.data["ground_truth"]) if c.finished_with_eos else 0.0
                  for c in group]
        rewards.extend(scores)
        correct = [c.response for c, s in zip(group, scores) if s == 1.0]
        wrong = [c.response for c, s in zip(group, scores) if s < 1.0]
        if not wrong:
            all_correct += 1
            continue
        if not correct:
            none_correct += 1
            if not p.reference_when_none_correct:
                continue
            correct = [row.data["reference"]]
        prompt = row.data["messages"]
        pairs.append({
            "chosen": [*prompt, {"role": "assistant", "content": correct[rng.integers(len(correct))]}],
            "rejected": [*prompt, {"role": "assistant", "content": wrong[rng.integers(len(wrong))]}],
        })
    if not pairs:
        raise DataError("no prompt had both a correct and an incorrect response: no preference pairs",
                        file=str(ctx.run_dir / "data" / "prompts.jsonl"))
    out = ctx.run_dir / "data" / "preferences.jsonl"
    out.write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    info = {"prompts": len(rows), "samples": len(completions), "pairs": len(pairs), "all_correct": all_correct,
            "none_correct": none_correct, "sample_reward": float(np.mean(rewards))}
    print(f"tulu-jax pipeline: {info['pairs']} pairs from {len(rows)} prompts × {p.samples_per_prompt} samples "
          f"({all_correct} all correct, {none_correct} none correct; mean sample reward "
          f"{info['sample_reward']:.3f})", file=sys.stderr)
    return StageOutput(ctx.model_dir, info)


STEPS: dict[str, PipelineStep] = {
    "base": PipelineStep("sft", "pretrain.jsonl", "text"),
    "sft": PipelineStep("sft", "sft.jsonl", "chat"),
    "preferences": PipelineStep(run=_preferences),
    "dpo": PipelineStep("dpo", "preferences.jsonl"),
    "rlvr": PipelineStep("rlvr", "prompts.jsonl"),
}


# --------------------------------------------------------------------------------------------------- run


def evaluate_held_out(
    run_dir: pathlib.Path, eval_section: EvalSection, model_dir: str | pathlib.Path, out_path: pathlib.Path | None,
) -> Any:
    """Greedy evaluation of the HF model `model_dir` on the run's held-out set (data/eval.jsonl, scored by the
    verifier, `eval_section`'s settings) → an `EvalResult`; per-example records to `out_path` when given."""
    from tulu_jax.data.tokenizers import load_tokenizer
    from tulu_jax.models.hf_io import load_hf_checkpoint
    from tulu_jax.stages.eval import evaluate

    return evaluate(
        load_hf_checkpoint(model_dir), load_tokenizer(run_dir / "tokenizer"), run_dir / "data" / "eval.jsonl",
        max_new_tokens=eval_section.max_new_tokens, batch_size=eval_section.batch_size, out_path=out_path,
        progress=True,
    )


def evaluate_stage(ctx: StageContext, name: str, model_dir: pathlib.Path) -> None:
    """Greedy evaluation of `model_dir` on the held-out set → `<stage>/eval.jsonl`."""
    result = evaluate_held_out(ctx.run_dir, ctx.config.eval, model_dir, ctx.stage_dir(name) / EVAL_FILE)
    print(f"tulu-jax pipeline: {name}: held-out accuracy {result.overall_accuracy:.3f}", file=sys.stderr)


def run_pipeline(
    config: PipelineConfig, sharding: str, *, resume: bool = False, allow_config_change: bool = False,
    devices: Any = None,
) -> list[SummaryRow]:
    """Run the configured stages (see the module docstring); returns the summary rows. A run directory that holds
    a finished stage or a checkpoint is continued only with `resume`, and with the same config unless
    `allow_config_change` (tulu_jax.stages.resume)."""
    run_dir = pathlib.Path(config.run_dir)
    _, existing = parts_state(run_dir, config.stages, "stage", STAGE_FILE)
    check_resume(run_dir, PIPELINE_FILE, dump_config(config), existing=existing, resume=resume,
                 allow_config_change=allow_config_change)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / PIPELINE_FILE).write_text(yaml.safe_dump(dump_config(config), sort_keys=False))
    build_world(config, run_dir)
    model_dir: pathlib.Path | None = None
    for name in config.stages:
        marker = run_dir / name / STAGE_FILE
        if marker.is_file():
            done = json.loads(marker.read_text())
            model_dir = pathlib.Path(done["model_dir"]) if done["model_dir"] else model_dir
            print(f"tulu-jax pipeline: {name}: finished before, skipped", file=sys.stderr)
            continue
        print(f"tulu-jax pipeline: {name} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        ctx = StageContext(config, run_dir, sharding, model_dir, devices, resume, allow_config_change)
        output = STEPS[name](name, ctx)
        made_model = output.model_dir is not None and output.model_dir != model_dir
        if made_model:
            evaluate_stage(ctx, name, output.model_dir)
            model_dir = output.model_dir
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({
            "stage": name, "wall_s": time.perf_counter() - start, "evaluated": made_model,
            "model_dir": str(output.model_dir) if made_model else None, "info": output.info,
        }, indent=2))
    rows = summarize(run_dir, config.stages)
    print(write_summary(run_dir, rows))
    print(f"tulu-jax pipeline: summary in {run_dir}/summary.{{md,json,png}}", file=sys.stderr)
    return rows


def main(args: argparse.Namespace) -> int:
    """`tulu-jax pipeline`."""
    config = load_pipeline_config(args.config, tuple(args.overrides))
    run_pipeline(config, args.sharding, resume=args.resume, allow_config_change=args.allow_config_change)
    return 0

