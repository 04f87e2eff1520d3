"""The KV-cache sampler: filtering primitives vs NumPy/HF, and generation vs transformers and a teacher-forced pass."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tulu_jax.errors import DataError
from tulu_jax.models import sampler
from tulu_jax.models.sampler import SamplingSettings, bucket_length, filter_top_k, filter_top_p, sample_tokens


# ---------------------------------------------------------------- NumPy references (HF's algorithms, literally)
def np_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    kth = np.sort(logits, axis=-1)[..., -k][..., None]
    return np.where(logits < kth, -np.inf, logits)


def np_top_p(logits: np.ndarray, p: float) -> np.ndarray:
    out = logits.copy()
    for row in range(logits.shape[0]):
        order = np.argsort(logits[row], kind="stable")
        sorted_logits = logits[row, order].astype(np.float64)
        probs = np.exp(sorted_logits - sorted_logits.max())
        cumulative = np.cumsum(probs / probs.sum())
        remove = cumulative <= 1.0 - p
        remove[-1] = False
        out[row, order[remove]] = -np.inf
    return out


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


# ---------------------------------------------------------------- primitives
def test_bucket_length():
    assert [bucket_length(n) for n in (1, 16, 17, 100, 1024, 1025, 3000)] == [16, 16, 32, 128, 1024, 2048, 3072]
    with pytest.raises(ValueError):
        bucket_length(0)


@pytest.mark.parametrize("k", [1, 5, 63])
def test_top_k_matches_numpy_and_hf(k):
    import torch
    from transformers.generation.logits_process import TopKLogitsWarper

    logits = np.random.default_rng(k).normal(size=(4, 64)).astype(np.float32) * 3
    got = np.asarray(filter_top_k(jnp.asarray(logits), k))
    np.testing.assert_array_equal(got, np_top_k(logits, k))
    hf = TopKLogitsWarper(k)(None, torch.from_numpy(logits)).numpy()
    np.testing.assert_array_equal(got, hf)
    assert (np.isfinite(got).sum(-1) == k).all()


def test_top_k_off_is_identity():
    logits = jnp.arange(12.0).reshape(2, 6)
    np.testing.assert_array_equal(filter_top_k(logits, 0), logits)
    np.testing.assert_array_equal(filter_top_k(logits, 6), logits)


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.99])
def test_top_p_matches_numpy_and_hf(p):
    import torch
    from transformers.generation.logits_process import TopPLogitsWarper

    logits = np.random.default_rng(int(p * 100)).normal(size=(6, 50)).astype(np.float32) * 2
    got = np.asarray(filter_top_p(jnp.asarray(logits), p))
    np.testing.assert_array_equal(got, np_top_p(logits, p))
    hf = TopPLogitsWarper(p)(None, torch.from_numpy(logits)).numpy()
    np.testing.assert_array_equal(got, hf)
    assert (np.isfinite(got).sum(-1) >= 1).all()


def test_top_p_keeps_the_argmax_even_for_tiny_p():
    logits = np.random.default_rng(0).normal(size=(3, 20)).astype(np.float32)
    got = np.asarray(filter_top_p(jnp.asarray(logits), 1e-6))
    assert (np.isfinite(got).sum(-1) == 1).all()
    np.testing.assert_array_equal(np.argmax(got, -1), np.argmax(logits, -1))


def test_top_k_then_top_p_matches_numpy():
    logits = np.random.default_rng(3).normal(size=(5, 40)).astype(np.float32) * 2
    got = np.asarray(filter_top_p(filter_top_k(jnp.asarray(logits), 10), 0.7))
    np.testing.assert_array_equal(got, np_top_p(np_top_k(logits, 10), 0.7))


def test_greedy_sample_is_argmax_with_its_logprob():
    logits = np.random.default_rng(1).normal(size=(4, 30)).astype(np.float32)
    tokens, logprobs = sample_tokens(jax.random.key(0), jnp.asarray(logits), SamplingSettings())
    np.testing.assert_array_equal(tokens, logits.argmax(-1))
    np.testing.assert_allclose(logprobs, np_log_softmax(logits)[np.arange(4), logits.argmax(-1)], rtol=1e-6)


def test_sampling_frequencies_follow_the_filtered_distribution():
    """Many draws from one row: empirical frequencies ≈ softmax of temperature-scaled, top-k/top-p-filtered logits."""
    settings = SamplingSettings(temperature=0.7, top_k=6, top_p=0.9)
    logits = np.random.default_rng(2).normal(size=(1, 10)).astype(np.float32)
    draws = 20_000
    keys = jax.random.split(jax.random.key(7), draws)
    tokens, logprobs = jax.vmap(lambda k: sample_tokens(k, jnp.asarray(logits), settings))(keys)
    tokens, logprobs = np.asarray(tokens)[:, 0], np.asarray(logprobs)[:, 0]

    filtered = np_top_p(np_top_k(logits / 0.7, 6), 0.9)[0]
    expected = np.exp(np_log_softmax(filtered[None])[0])
    freq = np.bincount(tokens, minlength=10) / draws
    assert (freq[~np.isfinite(filtered)] == 0).all()
    tolerance = 4 * np.sqrt(expected * (1 - expected) / draws) + 1e-9  # 4 binomial standard deviations
    assert (np.abs(freq - expected) <= tolerance).all(), (freq, expected)
    # the log-prob returned is from the unfiltered tempered distribution, not the filtered one
    np.testing.assert_allclose(logprobs, np_log_softmax(logits / 0.7)[0, tokens], rtol=1e-5)


def test_settings_reject_bad_values():
    for bad in (dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-2)):
        with pytest.raises(ValueError):
            SamplingSettings(**bad)


# ---------------------------------------------------------------- generation against transformers (torch)
VOCAB = 128
PAD = 0


def _tiny_hf(family: str):
    """A tiny random transformers model (init std 0.2 so greedy choices are well separated) and its config."""
    import torch
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
                  initializer_range=0.2, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed({"llama": 0, "olmo2": 1}[family])
    if family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(rope_theta=500000.0, **common))
    else:
        model = transformers.Olmo2ForCausalLM(transformers.Olmo2Config(**common))
    return model.eval()


@pytest.fixture(scope="module", params=["llama", "olmo2"])
def family(request, tmp_path_factory):
    """(torch model, our Decoder imported from its safetensors) for one family."""
    from tulu_jax.models import load_hf_checkpoint

    hf = _tiny_hf(request.param)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return hf, load_hf_checkpoint(path)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from tulu_jax.models import load_hf_checkpoint

    hf = _tiny_hf("llama")
    path = tmp_path_factory.mktemp("llama_single")
    hf.save_pretrained(path)
    return hf, load_hf_checkpoint(path)


PROMPTS = [
    [5, 17, 99, 3, 42],
    [7, 8, 9, 10, 11, 12, 13, 14, 15],
    [120, 1, 64],
]


def _hf_greedy(hf, prompts, max_new_tokens, eos=None):
    """transformers' generate(do_sample=False) on a left-padded batch; [B, max_new_tokens] with PAD after stops."""
    import torch

    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                          pad_token_id=PAD, eos_token_id=eos)[:, width:].numpy()
    return np.pad(out, ((0, 0), (0, max_new_tokens - out.shape[1])), constant_values=PAD)


