"""tulu-jax: the Tülu 3 post-training recipe (SFT, length-normalized DPO, RLVR) in pure JAX/Flax NNX.

Stable public API (imported lazily so that `import tulu_jax` stays cheap):
- `load_model(hf_dir, *, dtype=None, shardings=None)`: a local Hugging Face checkpoint as a Flax NNX decoder whose
  call `model(input_ids, attention_mask=None)` on int32 [B, T] arrays returns float32 logits [B, T, vocab].
- `generate(model, prompts, ...)`: batched KV-cache sampling; tokens, per-token log-probs, finished-with-EOS flags.
- `verify(dataset, response, ground_truth) -> float`: the verifiable reward (gsm8k, math, ifeval) in [0, 1].
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from tulu_jax import platform

__version__ = "0.1.0"

# Start silently: no libtpu probe on a host without TPU chips (tulu_jax.platform), and no "PyTorch was not found"
# advice from transformers (tulu-jax uses its tokenizers and configs only; torch is the tests' oracle).
platform.quiet_default()
logging.getLogger("transformers").addFilter(lambda record: not record.getMessage().startswith("PyTorch was not found"))

_LAZY = {
    "load_model": "tulu_jax.models.hf_io",
    "generate": "tulu_jax.models.sampler",
    "verify": "tulu_jax.rl.verifiers",
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tulu_jax' has no attribute {name!r}")
