"""Preference rows (DPO): validation, tokenization of both sides, truncation, and the counts a run reports.

Two row shapes are read:
- `{"chosen": messages, "rejected": messages}`: two whole conversations sharing their prompt turns (the Tülu 3
  preference mixtures);
- `{"prompt": messages, "chosen": messages, "rejected": messages}`: the responses (one or more turns, at least one
  of them an assistant turn) are appended to the prompt.

Each side is tokenized with `tokenize_sft`, so its response mask is the SFT label mask (labels != -100) of the whole
conversation, as in open-instruct's DPO (docs/recipe.md, DPO): every assistant turn is supervised, including assistant
turns inside a multi-turn prompt. Each side is then truncated to `max_seq_len` tokens (2048 in the recipe).
What happens to rows, all counted in `PreferenceStats` and never silent:
- a malformed row raises DataError naming file, row and field, or is skipped and counted (on_error="skip");
- a pair one of whose sides has no response token left after truncation is dropped (`dropped_empty`);
- a kept pair with a truncated side counts in `truncated`;
- a two-conversation row whose chosen and rejected prompt turns differ is malformed (DataError, or skipped);
- a pair whose two sides tokenize identically is dropped (it carries no preference: a constant loss with zero
  gradient) and counted in `identical`, so that a broken dataset shows up in the run's report.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from tulu_jax.data.rows import OnError, RowStats, Source, check_bad_fraction, mix_sources, validate_messages
from tulu_jax.data.sft import IGNORE_INDEX, tokenize_sft
from tulu_jax.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

SIDES = ("chosen", "rejected")
# A tokenized pair: {f"{side}_input_ids", f"{side}_labels"} int32 arrays for both sides.
Pair = dict[str, np.ndarray]


def validate_preference_row(data: Any, *, file: str | None = None, row: int | None = None) -> None:
    """Raises DataError (file, row, field) unless `data` is one of the two preference row shapes (module docstring)."""
    if not isinstance(data, Mapping):
        raise DataError(f"expected a JSON object, got {type(data).__name__}", file=file, row=row)
    for side in SIDES:
        if side not in data:
            raise DataError("missing field", file=file, row=row, field=side)
    if "prompt" not in data:
        for side in SIDES:
            validate_messages(data[side], file=file, row=row, field=side)
        _check_same_prompt(data, file=file, row=row)
        return
    validate_messages(data["prompt"], file=file, row=row, field="prompt", require_assistant=False)
    for side in SIDES:
        validate_messages(data[side], file=file, row=row, field=side, require_assistant=False)
        if not any(message["role"] == "assistant" for message in data[side]):
            raise DataError("the response has no assistant turn: nothing to compare", file=file, row=row, field=side)


def _prompt_turns(messages: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The turns before the final assistant response (the trailing assistant turns)."""
    end = len(messages)
    while end and messages[end - 1]["role"] == "assistant":
        end -= 1
    return list(messages[:end])


def _check_same_prompt(data: Mapping[str, Any], *, file: str | None, row: int | None) -> None:
    """DataError unless two whole conversations share their prompt turns: otherwise the pair compares answers to
    different questions."""
    chosen, rejected = (_prompt_turns(data[side]) for side in SIDES)
    if chosen != rejected:
        turn = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))
        raise DataError(
            f"chosen and rejected have different prompts (they differ at turn {turn}): not a preference pair",
            file=file, row=row, field="rejected",
        )


