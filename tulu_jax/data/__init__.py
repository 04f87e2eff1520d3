"""Data: chat templates, tokenizers, SFT tokenization, row reading and mixtures, batching and grain pipelines.

Submodules are imported on first use (`tulu_jax.data.tokenize_sft` works), so importing one submodule does not pull in
transformers or grain for the others.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TULU_CHAT_TEMPLATE": "templates",
    "apply_chat_template": "templates",
    "resolve_chat_template": "templates",
    "load_tokenizer": "tokenizers",
    "qwen25_tokenizer": "tokenizers",
    "train_tiny_bpe": "tokenizers",
    "IGNORE_INDEX": "sft",
    "tokenize_sft": "sft",
    "tokenize_prompt": "sft",
    "Row": "rows",
    "RowStats": "rows",
    "Source": "rows",
    "iter_rows": "rows",
    "read_rows": "rows",
    "mix_sources": "rows",
    "validate_messages": "rows",
    "validate_sft_row": "rows",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
