"""Batched KV-cache sampler: one prefill call, then a jitted decode loop that stops early.

`sample` is the sampler as a pure function of `(graphdef, states, prompts, rng, ...)`: it prefills the left-padded
prompts with one `Decoder.forward_cached` call and decodes inside a `jax.lax.while_loop` that exits as soon as
every row has produced a stop token or `max_new_tokens` is reached. `generate(model, ...)` is the friendly wrapper
(it left-pads the prompts into a length bucket and splits the model once per call; its state is an argument of the
compiled function, so a stream of requests compiles one program per (graphdef, batch, prompt bucket, new-token
bucket, sampling settings)); `tulu_jax.rl.rollout` jits `sample` with a trainer's shardings.

Log-probabilities: `GenerationResult.logprobs[b, t]` is log π(a_t) of the *sampling policy before
top-k/top-p filtering*: `log_softmax(logits / temperature)` when temperature > 0, `log_softmax(logits)`
when greedy. At temperature 1 this equals the teacher-forced `token_logps` of the same model, which is
the log π_old that PPO needs.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tulu_jax.errors import DataError

# How many times each compiled generate program has been traced (a diagnostic for tests/benchmarks).
TRACE_COUNTS: collections.Counter[str] = collections.Counter()


def bucket_length(n: int, *, minimum: int = 16, step_above: int = 1024) -> int:
    """Round a length up to a compile bucket: powers of two from `minimum`, then multiples of `step_above`."""
    if n < 1:
        raise ValueError(f"length must be positive, got {n}")
    if n > step_above:
        return -(-n // step_above) * step_above
    bucket = minimum
    while bucket < n:
        bucket *= 2
    return bucket


def filter_top_k(logits: jax.Array, top_k: int) -> jax.Array:
    """HF `TopKLogitsWarper`: set logits below the k-th largest (per row, last axis) to -inf; 0 = off."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    return jnp.where(logits < kth, -jnp.inf, logits)


def filter_top_p(logits: jax.Array, top_p: float) -> jax.Array:
    """HF `TopPLogitsWarper` (nucleus): keep the smallest high-probability set whose mass reaches `top_p`.

    As in HF, tokens are sorted ascending and those whose cumulative probability is <= 1 - top_p are
    removed; the most likely token is always kept. The removed set is a prefix of the ascending order,
    so it is applied as a threshold on the logit value (tokens tied with the threshold are all kept).
    """
    if top_p >= 1.0:
        return logits
    sorted_logits = jnp.sort(logits, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits.astype(jnp.float32), axis=-1), axis=-1)
    n_removed = jnp.sum(cumulative <= 1.0 - top_p, axis=-1, keepdims=True)
    n_removed = jnp.minimum(n_removed, logits.shape[-1] - 1)  # keep at least one token
    threshold = jnp.take_along_axis(sorted_logits, n_removed, axis=-1)
    return jnp.where(logits < threshold, -jnp.inf, logits)


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """Static sampling settings: part of the compile-cache key (stop ids and the pad id are runtime inputs).
    `logprobs=False` skips the full-vocabulary log-softmax of every step (the returned log-probs are then 0)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    logprobs: bool = True

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


def sample_tokens(key: jax.Array, logits: jax.Array, settings: SamplingSettings) -> tuple[jax.Array, jax.Array]:
    """Pick one token per row of `logits` [B, V]; return (tokens int32 [B], log π(token) float32 [B]).

    Greedy (argmax) at temperature 0, else temperature → top-k → top-p → categorical (HF's order).
    The returned log-prob is from the unfiltered distribution at the sampling temperature (0 when
    `settings.logprobs` is off: then no log-softmax over the vocabulary is computed).
    """
    logits = logits.astype(jnp.float32)
    if settings.temperature == 0.0:
        tokens = jnp.argmax(logits, axis=-1)
        scaled = logits
    else:
        scaled = logits / settings.temperature
        filtered = filter_top_p(filter_top_k(scaled, settings.top_k), settings.top_p)
        tokens = jax.random.categorical(key, filtered, axis=-1)
    if not settings.logprobs:
        return tokens.astype(jnp.int32), jnp.zeros(tokens.shape, jnp.float32)
    logprobs = jax.nn.log_softmax(scaled, axis=-1)
    token_logprobs = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    return tokens.astype(jnp.int32), token_logprobs


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """Host (NumPy) arrays for a batch of B prompts and N = max_new_tokens.

    tokens: int32 [B, N], pad_id after the stop token; logprobs: float32 [B, N] (0 after the stop);
    lengths: int32 [B] generated tokens including the stop token; finished_eos: bool [B] a stop id
    was produced; prompt_ids / prompt_mask: the left-padded prompt block [B, P_bucket] that was fed.
    """

    tokens: np.ndarray
    logprobs: np.ndarray
    lengths: np.ndarray
    finished_eos: np.ndarray
    prompt_ids: np.ndarray
    prompt_mask: np.ndarray


def _prompt_rows(prompts: Any, prompt_mask: Any) -> list[np.ndarray]:
    """Prompts (a list of int lists, or an int array [B, P] with a contiguous 0/1 mask) → list of 1-D arrays."""
    if isinstance(prompts, (list, tuple)) and prompt_mask is None:
        rows = []
        for i, row in enumerate(prompts):
            arr = np.asarray(row)
            if arr.ndim != 1 or not (arr.size == 0 or np.issubdtype(arr.dtype, np.integer)):
                raise DataError(f"expected a flat list of token ids, got {row!r:.80}", row=i, field="prompts")
            rows.append(arr.astype(np.int64))
        return rows
    try:
        ids = np.asarray(prompts)
    except ValueError:  # ragged nested lists
        raise DataError("prompts with a prompt_mask must form a rectangular [B, P] array", field="prompts") from None
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise DataError(f"expected an int array [B, P], got dtype {ids.dtype} shape {ids.shape}", field="prompts")
    mask = np.ones(ids.shape, bool) if prompt_mask is None else np.asarray(prompt_mask).astype(bool)
    if mask.shape != ids.shape:
        raise DataError(f"shape {mask.shape} differs from prompts {ids.shape}", field="prompt_mask")
    rows = []
    for i in range(ids.shape[0]):
        where = np.flatnonzero(mask[i])
        if where.size and where[-1] - where[0] + 1 != where.size:
            raise DataError("mask must be one contiguous run of tokens (left or right padding)", row=i,
                            field="prompt_mask")
        rows.append(ids[i, where].astype(np.int64))
    return rows


def _left_pad(rows: list[np.ndarray], vocab_size: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate token rows and left-pad them into a [B, bucket] block with its mask."""
    if not rows:
        raise DataError("no prompts given", field="prompts")
    for i, row in enumerate(rows):
        if row.size == 0:
            raise DataError("empty prompt: at least one token is needed to condition on", row=i, field="prompts")
        bad = (row < 0) | (row >= vocab_size)
        if bad.any():
            raise DataError(f"token id {row[bad][0]} outside the vocabulary [0, {vocab_size})", row=i,
                            field="prompts")
    width = bucket_length(max(row.size for row in rows))
    ids = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), bool)
    for i, row in enumerate(rows):
        ids[i, width - row.size:] = row
        mask[i, width - row.size:] = True
    return ids, mask


