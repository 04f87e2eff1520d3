"""Decoder models (Llama 3.x, Qwen 2/2.5, OLMo 2, Gemma 2, Gemma 3 text), the reward/value model, and their Hugging
Face import/export."""

from tulu_jax.models.config import ModelConfig, load_hf_config
from tulu_jax.models.decoder import Decoder, KVCache
from tulu_jax.models.hf_io import load_hf_checkpoint, load_model, save_hf_checkpoint
from tulu_jax.models.hf_reward_io import load_hf_reward_model, save_hf_reward_model
from tulu_jax.models.reward import RewardModel

__all__ = [
    "Decoder",
    "KVCache",
    "ModelConfig",
    "RewardModel",
    "load_hf_checkpoint",
    "load_hf_config",
    "load_hf_reward_model",
    "load_model",
    "save_hf_checkpoint",
    "save_hf_reward_model",
]
