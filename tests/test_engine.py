"""The continuous-batching rollout engine (tulu_jax.rl.engine) against the static sampler: the same greedy tokens
on prompts of different lengths with different stop points (few slots, so rows are refilled mid-run), and for
sampling the same tokens as the static sampler run on each prompt alone with that row's key."""
import jax
import numpy as np
import pytest
from flax import nnx

from tulu_jax.models import Decoder, ModelConfig, sampler
from tulu_jax.rl.engine import RolloutEngine

VOCAB, NEW, PAD = 128, 40, 0  # NEW > 16: decode windows of 16, 32 and 40 response slots
LENGTHS = (5, 20, 3, 33, 9, 12, 7)


@pytest.fixture(scope="module")
def setup():
    """A tiny Llama with weights scaled ×10 (well-separated greedy choices), its split, prompts and two stop ids
    that rows produce at different steps."""
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16, rope_theta=500000.0, tie_word_embeddings=False,
                      max_position_embeddings=512)
    graphdef, state = nnx.split(Decoder(cfg, nnx.Rngs(0)))
    state = jax.tree.map(lambda x: x * 10 if x.ndim > 1 else x, state)
    model = nnx.merge(graphdef, state)
    rng = np.random.default_rng(0)
    prompts = [list(map(int, rng.integers(1, VOCAB, n))) for n in LENGTHS]
    free = sampler.generate(model, prompts, max_new_tokens=NEW, pad_id=PAD).tokens
    stops = [int(free[0, 4]), int(free[3, 10])]
    return cfg, graphdef, state, model, prompts, stops


def test_greedy_equals_the_static_sampler(setup):
    cfg, graphdef, state, model, prompts, stops = setup
    static = sampler.generate(model, prompts, max_new_tokens=NEW, pad_id=PAD, stop_ids=stops)
    assert len(set(static.lengths.tolist())) >= 3 and static.finished_eos.any()  # rows stop at different points
    engine = RolloutEngine(graphdef, cfg, slots=3, max_prompt_len=40, max_new_tokens=NEW, temperature=0.0,
                           refill_every=4)
    out = engine.run((state,), prompts, jax.random.key(0), stop_ids=stops, pad_id=PAD)
    np.testing.assert_array_equal(out.tokens, static.tokens)
    np.testing.assert_array_equal(out.lengths, static.lengths)
    np.testing.assert_array_equal(out.finished, static.finished_eos)
    np.testing.assert_allclose(out.logprobs, static.logprobs, atol=1e-4)
    assert out.refills > 1  # slots were refilled while others were decoding


def test_groups_sample_each_rows_static_stream(setup):
    """G = 2 responses per prompt share one prefill; row r = i·G + j equals the static sampler on prompt i alone
    with rng = fold_in(rng, r)."""
    cfg, graphdef, state, model, prompts, stops = setup
    prompts = prompts[:3]  # two prompt buckets; fewer static programs to compile
    engine = RolloutEngine(graphdef, cfg, slots=4, max_prompt_len=40, max_new_tokens=NEW, temperature=1.0,
                           refill_every=4)
    base = jax.random.key(3)
    out = engine.run((state,), prompts, base, group_size=2, stop_ids=stops, pad_id=PAD)
    assert out.tokens.shape == (2 * len(prompts), NEW)
    for i, prompt in enumerate(prompts):
        for j in range(2):
            r = 2 * i + j
            ref = sampler.generate(model, [prompt], max_new_tokens=NEW, pad_id=PAD, stop_ids=stops,
                                   temperature=1.0, rng=jax.random.fold_in(base, r))
            np.testing.assert_array_equal(out.tokens[r], ref.tokens[0])
            assert out.lengths[r] == ref.lengths[0]
            np.testing.assert_allclose(out.logprobs[r], ref.logprobs[0], atol=1e-4)
    assert (out.tokens[0::2] != out.tokens[1::2]).any()  # the group's members differ


def test_rejects_bad_settings(setup):
    cfg, graphdef, state, _, prompts, _ = setup
    engine = RolloutEngine(graphdef, cfg, slots=2, max_prompt_len=16, max_new_tokens=4)
    with pytest.raises(ValueError, match="group_size"):
        engine.run((state,), prompts[:1], jax.random.key(0), group_size=3)
    with pytest.raises(ValueError, match="max_prompt_len"):
        engine.run((state,), prompts, jax.random.key(0))
