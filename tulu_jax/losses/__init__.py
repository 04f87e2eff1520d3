"""Losses: pure functions of arrays (no model, no mesh), float32 inside, explicit denominators."""

from tulu_jax.losses.common import count_sequences, masked_sum, safe_denominator, token_logps
from tulu_jax.losses.distill import generalized_jsd, soft_cross_entropy, sparse_soft_cross_entropy
from tulu_jax.losses.dpo import (
    LOSS_TYPES,
    check_dpo_hyperparameters,
    dpo_loss,
    needs_reference,
    sequence_logps,
    uses_average_logps,
)
from tulu_jax.losses.ppo import (
    GRPO_SCALES,
    KL_KINDS,
    explained_variance,
    gae,
    grpo_advantages,
    grpo_nonzero_variance,
    grpo_policy_loss,
    kl_estimate,
    ppo_policy_loss,
    ppo_value_loss,
    token_entropy,
    whiten,
)
from tulu_jax.losses.reward import last_token_index, last_token_values, reward_model_loss
from tulu_jax.losses.sft import REDUCTIONS, sft_loss, sft_loss_from_logps

__all__ = [
    "GRPO_SCALES",
    "KL_KINDS",
    "LOSS_TYPES",
    "REDUCTIONS",
    "check_dpo_hyperparameters",
    "count_sequences",
    "dpo_loss",
    "explained_variance",
    "gae",
    "generalized_jsd",
    "grpo_advantages",
    "grpo_nonzero_variance",
    "grpo_policy_loss",
    "kl_estimate",
    "last_token_index",
    "last_token_values",
    "masked_sum",
    "needs_reference",
    "ppo_policy_loss",
    "ppo_value_loss",
    "reward_model_loss",
    "safe_denominator",
    "sequence_logps",
    "sft_loss",
    "sft_loss_from_logps",
    "soft_cross_entropy",
    "sparse_soft_cross_entropy",
    "token_entropy",
    "token_logps",
    "uses_average_logps",
    "whiten",
]
