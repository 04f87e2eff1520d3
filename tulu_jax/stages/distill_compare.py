"""`tulu-jax distill-compare`: one student trained three ways from a finished pipeline's final model, evaluated.

    tulu-jax distill-compare --config configs/tiny_arith_distill.yaml [--resume] [--set key=value ...]

The teacher is a finished `tulu-jax pipeline` run (`teacher_run`): its last evaluated stage's HF export (or
`teacher_stage`), its tokenizer, its train data and held-out set. The student (`student`, a smaller model of the
same vocabulary) starts from the same initialization (`train.seed`) in every arm and sees the same SFT prompts for
the same steps, batch and optimizer; the arms differ only in the targets:

- `sft`: plain SFT on the reference answers (one-hot targets; `sft:` adds SFT-only keys, e.g. its loss reduction);
- `offline`: Gemma 3 style sparse targets, `tulu-jax distill-targets` run once from the teacher over the same data
  (`run_dir/targets`), then `distill.mode: offline` (sparse soft cross-entropy on the reference answers' tokens);
- `on_policy`: GKD, `distill.mode: on_policy` (a λ share of batches answered by the student, every response token
  scored by the teacher, generalized JSD with β).

Each arm's run goes to `run_dir/<arm>` (checkpoints, metrics.jsonl, hf/), is evaluated greedily on the 200 held-out
problems as the teacher run evaluates its stages (`<arm>/eval.jsonl`, `PipelineRun.evaluate`; with
`eval_checkpoints` its earlier kept checkpoints too, `<arm>/eval_curve/<step>.jsonl`, for accuracy curves) and
marked finished by `<arm>/stage.json` (written last; `--resume` skips finished arms and resumes an interrupted one
from its checkpoint). The table, with exact counts and 95% Wilson intervals recomputed from the eval files, goes to
`comparison.{md,json}`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import pathlib
import sys
import time
from typing import Any

import yaml

from tulu_jax.config import dump_config, from_dict
from tulu_jax.errors import ConfigError
from tulu_jax.stages.pipeline_run import PipelineRun, open_run
from tulu_jax.stages.registry import get_stage
from tulu_jax.stages.resume import check_resume, checkpoint_steps, parts_state
from tulu_jax.stages.sections import ModelSection, load_stage_config
from tulu_jax.stages.summary import EVAL_FILE, METRICS_FILE, STAGE_FILE, read_jsonl, training_info, wilson_interval

ARMS = ("sft", "offline", "on_policy")
COMPARE_FILE = "compare.yaml"
CURVE_DIR = "eval_curve"
# Keys of a distill section that this command sets.
_OWNED_DISTILL = ("mode", "teacher", "teacher_tokenizer")


@dataclasses.dataclass
class CompareConfig:
    """A comparison (module docstring). `data`, `optim`, `train`, `output`: sections shared by every arm (the data
    sources, run dirs and model are set here); `sft`: keys merged into the SFT arm's config only; `distill`: the
    distill section of both distillation arms (divergence, β, λ, targets' k/mode; not mode/teacher).
    Evaluation uses the teacher run's `eval` settings; `eval_checkpoints`: also evaluate every kept checkpoint (an
    accuracy curve per arm, `<arm>/eval_curve/`)."""

    student: ModelSection
    teacher_run: str = "runs/tiny_arith"
    teacher_stage: str | None = None
    run_dir: str = "runs/tiny_arith_distill"
    arms: list[str] = dataclasses.field(default_factory=lambda: list(ARMS))
    data: dict[str, Any] = dataclasses.field(default_factory=dict)
    optim: dict[str, Any] = dataclasses.field(default_factory=dict)
    train: dict[str, Any] = dataclasses.field(default_factory=dict)
    output: dict[str, Any] = dataclasses.field(default_factory=dict)
    sft: dict[str, Any] = dataclasses.field(default_factory=dict)
    distill: dict[str, Any] = dataclasses.field(default_factory=dict)
    eval_checkpoints: bool = True

    def __post_init__(self) -> None:
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown or not self.arms or len(set(self.arms)) != len(self.arms):
            raise ValueError(f"'arms' must be distinct names from {list(ARMS)}, got {self.arms}")
        owned = [f"'distill.{k}'" for k in _OWNED_DISTILL if k in self.distill]
        owned += [f"'data.{k}'" for k in ("sources", "format") if k in self.data]
        owned += ["'output.run_dir'"] if "run_dir" in self.output else []
        if owned:
            raise ValueError(f"{', '.join(owned)}: set by distill-compare, remove it")


# --------------------------------------------------------------------------------------------------- teacher


def teacher_model_dir(run: PipelineRun, stage: str | None) -> pathlib.Path:
    """The teacher's HF directory: `stage`'s model, else that of the run's last finished stage that made and
    evaluated one. ConfigError when there is none."""
    if stage is None:
        evaluated = [s for s in run.finished_stages if run.stage_record(s)["evaluated"]]
        if not evaluated:
            raise ConfigError(f"teacher_run {run.run_dir}: no stage is finished with an evaluated model")
        stage = evaluated[-1]
    return run.model_dir(stage)


# --------------------------------------------------------------------------------------------------- configs


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`base` with `extra` merged in, nested mappings key by key."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else copy.deepcopy(value)
    return out


def arm_config(config: CompareConfig, arm: str, teacher: pathlib.Path, *, source: str = "distill-compare") -> Any:
    """The full stage config of `arm` (an SFTConfig or DistillConfig), on the teacher run's tokenizer and SFT data
    (their paths follow the pipeline's run layout, `tulu_jax.stages.pipeline_run`)."""
    run, out = pathlib.Path(config.teacher_run), pathlib.Path(config.run_dir)
    shared = {
        "model": dump_config(config.student),
        "tokenizer": {"path": str(run / "tokenizer"), "chat_template": "tulu"},
        "data": {**config.data, "sources": [{"path": str(run / "data" / "sft.jsonl")}], "format": "chat"},
        "optim": config.optim, "train": config.train, "output": {**config.output, "run_dir": str(out / arm)},
    }
    if arm == "sft":
        return from_dict(get_stage("sft").config_class, _merge(shared, config.sft), source=f"{source} (sft)")
    distill = _merge(config.distill, {
        "mode": arm, "teacher": {"path": str(teacher)}, "teacher_tokenizer": str(run / "tokenizer"),
        "targets": {"path": str(out / "targets")},
    })
    return from_dict(get_stage("distill").config_class, {**shared, "distill": distill}, source=f"{source} ({arm})")


def load_compare_config(path: str, overrides: tuple[str, ...] = ()) -> CompareConfig:
    """Load and check a comparison config, including every arm's stage config (before anything runs)."""
    config = load_stage_config(CompareConfig, path, overrides)
    for arm in config.arms:
        arm_config(config, arm, pathlib.Path("<teacher>"), source=str(path))
    return config


# --------------------------------------------------------------------------------------------------- run


def parameter_count(model_dir: pathlib.Path) -> int:
    """The number of parameters stored in an HF directory's safetensors files (read from their headers)."""
    from safetensors import safe_open

    total = 0
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), "np") as f:
            total += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    return total


