"""HF import/export of the reward model as `<Family>ForSequenceClassification` with one label (Llama, Qwen 2,
OLMo 2, Gemma 2, Gemma 3 text).

The HF layout is the causal LM's `model.*` tensors (no `lm_head`) plus `score.weight` [1, hidden]; the backbone goes
through `hf_io` unchanged and the head is one more tensor, so a reward model exported here loads with
`transformers.AutoModelForSequenceClassification.from_pretrained` and scores the same sequences the same way.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from safetensors.numpy import load_file, save_file

from tulu_jax.errors import CheckpointError
from tulu_jax.models.config import ModelConfig
from tulu_jax.models.hf_io import (
    DEFAULT_MAX_SHARD_BYTES,
    INDEX_FILE,
    SINGLE_FILE,
    _Source,
    _sources,
    _to_host,
    dtype_fields,
    load_module,
    refuse_nonfinite,
    save_hf_checkpoint,
)
from tulu_jax.models.reward import RewardModel, backbone_config

# Causal-LM architecture (ModelConfig.architecture) -> its HF sequence-classification class.
SEQUENCE_CLASSIFICATION = {
    "LlamaForCausalLM": "LlamaForSequenceClassification",
    "Qwen2ForCausalLM": "Qwen2ForSequenceClassification",
    "Olmo2ForCausalLM": "Olmo2ForSequenceClassification",
    "Gemma2ForCausalLM": "Gemma2ForSequenceClassification",
    "Gemma3ForCausalLM": "Gemma3TextForSequenceClassification",
}
_CAUSAL = {v: k for k, v in SEQUENCE_CLASSIFICATION.items()}
SCORE_FILE = "score.safetensors"


def _score_source(config: ModelConfig) -> _Source:
    # HF's nn.Linear(hidden, 1) stores [1, hidden]; the model keeps [hidden, 1].
    return _Source("score.weight", True, ((config.hidden_size,), (1,)), False)


def save_hf_reward_model(model: RewardModel, out_dir: str | os.PathLike[str], *, dtype: Any = None,
                         max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    """Write `model` so that transformers loads it as `<Family>ForSequenceClassification` (num_labels = 1).

    The backbone is written by `save_hf_checkpoint`; the head joins model.safetensors, or for a sharded checkpoint
    gets score.safetensors in the index.
    HF pools at the last token that is not `pad_token_id` (taken from the model config; set it, or transformers
    refuses batches of more than one row). Every process must call this; process 0 writes.
    """
    out_dir = os.fspath(out_dir)
    refuse_nonfinite(model, f"export to {out_dir}")  # the score head too, before anything is written
    config = model.config
    save_hf_checkpoint(model.decoder, out_dir, max_shard_bytes=max_shard_bytes, dtype=dtype)
    out_dtype = np.dtype(jnp.dtype(dtype if dtype is not None else config.param_dtype))
    score = _to_host(model.score[...]).T.astype(out_dtype)  # gathered on every process
    if jax.process_index() == 0:
        index_path = os.path.join(out_dir, INDEX_FILE)
        head = {"score.weight": np.ascontiguousarray(score)}
        if os.path.exists(index_path):  # sharded: the head gets its own file in the index
            with open(index_path, encoding="utf-8") as f:
                index = json.load(f)
            save_file(head, os.path.join(out_dir, SCORE_FILE), metadata={"format": "pt"})
            index["weight_map"]["score.weight"] = SCORE_FILE
            index["metadata"]["total_size"] += score.nbytes
            with open(index_path, "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2)
        else:  # transformers reads a lone model.safetensors and ignores any index: the head goes into it
            single = os.path.join(out_dir, SINGLE_FILE)
            save_file({**load_file(single), **head}, single, metadata={"format": "pt"})
        hf = config.to_hf_config(dtype=out_dtype.name)
        hf.update(architectures=[SEQUENCE_CLASSIFICATION[config.architecture]], id2label={"0": "LABEL_0"},
                  label2id={"LABEL_0": 0})
        with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
            json.dump(hf, f, indent=2)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("tulu_jax.save_hf_reward_model")


def load_hf_reward_model(hf_dir: str | os.PathLike[str], *, dtype: Any = None, shardings: Any = None,
                         overrides: dict[str, Any] | None = None) -> RewardModel:
    """A RewardModel from an HF `<Family>ForSequenceClassification` directory with one label.

    dtype, shardings, overrides: as `hf_io.load_hf_checkpoint` (shardings match `nnx.state(abstract RewardModel)`).
    Raises CheckpointError naming config.json for another architecture or several labels, and the file/tensor for
    missing, unexpected or wrong-shaped tensors.
    """
    hf_dir = os.fspath(hf_dir)
    path = os.path.join(hf_dir, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read the reward model's config ({e})") from None
    archs = hf.get("architectures") or []
    if len(archs) != 1 or archs[0] not in _CAUSAL:
        raise CheckpointError(f"{path}: architectures {archs!r} is not one of {sorted(_CAUSAL)} (a reward model)")
    labels = len(hf.get("id2label") or {"0": "LABEL_0"})
    if hf.get("num_labels", labels) != 1 or labels != 1:
        raise CheckpointError(f"{path}: a reward model has one label (a scalar score), this config has {labels}")
    config = ModelConfig.from_hf_config({**hf, "architectures": [_CAUSAL[archs[0]]]}, source=path,
                                        **dtype_fields(dtype, overrides))
    backbone = backbone_config(config)
    sources = {("decoder", *key): source for key, source in _sources(backbone).items()}
    sources[("score",)] = _score_source(config)
    return load_module(hf_dir, backbone, lambda: RewardModel(config), sources, shardings)
