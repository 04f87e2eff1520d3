"""The decoder-only transformer (Llama 3.x / Qwen 2 / OLMo 2 / Gemma 2 / Gemma 3) in Flax NNX, with scanned layers
and a KV cache.

Layer parameters are stacked along a leading `layers` axis and the stack runs under one `jax.lax.scan`, so compile
time does not grow with depth. Every parameter carries logical axis names (`out_sharding` metadata) only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from tulu_jax.models.activation_sharding import constrain
from tulu_jax.models.attention import attend, cache_mask, segment_causal_mask
from tulu_jax.models.config import ModelConfig
from tulu_jax.models.fused_attention import layer_attend
from tulu_jax.models.dense import weight_einsum
from tulu_jax.models.lm_head import chunked_token_logps
from tulu_jax.models.layer_pattern import LayerInputs, sliding_flags
from tulu_jax.models.rope import apply_rope

_INIT_STD = 0.02  # transformers' initializer_range default for all three families
# Logical names of the activations (sharding files map them to mesh axes; see models/activation_sharding.py).
HIDDEN = ("batch", "length", "act_embed")
Q_HEADS = ("batch", "length", "act_heads", None)
KV_HEADS = ("batch", "length", "act_kv_heads", None)
MLP = ("batch", "length", "act_mlp")
LOGITS = ("batch", "length", "act_vocab")
CACHE = (None, "batch", "length", "act_kv_heads", None)


@flax.struct.dataclass
class KVCache:
    """Keys/values of every layer, k and v [L, B, S, KVH, Dh]; `index` (int32 scalar) is the next free slot."""

    k: jax.Array
    v: jax.Array
    index: jax.Array


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, axes: tuple[int, ...] = (-1,)) -> jax.Array:
    """RMSNorm over `axes`, computed in float32, returned in x's dtype (weight shape = x.shape over `axes`)."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=axes, keepdims=True) + eps)
    return (weight.astype(jnp.float32) * y).astype(x.dtype)


def _norm(config: ModelConfig, x: jax.Array, weight: jax.Array, axes: tuple[int, ...] = (-1,)) -> jax.Array:
    """The config's RMSNorm: Gemma's scales by (1 + weight), in float32 as transformers does."""
    if config.norm_unit_offset:
        weight = 1.0 + weight.astype(jnp.float32)
    return rms_norm(x, weight, config.rms_norm_eps, axes)


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], names: tuple[str, ...], dtype: str, init: str) -> nnx.Param:
    if init == "normal":
        value = (_INIT_STD * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    else:
        value = (jnp.ones if init == "ones" else jnp.zeros)(shape, dtype)
    # Logical names only; the mesh placement comes later from a sharding file, so no eager sharding here.
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


def layer_param_specs(config: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[str, ...], str]]:
    """Per-layer parameters: name -> (shape without the layers axis, logical axis names, init)."""
    h, i, n, k, d = (config.hidden_size, config.intermediate_size, config.num_heads, config.num_kv_heads,
                     config.head_dim)
    norm_init = "zeros" if config.norm_unit_offset else "ones"  # the identity norm either way
    specs = {
        "attn_norm": ((h,), ("embed",), norm_init),
        "q_proj": ((h, n, d), ("embed", "heads", "head_dim"), "normal"),
        "k_proj": ((h, k, d), ("embed", "kv_heads", "head_dim"), "normal"),
        "v_proj": ((h, k, d), ("embed", "kv_heads", "head_dim"), "normal"),
        "o_proj": ((n, d, h), ("heads", "head_dim", "embed"), "normal"),
        "mlp_norm": ((h,), ("embed",), norm_init),
        "gate_proj": ((h, i), ("embed", "mlp"), "normal"),
        "up_proj": ((h, i), ("embed", "mlp"), "normal"),
        "down_proj": ((i, h), ("mlp", "embed"), "normal"),
    }
    if config.attention_bias:
        specs["q_bias"] = ((n, d), ("heads", "head_dim"), "zeros")
        specs["k_bias"] = ((k, d), ("kv_heads", "head_dim"), "zeros")
        specs["v_bias"] = ((k, d), ("kv_heads", "head_dim"), "zeros")
    if config.qk_norm and config.qk_norm_per_head:
        specs["q_norm"] = ((d,), ("head_dim",), norm_init)
        specs["k_norm"] = ((d,), ("head_dim",), norm_init)
    elif config.qk_norm:
        specs["q_norm"] = ((n, d), ("heads", "head_dim"), norm_init)
        specs["k_norm"] = ((k, d), ("kv_heads", "head_dim"), norm_init)
    if config.norm_placement == "sandwich":
        specs["post_attn_norm"] = ((h,), ("embed",), norm_init)
        specs["post_mlp_norm"] = ((h,), ("embed",), norm_init)
    return specs