def evaluate_model(model: Any, run: PipelineRun, out_path: pathlib.Path) -> None:
    """A Decoder's held-out evaluation as `run` evaluates its stages (`PipelineRun.evaluate`, for an HF dir) →
    out_path."""
    from tulu_jax.stages.eval import evaluate

    evaluate(model, run.tokenizer(), run.data_file("eval"), max_new_tokens=run.config.eval.max_new_tokens,
             batch_size=run.config.eval.batch_size, out_path=out_path, progress=True)


def evaluate_checkpoints(arm_dir: pathlib.Path, run: PipelineRun) -> None:
    """The held-out accuracy curve: every kept checkpoint but the last (the exported model, evaluated apart)
    evaluated like the final model → `<arm>/eval_curve/<step>.jsonl`."""
    from tulu_jax.stages.convert import read_model_config, restore_params

    model_config = read_model_config(arm_dir)
    for step in checkpoint_steps(arm_dir / "checkpoints")[:-1]:
        model = restore_params(arm_dir / "checkpoints" / str(step) / "state", model_config)
        evaluate_model(model, run, arm_dir / CURVE_DIR / f"{step}.jsonl")


def run_arm(config: CompareConfig, arm: str, teacher: pathlib.Path, sharding: str, *, resume: bool,
            allow_config_change: bool) -> None:
    """Train `arm` (writing the offline targets first), evaluate it and mark it finished."""
    from tulu_jax.stages.distill_targets import write_targets

    start = time.perf_counter()
    stage_config = arm_config(config, arm, teacher)
    stage_config.output.resume, stage_config.output.allow_config_change = resume, allow_config_change
    info: dict[str, Any] = {}
    if arm == "offline":
        write_targets(stage_config, sharding)
        info["targets_wall_s"] = time.perf_counter() - start
    get_stage("sft" if arm == "sft" else "distill").run(stage_config, sharding)
    arm_dir = pathlib.Path(config.run_dir) / arm
    info.update(training_info(arm_dir / METRICS_FILE))
    run = open_run(config.teacher_run)
    run.evaluate(arm_dir / "hf", arm_dir / EVAL_FILE)
    if config.eval_checkpoints:
        evaluate_checkpoints(arm_dir, run)
    (arm_dir / STAGE_FILE).write_text(json.dumps({
        "stage": arm, "wall_s": time.perf_counter() - start, "evaluated": True, "model_dir": str(arm_dir / "hf"),
        "info": info,
    }, indent=2))


