"""SFT tokenization: a conversation → `input_ids` and `labels` (= input_ids on assistant tokens, else -100).

Supervised: each assistant turn's content and its end-of-turn token (the EOS under the Tülu template,
`<|im_end|>` under ChatML). Masked: system and user turns, the generation prompt before each assistant turn
(`<|assistant|>\\n`), and whitespace a template writes after an end-of-turn token (the "\\n" after `<|im_end|>`; the
model never generates it, it stops at the end-of-turn token).

Like open-instruct's `sft_tulu_tokenize_and_truncate`, turn boundaries come from rendering message prefixes: the
assistant turn i starts where `messages[:i]` rendered with the generation prompt ends, and ends where `messages[:i+1]`
rendered ends. Unlike it, the boundaries are character positions mapped onto the tokens of the ONE tokenization of the
full text (via offsets), so a template or BPE whose prefixes tokenize differently cannot shift the mask; a template
whose prefix renderings are not prefixes of the full text is an error, not a silently wrong mask. Consecutive
assistant turns under the Tülu template are masked as the reference masks them (see `assistant_char_spans`).
A conversation without an assistant turn has nothing to train on: `tokenize_sft` returns None for it, as for a row
whose supervised tokens were all truncated away.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jinja2
import numpy as np

from tulu_jax.data.rows import has_assistant_turn, validate_messages
from tulu_jax.data.templates import apply_chat_template
from tulu_jax.errors import ConfigError, DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100


def _special_strings(tokenizer: PreTrainedTokenizerBase) -> tuple[str, ...]:
    specials = set(tokenizer.all_special_tokens)
    specials.update(t.content for t in tokenizer.added_tokens_decoder.values() if t.special)
    return tuple(s for s in specials if s)


def assistant_char_spans(
    messages: Sequence[Mapping[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    template: str = "tulu",
    file: str | None = None,
    row: int | None = None,
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character span of each assistant turn's supervised text.

    file/row only label DataErrors."""
    messages = list(messages)

    def render(prefix: list[Mapping[str, Any]], generation_prompt: bool) -> str:
        try:
            return apply_chat_template(prefix, tokenizer, template=template, add_generation_prompt=generation_prompt)
        except jinja2.TemplateError as err:  # raise_exception(...) or an undefined field: about this conversation
            raise DataError(f"the chat template failed: {err}", file=file, row=row, field="messages") from err

    text = render(messages, False)
    specials = _special_strings(tokenizer)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(messages[:i], True)
        if i > 0 and not text.startswith(before) and messages[i - 1]["role"] == "assistant":
            # The Tülu template writes a turn's closing "\n" only when another turn follows, so no prefix renders the
            # generation prompt after an assistant turn. As in the reference (which masks only non-assistant turns),
            # the turn then starts where the previous one ends: the "\n<|assistant|>\n" between them is trained.
            before = render(messages[:i], False)
        through = render(messages[: i + 1], False)
        if not (through.startswith(before) and text.startswith(through)):
            raise DataError(
                "the chat template renders this conversation's prefixes inconsistently (a prefix is not a prefix of "
                "the full text), so the assistant turn cannot be located",
                file=file,
                row=row,
                field=f"messages[{i}]",
            )
        start, end = len(before), len(through)
        # Whitespace after the end-of-turn token (ChatML's "\n" after <|im_end|>) is formatting, not generated text.
        stripped = through[start:end].rstrip()
        if len(stripped) < end - start and stripped.endswith(specials):
            end = start + len(stripped)
        spans.append((start, end))
    return text, spans


def tokenize_sft(
    messages: Sequence[Mapping[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_seq_len: int,
    template: str = "tulu",
    file: str | None = None,
    row: int | None = None,
) -> dict[str, np.ndarray] | None:
    """`{"input_ids": int32[T], "labels": int32[T]}` for one conversation, truncated to its first max_seq_len tokens.

    Labels are the input ids on assistant tokens (see module docstring) and IGNORE_INDEX (-100) elsewhere; a token
    counts as assistant when its first character lies in an assistant span. Returns None when no supervised token is
    left (no assistant turn, or truncation cut every one): the caller drops the row and counts it.
    template: "tulu", "qwen2.5", "native" (the tokenizer's own) or a jinja string; file/row only label DataErrors.
    Raises DataError for a malformed conversation and ConfigError for an unusable tokenizer or template.
    """
    if max_seq_len < 1:
        raise ConfigError(f"max_seq_len must be >= 1, got {max_seq_len}")
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(
            f"tokenize_sft needs a fast (Rust-backed) tokenizer for offsets, got {type(tokenizer).__name__}"
        )
    validate_messages(list(messages), file=file, row=row, require_assistant=has_assistant_turn(messages))
    text, spans = assistant_char_spans(messages, tokenizer, template=template, file=file, row=row)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = np.asarray(encoding["input_ids"], dtype=np.int32)
    token_starts = np.asarray([start for start, _ in encoding["offset_mapping"]], dtype=np.int64)
    supervised = np.zeros(len(input_ids), dtype=bool)
    for start, end in spans:
        supervised |= (token_starts >= start) & (token_starts < end)
    labels = np.where(supervised, input_ids, IGNORE_INDEX).astype(np.int32)
    input_ids, labels = input_ids[:max_seq_len], labels[:max_seq_len]
    if not (labels != IGNORE_INDEX).any():
        return None
    return {"input_ids": input_ids, "labels": labels}


def tokenize_text(text: str, tokenizer: PreTrainedTokenizerBase, *, max_seq_len: int) -> dict[str, np.ndarray]:
    """A plain-text document for next-token prediction (pretraining): its tokens then EOS, every one supervised,
    truncated to the first max_seq_len tokens. Same output as `tokenize_sft`."""
    if max_seq_len < 1:
        raise ConfigError(f"max_seq_len must be >= 1, got {max_seq_len}")
    if tokenizer.eos_token_id is None:
        raise ConfigError("plain-text rows need a tokenizer with an EOS token (it ends every document)")
    ids = [*tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    input_ids = np.asarray(ids[:max_seq_len], dtype=np.int32)
    return {"input_ids": input_ids, "labels": input_ids.copy()}


def tokenize_prompt(
    messages: Sequence[Mapping[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    template: str = "tulu",
) -> np.ndarray:
    """int32 token ids of `messages` rendered with the generation prompt (e.g. ending in `<|assistant|>\\n`)."""
    validate_messages(list(messages), require_assistant=False)
    text = apply_chat_template(messages, tokenizer, template=template, add_generation_prompt=True)
    return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int32)
