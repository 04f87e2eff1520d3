"""Shared pieces of the tulu_jax.train tests: a tiny NNX language model with logical axis names, its loss, meshes,
a deterministic stateful batch iterator, and `train_main`, the run that the kill/resume tests start as a
subprocess (`python tests/test_train_helpers.py WORKDIR NUM_STEPS SAVE_EVERY SLEEP_S`).

The tests in this file check the helpers themselves against NumPy, since the other tests lean on them.
"""

from __future__ import annotations

import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from tulu_jax.train import (
    Checkpointer,
    MetricsWriter,
    build_train_step,
    init_train_state,
    make_optimizer,
    run_training,
    shardings_of,
)

VOCAB, EMBED, MLP = 16, 8, 32
RULES = {"vocab": None, "embed": "fsdp", "mlp": "tensor", "batch": ("data", "fsdp")}


class TinyLM(nnx.Module):
    """Embedding → Linear → relu → LayerNorm → Linear to vocab logits (no attention: enough for these tests)."""

    def __init__(self, rngs: nnx.Rngs, *, embed: int = EMBED, param_dtype=jnp.float32):
        part = nnx.with_partitioning
        self.embed = nnx.Embed(
            VOCAB, embed, embedding_init=part(nnx.initializers.normal(1.0), ("vocab", "embed")),
            param_dtype=param_dtype, rngs=rngs,
        )
        self.up = nnx.Linear(
            embed, MLP, kernel_init=part(nnx.initializers.lecun_normal(), ("embed", "mlp")),
            bias_init=part(nnx.initializers.normal(0.1), ("mlp",)), param_dtype=param_dtype, rngs=rngs,
        )
        self.norm = nnx.LayerNorm(
            MLP, scale_init=part(nnx.initializers.ones, ("mlp",)), bias_init=part(nnx.initializers.zeros, ("mlp",)),
            param_dtype=param_dtype, rngs=rngs,
        )
        self.out = nnx.Linear(
            MLP, VOCAB, kernel_init=part(nnx.initializers.lecun_normal(), ("mlp", "vocab")),
            use_bias=False, param_dtype=param_dtype, rngs=rngs,
        )

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        return self.out(self.norm(jax.nn.relu(self.up(self.embed(input_ids))))).astype(jnp.float32)


def make_model(rngs: nnx.Rngs) -> TinyLM:
    return TinyLM(rngs)


def masked_nll(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(mask, nll, 0.0))


def loss_fn(model, batch, denominators, frozen=None):
    """Σ masked token NLL / denominators["denominator"] (a global count: sequences or supervised tokens)."""
    nll_sum = masked_nll(model(batch["input_ids"]), batch["targets"], batch["loss_mask"])
    return nll_sum / denominators["denominator"], {"nll_sum": nll_sum, "tokens": jnp.sum(batch["loss_mask"])}


def sequences_denominator(batch):
    """Number of sequences in the global batch (the recipe's `sum` reduction)."""
    return {"denominator": jnp.float32(batch["input_ids"].shape[0])}


def tokens_denominator(batch):
    """Number of supervised tokens in the global batch (the `mean` reduction)."""
    return {"denominator": jnp.maximum(jnp.sum(batch["loss_mask"]), 1).astype(jnp.float32)}


