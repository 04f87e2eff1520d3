"""Model-agnostic training machinery shared by the SFT, DPO and RLVR stages."""

from tulu_jax.train.checkpoint import Checkpointer, Restored
from tulu_jax.train.frozen import FrozenModel, freeze
from tulu_jax.train.loop import StatefulIterator, batch_tokens, run_training
from tulu_jax.train.metrics import MetricsWriter, ProgressBar
from tulu_jax.train.optim import Optimizer, decay_mask, make_optimizer, make_schedule, warmup_steps
from tulu_jax.train.state import (
    TrainState,
    abstract_train_state,
    create_train_state,
    eval_shape_train_state,
    init_train_state,
    shardings_of,
    split_model,
    train_state_shardings,
    with_shardings,
)
from tulu_jax.train.step import Step, build_eval_step, build_train_step, split_micro_batches

__all__ = [
    "Checkpointer",
    "FrozenModel",
    "MetricsWriter",
    "Optimizer",
    "ProgressBar",
    "Restored",
    "StatefulIterator",
    "Step",
    "TrainState",
    "abstract_train_state",
    "batch_tokens",
    "build_eval_step",
    "build_train_step",
    "create_train_state",
    "decay_mask",
    "eval_shape_train_state",
    "freeze",
    "init_train_state",
    "make_optimizer",
    "make_schedule",
    "run_training",
    "shardings_of",
    "split_micro_batches",
    "split_model",
    "train_state_shardings",
    "warmup_steps",
    "with_shardings",
]
