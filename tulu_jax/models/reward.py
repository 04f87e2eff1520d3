"""A scalar head on the decoder: the reward model of RLVR's value initialization, and the PPO value model.

`RewardModel(config)` holds a `Decoder` backbone without an LM head and `score` [hidden, 1] (logical axes
("embed", None)); HF's `LlamaForSequenceClassification` / `Qwen2ForSequenceClassification` with num_labels = 1 has the
same parameters (import/export: `tulu_jax.models.hf_reward_io`). Called on a batch it gives one scalar per position
(the value model's V_t); the reward of a sequence is the scalar at its last token (`sequence_rewards`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tulu_jax.errors import ConfigError
from tulu_jax.models.config import ModelConfig
from tulu_jax.models.decoder import _INIT_STD, Decoder


def backbone_config(config: ModelConfig) -> ModelConfig:
    """The backbone's config: tied embeddings, so the Decoder creates no [hidden, vocab] LM head the scalar head
    would leave unused (HF's sequence-classification models have none either)."""
    return config.replace(tie_word_embeddings=True)


def _score_param(config: ModelConfig, rngs: nnx.Rngs) -> nnx.Param:
    value = _INIT_STD * jax.random.normal(rngs.params(), (config.hidden_size, 1), jnp.float32)
    return nnx.Param(value.astype(config.param_dtype), out_sharding=("embed", None), eager_sharding=False)


class RewardModel(nnx.Module):
    """Decoder backbone + scalar head: r_t = score · h_t on the final-normed hidden states, float32."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = config
        self.decoder = Decoder(backbone_config(config), rngs=rngs)
        self.score = _score_param(config, rngs)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                 positions: jax.Array | None = None, segment_ids: jax.Array | None = None) -> jax.Array:
        """float32 scalars [B, T], one per position (same arguments as `Decoder.__call__`)."""
        hidden = self.decoder.hidden(input_ids, attention_mask, positions=positions, segment_ids=segment_ids)
        dt = self.config.compute_dtype
        out = jnp.einsum("bth,ho->bto", hidden.astype(dt), self.score[...].astype(dt),
                         preferred_element_type=jnp.float32)
        return out[..., 0]

    def sequence_rewards(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """[B] float32: the scalar at each row's last token where `attention_mask` is 1 (HF's pooling for
        right-padded rows whose content never contains the pad id)."""
        per_token = self(input_ids, attention_mask)
        positions = jnp.arange(input_ids.shape[1], dtype=jnp.int32)
        last = jnp.argmax(positions * (attention_mask != 0), axis=-1)
        return jnp.take_along_axis(per_token, last[:, None], axis=1)[:, 0]


def reward_model_from_decoder(decoder: Decoder, rngs: nnx.Rngs | None = None) -> RewardModel:
    """A RewardModel whose backbone is a copy of `decoder`'s parameters (in their shardings; its LM head dropped)
    and whose head is fresh: the "value model from the policy" initialization. Nothing full-size is built on one
    device; the copy keeps the two models' buffers apart, so donating one's state in a step never frees the other's.
    """
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    config = decoder.config
    model = nnx.eval_shape(lambda: RewardModel(config, nnx.Rngs(0)))
    params = nnx.state(decoder, nnx.Param)
    if "unembed" in params:
        del params["unembed"]
    nnx.update(model.decoder, jax.tree.map(jnp.copy, params))
    model.score = _score_param(config, rngs)
    return model


def check_value_model_matches(policy: ModelConfig, value: ModelConfig, *, source: str = "value model") -> None:
    """ConfigError unless the value/reward model has the policy's vocabulary and hidden sizes (it reads the policy's
    token ids, and RLVR initializes it from a reward model trained on the same base)."""
    for field, what in (("vocab_size", "vocabulary size"), ("hidden_size", "hidden size")):
        if getattr(policy, field) != getattr(value, field):
            raise ConfigError(
                f"{source}: {what} {getattr(value, field)} differs from the policy's {getattr(policy, field)}; "
                "the value model must come from the policy's base model (same tokenizer and width)"
            )