def _stop_block(stop_ids: Sequence[int]) -> np.ndarray:
    """Stop ids as an int32 vector padded with -1 (never sampled) to a power of two ≥ 8, so sets of up to 8 ids
    share one compiled program."""
    width = max(8, 1 << max(len(stop_ids) - 1, 0).bit_length())
    block = np.full((width,), -1, np.int32)
    block[:len(stop_ids)] = stop_ids
    return block


def sample(
    graphdef: nnx.GraphDef,
    states: tuple[nnx.State, ...],
    ids: jax.Array,
    mask: jax.Array,
    key: jax.Array,
    max_new: jax.Array,
    stop_ids: jax.Array,
    pad_id: jax.Array,
    *,
    settings: SamplingSettings,
    new_bucket: int,
    cache_sharding: jax.sharding.Sharding | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The sampler as a pure function: `nnx.merge(graphdef, *states)` prefills the left-padded prompts `ids` [B, P]
    (`mask` bool [B, P]) and decodes up to `max_new` (≤ new_bucket) tokens in a while loop that stops when every row
    has produced one of `stop_ids`. Returns (tokens int32 [B, new_bucket], logprobs float32 [B, new_bucket],
    lengths int32 [B], finished bool [B]). `cache_sharding`: a layout for the KV cache k/v [L, B, S, KVH, Dh].
    Traceable under any jit (no Python state but a trace counter)."""
    TRACE_COUNTS[f"generate/{settings}"] += 1
    model = nnx.merge(graphdef, *states)
    batch, width = ids.shape

    def constrain(cache: Any) -> Any:
        if cache_sharding is None:
            return cache
        return dataclasses.replace(cache, k=jax.lax.with_sharding_constraint(cache.k, cache_sharding),
                                   v=jax.lax.with_sharding_constraint(cache.v, cache_sharding))

    def record(t, token, logprob, out):
        tokens, logprobs, lengths, finished, done = out
        active = ~done
        tokens = jax.lax.dynamic_update_index_in_dim(tokens, jnp.where(active, token, pad_id), t, axis=1)
        logprobs = jax.lax.dynamic_update_index_in_dim(logprobs, jnp.where(active, logprob, 0.0), t, axis=1)
        stopped = active & jnp.any(token[:, None] == stop_ids[None, :], axis=1)
        return tokens, logprobs, lengths + active, finished | stopped, done | stopped

    key_mask = jnp.concatenate([mask, jnp.ones((batch, new_bucket), bool)], axis=1)
    prompt_len = jnp.sum(mask, axis=1, dtype=jnp.int32)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1, 0)

    cache = constrain(model.init_cache(batch, width + new_bucket))
    logits, cache = model.forward_cached(ids, positions, cache, key_mask, last_only=True)
    token, logprob = sample_tokens(jax.random.fold_in(key, 0), logits[:, -1], settings)
    out = (
        jnp.full((batch, new_bucket), pad_id, jnp.int32),
        jnp.zeros((batch, new_bucket), jnp.float32),
        jnp.zeros((batch,), jnp.int32),
        jnp.zeros((batch,), bool),
        jnp.zeros((batch,), bool),
    )
    out = record(0, token, logprob, out)

    def cond(carry):
        t, _, _, out = carry
        return (t < max_new) & ~jnp.all(out[-1])

    def body(carry):
        t, cache, token, out = carry
        # The token sampled at step t-1 sits at position prompt_len + t - 1.
        logits, cache = model.forward_cached(token[:, None], (prompt_len + t - 1)[:, None], cache, key_mask)
        token, logprob = sample_tokens(jax.random.fold_in(key, t), logits[:, 0], settings)
        return t + 1, constrain(cache), token, record(t, token, logprob, out)

    _, _, _, out = jax.lax.while_loop(cond, body, (jnp.int32(1), cache, token, out))
    return out[:4]


@functools.lru_cache(maxsize=64)
def _compiled_generate(graphdef: nnx.GraphDef, settings: SamplingSettings, new_bucket: int):
    """`sample` jitted for one model structure, sampling settings and new-token bucket (jit adds one executable per
    batch/prompt-bucket shape); arguments keep the layout they come with."""
    return jax.jit(functools.partial(sample, graphdef, settings=settings, new_bucket=new_bucket))


def prepare_prompts(
    config: Any,
    prompts: Sequence[Sequence[int]] | np.ndarray | jax.Array,
    prompt_mask: np.ndarray | jax.Array | None,
    *,
    eos_id: int | Sequence[int] | None,
    stop_ids: Sequence[int],
    pad_id: int | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Validate and left-pad prompts for `sample`: (ids [B, bucket], mask, stop-id block, pad id)."""
    if pad_id is None:
        pad_id = 0 if getattr(config, "pad_token_id", None) is None else int(config.pad_token_id)
    eos_ids = () if eos_id is None else (eos_id,) if np.ndim(eos_id) == 0 else tuple(eos_id)
    stops = sorted({int(s) for s in (*stop_ids, *eos_ids)})
    for s in stops:
        if not 0 <= s < config.vocab_size:
            raise ValueError(f"stop id {s} outside the vocabulary [0, {config.vocab_size})")
    ids, mask = _left_pad(_prompt_rows(prompts, prompt_mask), config.vocab_size, pad_id)
    return ids, mask, _stop_block(stops), pad_id


def generate(
    model: nnx.Module,
    prompts: Sequence[Sequence[int]] | np.ndarray | jax.Array,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_id: int | Sequence[int] | None = None,
    stop_ids: Sequence[int] = (),
    pad_id: int | None = None,
    seed: int = 0,
    rng: jax.Array | None = None,
    prompt_mask: np.ndarray | jax.Array | None = None,
    logprobs: bool = True,
) -> GenerationResult:
    """Generate up to `max_new_tokens` tokens for each prompt with a KV cache.

    `model` is a Decoder (anything with `config.vocab_size`, `init_cache` and `forward_cached`).
    `prompts` is a list of token-id lists, or an int array [B, P] with `prompt_mask` (1 = token; each row
    one contiguous run, left- or right-padded). A row stops after it produces `eos_id` (one id or several,
    e.g. `config.eos_token_id`) or any of `stop_ids`; that token is kept in `tokens` and later slots hold
    `pad_id` (default: the model config's pad id, else 0). Nothing stops generation unless given here.
    `temperature=0` is greedy; otherwise sampling uses `rng` (or `seed`) and is reproducible for the same
    key. See the module docstring for which log-probs are returned; `logprobs=False` skips computing them (the
    result's `logprobs` are then 0), which saves a full-vocabulary log-softmax per token.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    settings = SamplingSettings(float(temperature), float(top_p), int(top_k), bool(logprobs))
    ids, mask, stops, pad_id = prepare_prompts(model.config, prompts, prompt_mask, eos_id=eos_id, stop_ids=stop_ids,
                                               pad_id=pad_id)
    key = jax.random.key(seed) if rng is None else rng
    graphdef, state = nnx.split(model)
    run = _compiled_generate(graphdef, settings, bucket_length(max_new_tokens))
    outputs = run((state,), ids, mask, key, np.int32(max_new_tokens), stops, np.int32(pad_id))
    tokens, logprobs, lengths, finished = jax.device_get(outputs)
    return GenerationResult(
        tokens=tokens[:, :max_new_tokens],
        logprobs=logprobs[:, :max_new_tokens],
        lengths=lengths,
        finished_eos=finished,
        prompt_ids=ids,
        prompt_mask=mask,
    )
