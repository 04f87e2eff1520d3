"""Sharding files, meshes, logical rules, sharded init and AOT compilation for a TPU topology.

Sharded results are checked against the same computation on one device; shard shapes against a NumPy
recomputation from the mesh sizes.
"""

from __future__ import annotations

import importlib.util
import math
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from tulu_jax.errors import ConfigError
from tulu_jax.sharding import (
    HBM_BYTES,
    HbmExhaustedError,
    ShardingSpec,
    batch_sharding,
    compile_for_topology,
    init_sharded,
    load_sharding,
    logical_to_spec,
    make_mesh,
    memory_report,
    named_sharding,
    state_shardings,
    topology_chip_count,
    tpu_topology_mesh,
)

SHARDING_DIR = pathlib.Path(__file__).resolve().parent.parent / "sharding"
# device count each file is meant for (TPU: chips of its topology; h100x8 uses -1 and resolves on 8 GPUs)
DEVICES = {"cpu-1": 1, "cpu-8": 8, "h100x8": 8, "v5p-8": 4, "v5p-64": 32, "v5p-256": 128, "v5p-1024": 512,
           "v6e-256": 256}
LOGICAL_AXES = ["vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "layers"] + [
    "batch", "length", "act_embed", "act_heads", "act_kv_heads", "act_mlp", "act_vocab"
]  # the contract's names (docs/ARCHITECTURE.md)
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
LIBTPU_MISSING = "libtpu is not installed: install the `tpu` extra (jax[tpu]==0.10.2) to run the AOT checks"
W = nnx.with_partitioning


class Mlp(nnx.Module):
    """Two linears with logical names, a named bias, and an unnamed scalar (replicated).

    Uniform initializers: random enough to catch a misplaced shard, and far cheaper for XLA:CPU to compile than
    (truncated) normals.
    """

    def __init__(self, d: int, f: int, rngs: nnx.Rngs, use_bias: bool = True):
        init = nnx.initializers.uniform(0.5)
        self.up = nnx.Linear(d, f, use_bias=use_bias, kernel_init=W(init, ("embed", "mlp")),
                             bias_init=W(init, ("mlp",)), rngs=rngs)
        self.down = nnx.Linear(f, d, use_bias=use_bias, kernel_init=W(init, ("mlp", "embed")),
                               bias_init=init, rngs=rngs)  # unnamed bias: replicated
        self.scale = nnx.Param(jnp.full((), 1.5))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(jax.nn.gelu(self.up(x))) * self.scale


def make_mlp() -> Mlp:
    return Mlp(16, 32, nnx.Rngs(0))


def unsharded(make):
    with nnx.use_eager_sharding(False):
        return make()


@pytest.fixture(scope="module")
def spec8() -> ShardingSpec:
    return load_sharding(SHARDING_DIR / "cpu-8.yaml")


@pytest.fixture(scope="module")
def mesh8(spec8):
    return make_mesh(spec8)


@pytest.fixture(scope="module")
def sharded_mlp(mesh8, spec8):
    return init_sharded(make_mlp, mesh8, spec8)


@pytest.fixture(scope="module")
def reference_mlp() -> Mlp:
    """The same model built eagerly on one device, without any sharding."""
    return unsharded(make_mlp)


def flat(tree) -> dict:
    return {".".join(map(str, path)): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(tree))}


# --- sharding files -------------------------------------------------------------------------------------------


def test_every_sharding_file_loads_and_fits_its_hardware():
    files = {p.stem: p for p in SHARDING_DIR.glob("*.yaml")}
    assert set(files) == set(DEVICES), "add each new sharding file to DEVICES with its device count"
    for name, path in files.items():
        spec = load_sharding(path)
        shape = spec.mesh_shape(DEVICES[name])
        assert math.prod(shape) == DEVICES[name], name
        assert set(LOGICAL_AXES) <= set(spec.rules), f"{name} lacks rules for {set(LOGICAL_AXES) - set(spec.rules)}"
        if spec.topology is not None:
            assert spec.platform == "tpu"
            assert topology_chip_count(spec.topology) == DEVICES[name], name
        # the batch axes must divide Tülu 3's 128-sequence batch, except v6e-256 (documented: 256 sequences)
        batch_parts = math.prod(dict(zip(spec.mesh, shape, strict=True))[a] for a in spec.rules["batch"])
        assert (128 if name != "v6e-256" else 256) % batch_parts == 0, name