def test_greedy_matches_transformers(family):
    hf, model = family
    result = sampler.generate(model, PROMPTS, max_new_tokens=12, pad_id=PAD)
    expected = _hf_greedy(hf, PROMPTS, 12)
    np.testing.assert_array_equal(result.tokens, expected)
    np.testing.assert_array_equal(result.lengths, [12, 12, 12])
    assert not result.finished_eos.any()

    # With an EOS that row 0 produces at step 4, HF stops that row there and pads it: so must we.
    eos = int(expected[0, 4])
    stopped = sampler.generate(model, PROMPTS, max_new_tokens=12, eos_id=eos, pad_id=PAD)
    np.testing.assert_array_equal(stopped.tokens, _hf_greedy(hf, PROMPTS, 12, eos=eos))
    assert stopped.finished_eos[0] and stopped.lengths[0] <= 5


def _np_teacher_forced_logps(hf, result, temperature):
    """log_softmax(logits / T) of each generated token from one full torch forward over prompt + generation."""
    import torch

    ids = np.concatenate([result.prompt_ids, result.tokens], axis=1)
    gen_mask = np.arange(result.tokens.shape[1])[None] < result.lengths[:, None]
    mask = np.concatenate([result.prompt_mask, gen_mask], axis=1).astype(np.int64)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        logits = hf(input_ids=torch.from_numpy(ids.astype(np.int64)), attention_mask=torch.from_numpy(mask),
                    position_ids=torch.from_numpy(positions)).logits.double().numpy()
    width = result.prompt_ids.shape[1]
    logps = np_log_softmax(logits[:, width - 1:-1] / temperature)
    return np.take_along_axis(logps, result.tokens[..., None], axis=-1)[..., 0], gen_mask


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 20, 0.9), (0.0, 0, 1.0)])
def test_sampled_logprobs_equal_teacher_forced_forward(llama, temperature, top_k, top_p):
    """log π of each generated token = log_softmax(logits / T) of a full torch forward (T = 1 when greedy)."""
    hf, model = llama
    result = sampler.generate(model, PROMPTS, max_new_tokens=10, temperature=temperature, top_k=top_k, top_p=top_p,
                              stop_ids=(3, 4), pad_id=PAD, seed=11)
    expected, valid = _np_teacher_forced_logps(hf, result, temperature or 1.0)
    np.testing.assert_allclose(result.logprobs[valid], expected[valid], atol=1e-4)
    assert (result.logprobs[~valid] == 0).all() and (result.tokens[~valid] == PAD).all()
    assert result.logprobs.dtype == np.float32 and result.tokens.dtype == np.int32


