"""`tulu-jax eval` and `evaluate`: greedy (or sampled) answers to verifiable prompts, scored by the RLVR verifiers.

Rows are in the RLVR format `{"messages": [prompt turns], "ground_truth": ..., "dataset": "gsm8k"|"MATH"|"ifeval"}`
(`tulu_jax/assets/tiny_eval.jsonl` is a small example). `evaluate` runs, in order:

1. `load_eval_rows`: validate every row up front (messages, a known dataset, a ground truth its verifier accepts);
   a bad row raises DataError naming file/row/field, or with `on_error="skip"` is skipped and counted.
2. `tulu_jax.rl.completions.generate_completions`: render each prompt with the chat template's generation prompt,
   generate in fixed-size batches with the KV-cache sampler (stopping at EOS), decode.
3. `score_completions`: verifier rewards in parallel worker processes under a time limit (`score_batch`); accuracy
   per dataset = the fraction of examples with reward 1 (for IFEval's instruction lists: every instruction followed).
4. One JSONL record per example (`EvalRecord`) to `out_path`.

This module imports JAX only inside functions, so that `tulu-jax` can build its argument parser
(`add_arguments`) before a command picks the JAX platform.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from tulu_jax.data.rows import OnError, Row, RowStats, iter_rows, validate_messages, validated_rows
from tulu_jax.data.templates import NAMED_TEMPLATES
from tulu_jax.errors import DataError
from tulu_jax.rl.completions import Completion, generate_completions, stop_token_ids
from tulu_jax.rl.verifiers import DEFAULT_TIMEOUT_S, extract_answer, score_batch
from tulu_jax.rl.verifiers.registry import get_verifier

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from tulu_jax.models.decoder import Decoder

RowSource = str | os.PathLike[str] | Sequence[Mapping[str, Any]]
IN_MEMORY = "<rows>"  # the `file` of rows given as Python objects


# --------------------------------------------------------------------------------------------------- rows


def validate_eval_row(data: Any, *, file: str | None = None, row: int | None = None) -> None:
    """Raise DataError (naming file/row/field) unless `data` is an RLVR prompt row a verifier can score.

    The prompt must not end with an assistant turn: the model answers after the generation prompt.
    """
    if not isinstance(data, Mapping):
        raise DataError(f"expected a JSON object, got {type(data).__name__}", file=file, row=row)
    for field in ("messages", "ground_truth", "dataset"):
        if field not in data:
            raise DataError("missing field", file=file, row=row, field=field)
    messages = data["messages"]
    validate_messages(messages, file=file, row=row, require_assistant=False)
    if messages[-1]["role"] == "assistant":
        raise DataError("the prompt ends with an assistant turn; give only the turns before the answer",
                        file=file, row=row, field=f"messages[{len(messages) - 1}].role")
    try:
        verifier = get_verifier(data["dataset"])
    except ValueError as e:
        raise DataError(str(e), file=file, row=row, field="dataset") from None
    try:
        verifier.check_ground_truth(data["ground_truth"])
    except ValueError as e:
        raise DataError(str(e), file=file, row=row, field="ground_truth") from None


def _in_memory_rows(rows: Sequence[Mapping[str, Any]], stats: RowStats, on_error: OnError) -> Iterator[Row]:
    """`iter_rows` for rows given as Python objects (numbered from 1, like JSONL lines: row n is rows[n - 1])."""
    records = (
        (IN_MEMORY, number, dict(data) if isinstance(data, Mapping) else data)
        for number, data in enumerate(rows, start=1)
    )
    return validated_rows(records, stats, on_error=on_error, validate=validate_eval_row)


def load_eval_rows(
    source: RowSource, *, on_error: OnError = "raise", limit: int | None = None
) -> tuple[list[Row], RowStats]:
    """The first `limit` (default: all) valid rows of a data file (JSONL/Parquet/saved dataset) or a list of row
    dicts, validated by `validate_eval_row`, and the counts (skipped rows by field with `on_error="skip"`)."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    in_memory = not isinstance(source, (str, os.PathLike))
    stats = RowStats(IN_MEMORY if in_memory else str(source))
    it: Iterable[Row] = (
        _in_memory_rows(source, stats, on_error)  # type: ignore[arg-type]
        if in_memory
        else iter_rows(source, stats, on_error=on_error, validate=validate_eval_row)  # type: ignore[arg-type]
    )
    rows: list[Row] = []
    for row in it:
        rows.append(row)
        if limit is not None and len(rows) == limit:
            break
    return rows, stats


