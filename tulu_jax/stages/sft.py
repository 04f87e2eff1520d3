"""The SFT stage: chat rows → assistant-only token NLL, trained with the Tülu 3 recipe (docs/recipe.md, "SFT").

Data: the mixture of `data.sources` → `tokenize_sft` (labels on assistant turns only; rows truncated to
`data.max_seq_len` and counted; rows left with no supervised token dropped and counted; malformed rows raise or,
with `on_error: skip`, are skipped and counted) → the grain pipeline (padded or packed batches) → global arrays.

Loss (`sft_loss_fn`): Σ token NLL over the supervised targets of the GLOBAL batch divided by the number of
sequences in it (`sum`, the recipe's choice) or by its number of supervised tokens (`mean`). The denominators are
computed once from the full batch (`sft_denominators`), so gradient accumulation is exact for both reductions.
`mean_per_micro_batch` (the report's baseline, HF's default) averages each micro-batch's token mean instead, so it
depends on the accumulation (see `tulu_jax.losses.sft`).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tulu_jax.errors import ConfigError, DataError
from tulu_jax.losses import count_sequences, sft_loss_from_logps
from tulu_jax.losses.sft import Reduction
from tulu_jax.models.activation_sharding import with_activation_sharding
from tulu_jax.stages.common import (
    DataSection,
    GlobalBatcher,
    ModelSection,
    OptimSection,
    OutputSection,
    TokenizerSection,
    TrainSection,
    check_run_dir,
    init_stage_state,
    load_stage_config,
    load_stage_tokenizer,
    make_stage_optimizer,
    micro_batches_text,
    num_train_steps,
    resolve_grad_accum,
    resolve_model_config,
    setup_mesh,
    train_and_export,
)
from tulu_jax.train import TrainState, build_train_step, shardings_of

# The batch contract (docs/ARCHITECTURE.md, "Batches"): every key is [B, T].
BATCH_DTYPES: dict[str, Any] = {
    "input_ids": jnp.int32,
    "positions": jnp.int32,
    "segment_ids": jnp.int32,
    "targets": jnp.int32,
    "loss_mask": jnp.bool_,
}
# An SFT row's token count before truncation is only needed to count truncated rows.
_NO_TRUNCATION = sys.maxsize


@dataclasses.dataclass
class SFTDataSection(DataSection):
    """`data` of SFT: the shared fields plus format, `chat` (`messages` rows; loss on assistant turns only) or `text`
    (`{"text": ...}` documents; loss on every token and the EOS that ends each: next-token pretraining)."""

    format: Literal["chat", "text"] = "chat"


@dataclasses.dataclass
class SFTTrainSection(TrainSection):
    """`train` of SFT: the shared fields plus loss_reduction, `sum` (Σ NLL / sequences, the recipe) or `mean`
    (Σ NLL / supervised tokens), both over the global batch, or `mean_per_micro_batch` (the mean over micro-batches
    of each one's token mean: the Tülu 3 report's baseline)."""

    loss_reduction: Reduction = "sum"


@dataclasses.dataclass
class SFTConfig:
    """A full SFT run: model, tokenizer, data, optimizer, steps and outputs (see `tulu_jax.stages.common`)."""

    model: ModelSection
    tokenizer: TokenizerSection = dataclasses.field(default_factory=TokenizerSection)
    data: SFTDataSection = dataclasses.field(default_factory=SFTDataSection)
    optim: OptimSection = dataclasses.field(default_factory=OptimSection)
    train: SFTTrainSection = dataclasses.field(default_factory=SFTTrainSection)
    output: OutputSection = dataclasses.field(default_factory=OutputSection)

    def __post_init__(self) -> None:
        if not self.data.sources:
            raise ValueError("'data.sources' lists no data source")


# --------------------------------------------------------------------------------------------------- data


@dataclasses.dataclass
class SFTDataReport:
    """What preparing the SFT data did: per-source read counts, and the tokenization outcome of the mixture."""

    source_summaries: list[str]
    rows: int = 0  # rows of the mixture that were tokenized
    kept: int = 0
    truncated: int = 0  # kept rows cut to max_seq_len
    no_assistant_turn: int = 0  # dropped: a conversation without an assistant turn (nothing to train on)
    no_supervised_tokens: int = 0  # dropped: nothing to train on after truncation
    skipped: int = 0  # dropped by on_error=skip at tokenization (e.g. a template failure)
    skip_examples: list[str] = dataclasses.field(default_factory=list)  # the first few of those, verbatim

    def summary(self) -> str:
        """Human-readable lines for the log."""
        lines = [*self.source_summaries]
        lines.append(
            f"tokenized {self.rows} rows: {self.kept} kept, {self.truncated} truncated to max_seq_len, "
            f"{self.no_assistant_turn} dropped with no assistant turn, "
            f"{self.no_supervised_tokens} dropped with no supervised token, {self.skipped} skipped"
        )
        lines.extend(f"  e.g. {example}" for example in self.skip_examples)
        return "\n".join(lines)


def tokenize_rows(
    rows: Sequence[Any], tokenizer: Any, *, max_seq_len: int, template: str, on_error: str,
    format: Literal["chat", "text"] = "chat", max_bad_fraction: float = 1.0,
) -> tuple[list[dict[str, np.ndarray]], SFTDataReport]:
    """`tulu_jax.data.rows.Row`s → tokenized {input_ids, labels} rows, truncated to max_seq_len.

    A row repeated by the mixture is tokenized once. Rows with no assistant turn or no supervised token left are
    dropped and counted; a DataError raises (on_error="raise") or skips and counts the row, up to
    `max_bad_fraction` of the rows (`check_bad_fraction`). format "text": every token is supervised.
    """
    from tulu_jax.data.rows import RowStats, check_bad_fraction, has_assistant_turn
    from tulu_jax.data.sft import IGNORE_INDEX, tokenize_sft, tokenize_text

    report = SFTDataReport(source_summaries=[])
    skips = RowStats("tokenization")
    cache: dict[tuple[str, int], dict[str, np.ndarray] | None | DataError] = {}
    out = []
    for row in rows:
        key = (row.file, row.index)
        if key not in cache:
            try:
                if format == "text":
                    full = tokenize_text(row.data["text"], tokenizer, max_seq_len=_NO_TRUNCATION)
                else:
                    full = tokenize_sft(row.data["messages"], tokenizer, max_seq_len=_NO_TRUNCATION,
                                        template=template, file=row.file, row=row.index)
            except DataError as error:
                if on_error == "raise":
                    raise
                full = error
            cache[key] = full
        full = cache[key]
        report.rows += 1
        skips.rows += 1
        if isinstance(full, DataError):
            skips.record_skip(full)
            continue
        if format == "chat" and not has_assistant_turn(row.data["messages"]):
            report.no_assistant_turn += 1
            continue
        if full is None:
            report.no_supervised_tokens += 1
            continue
        ids, labels = full["input_ids"][:max_seq_len], full["labels"][:max_seq_len]
        if not (labels != IGNORE_INDEX).any():
            report.no_supervised_tokens += 1
            continue
        report.truncated += int(len(full["input_ids"]) > max_seq_len)
        report.kept += 1
        out.append({"input_ids": ids, "labels": labels})
    report.skipped, report.skip_examples = skips.skipped, skips.examples
    check_bad_fraction(skips, max_bad_fraction)
    return out, report


def prepare_sft_data(
    data: SFTDataSection, tokenizer: Any, template: str
) -> tuple[list[dict[str, np.ndarray]], SFTDataReport]:
    """Read and mix `data.sources`, then tokenize (see `tokenize_rows`); the report carries every count."""
    from tulu_jax.data.rows import mix_sources, validate_sft_row, validate_text_row

    sources = [s.to_source() for s in data.sources]
    validate = validate_text_row if data.format == "text" else validate_sft_row
    mixture, stats = mix_sources(sources, seed=data.seed, on_error=data.on_error, shuffle=data.shuffle,
                                 validate=validate, max_bad_fraction=data.max_bad_fraction)
    rows, report = tokenize_rows(
        mixture, tokenizer, max_seq_len=data.max_seq_len, template=template, on_error=data.on_error,
        format=data.format, max_bad_fraction=data.max_bad_fraction,
    )
    report.source_summaries = [s.summary() for s in stats]
    return rows, report


# --------------------------------------------------------------------------------------------------- loss/step


def sft_denominators(batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """The global batch's sequence count (Σ_rows max segment id) and supervised-token count."""
    return {
        "num_sequences": count_sequences(batch["segment_ids"]),
        "num_tokens": jnp.sum(batch["loss_mask"], dtype=jnp.int32),
    }