def test_topology_meshes_build_from_libtpu():
    """Each TPU file's mesh maps onto its physical topology (each axis a product of physical axes)."""
    assert HAS_LIBTPU, LIBTPU_MISSING
    for name in ("v5p-8", "v5p-64", "v5p-256", "v6e-256"):
        spec = load_sharding(SHARDING_DIR / f"{name}.yaml")
        mesh = tpu_topology_mesh(spec)
        assert mesh.devices.size == DEVICES[name] and tuple(mesh.axis_names) == tuple(spec.mesh)
        assert len({d.id for d in mesh.devices.flat}) == DEVICES[name]
        assert mesh.devices.flat[0].platform == "tpu"


def test_cpu8_mesh(mesh8):
    assert dict(mesh8.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert set(mesh8.devices.flat) == set(jax.devices())
    assert mesh8.axis_types == (AxisType.Auto,) * 3


def test_minus_one_takes_the_rest():
    spec = ShardingSpec(mesh={"data": -1, "tensor": 2}, rules={"batch": "data"})
    assert spec.mesh_shape(8) == (4, 2)
    mesh = make_mesh(spec, devices=jax.devices()[:4])
    assert dict(mesh.shape) == {"data": 2, "tensor": 2}


def write(tmp_path, text: str) -> pathlib.Path:
    path = tmp_path / "s.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text, message",
    [
        ("mesh: {data: 2, fsdp: 4}\nrules: {embed: fsdpp}\n",
         "'rules.embed' names unknown mesh axis 'fsdpp' (did you mean 'fsdp'?)"),
        ("mesh: {data: 2, fsdp: 4}\nrules: {batch: [data, model]}\n",
         "'rules.batch' names unknown mesh axis 'model' (mesh axes: data, fsdp)"),
        ("mesh: {data: -1, fsdp: -1}\nrules: {}\n", "at most one mesh axis may be -1"),
        ("mesh: {data: 0}\nrules: {}\n", "'mesh.data' must be a positive size or -1, got 0"),
        ("mesh: {}\nrules: {}\n", "'mesh' must name at least one axis"),
        ("mesh: {data: 2}\nrules: {batch: 3}\n", "key 'rules.batch' expects str | list[str] | null, got int 3"),
        ("mesh: {fsdp: 8}\nrules: {}\ntopology: v5p:2x2x1\n", "topology v5p:2x2x1 has 4 chips: mesh {'fsdp': 8} has 8"),
        ("mesh: {fsdp: 3, data: -1}\nrules: {}\ntopology: v5p:2x2x1\n", "needs a device count divisible by 3, got 4"),
        ("mesh: {fsdp: 4}\nrules: {}\ntopology: v5p-8\n", "'topology' must look like 'v5p:2x2x1', got 'v5p-8'"),
        ("mesh: {fsdp: 4}\nrules: {}\ntopology: v5p:2x2x1\nplatform: gpu\n", "but 'platform' is 'gpu'"),
        ("mesh: {fsdp: 4}\nrules: {}\nplatform: tpuv5\n", "key 'platform' must be one of 'cpu', 'gpu', 'tpu'"),
        ("mesh: {fsdp: 4}\nrule: {}\n", "unknown key 'rule' (did you mean 'rules'?)"),
    ],
)
def test_sharding_file_errors_name_file_and_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        load_sharding(path)
    assert str(err.value).startswith(str(path))


