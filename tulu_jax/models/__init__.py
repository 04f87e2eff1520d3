"""Decoder models (Llama 3.x, Qwen 2/2.5, OLMo 2) and their Hugging Face import/export."""

from tulu_jax.models.config import ModelConfig, load_hf_config
from tulu_jax.models.decoder import Decoder, KVCache
from tulu_jax.models.hf_io import load_hf_checkpoint, load_model, save_hf_checkpoint

__all__ = [
    "Decoder",
    "KVCache",
    "ModelConfig",
    "load_hf_checkpoint",
    "load_hf_config",
    "load_model",
    "save_hf_checkpoint",
]