# --------------------------------------------------------------------------------------------------- results


@dataclasses.dataclass(frozen=True)
class EvalRecord:
    """One example's line of the output JSONL. `dataset` is the verifier's name (lower case); `file`/`row` locate
    the source row (`<rows>` and the 1-based position for in-memory rows)."""

    file: str
    row: int
    dataset: str
    prompt: str
    response: str
    reward: float
    extracted_answer: str | None
    ground_truth: Any
    finished_with_eos: bool
    num_tokens: int
    num_prompt_tokens: int


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """Scores of one evaluation. Per dataset (verifier name → value): `accuracy` (fraction of examples with
    reward 1), `mean_reward_by_dataset`, `count`; overall (every example weighs the same): `overall_accuracy`,
    `mean_reward`. `num_timeouts`: responses whose check ran out of time (scored 0); `num_skipped`: invalid rows
    skipped (on_error="skip"); `records`: one per example, in row order."""

    accuracy: dict[str, float]
    mean_reward_by_dataset: dict[str, float]
    count: dict[str, int]
    overall_accuracy: float
    mean_reward: float
    num_timeouts: int
    num_skipped: int
    records: list[EvalRecord]

    @classmethod
    def from_records(cls, records: Sequence[EvalRecord], *, num_timeouts: int = 0, num_skipped: int = 0) -> EvalResult:
        """Aggregate per-example records (at least one)."""
        if not records:
            raise ValueError("no records to aggregate")
        by_dataset: dict[str, list[float]] = {}
        for record in records:
            by_dataset.setdefault(record.dataset, []).append(record.reward)
        rewards = [r.reward for r in records]
        return cls(
            accuracy={name: _accuracy(v) for name, v in sorted(by_dataset.items())},
            mean_reward_by_dataset={name: math.fsum(v) / len(v) for name, v in sorted(by_dataset.items())},
            count={name: len(v) for name, v in sorted(by_dataset.items())},
            overall_accuracy=_accuracy(rewards),
            mean_reward=math.fsum(rewards) / len(rewards),
            num_timeouts=num_timeouts,
            num_skipped=num_skipped,
            records=list(records),
        )

    def metrics(self, prefix: str = "eval") -> dict[str, float]:
        """Flat scalars for a metrics log: `{prefix}/{dataset}/accuracy`, ..., `{prefix}/accuracy`, ..."""
        out: dict[str, float] = {}
        for name in self.count:
            out[f"{prefix}/{name}/accuracy"] = self.accuracy[name]
            out[f"{prefix}/{name}/mean_reward"] = self.mean_reward_by_dataset[name]
            out[f"{prefix}/{name}/count"] = float(self.count[name])
        out.update({
            f"{prefix}/accuracy": self.overall_accuracy,
            f"{prefix}/mean_reward": self.mean_reward,
            f"{prefix}/num_timeouts": float(self.num_timeouts),
            f"{prefix}/num_skipped": float(self.num_skipped),
        })
        return out

    def table(self) -> str:
        """The per-dataset table printed by `tulu-jax eval` (one row per dataset, then `all`)."""
        lines = [f"{'dataset':<12} {'n':>6} {'accuracy':>9} {'mean_reward':>12}"]
        for name in self.count:
            lines.append(f"{name:<12} {self.count[name]:>6} {self.accuracy[name]:>9.4f} "
                         f"{self.mean_reward_by_dataset[name]:>12.4f}")
        lines.append(f"{'all':<12} {len(self.records):>6} {self.overall_accuracy:>9.4f} {self.mean_reward:>12.4f}")
        finished = sum(r.finished_with_eos for r in self.records)
        lines.append(f"finished with EOS: {finished}/{len(self.records)}, verifier timeouts: {self.num_timeouts}, "
                     f"skipped rows: {self.num_skipped}")
        return "\n".join(lines)