def count_correct(eval_file: pathlib.Path) -> tuple[int, int]:
    """(examples with reward 1, examples) of an eval file."""
    rewards = [r["reward"] for r in read_jsonl(eval_file)]
    return sum(r == 1.0 for r in rewards), len(rewards)


def comparison_rows(config: CompareConfig, teacher: pathlib.Path) -> list[dict[str, Any]]:
    """One row per model (the teacher, then the finished arms): correct / total from its eval file, accuracy, the
    95% Wilson interval, its run's facts and (arms) its accuracy curve."""
    run, out = pathlib.Path(config.teacher_run), pathlib.Path(config.run_dir)
    sources = [("teacher", teacher.parent)] + [(arm, out / arm) for arm in config.arms]
    rows = []
    for name, directory in sources:
        marker = directory / STAGE_FILE
        if not marker.is_file():
            continue
        correct, total = count_correct(directory / EVAL_FILE)
        info = {**json.loads(marker.read_text())["info"], "params": parameter_count(directory / "hf")}
        row = {"model": name, "correct": correct, "total": total, "accuracy": correct / total,
               "interval": list(wilson_interval(correct, total)), "wall_s": json.loads(marker.read_text())["wall_s"]}
        if name == "teacher":
            info.update(stage=directory.name, run=str(run))
        else:  # held-out accuracy per evaluated step: the kept checkpoints, then the final model
            steps = sorted(int(p.stem) for p in (directory / CURVE_DIR).glob("*.jsonl"))
            row["curve"] = [{"step": s, "correct": count_correct(directory / CURVE_DIR / f"{s}.jsonl")[0]}
                            for s in steps] + [{"step": info["steps"], "correct": correct}]
        rows.append({**row, "info": info})
    return rows


def format_comparison(rows: list[dict[str, Any]]) -> str:
    """The comparison as a Markdown table (an arm's wall time: training, its targets and its evaluations)."""
    lines = ["| model | held-out correct | accuracy | 95% interval | params | steps | final loss | wall time |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        info = r["info"]
        name = f"teacher ({info['stage']})" if r["model"] == "teacher" else f"student, {r['model']}"
        params = f"{info['params']:,}"
        student = r["model"] != "teacher"  # the teacher's run is another command's: its facts are in its run
        steps, loss, wall = (str(info["steps"]), f"{info['final_loss']:.4f}", f"{r['wall_s']:.0f} s") if student \
            else ("—", "—", "—")
        lo, hi = r["interval"]
        lines.append(f"| {name} | {r['correct']}/{r['total']} | {r['accuracy']:.3f} | {lo:.3f}–{hi:.3f} | {params} "
                     f"| {steps} | {loss} | {wall} |")
    return "\n".join(lines)


def run_comparison(config: CompareConfig, sharding: str, *, resume: bool = False,
                   allow_config_change: bool = False) -> list[dict[str, Any]]:
    """Run the configured arms (module docstring); returns the comparison rows (also in comparison.{md,json})."""
    out = pathlib.Path(config.run_dir)
    teacher = teacher_model_dir(open_run(config.teacher_run), config.teacher_stage)
    finished, existing = parts_state(out, config.arms, "arm", STAGE_FILE)
    check_resume(out, COMPARE_FILE, dump_config(config), existing=existing, resume=resume,
                 allow_config_change=allow_config_change)
    out.mkdir(parents=True, exist_ok=True)
    (out / COMPARE_FILE).write_text(yaml.safe_dump(dump_config(config), sort_keys=False))
    for arm in config.arms:
        if arm in finished:
            print(f"tulu-jax distill-compare: {arm}: finished before, skipped", file=sys.stderr)
            continue
        print(f"tulu-jax distill-compare: {arm} ...", file=sys.stderr, flush=True)
        run_arm(config, arm, teacher, sharding, resume=resume, allow_config_change=allow_config_change)
    rows = comparison_rows(config, teacher)
    table = format_comparison(rows)
    (out / "comparison.json").write_text(json.dumps(rows, indent=2))
    (out / "comparison.md").write_text(table + "\n")
    print(table)
    return rows


def main(args: argparse.Namespace) -> int:
    """`tulu-jax distill-compare`."""
    config = load_compare_config(args.config, tuple(args.overrides))
    run_comparison(config, args.sharding, resume=args.resume, allow_config_change=args.allow_config_change)
    return 0
