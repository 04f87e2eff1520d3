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
from jax.sharding import Mesh

from tulu_jax.errors import ConfigError, DataError
from tulu_jax.losses import count_sequences, sft_loss_from_logps
from tulu_jax.losses.sft import Reduction
from tulu_jax.sharding import ShardingSpec, batch_sharding
from tulu_jax.stages.sections import (
    DataSection,
    ModelSection,
    OptimSection,
    OutputSection,
    TokenizerSection,
    TrainSection,
)
from tulu_jax.stages.setup import batch_shards, micro_batches_text, num_train_steps
from tulu_jax.stages.training import StageData, StageSetup, TrainingStage
from tulu_jax.train import Step, TrainState, build_train_step, shardings_of
from tulu_jax.train.batcher import Batcher
from tulu_jax.train.batches import Batch

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
    """A full SFT run: model, tokenizer, data, optimizer, steps and outputs (see `tulu_jax.stages.sections`)."""

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


def sft_denominators(batch: Batch) -> dict[str, jax.Array]:
    """The global batch's sequence count (Σ_rows max segment id) and supervised-token count."""
    return {
        "num_sequences": count_sequences(batch.segment_ids),
        "num_tokens": jnp.sum(batch.loss_mask, dtype=jnp.int32),
    }


def sft_loss_fn(reduction: Reduction, num_micro_batches: int = 1) -> Any:
    """`loss_fn(model, batch, denominators, frozen) -> (loss, aux)` on the batch contract (padded or packed); SFT
    reads no frozen model.

    `num_micro_batches`: how many micro-batches the step splits a global batch into (for `mean_per_micro_batch`).

    aux (summed over micro-batches): nll_sum, supervised_tokens, tokens (non-padding tokens).
    """

    def loss_fn(model: nnx.Module, batch: Batch, den: Mapping[str, jax.Array], frozen: Any = None):
        logps = model.token_logps(batch.input_ids, batch.targets, positions=batch.positions,
                                  segment_ids=batch.segment_ids)
        loss, metrics = sft_loss_from_logps(
            logps,
            batch.loss_mask,
            reduction=reduction,
            num_sequences=den["num_sequences"],
            num_tokens=den["num_tokens"],
            num_micro_batches=num_micro_batches,
        )
        aux = {
            "nll_sum": metrics["nll_sum"],
            "supervised_tokens": metrics["supervised_tokens"],
            "tokens": jnp.sum(batch.segment_ids > 0, dtype=jnp.int32),
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
) -> Step:
    """The jitted SFT train step `(state, batch, frozen=None) -> (state, metrics)` (run and AOT compile)."""
    return build_train_step(
        graphdef,
        sft_loss_fn(reduction, grad_accum_steps),
        optimizer,
        state_shardings=state_shardings,
        batch_shardings=batch_sharding,
        grad_accum_steps=grad_accum_steps,
        denominators_fn=sft_denominators,
    )


# --------------------------------------------------------------------------------------------------- stage


class SFTStage(TrainingStage):
    """SFT as a registered stage (`tulu_jax.stages.registry`): the data of `prepare_sft_data`, padded or packed
    batches (`train.batches.Batch`), the step of `build_sft_step`; no frozen model."""

    name = "sft"
    config_class = SFTConfig

    def load_data(self, config: SFTConfig, tokenizer: Any, spec: ShardingSpec, mesh: Mesh) -> StageData:
        """Mix, validate and tokenize `data.sources` (the counts go to the log and data_report.json)."""
        from tulu_jax.data.pipeline import batch_dataset

        rows, report = prepare_sft_data(config.data, tokenizer, tokenizer.chat_template)
        print(report.summary(), file=sys.stderr)
        if len(rows) == 0:  # name the files; the report above says what became of their rows
            sources = ", ".join(source.path for source in config.data.sources)
            raise ConfigError(f"no rows to train on in {sources} (every row was skipped or left nothing to train on)")
        dataset = batch_dataset(rows, self.pipeline_config(config), source_name="the tokenized SFT mixture")
        return StageData(dataset, num_train_steps(len(dataset), config.train),
                         {"data_report.json": dataclasses.asdict(report)})

    def batch_shardings(self, setup: StageSetup) -> jax.sharding.Sharding:
        """Every field of an SFT batch is [B, T]: one sharding."""
        return batch_sharding(setup.mesh, setup.spec)

    def abstract_batch(self, setup: StageSetup) -> Batch:
        """[train.global_batch_size, data.max_seq_len] for every field."""
        config = setup.config
        return Batch.spec(config.train.global_batch_size, config.data.max_seq_len, self.batch_shardings(setup))

    def build_step(self, setup: StageSetup) -> Step:
        """`build_sft_step` with the setup's state, shardings and accumulation."""
        return build_sft_step(
            setup.state.graphdef,
            setup.optimizer,
            state_shardings=shardings_of(setup.state),
            batch_sharding=self.batch_shardings(setup),
            reduction=setup.config.train.loss_reduction,
            grad_accum_steps=setup.grad_accum,
        )

    def batches(self, setup: StageSetup) -> tuple[Any, Batcher]:
        """The grain iterator over the dataset (checkpointed with the run) and the Batcher placing its batches."""
        from tulu_jax.data.pipeline import batch_iterator

        config = setup.config
        batcher = Batcher(self.batch_shardings(setup), config.train.global_batch_size, typed=Batch.from_host)
        return batch_iterator(setup.data.dataset, self.pipeline_config(config)), batcher

    def describe(self, setup: StageSetup) -> str:
        """The global batch, the micro-batches per device, the model and its dtypes."""
        config, model = setup.config, setup.model_config
        per_device = config.train.global_batch_size // (setup.grad_accum * batch_shards(setup.mesh, setup.spec))
        return (
            f"sft step: global batch {config.train.global_batch_size} × {config.data.max_seq_len} tokens, "
            f"{micro_batches_text(setup.grad_accum)} of {per_device} sequence(s) per device; "
            f"model {model.architecture} hidden {model.hidden_size} × {model.num_layers} layers, "
            f"params {model.param_dtype}, compute {model.compute_dtype}, remat {model.remat}"
        )


STAGE = SFTStage()