def _accuracy(rewards: Sequence[float]) -> float:
    return sum(r >= 1.0 for r in rewards) / len(rewards)


def score_completions(
    rows: Sequence[Row],
    completions: Sequence[Completion],
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    num_workers: int | None = None,
    num_skipped: int = 0,
) -> EvalResult:
    """Score row-aligned completions with the verifiers (parallel worker processes, each response under
    `timeout_s`; a timeout scores 0 and is counted) and aggregate them."""
    if len(rows) != len(completions):
        raise ValueError(f"{len(rows)} rows but {len(completions)} completions")
    datasets = [get_verifier(row.data["dataset"]).name for row in rows]
    ground_truths = [row.data["ground_truth"] for row in rows]
    rewards, num_timeouts = score_batch(datasets, [c.response for c in completions], ground_truths,
                                        timeout_s=timeout_s, num_workers=num_workers)
    records = [
        EvalRecord(
            file=row.file,
            row=row.index,
            dataset=dataset,
            prompt=c.prompt,
            response=c.response,
            reward=float(reward),
            extracted_answer=extract_answer(dataset, c.response),
            ground_truth=ground_truth,
            finished_with_eos=c.finished_with_eos,
            num_tokens=c.num_tokens,
            num_prompt_tokens=c.num_prompt_tokens,
        )
        for row, c, dataset, ground_truth, reward in zip(rows, completions, datasets, ground_truths, rewards)
    ]
    return EvalResult.from_records(records, num_timeouts=num_timeouts, num_skipped=num_skipped)