def make_batch(seed: int, batch: int = 8, length: int = 6) -> dict[str, np.ndarray]:
    """Random tokens with a ragged supervision mask (so micro-batches carry different token counts)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, size=(batch, length + 1), dtype=np.int32)
    mask = rng.random((batch, length)) < rng.uniform(0.2, 0.9, size=(batch, 1))
    mask[:, -1] = True  # at least one supervised token per row
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": mask}


def make_mesh(shape=(2, 2, 2), devices=None) -> jax.sharding.Mesh:
    auto = (jax.sharding.AxisType.Auto,) * 3
    if devices is None:
        return jax.make_mesh(shape, ("data", "fsdp", "tensor"), axis_types=auto)
    return jax.sharding.Mesh(np.asarray(devices).reshape(shape), ("data", "fsdp", "tensor"), axis_types=auto)


def logical_to_mesh(spec: PartitionSpec) -> PartitionSpec:
    return PartitionSpec(*(RULES.get(name) if name is not None else None for name in spec))


def variable_shardings(mesh):
    """nnx.State → shardings, from the variables' logical names through RULES (the test's sharding module)."""

    def fn(state: nnx.State):
        specs = nnx.get_partition_spec(state)
        return jax.tree.map(
            lambda spec: NamedSharding(mesh, logical_to_mesh(spec)), specs,
            is_leaf=lambda x: isinstance(x, PartitionSpec),
        )

    return fn


def batch_sharding(mesh) -> NamedSharding:
    return NamedSharding(mesh, logical_to_mesh(PartitionSpec("batch")))


class CountingBatches:
    """Deterministic iterator: batch i is make_batch(1000 + i); its state is the next index."""

    def __init__(self, batch: int = 8):
        self.index, self.batch = 0, batch

    def __iter__(self):
        return self

    def __next__(self):
        out = make_batch(1000 + self.index, batch=self.batch)
        self.index += 1
        return out

    def get_state(self) -> dict:
        return {"index": self.index}

    def set_state(self, state: dict) -> None:
        self.index = int(state["index"])


def train_main(workdir: pathlib.Path, num_steps: int, save_every: int, sleep_s: float = 0.0):
    """The run of the kill/resume tests: 8-device mesh, grad accumulation 2, checkpoints and metrics in workdir."""
    mesh = make_mesh()
    optimizer = make_optimizer(1e-2, warmup_ratio=0.2, total_steps=num_steps, weight_decay=0.01)
    state = init_train_state(make_model, optimizer, mesh, variable_shardings(mesh), seed=0)
    step = build_train_step(
        state.graphdef, loss_fn, optimizer, state_shardings=shardings_of(state),
        batch_shardings=batch_sharding(mesh), grad_accum_steps=2, denominators_fn=tokens_denominator,
    )
    checkpointer = Checkpointer(workdir / "ckpt", max_to_keep=2)
    writer = MetricsWriter(workdir / "metrics.jsonl")
    try:
        return run_training(
            state, step, CountingBatches(), num_steps=num_steps, checkpointer=checkpointer, save_every=save_every,
            metrics_writer=writer, on_step=(lambda *_: time.sleep(sleep_s)) if sleep_s else None, log_every=3,
            metadata={"num_steps": num_steps}, progress=False,
        )
    finally:
        writer.close()
        checkpointer.close()


def _numpy_loss(params: dict[str, np.ndarray], batch: dict[str, np.ndarray], denominator: float) -> float:
    """TinyLM forward + masked NLL in float64 NumPy (LayerNorm eps 1e-6 as nnx's default)."""
    h = params["embed"][batch["input_ids"]]
    h = np.maximum(h @ params["up_kernel"] + params["up_bias"], 0.0)
    mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
    h = (h - mu) / np.sqrt(var + 1e-6) * params["norm_scale"] + params["norm_bias"]
    logits = h @ params["out_kernel"]
    logits = logits - logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
    return float(np.sum(nll * batch["loss_mask"]) / denominator)


def numpy_params(params: nnx.State) -> dict[str, np.ndarray]:
    """TinyLM parameters as float64 NumPy arrays keyed for `_numpy_loss`."""
    p = jax.device_get(nnx.to_pure_dict(params))
    return {
        "embed": np.float64(p["embed"]["embedding"]),
        "up_kernel": np.float64(p["up"]["kernel"]),
        "up_bias": np.float64(p["up"]["bias"]),
        "norm_scale": np.float64(p["norm"]["scale"]),
        "norm_bias": np.float64(p["norm"]["bias"]),
        "out_kernel": np.float64(p["out"]["kernel"]),
    }


def numpy_loss(params: nnx.State, batch: dict[str, np.ndarray], denominator: float) -> float:
    """Reference loss of TinyLM on `batch`."""
    return _numpy_loss(numpy_params(params), batch, denominator)


def test_tiny_lm_loss_matches_numpy():
    with nnx.use_eager_sharding(False):  # no mesh here: skip per-variable sharding constraints
        model = make_model(nnx.Rngs(3))
    batch = make_batch(0)
    denominators = tokens_denominator(batch)
    loss, aux = loss_fn(model, batch, denominators)
    _, params, _ = nnx.split(model, nnx.Param, ...)
    expected = numpy_loss(params, batch, float(batch["loss_mask"].sum()))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert int(aux["tokens"]) == int(batch["loss_mask"].sum())


def test_counting_batches_resume_position():
    it = CountingBatches()
    next(it), next(it)
    state = it.get_state()
    expected = next(it)
    other = CountingBatches()
    other.set_state(state)
    np.testing.assert_array_equal(next(other)["input_ids"], expected["input_ids"])


if __name__ == "__main__":
    workdir, num_steps, save_every, sleep_s = sys.argv[1:5]
    train_main(pathlib.Path(workdir), int(num_steps), int(save_every), float(sleep_s))