def sft_loss_fn(reduction: Reduction, num_micro_batches: int = 1) -> Any:
    """`loss_fn(model, batch, denominators) -> (loss, aux)` on the batch contract (padded or packed).

    `num_micro_batches`: how many micro-batches the step splits a global batch into (for `mean_per_micro_batch`).

    aux (summed over micro-batches): nll_sum, supervised_tokens, tokens (non-padding tokens).
    """

    def loss_fn(model: nnx.Module, batch: Mapping[str, jax.Array], den: Mapping[str, jax.Array]):
        logps = model.token_logps(batch["input_ids"], batch["targets"], positions=batch["positions"],
                                  segment_ids=batch["segment_ids"])
        loss, metrics = sft_loss_from_logps(
            logps,
            batch["loss_mask"],
            reduction=reduction,
            num_sequences=den["num_sequences"],
            num_tokens=den["num_tokens"],
            num_micro_batches=num_micro_batches,
        )
        aux = {
            "nll_sum": metrics["nll_sum"],
            "supervised_tokens": metrics["supervised_tokens"],
            "tokens": jnp.sum(batch["segment_ids"] > 0, dtype=jnp.int32),
        }
        return loss, aux

    return loss_fn


def build_sft_step(
    graphdef: nnx.GraphDef,
    optimizer: Any,
    *,
    state_shardings: TrainState,
    batch_sharding: jax.sharding.Sharding,
    reduction: Reduction = "sum",
    grad_accum_steps: int = 1,
) -> Any:
    """The jitted SFT train step `(state, batch) -> (state, metrics)` (also used by compile-check for AOT)."""
    return build_train_step(
        graphdef,
        sft_loss_fn(reduction, grad_accum_steps),
        optimizer,
        state_shardings=state_shardings,
        batch_shardings=batch_sharding,
        grad_accum_steps=grad_accum_steps,
        denominators_fn=sft_denominators,
    )