def test_mesh_not_matching_device_count(spec8):
    with pytest.raises(ConfigError, match=re.escape("cpu-8.yaml: mesh {'data': 2, 'fsdp': 2, 'tensor': 2} has 8 "
                                                    "devices, but there are 4")):
        make_mesh(spec8, devices=jax.devices()[:4])


# --- logical rules ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "axes, expected",
    [
        (("batch", "length"), P(("data", "fsdp"), None)),
        (("embed", "mlp"), P("fsdp", "tensor")),
        (("layers", "embed", "heads", "head_dim"), P(None, "fsdp", "tensor", None)),
        (("heads", "kv_heads"), P("tensor", None)),  # tensor used twice: dropped the second time
        (("batch", "length", "act_embed"), P(("data", "fsdp"), None, None)),
        (("embed", "batch"), P("fsdp", "data")),  # fsdp taken by embed: the batch keeps only data
        ((None, "vocab"), P(None, "tensor")),
        ((), P()),
    ],
)
def test_logical_to_spec(spec8, axes, expected):
    assert logical_to_spec(axes, spec8.rules) == expected
    assert logical_to_spec(axes, spec8) == expected


def test_unknown_logical_axis(spec8):
    message = "no sharding rule for logical axis 'emebd' (did you mean 'embed'?)"
    with pytest.raises(ConfigError, match=re.escape(message)):
        logical_to_spec(("emebd",), spec8.rules)


def test_batch_sharding_splits_rows(mesh8, spec8):
    sharding = batch_sharding(mesh8, spec8)
    assert sharding.spec == P(("data", "fsdp"), None)
    x = jax.device_put(np.arange(8 * 6, dtype=np.int32).reshape(8, 6), sharding)
    # data×fsdp = 4 row blocks, replicated over tensor: 8 shards of 2 rows
    assert {s.data.shape for s in x.addressable_shards} == {(2, 6)}
    assert len({s.index[0].start for s in x.addressable_shards}) == 4


# --- sharded init -------------------------------------------------------------------------------------------------


EXPECTED_SPECS = {
    "up.kernel": P("fsdp", "tensor"),
    "up.bias": P("tensor"),
    "down.kernel": P("tensor", "fsdp"),
    "down.bias": P(),
    "scale": P(),
}