def test_stops_at_the_first_of_any_stop_id(llama):
    """Greedy decoding is deterministic, so a run with stop ids is the free run cut after each row's first stop."""
    _, model = llama
    free = sampler.generate(model, PROMPTS, max_new_tokens=12, pad_id=PAD).tokens
    stop_ids = (int(free[0, 2]), int(free[1, 6]))
    result = sampler.generate(model, PROMPTS, max_new_tokens=12, stop_ids=stop_ids, pad_id=PAD)
    for row in range(len(PROMPTS)):
        hits = np.flatnonzero(np.isin(free[row], stop_ids))
        length = hits[0] + 1 if hits.size else 12
        np.testing.assert_array_equal(result.tokens[row, :length], free[row, :length])
        assert (result.tokens[row, length:] == PAD).all()
        assert result.lengths[row] == length and result.finished_eos[row] == bool(hits.size)

    # every row stopped at step 0 → the loop exits at once, everything after is padding
    first = sampler.generate(model, PROMPTS, max_new_tokens=12, stop_ids=tuple(int(t) for t in free[:, 0]),
                             pad_id=PAD)
    np.testing.assert_array_equal(first.lengths, [1, 1, 1])
    assert (first.tokens[:, 1:] == PAD).all() and first.finished_eos.all()


def test_same_seed_same_samples(llama):
    _, model = llama
    kwargs = dict(max_new_tokens=10, temperature=1.0, pad_id=PAD)
    a = sampler.generate(model, PROMPTS, seed=5, **kwargs)
    b = sampler.generate(model, PROMPTS, rng=jax.random.key(5), **kwargs)
    c = sampler.generate(model, PROMPTS, seed=6, **kwargs)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.logprobs, b.logprobs)
    assert (a.tokens != c.tokens).any()


def test_without_logprobs_same_tokens_and_no_log_softmax(llama):
    """logprobs=False: the same greedy and sampled tokens, log-probs 0, and the compiled decode computes no
    log-softmax (no reduction over the vocabulary besides the argmax / the categorical draw)."""
    _, model = llama
    for kwargs in (dict(), dict(temperature=1.0, seed=3)):
        full = sampler.generate(model, PROMPTS, max_new_tokens=10, pad_id=PAD, **kwargs)
        lean = sampler.generate(model, PROMPTS, max_new_tokens=10, pad_id=PAD, logprobs=False, **kwargs)
        np.testing.assert_array_equal(lean.tokens, full.tokens)
        np.testing.assert_array_equal(lean.lengths, full.lengths)
        assert (lean.logprobs == 0).all() and (full.logprobs != 0).any()
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, VOCAB)), jnp.float32)
    hlo = {flag: jax.jit(lambda x, f=flag: sample_tokens(jax.random.key(0), x, SamplingSettings(logprobs=f)))
           .lower(logits).as_text() for flag in (True, False)}
    assert "exponential" in hlo[True] and "exponential" not in hlo[False]