# --------------------------------------------------------------------------------------------------- run


def run_sft(config: SFTConfig, sharding_path: str, *, devices: Sequence[Any] | None = None) -> TrainState:
    """Run SFT end to end (resuming from run_dir's latest checkpoint if any); returns the final TrainState.

    Errors in the config, the sharding file or the data surface before anything is compiled.
    """
    from tulu_jax.data.pipeline import PipelineConfig, batch_dataset, batch_iterator

    spec, mesh = setup_mesh(sharding_path, devices)
    check_run_dir(config)
    tokenizer = load_stage_tokenizer(config.tokenizer, config.model)
    model_config = resolve_model_config(config.model, tokenizer)
    accum = resolve_grad_accum(config.train, mesh, spec)
    rows, report = prepare_sft_data(config.data, tokenizer, tokenizer.chat_template)
    print(report.summary(), file=sys.stderr)
    if len(rows) == 0:  # name the files; the report above says what became of their rows
        sources = ", ".join(source.path for source in config.data.sources)
        raise ConfigError(f"no rows to train on in {sources} (every row was skipped or left nothing to train on)")

    pipeline = PipelineConfig(
        seq_len=config.data.max_seq_len,
        global_batch_size=config.train.global_batch_size,
        packed=config.data.packing,
        seed=config.data.seed,
        num_epochs=config.train.epochs,
        shuffle=config.data.shuffle,
    )
    dataset = batch_dataset(rows, pipeline, source_name="the tokenized SFT mixture")
    num_steps = num_train_steps(len(dataset), config.train)
    optimizer = make_stage_optimizer(config.optim, num_steps)
    state = init_stage_state(config.model, model_config, optimizer, mesh, spec, config.train.seed)
    batcher = GlobalBatcher(mesh, spec, config.train.global_batch_size)
    step = build_sft_step(
        state.graphdef,
        optimizer,
        state_shardings=shardings_of(state),
        batch_sharding=batcher.sharding,
        reduction=config.train.loss_reduction,
        grad_accum_steps=accum,
    )
    step = with_activation_sharding(step, mesh, spec)
    print(
        f"tulu-jax sft: {num_steps} steps of {config.train.global_batch_size} sequences × {config.data.max_seq_len} "
        f"tokens ({micro_batches_text(accum)}) on mesh {dict(mesh.shape)}",
        file=sys.stderr,
    )
    return train_and_export(
        state=state,
        train_step=step,
        batches=batch_iterator(dataset, pipeline),
        num_steps=num_steps,
        output=config.output,
        config=config,
        model_config=model_config,
        prepare_batch=batcher,
        tokenizer=tokenizer,
        stage="sft",
        run_files={"data_report.json": dataclasses.asdict(report)},
    )


