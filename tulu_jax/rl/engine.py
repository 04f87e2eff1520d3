"""A continuous-batching rollout engine: RL responses have very different lengths, and a static batch
(`tulu_jax.models.sampler.sample`) decodes until its longest row ends; here a finished row's slot is refilled.

The engine keeps a fixed-shape batch of `slots` rows and one KV cache [L, slots, S, KVH, Dh] with
S = prompt_width + max_new_tokens: a row's prompt sits left-padded in slots [0, prompt_width) and its t-th
generated token's key/value at prompt_width + t. Two jitted programs do all the device work:

- `admit`: prefills a batch of new prompts (each GRPO group's prompt ONCE, at the bucket of the longest prompt
  of the batch: prompt-length buckets; prompts are admitted shortest first, so a batch's prompts have similar
  lengths), copies each prefilled prompt's keys/values into the G slots of its
  group (shared prompt KV), resets those slots' key masks and outputs, and samples their first tokens;
- `decode`: up to `refill_every` decode steps (`Decoder.decode_rows`: each row writes its own cache slot) in a
  while loop that exits early once every slot is done. A decode step reads every cache slot it attends to, so it
  attends only to the window the live rows can use until the next refill point: the prompt block plus a
  power-of-two bucket of (the longest live response + refill_every), compiled once per window.

The host loop only runs at refill points: it reads the done flags, copies finished rows out, and admits the
next groups into the free slots. Programs compile once per (refill batch bucket, prompt bucket) and once per
decode window.

Keys: sequence r (prompt i, group member j; r = i·G + j) samples its t-th token with
`fold_in(fold_in(rng, r), t)` on its own logits, so its tokens equal those of the static sampler run on that
prompt alone with `rng=fold_in(rng, r)`, whatever slot it lands in and whatever else is decoding (greedy needs no
key). Log-probs as in the static sampler (`SamplingSettings.logprobs`).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tulu_jax.models.decoder import KVCache
from tulu_jax.models.sampler import SamplingSettings, bucket_length, prepare_prompts, sample_tokens


@flax.struct.dataclass
class SlotState:
    """Everything the device keeps per slot (leading axis = slot). k/v: the KV cache [L, B, S, KVH, Dh];
    key_mask bool [B, S]; token: the last sampled token, to be fed next; prompt_len, t (tokens generated so
    far) int32 [B]; done bool [B] (finished, or an empty slot); finished bool [B] (a stop id was produced);
    keys: one PRNG key per slot; tokens int32 / logprobs float32 [B, N]: the outputs so far."""

    k: jax.Array
    v: jax.Array
    key_mask: jax.Array
    token: jax.Array
    prompt_len: jax.Array
    t: jax.Array
    done: jax.Array
    finished: jax.Array
    keys: jax.Array
    tokens: jax.Array
    logprobs: jax.Array


@dataclasses.dataclass(frozen=True)
class EngineOutput:
    """Host arrays for R = prompts × group_size sequences (row i·G + j: prompt i, member j), N = max_new_tokens:
    tokens int32 [R, N] (pad after the stop token), logprobs float32 [R, N], lengths int32 [R] (stop included),
    finished bool [R]; refills: how many admit calls ran; decode_steps: decode steps run (slot-batch steps)."""

    tokens: np.ndarray
    logprobs: np.ndarray
    lengths: np.ndarray
    finished: np.ndarray
    refills: int
    decode_steps: int


def _sample_rows(keys: jax.Array, t: jax.Array, logits: jax.Array, settings: SamplingSettings) -> tuple[Any, Any]:
    """Each row samples from its own logits [V] with key fold_in(keys[b], t[b]) (the static sampler's schedule for
    a batch of one)."""
    def one(key: jax.Array, step: jax.Array, row: jax.Array) -> tuple[jax.Array, jax.Array]:
        token, logprob = sample_tokens(jax.random.fold_in(key, step), row[None], settings)
        return token[0], logprob[0]
    return jax.vmap(one)(keys, t, logits)


def _record(s: SlotState, token: jax.Array, logprob: jax.Array, live: jax.Array, stop_ids: jax.Array,
            pad_id: jax.Array, max_new: int) -> SlotState:
    """Store token t of the live rows, advance them, and mark rows that stopped or reached max_new as done."""
    rows = jnp.arange(token.shape[0])
    col = jnp.minimum(s.t, max_new - 1)
    tokens = s.tokens.at[rows, col].set(jnp.where(live, token, s.tokens[rows, col]))
    logprobs = s.logprobs.at[rows, col].set(jnp.where(live, logprob, s.logprobs[rows, col]))
    stopped = live & jnp.any(token[:, None] == stop_ids[None, :], axis=1)
    t = s.t + live
    return s.replace(token=jnp.where(live, token, s.token), t=t, tokens=tokens, logprobs=logprobs,
                     finished=s.finished | stopped, done=s.done | stopped | (live & (t >= max_new)))


class RolloutEngine:
    """Continuous batching over `slots` rows for one model structure (`graphdef`), sampling settings and limits.

    `engine.run(states, prompts, rng, group_size=G, stop_ids=..., pad_id=...)` samples G responses per prompt;
    `states` is `(params, model_state)` (or any split of the model), passed as jit arguments (no copy).
    """

    def __init__(self, graphdef: nnx.GraphDef, config: Any, *, slots: int, max_prompt_len: int, max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, logprobs: bool = True,
                 refill_every: int = 8):
        if slots < 1 or max_new_tokens < 1 or refill_every < 1 or max_prompt_len < 1:
            raise ValueError("slots, max_prompt_len, max_new_tokens and refill_every must be >= 1")
        self.graphdef, self.config, self.slots = graphdef, config, slots
        self.prompt_width = bucket_length(max_prompt_len)
        self.max_new, self.refill_every = max_new_tokens, refill_every
        self.settings = SamplingSettings(float(temperature), float(top_p), int(top_k), bool(logprobs))
        self._admit = jax.jit(self._admit_fn, donate_argnums=1)
        self._decode = jax.jit(self._decode_fn, donate_argnums=1, static_argnames="window")

    # ------------------------------------------------------------------------------------------- device programs
    def empty_state(self, rng: jax.Array) -> SlotState:
        """All slots empty (done), zero cache."""
        cfg, b, n = self.config, self.slots, self.max_new
        shape = (cfg.num_layers, b, self.prompt_width + n, cfg.num_kv_heads, cfg.head_dim)
        vec = functools.partial(jnp.zeros, (b,), jnp.int32)  # distinct buffers: the state is donated
        return SlotState(k=jnp.zeros(shape, cfg.compute_dtype), v=jnp.zeros(shape, cfg.compute_dtype),
                         key_mask=jnp.zeros((b, shape[2]), bool), token=vec(), prompt_len=vec(), t=vec(),
                         done=jnp.ones((b,), bool), finished=jnp.zeros((b,), bool),
                         keys=jax.random.split(rng, b), tokens=jnp.zeros((b, n), jnp.int32),
                         logprobs=jnp.zeros((b, n), jnp.float32))

    def _admit_fn(self, states: tuple[nnx.State, ...], s: SlotState, ids: jax.Array, mask: jax.Array,
                  src: jax.Array, keys: jax.Array, stop_ids: jax.Array, pad_id: jax.Array) -> SlotState:
        """Prefill prompts ids/mask [n, Pb] once; slot b takes prefilled row src[b] (-1: untouched) and key keys[b]."""
        model = nnx.merge(self.graphdef, *states)
        n, width = ids.shape
        positions = jnp.maximum(jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1, 0)
        logits, cache = model.forward_cached(ids, positions, model.init_cache(n, width), mask, last_only=True)
        take = src >= 0
        row = jnp.maximum(src, 0)
        start = self.prompt_width - width  # prompts end at prompt_width: decode slots are the same for all rows

        def place(old: jax.Array, new: jax.Array) -> jax.Array:
            region = jax.lax.dynamic_slice_in_dim(old, start, width, axis=2)
            shared = jnp.take(new, row, axis=1)  # one prefilled prompt → every slot of its group
            region = jnp.where(take[None, :, None, None, None], shared, region)
            return jax.lax.dynamic_update_slice_in_dim(old, region, start, axis=2)

        fresh_mask = jnp.zeros_like(s.key_mask).at[:, start:self.prompt_width].set(jnp.take(mask, row, axis=0))
        reset = s.replace(
            k=place(s.k, cache.k), v=place(s.v, cache.v),
            key_mask=jnp.where(take[:, None], fresh_mask, s.key_mask),
            prompt_len=jnp.where(take, jnp.sum(jnp.take(mask, row, axis=0), axis=1, dtype=jnp.int32), s.prompt_len),
            t=jnp.where(take, 0, s.t), done=s.done & ~take, finished=s.finished & ~take,
            keys=jax.random.wrap_key_data(jnp.where(take[:, None], jax.random.key_data(keys),
                                                    jax.random.key_data(s.keys))),
            tokens=jnp.where(take[:, None], pad_id, s.tokens), logprobs=jnp.where(take[:, None], 0.0, s.logprobs),
        )
        token, logprob = _sample_rows(reset.keys, reset.t, jnp.take(logits[:, -1], row, axis=0), self.settings)
        return _record(reset, token, logprob, take, stop_ids, pad_id, self.max_new)

    def _decode_fn(self, states: tuple[nnx.State, ...], s: SlotState, stop_ids: jax.Array, pad_id: jax.Array, *,
                   window: int) -> tuple[SlotState, jax.Array]:
        """Up to refill_every decode steps over all slots (stops early when every slot is done), attending to cache
        slots [0, window): every live row's prompt and the responses' slots it writes in these steps."""
        model = nnx.merge(self.graphdef, *states)
        rows = jnp.arange(self.slots)

        def body(carry: tuple[jax.Array, SlotState]) -> tuple[jax.Array, SlotState]:
            i, s = carry
            live = ~s.done
            # The last sampled token (number t-1) goes to cache slot prompt_width + t - 1, position prompt_len + t - 1.
            slot = self.prompt_width + jnp.maximum(s.t - 1, 0)
            key_mask = s.key_mask.at[rows, slot].set(s.key_mask[rows, slot] | live)
            logits, cache = model.decode_rows(s.token, s.prompt_len + s.t - 1, KVCache(s.k, s.v, jnp.int32(0)),
                                              key_mask, slot, window=window)
            token, logprob = _sample_rows(s.keys, s.t, logits, self.settings)
            s = s.replace(k=cache.k, v=cache.v, key_mask=key_mask)
            return i + 1, _record(s, token, logprob, live, stop_ids, pad_id, self.max_new)

        steps, s = jax.lax.while_loop(lambda c: (c[0] < self.refill_every) & ~jnp.all(c[1].done), body,
                                      (jnp.int32(0), s))
        return s, steps

    # ------------------------------------------------------------------------------------------------ host loop
    def run(self, states: tuple[nnx.State, ...], prompts: Sequence[Sequence[int]], rng: jax.Array, *,
            group_size: int = 1, eos_id: int | Sequence[int] | None = None, stop_ids: Sequence[int] = (),
            pad_id: int | None = None) -> EngineOutput:
        """Sample `group_size` responses for each prompt (a list of token-id lists); see the module docstring."""
        g = group_size
        if g < 1 or g > self.slots:
            raise ValueError(f"group_size must be in [1, slots={self.slots}], got {g}")
        ids, mask, stops, pad = prepare_prompts(self.config, prompts, None, eos_id=eos_id, stop_ids=stop_ids,
                                                pad_id=pad_id)
        if ids.shape[1] > self.prompt_width:
            raise ValueError(f"a prompt of {int(mask.sum(1).max())} tokens exceeds max_prompt_len "
                             f"(bucket {self.prompt_width})")
        lengths_in = mask.sum(axis=1)
        rows = [ids[i, ids.shape[1] - lengths_in[i]:] for i in range(len(ids))]
        total = len(rows) * g
        out_tokens = np.full((total, self.max_new), pad, np.int32)
        out_logprobs = np.zeros((total, self.max_new), np.float32)
        out_lengths = np.zeros((total,), np.int32)
        out_finished = np.zeros((total,), bool)
        stops_d, pad_d = jnp.asarray(stops), jnp.asarray(np.int32(pad))
        if not jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
            rng = jax.random.wrap_key_data(rng)  # a raw uint32 key: the same stream as the typed one
        s = self.empty_state(rng)
        # Admit prompts shortest first: each admit batch then holds prompts of similar length, so its prefill
        # bucket wastes little on padding (the outputs do not depend on the order: keys follow the sequence id).
        pending = collections.deque(sorted(range(len(rows)), key=lambda i: rows[i].size))
        owner = np.full((self.slots,), -1)  # sequence id held by each slot
        t = np.zeros((self.slots,), np.int32)  # tokens generated per slot, as of the last decode call
        refills = steps = 0
        while pending or (owner >= 0).any():
            free = np.flatnonzero(owner < 0)
            if pending and len(free) >= g:
                s = self._admit_groups(states, s, rows, pending, free, owner, rng, g, stops_d, pad_d, pad)
                t[free[owner[free] >= 0]] = 1  # admitted: the first token is sampled
                refills += 1
            s, ran = self._decode(states, s, stops_d, pad_d, window=self.decode_window(t, owner >= 0))
            done, t = map(np.array, jax.device_get((s.done, s.t)))  # writable host copies
            steps += int(ran)
            finished_slots = np.flatnonzero(done & (owner >= 0))
            if finished_slots.size:
                tokens, logprobs, fin = jax.device_get((s.tokens, s.logprobs, s.finished))
                for b in finished_slots:
                    r = owner[b]
                    out_tokens[r, :t[b]] = tokens[b, :t[b]]
                    out_logprobs[r, :t[b]] = logprobs[b, :t[b]]
                    out_lengths[r], out_finished[r], owner[b] = t[b], fin[b], -1
        return EngineOutput(out_tokens, out_logprobs, out_lengths, out_finished, refills, steps)

    def decode_window(self, t: np.ndarray, live: np.ndarray) -> int:
        """Cache slots the next decode call must attend to: the prompt block and, rounded up to a power of two,
        the longest live response after refill_every more tokens."""
        longest = max(1, int(t[live].max(initial=0))) + self.refill_every
        return self.prompt_width + min(self.max_new, bucket_length(longest))

    def _admit_groups(self, states: tuple[nnx.State, ...], s: SlotState, rows: list[np.ndarray],
                      pending: collections.deque, free: np.ndarray, owner: np.ndarray, rng: jax.Array, g: int,
                      stops: jax.Array, pad: jax.Array, pad_id: int) -> SlotState:
        """Admit as many whole groups as the free slots hold: one prefill row per group, G slots per group."""
        groups = []
        while pending and len(free) - g * len(groups) >= g:
            groups.append(pending.popleft())
        n = bucket_length(len(groups), minimum=1)
        width = bucket_length(max(rows[i].size for i in groups))
        ids = np.full((n, width), pad_id, np.int32)
        mask = np.zeros((n, width), bool)
        for k, i in enumerate(groups):
            ids[k, width - rows[i].size:], mask[k, width - rows[i].size:] = rows[i], True
        src = np.full((self.slots,), -1, np.int32)
        seq = np.zeros((self.slots,), np.int32)
        for k, i in enumerate(groups):
            for j in range(g):
                b = free[k * g + j]
                src[b], seq[b], owner[b] = k, i * g + j, i * g + j
        keys = jax.vmap(lambda r: jax.random.fold_in(rng, r))(jnp.asarray(seq))
        return self._admit(states, s, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(src), keys, stops, pad)