def write_records(records: Iterable[EvalRecord], path: str | os.PathLike[str]) -> None:
    """One JSON object per line (UTF-8), creating the parent directory."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(dataclasses.asdict(record), ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------------------------------- evaluate


def evaluate(
    model: Decoder,
    tokenizer: PreTrainedTokenizerBase,
    rows: RowSource,
    *,
    chat_template: str = "tulu",
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    batch_size: int = 8,
    seed: int = 0,
    out_path: str | os.PathLike[str] | None = None,
    stop_ids: Iterable[int] = (),
    on_error: OnError = "raise",
    limit: int | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    num_workers: int | None = None,
    progress: bool = False,
) -> EvalResult:
    """Generate answers to verifiable prompts and score them (greedy by default, stopping at EOS).

    `rows`: a data file (JSONL/Parquet/saved dataset) or a list of row dicts in the RLVR format, validated before
    anything runs (`load_eval_rows`; `on_error`, `limit`). The model may be sharded (its parameters carry their
    shardings). `out_path`: the per-example JSONL (written by process 0). Raises DataError if no row is valid.
    """
    import jax

    valid, stats = load_eval_rows(rows, on_error=on_error, limit=limit)
    if not valid:
        raise DataError(f"no rows to evaluate ({stats.summary()})", file=stats.source)
    completions = generate_completions(
        model, tokenizer, valid, chat_template=chat_template, max_new_tokens=max_new_tokens,
        temperature=temperature, top_p=top_p, top_k=top_k, batch_size=batch_size, seed=seed, stop_ids=stop_ids,
        progress=progress,
    )
    result = score_completions(valid, completions, timeout_s=timeout_s, num_workers=num_workers,
                               num_skipped=stats.skipped)
    if out_path is not None and jax.process_index() == 0:
        write_records(result.records, out_path)
    return result


# --------------------------------------------------------------------------------------------------- CLI


def load_eval_model(model_dir: str | os.PathLike[str], sharding: str | None = None,
                    dtype: str | None = None) -> Decoder:
    """An HF model directory as a Decoder: on one device, or (with a sharding file) streamed into the shardings
    its logical-axis rules give on that file's mesh."""
    from tulu_jax.models.hf_io import load_hf_checkpoint

    if sharding is None:
        return load_hf_checkpoint(model_dir, dtype=dtype)
    from flax import nnx

    from tulu_jax.models.config import load_hf_config
    from tulu_jax.models.decoder import Decoder
    from tulu_jax.stages.setup import setup_mesh, variable_shardings

    spec, mesh = setup_mesh(sharding)
    fields = {} if dtype is None else {"param_dtype": dtype, "compute_dtype": dtype}
    config = load_hf_config(os.path.join(model_dir, "config.json"), **fields)
    with nnx.use_eager_sharding(False):
        abstract: nnx.Module = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0)))
    shardings = variable_shardings(mesh, spec)(nnx.state(abstract))
    return load_hf_checkpoint(model_dir, dtype=dtype, shardings=shardings)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `tulu-jax eval`."""
    parser.add_argument("--model", required=True, help="HF model directory (config.json + safetensors)")
    parser.add_argument("--data", required=True, help="RLVR-format rows: JSONL/Parquet file or saved dataset")
    parser.add_argument("--sharding", default=None, help="sharding file YAML (default: one device)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory or qwen2.5 (default: --model)")
    parser.add_argument("--out", default=None,
                        help="per-example JSONL (default: eval/<data name>.jsonl in the model's run directory when "
                             "the model is a run's hf/ export, else in the model directory)")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="response length limit (default: 512)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0 = off)")
    parser.add_argument("--top-k", type=int, default=0, help="top-k sampling (default: 0 = off)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (default: 8)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N valid rows")
    parser.add_argument("--chat-template", choices=NAMED_TEMPLATES, default="tulu",
                        help="tulu (default), native (the tokenizer's own) or qwen2.5")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (temperature > 0)")
    parser.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                        help="a malformed row stops the run (raise, default) or is skipped and counted (skip)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="parameter/compute dtype")


def default_out_path(model_dir: str | os.PathLike[str], data: str | os.PathLike[str]) -> pathlib.Path:
    """Where `tulu-jax eval` writes without --out: `eval/<data file stem>.jsonl` in the run directory when the model
    is a run's `hf/` export (the run dir holds config.yaml), else in the model directory itself."""
    model = pathlib.Path(model_dir)
    base = model.parent if model.name == "hf" and (model.parent / "config.yaml").is_file() else model
    return base / "eval" / f"{pathlib.Path(data).stem}.jsonl"


def main(args: argparse.Namespace) -> int:
    """`tulu-jax eval`: load the model and tokenizer, evaluate, print the per-dataset table, write the JSONL."""
    from tulu_jax.data.tokenizers import check_vocabulary
    from tulu_jax.stages.paths import resolve_path
    from tulu_jax.stages.sections import ModelSection, TokenizerSection
    from tulu_jax.stages.setup import load_stage_tokenizer

    data = resolve_path(args.data)
    model = load_eval_model(os.fspath(resolve_path(args.model)), args.sharding, args.dtype)
    tokenizer = load_stage_tokenizer(TokenizerSection(path=args.tokenizer, chat_template=args.chat_template),
                                     ModelSection(path=args.model))
    check_vocabulary(tokenizer, model.config.vocab_size)
    out_path = pathlib.Path(args.out) if args.out is not None else default_out_path(resolve_path(args.model), data)
    result = evaluate(
        model, tokenizer, data, chat_template=args.chat_template, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, batch_size=args.batch_size,
        seed=args.seed, out_path=out_path, on_error=args.on_error, limit=args.limit, progress=True,
    )
    print(result.table())
    print(f"tulu-jax eval: wrote {len(result.records)} records to {out_path}", file=sys.stderr)
    return 0