def main(args: Any) -> int:
    """`tulu-jax sft`: load the config (all checks first), then run; exit status 0 (also after SIGTERM)."""
    config = load_stage_config(SFTConfig, args.config, args.overrides)
    run_sft(config, args.sharding)
    return 0


def aot_train_step(config: SFTConfig, mesh: jax.sharding.Mesh, spec: Any) -> tuple[Any, tuple[Any, Any], str]:
    """The real SFT train step with abstract (sharded ShapeDtypeStruct) arguments on `mesh`, for AOT compilation.

    The batch is [train.global_batch_size, data.max_seq_len]; the model comes from model.path's config.json or,
    when that is absent, model.preset. Returns (jitted step, (abstract state, abstract batch), a one-line summary).
    """
    from tulu_jax.sharding import batch_sharding
    from tulu_jax.stages.common import abstract_batch, abstract_stage_state, batch_shards

    model_config = resolve_model_config(config.model, allow_preset_fallback=True)
    accum = resolve_grad_accum(config.train, mesh, spec)
    optimizer = make_stage_optimizer(config.optim, total_steps=1000)  # the schedule's length does not change shapes
    state = abstract_stage_state(model_config, optimizer, mesh, spec)
    sharding = batch_sharding(mesh, spec)
    step = build_sft_step(
        state.graphdef,
        optimizer,
        state_shardings=shardings_of(state),
        batch_sharding=sharding,
        reduction=config.train.loss_reduction,
        grad_accum_steps=accum,
    )
    batch = abstract_batch(BATCH_DTYPES, config.train.global_batch_size, config.data.max_seq_len, sharding)
    per_device = config.train.global_batch_size // (accum * batch_shards(mesh, spec))
    summary = (
        f"sft step: global batch {config.train.global_batch_size} × {config.data.max_seq_len} tokens, "
        f"{micro_batches_text(accum)} of {per_device} sequence(s) per device; model {model_config.architecture} "
        f"hidden {model_config.hidden_size} × {model_config.num_layers} layers, params {model_config.param_dtype}, "
        f"compute {model_config.compute_dtype}, remat {model_config.remat}"
    )
    return step, (state, batch), summary