def test_init_sharded_places_by_rules_and_matches_unsharded(sharded_mlp, reference_mlp, mesh8):
    state = dict(nnx.to_flat_state(nnx.state(sharded_mlp)))
    assert {".".join(k) for k in state} == set(EXPECTED_SPECS)
    for key, var in state.items():
        array = var.get_value()
        name = ".".join(key)
        assert isinstance(array.sharding, NamedSharding) and array.sharding.mesh == mesh8
        assert array.sharding.spec == EXPECTED_SPECS[name], name
        # the shard shape recomputed from the mesh sizes
        spec = tuple(EXPECTED_SPECS[name]) + (None,) * (array.ndim - len(EXPECTED_SPECS[name]))
        expected = tuple(n // (mesh8.shape[a] if a else 1) for n, a in zip(array.shape, spec, strict=True))
        assert {s.data.shape for s in array.addressable_shards} == {expected}, name
    reference = flat(reference_mlp)
    got = flat(sharded_mlp)
    assert set(got) == set(reference)
    for name in reference:
        np.testing.assert_allclose(got[name], reference[name], rtol=1e-6, atol=1e-7, err_msg=name)


def test_sharded_forward_matches_one_device(sharded_mlp, reference_mlp, mesh8, spec8):
    x = np.random.default_rng(0).normal(size=(8, 16)).astype(np.float32)
    xs = jax.device_put(x, named_sharding(mesh8, spec8, ("batch", "act_embed")))
    got = jax.jit(lambda m, x: m(x))(sharded_mlp, xs)
    want = reference_mlp(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_cpu1_size_one_axes(reference_mlp):
    spec1 = load_sharding(SHARDING_DIR / "cpu-1.yaml")
    mesh1 = make_mesh(spec1, devices=jax.devices()[:1])
    model = init_sharded(make_mlp, mesh1, spec1)
    assert model.up.kernel.get_value().sharding.spec == P("fsdp", "tensor")
    x = jnp.ones((2, 16), jnp.float32)
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(reference_mlp(x)), rtol=1e-5, atol=1e-6)


def loss_fn(model: Mlp, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean((model(x) - y) ** 2)


def make_train(graphdef):
    def step(state, x, y):
        model, opt = nnx.merge(graphdef, state)
        loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
        opt.update(model, grads)
        return nnx.state((model, opt)), loss

    return step


TX = optax.adamw(1e-2)


def model_and_optimizer():
    model = make_mlp()
    return model, nnx.Optimizer(model, TX, wrt=nnx.Param)


def test_optimizer_state_sharded_like_params_and_train_step_matches(sharded_mlp, reference_mlp, mesh8, spec8):
    """Adam moments follow their parameter, counters are replicated; a sharded step equals a one-device step."""
    with nnx.use_eager_sharding(False):
        graphdef, abstract = nnx.split(nnx.eval_shape(model_and_optimizer))
    shardings = state_shardings(abstract, mesh8, spec8)
    specs = {".".join(map(str, k)): v.get_value().spec for k, v in nnx.to_flat_state(shardings)}
    for name, spec in EXPECTED_SPECS.items():
        assert specs[f"0.{name}"] == spec
        assert specs[f"1.opt_state.0.mu.{name}"] == spec and specs[f"1.opt_state.0.nu.{name}"] == spec
    assert specs["1.opt_state.0.count"] == P() and specs["1.step"] == P()

    # the optimizer of an already sharded model, itself built straight into its shardings
    optimizer = init_sharded(lambda: nnx.Optimizer(sharded_mlp, TX, wrt=nnx.Param), mesh8, spec8)
    assert optimizer.opt_state[0].mu["up"]["kernel"].get_value().sharding.spec == P("fsdp", "tensor")
    state = nnx.state((sharded_mlp, optimizer))
    ref_state = nnx.state((reference_mlp, nnx.Optimizer(reference_mlp, TX, wrt=nnx.Param)))

    step = make_train(graphdef)
    rng = np.random.default_rng(1)
    x, y = (rng.normal(size=(8, 16)).astype(np.float32) for _ in range(2))
    rows = named_sharding(mesh8, spec8, ("batch", None))
    sharded_step = jax.jit(step, in_shardings=(shardings, rows, rows), out_shardings=(shardings, None))
    ref_step = jax.jit(step)
    for _ in range(2):
        state, loss = sharded_step(state, jax.device_put(x, rows), jax.device_put(y, rows))
        ref_state, ref_loss = ref_step(ref_state, x, y)
        np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    got, want = flat(state), flat(ref_state)
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert state[0]["up"]["kernel"].get_value().sharding.spec == P("fsdp", "tensor")
    assert state[1]["opt_state"][0]["nu"]["up"]["kernel"].get_value().sharding.spec == P("fsdp", "tensor")


def test_indivisible_dimension_names_variable(mesh8, spec8):
    message = ("variable 'down.kernel' dimension 0 ('mlp', size 3) cannot be split over mesh axes ('tensor',) "
               "of total size 2")
    with pytest.raises(ConfigError, match=re.escape(message)):
        init_sharded(lambda: Mlp(16, 3, nnx.Rngs(0)), mesh8, spec8)


def test_missing_rule_for_parameter(mesh8):
    rules = {"embed": "fsdp"}  # no rule for 'mlp'
    with pytest.raises(ConfigError, match=re.escape("no sharding rule for logical axis 'mlp'")):
        init_sharded(make_mlp, mesh8, rules)


# --- memory report and AOT compilation for a TPU topology ------------------------------------------------------


def test_memory_report_on_cpu(mesh8, spec8):
    rows = named_sharding(mesh8, spec8, ("batch", None))
    x = jax.ShapeDtypeStruct((8, 16), jnp.float32, sharding=rows)
    compiled = jax.jit(lambda x: x * 2).lower(x).compile()
    report = memory_report(compiled)
    assert report["device_kind"] == jax.devices()[0].device_kind
    assert report["argument_bytes"] == 2 * 16 * 4  # one shard of rows per device
    assert report["hbm_bytes"] is None and report["fits"] is None


@pytest.fixture(scope="module")
def v5p8():
    assert HAS_LIBTPU, LIBTPU_MISSING
    spec = load_sharding(SHARDING_DIR / "v5p-8.yaml")
    return spec, tpu_topology_mesh(spec)


def test_aot_train_step_for_v5p(v5p8):
    """A jitted, donated MLP train step compiled for v5p:2x2x1 from this CPU host, and its memory report."""
    spec, mesh = v5p8

    def build():
        model = Mlp(512, 256, nnx.Rngs(0), use_bias=False)  # compile only: nothing runs, so size is free
        return model, nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)

    with nnx.use_eager_sharding(False):
        graphdef, abstract = nnx.split(nnx.eval_shape(build))
    shardings = state_shardings(abstract, mesh, spec)
    args = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    rows = named_sharding(mesh, spec, ("batch", None))
    x = jax.ShapeDtypeStruct((32, 512), jnp.float32, sharding=rows)
    step = jax.jit(make_train(graphdef), out_shardings=(shardings, None), donate_argnums=0)
    compiled = compile_for_topology(step, (args, x, x), spec)
    report = memory_report(compiled)
    assert report["device_kind"] == "TPU v5" and report["hbm_bytes"] == 95 * 2**30 and report["fits"] is True
    # arguments: each device holds its shard of every array (NumPy recomputation from the shard shapes); TPU pads
    # each scalar (the two step counters; here also the replicated `scale`) to one 512-byte tile at most
    def shard_bytes(leaves):
        return sum(int(np.prod(a.sharding.shard_shape(a.shape))) * a.dtype.itemsize for a in leaves)

    leaves = jax.tree.leaves((args, x, x))
    scalars = sum(a.ndim == 0 for a in leaves)
    assert shard_bytes(leaves) <= report["argument_bytes"] <= shard_bytes(leaves) + 512 * scalars
    # the donated state (parameters and Adam moments) is updated in place
    assert report["alias_bytes"] >= shard_bytes(a for a in jax.tree.leaves(args) if a.ndim)
    total = report["argument_bytes"] + report["output_bytes"] - report["alias_bytes"] + report["temp_bytes"]
    assert report["total_bytes"] == total + report["generated_code_bytes"]
    # the same program judged against smaller chips
    assert memory_report(compiled, device_kind="NVIDIA H100 80GB HBM3")["hbm_bytes"] == HBM_BYTES["NVIDIA H100"]


def test_aot_out_of_memory_is_a_plain_message(v5p8):
    spec, mesh = v5p8
    # 64 GiB of float32 per chip in and 64 GiB out: more than a v5p chip's 95 GiB
    big = jax.ShapeDtypeStruct((4 * 2**34,), jnp.float32, sharding=NamedSharding(mesh, P("fsdp")))
    with pytest.raises(HbmExhaustedError) as err:
        compile_for_topology(lambda a: a * 2 + 1, (big,), spec)
    message = str(err.value)
    assert message.startswith(f"{SHARDING_DIR / 'v5p-8.yaml'}: the program does not fit in device memory on v5p:2x2x1")
    assert "RESOURCE_EXHAUSTED" in message and "Traceback" not in message and "\n" not in message
    assert err.value.__cause__ is None and err.value.__suppress_context__


def test_memory_report_fits_flag_against_chip_kind(v5p8):
    spec, mesh = v5p8
    # 32 GiB per chip in and out: fits a v5p (95 GiB), not a v5e (16 GiB)
    arg = jax.ShapeDtypeStruct((4 * 2**33,), jnp.float32, sharding=NamedSharding(mesh, P("fsdp")))
    compiled = compile_for_topology(jax.jit(lambda a: a + 1), (arg,), spec)
    assert memory_report(compiled)["fits"] is True
    small = memory_report(compiled, device_kind="TPU v5 lite")
    assert small["argument_bytes"] == 2**35 and small["hbm_bytes"] == 16 * 2**30 and small["fits"] is False


# --- the real decoder on data 2 × fsdp 2 × tensor 2 ----------------------------------------------------------------


def test_decoder_forward_sharded_matches_one_device(mesh8, spec8):
    """The real Decoder: parameters placed by state_shardings (as an HF import does), forward equals one device.

    Parameters come from NumPy rather than the model's own init, whose XLA:CPU compile (nine random normals) costs
    more than this whole file; init_sharded's equality with an unsharded init is tested on the MLP above.
    """
    from tulu_jax.models.config import ModelConfig
    from tulu_jax.models.decoder import Decoder

    config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=8, rope_theta=10000.0)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Decoder(config, nnx.Rngs(0))))
    shardings = state_shardings(abstract, mesh8, spec8)
    rng = np.random.default_rng(0)
    values = jax.tree.map(lambda a: rng.normal(0, 0.1, a.shape).astype(a.dtype), abstract)
    model = nnx.merge(graphdef, jax.device_put(values, shardings))
    reference = nnx.merge(graphdef, jax.device_put(values, jax.devices()[0]))
    assert model.layers.q_proj.get_value().sharding.spec == P(None, "fsdp", "tensor", None)
    assert model.layers.k_proj.get_value().sharding.spec == P(None, "fsdp", "tensor", None)
    assert model.embed.get_value().sharding.spec == P("tensor", "fsdp")
    assert len(model.layers.q_proj.get_value().addressable_shards[0].data.reshape(-1)) == 2 * 16 * 2 * 8

    ids = rng.integers(0, 64, size=(4, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 9:] = 0  # one right-padded row
    rows = batch_sharding(mesh8, spec8)

    @jax.jit
    def forward(m, ids, mask):
        return m(ids, mask)

    got = forward(model, jax.device_put(ids, rows), jax.device_put(mask, rows))
    want = forward(reference, jnp.asarray(ids), jnp.asarray(mask))
    assert got.shape == (4, 12, 64)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


# --- default rules ----------------------------------------------------------------------------------------------

# The rules every sharding file listed in full before DEFAULT_RULES existed (cpu-1, cpu-8, h100x8, v5p-8, v5p-64,
# v5p-256, v6e-256 all had this table): loading a file must still give exactly these.
FORMER_TABLE = {
    "vocab": "tensor", "embed": "fsdp", "mlp": "tensor", "heads": "tensor", "kv_heads": "tensor", "head_dim": None,
    "layers": None, "batch": ["data", "fsdp"], "length": None, "act_embed": None, "act_heads": "tensor",
    "act_kv_heads": "tensor", "act_mlp": "tensor", "act_vocab": "tensor",
}


def test_every_sharding_file_keeps_its_former_rules():
    for path in SHARDING_DIR.glob("*.yaml"):
        assert load_sharding(path).rules == FORMER_TABLE, path.name


def test_a_file_lists_only_the_rules_that_differ(tmp_path):
    spec = load_sharding(write(tmp_path, "mesh: {data: 2, fsdp: 2, tensor: 2}\nrules: {embed: null, value: tensor}\n"))
    assert spec.rules == {**FORMER_TABLE, "embed": None, "value": "tensor"}


def test_a_default_rule_naming_an_axis_the_mesh_lacks_is_an_error_naming_the_file(tmp_path):
    path = write(tmp_path, "mesh: {data: 2, fsdp: 4}\n")
    with pytest.raises(ConfigError, match=re.escape("names unknown mesh axis 'tensor'")) as err:
        load_sharding(path)
    assert str(err.value).startswith(str(path)) and "default rule" in str(err.value)