def test_no_recompile_within_a_bucket(llama):
    _, model = llama
    kwargs = dict(temperature=0.5, top_k=7, pad_id=PAD)  # settings no other test uses: a fresh cache entry
    key = f"generate/{SamplingSettings(0.5, 1.0, 7)}"
    sampler.generate(model, PROMPTS, max_new_tokens=12, **kwargs)
    assert sampler.TRACE_COUNTS[key] == 1
    sampler.generate(model, [[1, 2, 3]] * 3, max_new_tokens=9, **kwargs)  # prompt bucket 16, new-token bucket 16
    sampler.generate(model, [list(range(1, 17))] * 3, max_new_tokens=16, **kwargs)
    sampler.generate(model, PROMPTS, max_new_tokens=12, stop_ids=(4, 5, 6), temperature=0.5, top_k=7, pad_id=1)
    assert sampler.TRACE_COUNTS[key] == 1
    sampler.generate(model, [list(range(1, 18))] * 3, max_new_tokens=16, **kwargs)  # 17 tokens: bucket 32
    assert sampler.TRACE_COUNTS[key] == 2


def test_array_prompts_with_mask_equal_list_prompts(llama):
    _, model = llama
    width = 11
    ids = np.full((3, width), 77, np.int32)  # junk under the mask must be ignored
    mask = np.zeros((3, width), np.int32)
    for row, prompt in enumerate(PROMPTS):  # right-padded rows
        ids[row, :len(prompt)] = prompt
        mask[row, :len(prompt)] = 1
    from_array = sampler.generate(model, jnp.asarray(ids), prompt_mask=mask, max_new_tokens=6, pad_id=PAD)
    from_list = sampler.generate(model, PROMPTS, max_new_tokens=6, pad_id=PAD)
    np.testing.assert_array_equal(from_array.tokens, from_list.tokens)


def test_sharded_state_generates_the_same_tokens(llama):
    """Weights sharded over the 8-device test mesh (cpu-8.yaml) give the same greedy tokens as one device."""
    import pathlib

    from flax import nnx

    from tulu_jax.sharding import load_sharding, make_mesh, state_shardings

    _, model = llama
    spec = load_sharding(pathlib.Path(__file__).resolve().parent.parent / "sharding" / "cpu-8.yaml")
    graphdef, state = nnx.split(model)
    sharded = jax.device_put(state, state_shardings(state, make_mesh(spec), spec))
    assert any(not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(sharded))
    sharded_model = nnx.merge(graphdef, sharded)
    got = sampler.generate(sharded_model, PROMPTS, max_new_tokens=8, pad_id=PAD)
    np.testing.assert_array_equal(got.tokens, sampler.generate(model, PROMPTS, max_new_tokens=8, pad_id=PAD).tokens)


@pytest.mark.parametrize(
    "prompts, mask, field, row",
    [
        ([[1, 2], [3, VOCAB]], None, "prompts", 1),
        ([[1, 2], []], None, "prompts", 1),
        ([[1, 2], [-1, 2]], None, "prompts", 1),
        (np.ones((2, 4), np.int32), np.array([[1, 1, 0, 0], [1, 0, 1, 0]]), "prompt_mask", 1),
        (np.ones((2, 4), np.int32), np.ones((2, 3)), "prompt_mask", None),
        ([[1, 2], [3]], np.ones((2, 2)), "prompts", None),
    ],
)
def test_bad_prompts_raise_data_errors(llama, prompts, mask, field, row):
    _, model = llama
    with pytest.raises(DataError) as err:
        sampler.generate(model, prompts, prompt_mask=mask, max_new_tokens=2)
    assert err.value.field == field and err.value.row == row
