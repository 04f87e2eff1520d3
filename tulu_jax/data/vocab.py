"""Vocabulary identity for distillation: a teacher's distribution only means something to a student that numbers
the same tokens the same way, so sizes and tokenizers are checked before any step runs."""

from __future__ import annotations

import hashlib
import json
import os
from typing import TYPE_CHECKING

from tulu_jax.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def vocabulary_hash(tokenizer: PreTrainedTokenizerBase | str | os.PathLike[str]) -> str:
    """sha256 of the token → id mapping (added and special tokens included) of a tokenizer or a local tokenizer dir.

    Only the numbering counts: two tokenizer directories that differ in chat template, padding side or model max
    length hash the same.
    """
    if isinstance(tokenizer, (str, os.PathLike)):
        from tulu_jax.data.tokenizers import load_tokenizer

        tokenizer = load_tokenizer(tokenizer)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def check_same_vocabulary(
    student_vocab_size: int,
    teacher_vocab_size: int,
    *,
    student_tokenizer: PreTrainedTokenizerBase | str | os.PathLike[str] | None = None,
    teacher_tokenizer: PreTrainedTokenizerBase | str | os.PathLike[str] | None = None,
) -> None:
    """Raise ConfigError unless the two models' vocabulary sizes (and, when both are given, tokenizers) match.

    Args:
      student_vocab_size, teacher_vocab_size: the models' `vocab_size` (rows of the embedding / logits width).
      student_tokenizer, teacher_tokenizer: tokenizers or local tokenizer directories, compared by `vocabulary_hash`.
    """
    if student_vocab_size != teacher_vocab_size:
        raise ConfigError(
            f"distillation: the student's vocabulary has {student_vocab_size} entries and the teacher's "
            f"{teacher_vocab_size}; teacher and student must share one tokenizer and one vocabulary size"
        )
    if student_tokenizer is None or teacher_tokenizer is None:
        return
    student_hash, teacher_hash = vocabulary_hash(student_tokenizer), vocabulary_hash(teacher_tokenizer)
    if student_hash != teacher_hash:
        names = [t if isinstance(t, (str, os.PathLike)) else type(t).__name__
                 for t in (student_tokenizer, teacher_tokenizer)]
        raise ConfigError(
            f"distillation: the student's tokenizer ({names[0]}, vocabulary sha256 {student_hash[:12]}) and the "
            f"teacher's ({names[1]}, {teacher_hash[:12]}) number tokens differently; use one tokenizer for both"
        )