class DecoderLayers(nnx.Module):
    """All transformer blocks, each parameter stacked along a leading `layers` axis."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        self.names = tuple(layer_param_specs(config))
        for name, (shape, axes, init) in layer_param_specs(config).items():
            setattr(self, name, _param(rngs, (config.num_layers, *shape), ("layers", *axes), config.param_dtype,
                                       init))

    def stacked(self) -> dict[str, jax.Array]:
        """The raw stacked arrays, name -> [L, ...]."""
        return {name: getattr(self, name)[...] for name in self.names}


def _block(config: ModelConfig, p: dict[str, jax.Array], h: jax.Array, cos: jax.Array, sin: jax.Array,
           attend_fn: Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, Any]]) -> tuple[jax.Array, Any]:
    """One transformer block on h [B, T, H] -> (h, aux).

    `attend_fn(q, k, v) -> (attention output, aux)` does the masked (maybe cached) attention; aux is passed through.
    """
    dt = config.compute_dtype
    w = {name: value.astype(dt) for name, value in p.items()}

    def attention(x: jax.Array) -> tuple[jax.Array, Any]:
        q = constrain(jnp.einsum("bth,hnd->btnd", x, w["q_proj"]), Q_HEADS)
        k = constrain(jnp.einsum("bth,hnd->btnd", x, w["k_proj"]), KV_HEADS)
        v = constrain(jnp.einsum("bth,hnd->btnd", x, w["v_proj"]), KV_HEADS)
        if config.attention_bias:
            q, k, v = q + w["q_bias"], k + w["k_bias"], v + w["v_bias"]
        if config.qk_norm:  # before RoPE; OLMo 2: over the whole projection (all heads), Gemma 3: over each head
            axes = (-1,) if config.qk_norm_per_head else (-2, -1)
            q, k = _norm(config, q, w["q_norm"], axes), _norm(config, k, w["k_norm"], axes)
        q = apply_rope(q, cos, sin) * jnp.asarray(config.query_scale, dt)
        k = apply_rope(k, cos, sin)
        attn, aux = attend_fn(q, k, v)
        return constrain(jnp.einsum("btnd,ndh->bth", constrain(attn, Q_HEADS), w["o_proj"]), HIDDEN), aux

    def mlp(x: jax.Array) -> tuple[jax.Array, None]:
        gate = weight_einsum("bth,hi->bti", x, w["gate_proj"])
        gate = jax.nn.silu(gate) if config.hidden_act == "silu" else jax.nn.gelu(gate, approximate=True)  # GeGLU
        hidden = constrain(gate * weight_einsum("bth,hi->bti", x, w["up_proj"]), MLP)
        return constrain(weight_einsum("bti,ih->bth", hidden, w["down_proj"]), HIDDEN), None

    h, aux = _residual(config, w, constrain(h, HIDDEN), "attn_norm", "post_attn_norm", attention)
    h, _ = _residual(config, w, constrain(h, HIDDEN), "mlp_norm", "post_mlp_norm", mlp)
    return constrain(h, HIDDEN), aux


def _residual(config: ModelConfig, w: dict[str, jax.Array], h: jax.Array, norm: str, post_norm: str,
              branch: Callable[[jax.Array], tuple[jax.Array, Any]]) -> tuple[jax.Array, Any]:
    """h + branch(h) under the config's norm placement: "pre" norms the branch input, "post" (OLMo 2) its output
    with the same `norm` weights, "sandwich" (Gemma) both, the output with the `post_norm` weights."""
    placement = config.norm_placement
    out, aux = branch(h if placement == "post" else _norm(config, h, w[norm]))
    if placement != "pre":
        out = _norm(config, out, w[norm if placement == "post" else post_norm])
    return h + out, aux


def _remat(config: ModelConfig, fn: Callable[..., Any]) -> Callable[..., Any]:
    if config.remat == "none":
        return fn
    policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable if config.remat == "dots" else None
    # prevent_cse=False is safe (and faster) inside scan, which already blocks the CSE remat guards against.
    return jax.checkpoint(fn, policy=policy, prevent_cse=False)


class Decoder(nnx.Module):
    """Decoder-only LM: embeddings, scanned blocks, final RMSNorm, LM head (tied or not); float32 logits."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = config
        pdt = config.param_dtype
        self.embed = _param(rngs, (config.vocab_size, config.hidden_size), ("vocab", "embed"), pdt, "normal")
        self.layers = DecoderLayers(config, rngs)
        self.final_norm = _param(rngs, (config.hidden_size,), ("embed",), pdt,
                                 "zeros" if config.norm_unit_offset else "ones")
        if not config.tie_word_embeddings:
            self.unembed = _param(rngs, (config.hidden_size, config.vocab_size), ("embed", "vocab"), pdt, "normal")

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                 positions: jax.Array | None = None, segment_ids: jax.Array | None = None) -> jax.Array:
        """float32 logits [B, T, V] for int input_ids [B, T].

        Either `attention_mask` (HF padding mask, 1 = token; positions default to cumsum(mask) - 1, clipped at 0)
        or `segment_ids` (0 = padding, 1..k = packed sequences) with `positions` restarting per segment.
        """
        return self.lm_head(self.hidden(input_ids, attention_mask, positions=positions, segment_ids=segment_ids))

    def token_logps(self, input_ids: jax.Array, targets: jax.Array, attention_mask: jax.Array | None = None, *,
                    positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
                    entropy: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
        """float32 [B, T] log-probs of `targets` [B, T] (and the entropies with `entropy`), the same numbers as
        log_softmax(self(...))[targets], computed `config.logits_chunk_size` positions at a time so that no
        full-sequence float32 logits exist in the forward or the backward pass (see models/lm_head.py)."""
        hidden = self.hidden(input_ids, attention_mask, positions=positions, segment_ids=segment_ids)
        return self._head_logps(hidden, targets, entropy)

    def _head_logps(self, hidden: jax.Array, targets: jax.Array,
                    entropy: bool) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Log-probs of `targets` (and entropies) under the LM head from final hidden states, chunked."""
        cfg = self.config
        weight = self.embed[...] if cfg.tie_word_embeddings else self.unembed[...]
        return chunked_token_logps(hidden, weight, targets, chunk_size=cfg.logits_chunk_size,
                                   vocab_first=cfg.tie_word_embeddings, compute_dtype=cfg.compute_dtype,
                                   softcap=cfg.final_logit_softcap, entropy=entropy)

    def shared_prompt_token_logps(self, input_ids: jax.Array, positions: jax.Array, segment_ids: jax.Array, *,
                                  prompt_width: int, group_size: int,
                                  entropy: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
        """`token_logps` of the response tokens of rows that share their prompt in consecutive groups (GRPO's G
        samples of one prompt): float32 [B, N] log π(input_ids[:, P + j] | everything before), N = T − P (and the
        entropies with `entropy`), the same numbers as `token_logps` over the whole rows.

        `input_ids`, `positions`, `segment_ids` [B, T]: a left-padded prompt block of `prompt_width` P columns,
        identical within each group of `group_size` consecutive rows, then the responses. The prompt runs once per
        group and each response attends to its group's prompt keys/values, so a step costs B/G·P + B·N tokens
        instead of B·(P + N); gradients reach the shared prompt from every response of its group.
        """
        cfg = self.config
        b, t = input_ids.shape
        g, p, n = group_size, prompt_width, t - prompt_width
        if b % g or not 0 < p < t:
            raise ValueError(f"shared prompts: {b} rows in groups of {g} with a {p}-column prompt in {t} columns")

        def first_of_group(x: jax.Array) -> jax.Array:  # [B, P] → [B/G, P] (a reshape keeps the batch sharding)
            return x[:, :p].reshape(b // g, g, p)[:, 0]

        prompt_ids, prompt_positions, prompt_segments = map(first_of_group, (input_ids, positions, segment_ids))
        response_segments = segment_ids[:, p:]
        key_segments = jnp.concatenate([jnp.repeat(prompt_segments, g, axis=0), response_segments], axis=1)
        # Rows P.. of the whole rows' segment_causal_mask: query j sits at slot P + j.
        response_mask = ((jnp.arange(t)[None, :] <= p + jnp.arange(n)[:, None])[None]
                         & (response_segments[:, :, None] == key_segments[:, None, :])
                         & (key_segments != 0)[:, None, :])
        prompt_inputs = LayerInputs.build(cfg, prompt_positions, segment_causal_mask(prompt_segments),
                                          jnp.arange(p))
        response_inputs = LayerInputs.build(cfg, positions[:, p:], response_mask, p + jnp.arange(n))

        def body(carry: tuple[jax.Array, jax.Array], xs: tuple[dict[str, jax.Array], jax.Array]
                 ) -> tuple[tuple[jax.Array, jax.Array], None]:
            h_prompt, h_response = carry
            weights, sliding = xs
            prompt_layer, response_layer = prompt_inputs.at(sliding), response_inputs.at(sliding)
            h_prompt, (k_prompt, v_prompt) = _block(cfg, weights, h_prompt, prompt_layer.cos, prompt_layer.sin,
                                                    lambda q, k, v: (layer_attend(
                                                        cfg, q, k, v, mask=prompt_layer.mask,
                                                        segment_ids=prompt_segments, sliding=sliding), (k, v)))

            def attend_after_prompt(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, None]:
                keys = jnp.concatenate([jnp.repeat(k_prompt, g, axis=0), k], axis=1)
                values = jnp.concatenate([jnp.repeat(v_prompt, g, axis=0), v], axis=1)
                return attend(q, keys, values, response_layer.mask, softcap=cfg.attn_logit_softcap), None

            h_response, _ = _block(cfg, weights, h_response, response_layer.cos, response_layer.sin,
                                   attend_after_prompt)
            return (h_prompt, h_response), None

        (h_prompt, h_response), _ = jax.lax.scan(
            _remat(cfg, body), (self._embed(prompt_ids), self._embed(input_ids[:, p:])),
            (self.layers.stacked(), sliding_flags(cfg)))
        # Response token j is predicted from the prompt's last position (j = 0) or response position j − 1.
        predicting = jnp.concatenate([jnp.repeat(h_prompt[:, -1:], g, axis=0), h_response[:, :-1]], axis=1)
        hidden = _norm(cfg, constrain(predicting, HIDDEN), self.final_norm[...].astype(cfg.compute_dtype))
        return self._head_logps(hidden, input_ids[:, p:], entropy)

    def hidden(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
               positions: jax.Array | None = None, segment_ids: jax.Array | None = None) -> jax.Array:
        """Final-normed hidden states [B, T, H] in the compute dtype (same arguments as `__call__`)."""
        cfg = self.config
        positions, segment_ids = _positions_and_segments(input_ids, attention_mask, positions, segment_ids)
        inputs = LayerInputs.build(cfg, positions, segment_causal_mask(segment_ids), jnp.arange(input_ids.shape[1]))

        def body(h: jax.Array, xs: tuple[dict[str, jax.Array], jax.Array]) -> tuple[jax.Array, None]:
            p, sliding = xs
            layer = inputs.at(sliding)
            h, _ = _block(cfg, p, h, layer.cos, layer.sin, lambda q, k, v: (layer_attend(
                cfg, q, k, v, mask=layer.mask, segment_ids=segment_ids, sliding=sliding), None))
            return h, None

        h, _ = jax.lax.scan(_remat(cfg, body), self._embed(input_ids), (self.layers.stacked(), sliding_flags(cfg)))
        return _norm(cfg, constrain(h, HIDDEN), self.final_norm[...].astype(cfg.compute_dtype))

    def lm_head(self, hidden: jax.Array) -> jax.Array:
        """float32 logits [..., V] from final hidden states [..., H] (soft-capped when the config says so)."""
        dt = self.config.compute_dtype
        if self.config.tie_word_embeddings:
            logits = jnp.einsum("...h,vh->...v", hidden.astype(dt), self.embed[...].astype(dt),
                                preferred_element_type=jnp.float32)
        else:
            logits = jnp.einsum("...h,hv->...v", hidden.astype(dt), self.unembed[...].astype(dt),
                                preferred_element_type=jnp.float32)
        cap = self.config.final_logit_softcap
        logits = logits if cap is None else cap * jnp.tanh(logits / cap)
        return constrain(logits, LOGITS) if logits.ndim == 3 else logits

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty cache of `max_len` slots for `batch` rows, in the compute dtype."""
        cfg = self.config
        shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
        zeros = jnp.zeros(shape, cfg.compute_dtype)
        return KVCache(k=zeros, v=zeros, index=jnp.zeros((), jnp.int32))

    def forward_cached(self, input_ids: jax.Array, positions: jax.Array, cache: KVCache, key_mask: jax.Array, *,
                       last_only: bool = False) -> tuple[jax.Array, KVCache]:
        """Run T new tokens [B, T] against the cache; returns float32 logits [B, T, V] and the advanced cache.

        Writes the new keys/values at slots [index, index+T); the query at slot index+t attends to slot j iff
        key_mask[b, j] (bool [B, S]) and j <= index+t. `index` advances by T. Shapes are static, `index` dynamic.
        last_only: only the last position's logits, [B, 1, V] (all a prefill needs).
        """
        cfg = self.config
        t = input_ids.shape[1]
        index = cache.index
        inputs = LayerInputs.build(cfg, positions, cache_mask(key_mask, index, t), index + jnp.arange(t))

        def body(carry: tuple[jax.Array, jax.Array, jax.Array],
                 xs: tuple[dict[str, jax.Array], jax.Array]) -> tuple[tuple[jax.Array, jax.Array, jax.Array], None]:
            h, k_all, v_all = carry
            p, layer, sliding = xs
            layer_inputs = inputs.at(sliding)
            h, k_all, v_all = constrain(h, HIDDEN), constrain(k_all, CACHE), constrain(v_all, CACHE)

            def attend_cached(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, Any]:
                # Write this layer's new keys/values in place into the full cache (the carry, so XLA updates it
                # without copying), then attend over this layer's slots.
                start = (layer, 0, index, 0, 0)
                k_new = jax.lax.dynamic_update_slice(k_all, k.astype(k_all.dtype)[None], start)
                v_new = jax.lax.dynamic_update_slice(v_all, v.astype(v_all.dtype)[None], start)
                keys = jax.lax.dynamic_index_in_dim(k_new, layer, keepdims=False)
                values = jax.lax.dynamic_index_in_dim(v_new, layer, keepdims=False)
                return attend(q, keys, values, layer_inputs.mask, softcap=cfg.attn_logit_softcap), (k_new, v_new)

            h, (k_all, v_all) = _block(cfg, p, h, layer_inputs.cos, layer_inputs.sin, attend_cached)
            return (h, k_all, v_all), None

        layers = jnp.arange(cfg.num_layers, dtype=jnp.int32)
        (h, k_all, v_all), _ = jax.lax.scan(body, (self._embed(input_ids), cache.k, cache.v),
                                            (self.layers.stacked(), layers, sliding_flags(cfg)))
        h = _norm(cfg, h[:, -1:] if last_only else h, self.final_norm[...].astype(cfg.compute_dtype))
        cache = KVCache(k=constrain(k_all, CACHE), v=constrain(v_all, CACHE), index=index + t)
        return self.lm_head(h), cache

    def decode_rows(self, tokens: jax.Array, positions: jax.Array, cache: KVCache, key_mask: jax.Array,
                    write_slots: jax.Array, *, window: int | None = None) -> tuple[jax.Array, KVCache]:
        """One decode step where every row has its own cache slot (continuous batching, `tulu_jax.rl.engine`):
        token [B] at RoPE position positions [B] is written at cache slot write_slots[b] of row b, then attends to
        the slots j with key_mask[b, j] (bool [B, S]; the caller sets the written slot, and no slot after it, true).
        `window`: attend over slots [0, window) only, reading that much of the cache (a decode step reads the whole
        attended cache, so the caller passes a bound on the live rows' used slots, e.g. `tulu_jax.rl.engine`).
        Returns float32 logits [B, V] and the cache (its `index` untouched). No sliding-window layers."""
        cfg = self.config
        if any(cfg.sliding_layers):
            raise ValueError("decode_rows does not support sliding-window layers (per-row windows are not built)")
        rows = jnp.arange(tokens.shape[0])
        width = cache.k.shape[2] if window is None else window
        inputs = LayerInputs.build(cfg, positions[:, None], key_mask[:, None, :width], jnp.zeros((1,), jnp.int32))

        def body(carry: tuple[jax.Array, jax.Array, jax.Array],
                 xs: tuple[dict[str, jax.Array], jax.Array]) -> tuple[tuple[jax.Array, jax.Array, jax.Array], None]:
            h, k_all, v_all = carry
            p, layer = xs

            def attend_rows(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, Any]:
                # Scatter each row's new key/value into its own slot of the carried cache (updated in place).
                k_new = k_all.at[layer, rows, write_slots].set(k[:, 0].astype(k_all.dtype))
                v_new = v_all.at[layer, rows, write_slots].set(v[:, 0].astype(v_all.dtype))
                keys = jax.lax.dynamic_index_in_dim(k_new, layer, keepdims=False)[:, :width]
                values = jax.lax.dynamic_index_in_dim(v_new, layer, keepdims=False)[:, :width]
                return attend(q, keys, values, inputs.full.mask, softcap=cfg.attn_logit_softcap), (k_new, v_new)

            h, (k_all, v_all) = _block(cfg, p, h, inputs.full.cos, inputs.full.sin, attend_rows)
            return (h, k_all, v_all), None

        layers = jnp.arange(cfg.num_layers, dtype=jnp.int32)
        (h, k_all, v_all), _ = jax.lax.scan(body, (self._embed(tokens[:, None]), cache.k, cache.v),
                                            (self.layers.stacked(), layers))
        h = _norm(cfg, h, self.final_norm[...].astype(cfg.compute_dtype))
        return self.lm_head(h)[:, 0], KVCache(k=k_all, v=v_all, index=cache.index)

    def _embed(self, input_ids: jax.Array) -> jax.Array:
        dt = self.config.compute_dtype
        # Gather the table's hidden axis first (the all-gather FSDP does for every weight): a lookup into a
        # table still split along it would give hidden-split rows that XLA can only move to batch-split rows by
        # replicating them ("involuntary full rematerialization"). A vocabulary split stays: masked local lookups.
        table = constrain(self.embed[...], ("vocab", None))
        x = jnp.take(table, constrain(input_ids, ("batch", "length")), axis=0).astype(dt)
        # Gemma: × √hidden_size, the factor rounded to the compute dtype as transformers does.
        x = x * jnp.asarray(self.config.hidden_size**0.5, dt) if self.config.scale_embeddings else x
        return constrain(x, HIDDEN)


def _positions_and_segments(input_ids: jax.Array, attention_mask: jax.Array | None, positions: jax.Array | None,
                            segment_ids: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Resolve the (positions, segment_ids) pair both forward modes reduce to."""
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
    if attention_mask is not None and segment_ids is not None:
        raise ValueError("pass either attention_mask or segment_ids, not both")
    if segment_ids is not None:
        if positions is None:
            raise ValueError("segment_ids need positions (restarting at 0 in each packed segment)")
        return positions, segment_ids.astype(jnp.int32)
    if attention_mask is not None:
        segments = (attention_mask != 0).astype(jnp.int32)
        if positions is None:
            # As transformers' generate: left-padded rows start at position 0 on their first real token.
            positions = jnp.maximum(jnp.cumsum(segments, axis=1) - 1, 0)
        return positions, segments
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)
    return positions, jnp.ones(input_ids.shape, jnp.int32)
