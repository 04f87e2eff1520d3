"""Compatibility: the names this module used to hold, now in modules with one job each — `stages.sections` (config
sections), `stages.setup` (mesh, tokenizer, model config, state), `stages.run_dir` (run directory, loop, export),
`train.batcher` (host batches → global arrays), `train.metrics.ThroughputWriter`. Import from those.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = (
    "tulu_jax.stages.sections",
    "tulu_jax.stages.setup",
    "tulu_jax.stages.run_dir",
    "tulu_jax.stages.paths",
    "tulu_jax.train.metrics",
)


def make_stage_optimizer(optim: Any, total_steps: int) -> Any:
    """`optim.build(total_steps)` (the old name)."""
    return optim.build(total_steps)


def __getattr__(name: str) -> Any:
    for home in _HOMES:
        module = importlib.import_module(home)
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"module 'tulu_jax.stages.common' has no attribute {name!r}")