def pair_conversations(data: Mapping[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The chosen and rejected conversations of a validated row (the prompt, if any, prepended to each response)."""
    prompt = list(data.get("prompt", []))
    return prompt + list(data["chosen"]), prompt + list(data["rejected"])


@dataclasses.dataclass
class PreferenceStats:
    """What reading and tokenizing a preference mixture did (see the module docstring for each count)."""

    sources: list[RowStats] = dataclasses.field(default_factory=list)
    tokenization: RowStats = dataclasses.field(default_factory=lambda: RowStats("tokenization"))
    kept: int = 0
    dropped_empty: int = 0
    truncated: int = 0
    identical: int = 0

    def report(self) -> dict[str, Any]:
        """The counts as JSON-able data (a run's data_report.json)."""
        return {
            "sources": [stats.summary() for stats in self.sources],
            "tokenization_skipped": self.tokenization.skipped,
            "tokenization_skip_examples": list(self.tokenization.examples),
            "kept": self.kept,
            "dropped_empty": self.dropped_empty,
            "truncated": self.truncated,
            "identical": self.identical,
        }

    def summary(self) -> str:
        """Several lines for logs: each source's counts, tokenization skips, then the pair counts."""
        lines = [stats.summary() for stats in self.sources]
        if self.tokenization.skipped:
            lines.append(self.tokenization.summary())
            lines.extend(f"  e.g. {example}" for example in self.tokenization.examples)
        lines.append(
            f"preference pairs: {self.kept} kept, {self.dropped_empty} dropped (a response empty after truncation), "
            f"{self.truncated} truncated, {self.identical} dropped with chosen == rejected"
        )
        return "\n".join(lines)


def tokenize_pair(
    data: Mapping[str, Any],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_seq_len: int,
    template: str = "tulu",
    file: str | None = None,
    row: int | None = None,
) -> tuple[Pair | None, bool]:
    """Tokenize both sides of a validated row; returns (pair or None when a side's response is empty after
    truncation to `max_seq_len`, whether a side was truncated). file/row only label DataErrors."""
    pair: Pair = {}
    truncated = False
    for side, messages in zip(SIDES, pair_conversations(data), strict=True):
        # Tokenize whole, then truncate here, so that truncation can be counted.
        full = tokenize_sft(messages, tokenizer, max_seq_len=2**62, template=template, file=file, row=row)
        if full is None:  # a custom template may render an assistant turn as nothing: no response at all
            return None, False
        ids, labels = full["input_ids"][:max_seq_len], full["labels"][:max_seq_len]
        truncated |= len(full["input_ids"]) > max_seq_len
        if not (labels != IGNORE_INDEX).any():
            return None, truncated
        pair[f"{side}_input_ids"], pair[f"{side}_labels"] = ids, labels
    return pair, truncated


def same_sides(pair: Pair) -> bool:
    """Whether the chosen and rejected sides of a tokenized pair are the same tokens with the same mask."""
    return all(np.array_equal(pair[f"chosen_{key}"], pair[f"rejected_{key}"]) for key in ("input_ids", "labels"))


def load_preference_pairs(
    sources: Sequence[Source],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_seq_len: int,
    template: str = "tulu",
    seed: int = 0,
    on_error: OnError = "raise",
    shuffle: bool = True,
    max_bad_fraction: float = 1.0,
) -> tuple[list[Pair], PreferenceStats]:
    """Read, mix (`mix_sources`: weights, deterministic in `seed`), validate and tokenize preference rows.

    Returns the kept pairs, in mixture order (a pair's position is its `pair_index`, the key of cached reference
    log-probs), and the counts. A row that fails tokenization (e.g. the chat template rejects it) follows
    `on_error` like a malformed row; with on_error="skip", more than `max_bad_fraction` malformed rows of a source
    (or of the tokenized rows) raise DataError.
    """
    rows, source_stats = mix_sources(
        sources, seed=seed, on_error=on_error, validate=validate_preference_row, shuffle=shuffle,
        max_bad_fraction=max_bad_fraction,
    )
    stats = PreferenceStats(sources=source_stats)
    pairs: list[Pair] = []
    for item in rows:
        stats.tokenization.rows += 1
        try:
            pair, truncated = tokenize_pair(
                item.data, tokenizer, max_seq_len=max_seq_len, template=template, file=item.file, row=item.index
            )
        except DataError as err:
            if on_error == "raise":
                raise
            stats.tokenization.record_skip(err)
            continue
        stats.tokenization.valid += 1
        if pair is None:
            stats.dropped_empty += 1
            continue
        if same_sides(pair):
            stats.identical += 1
            continue
        stats.kept += 1
        stats.truncated += truncated
        pairs.append(pair)
    check_bad_fraction(stats.tokenization, max_bad_fraction)
    return pairs, stats
