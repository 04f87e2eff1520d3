"""HF safetensors import/export: round trips through transformers, sharded files, sharded import, bad checkpoints."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from tulu_jax.errors import CheckpointError
from tulu_jax.models import ModelConfig, load_hf_checkpoint, load_model, save_hf_checkpoint

VOCAB = 160


def _tiny_hf(family: str, dtype=None):
    """A tiny random transformers model (Llama 3.1 rope scaling / Qwen 2 tied + biases / OLMo 2)."""
    import torch
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
    config = {
        "llama": lambda: transformers.LlamaConfig(**common, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
        "qwen2": lambda: transformers.Qwen2Config(**common, tie_word_embeddings=True),
        "olmo2": lambda: transformers.Olmo2Config(**common),
    }[family]()
    torch.manual_seed(7)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.to(dtype) if dtype is not None else model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> (torch model, its save_pretrained dir, our import of it)."""
    out = {}
    for family in ("llama", "qwen2", "olmo2"):
        hf = _tiny_hf(family)
        path = tmp_path_factory.mktemp(family)
        hf.save_pretrained(path)
        out[family] = (hf, path, load_model(path))
    return out


def _leaves(model) -> dict:
    return {path: np.asarray(var[...]) for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _assert_same_params(a, b) -> None:
    la, lb = _leaves(a), _leaves(b)
    assert la.keys() == lb.keys()
    for path in la:
        assert la[path].dtype == lb[path].dtype, path
        np.testing.assert_array_equal(la[path], lb[path], err_msg=str(path))


def _torch_logits(hf, ids):
    import torch

    with torch.no_grad():
        return hf(input_ids=torch.tensor(ids)).logits.numpy()


@pytest.mark.parametrize("family", ["llama", "qwen2", "olmo2"])
def test_export_loads_in_transformers_and_reimports_bit_exact(checkpoints, family, tmp_path):
    import transformers

    hf, _, model = checkpoints[family]
    save_hf_checkpoint(model, tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not (tmp_path / "model.safetensors.index.json").exists()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(reloaded) is type(hf)
    expected, got = hf.state_dict(), reloaded.state_dict()
    assert expected.keys() == got.keys()
    for name in expected:
        assert (expected[name] == got[name]).all(), name
    assert reloaded.config.rope_parameters == hf.config.rope_parameters
    assert reloaded.config.tie_word_embeddings == hf.config.tie_word_embeddings
    ids = np.random.default_rng(0).integers(0, VOCAB, (2, 9))
    np.testing.assert_array_equal(_torch_logits(reloaded, ids), _torch_logits(hf, ids))
    _assert_same_params(load_model(tmp_path), model)


def test_multi_shard_export_import_and_errors(checkpoints, tmp_path):
    import transformers

    hf, _, model = checkpoints["llama"]
    out = tmp_path / "sharded"
    save_hf_checkpoint(model, out, max_shard_bytes=60_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and not (out / "model.safetensors").exists()
    assert all((out / f).exists() for f in files)
    assert index["metadata"]["total_size"] == sum(int(p.numel()) * 4 for p in hf.state_dict().values())
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids = np.random.default_rng(1).integers(0, VOCAB, (2, 9))
    np.testing.assert_array_equal(_torch_logits(reloaded, ids), _torch_logits(hf, ids))
    _assert_same_params(load_hf_checkpoint(out), model)

    (out / files[1]).unlink()
    with pytest.raises(CheckpointError, match=files[1]):
        load_hf_checkpoint(out)


def test_bf16_checkpoint_imports_exactly(tmp_path):
    import torch

    hf = _tiny_hf("olmo2", dtype=torch.bfloat16)
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path)  # default: float32 parameters
    params = _leaves(model)
    embed = hf.model.embed_tokens.weight.detach().float().numpy()
    np.testing.assert_array_equal(params[("embed",)], embed)
    q = hf.model.layers[1].self_attn.q_proj.weight.detach().float().numpy()  # [heads*head_dim, hidden]
    np.testing.assert_array_equal(params[("layers", "q_proj")][1], q.T.reshape(64, 4, 16))
    bf16 = load_model(tmp_path, dtype="bfloat16")
    assert _leaves(bf16)[("embed",)].dtype == jnp.bfloat16
    save_hf_checkpoint(bf16, tmp_path / "export")
    exported = json.loads((tmp_path / "export" / "config.json").read_text())
    assert exported["dtype"] == "bfloat16"
    _assert_same_params(load_model(tmp_path / "export", dtype="bfloat16"), bf16)


RULES = {"layers": None, "vocab": "data", "embed": "fsdp", "mlp": "tensor", "heads": "tensor", "kv_heads": "tensor",
         "head_dim": "data"}


def _shardings(model, mesh, rules):
    """NamedSharding for each parameter from its logical names (an inline stand-in for tulu_jax.sharding)."""
    def one(var):
        return NamedSharding(mesh, PartitionSpec(*(rules[n] for n in var.get_metadata()["out_sharding"])))

    return jax.tree.map(one, nnx.state(model), is_leaf=lambda x: isinstance(x, nnx.Variable))


@pytest.mark.parametrize("family", ["llama", "olmo2"])
def test_sharded_import_equals_unsharded(checkpoints, family):
    _, path, model = checkpoints[family]
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    # head_dim split over "data" makes import cut inside an HF row block (heads*head_dim) too.
    for rules in (RULES, {**RULES, "layers": "data", "head_dim": None}):
        sharded = load_hf_checkpoint(path, shardings=_shardings(model, mesh, rules))
        for path_, var in nnx.to_flat_state(nnx.state(sharded, nnx.Param)):
            names = var.get_metadata()["out_sharding"]
            assert var[...].sharding.spec == PartitionSpec(*(rules[n] for n in names)), path_
        _assert_same_params(sharded, model)


def test_sharded_export_gathers(checkpoints, tmp_path):
    _, path, model = checkpoints["qwen2"]
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    sharded = load_hf_checkpoint(path, shardings=_shardings(model, mesh, RULES))
    save_hf_checkpoint(sharded, tmp_path)
    _assert_same_params(load_model(tmp_path), model)


def _rewrite(src, dst, edit) -> None:
    """Copy a single-file checkpoint with its tensors changed by `edit(dict) -> dict`."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    tensors = edit(load_file(str(src / "model.safetensors")))
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})


def test_bad_checkpoints_raise_checkpoint_errors(checkpoints, tmp_path):
    _, path, _ = checkpoints["llama"]

    unknown = tmp_path / "unknown"
    shutil.copytree(path, unknown)
    config = json.loads((unknown / "config.json").read_text())
    config["architectures"] = ["MistralForCausalLM"]
    (unknown / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="MistralForCausalLM"):
        load_model(unknown)

    missing = "model.layers.1.mlp.up_proj.weight"
    _rewrite(path, tmp_path / "missing", lambda t: {k: v for k, v in t.items() if k != missing})
    with pytest.raises(CheckpointError, match=missing.replace(".", r"\.")):
        load_model(tmp_path / "missing")

    wrong = "model.layers.0.self_attn.k_proj.weight"
    _rewrite(path, tmp_path / "wrong", lambda t: {**t, wrong: t[wrong][:16]})
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*k_proj.*\[16, 64\].*\[32, 64\]"):
        load_model(tmp_path / "wrong")

    _rewrite(path, tmp_path / "extra", lambda t: {**t, "model.layers.2.mlp.up_proj.weight": t[missing]})
    with pytest.raises(CheckpointError, match="unexpected tensor"):
        load_model(tmp_path / "extra")

    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(tmp_path / "empty")
    shutil.copy(path / "config.json", tmp_path / "empty")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(tmp_path / "empty")


def test_config_reads_transformers_4_and_5_layouts_and_round_trips():
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    base = {"architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 4096,
            "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
            "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "eos_token_id": [128001, 128008, 128009]}
    v4 = ModelConfig.from_hf_config({**base, "rope_theta": 500000.0, "rope_scaling": scaling})
    v5 = ModelConfig.from_hf_config({**base, "rope_parameters": {**scaling, "rope_theta": 500000.0}})
    assert v4 == v5
    assert (v4.head_dim, v4.rope_theta, v4.num_kv_heads) == (128, 500000.0, 8)
    assert v4.eos_token_ids == (128001, 128008, 128009) and v4.norm_placement == "pre" and not v4.qk_norm
    assert ModelConfig.from_hf_config(v4.to_hf_config()) == v4

    olmo = ModelConfig.from_hf_config({**base, "architectures": None, "model_type": "olmo2"})
    assert olmo.architecture == "Olmo2ForCausalLM" and olmo.qk_norm and olmo.norm_placement == "post"
    qwen = ModelConfig.from_hf_config({**base, "architectures": ["Qwen2ForCausalLM"], "tie_word_embeddings": True})
    assert qwen.attention_bias and qwen.tie_word_embeddings

    with pytest.raises(CheckpointError, match="rope_type 'yarn'"):
        ModelConfig.from_hf_config({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(CheckpointError, match="num_hidden_layers"):
        ModelConfig.from_hf_config({k: v for k, v in base.items() if k != "num_hidden_layers"})
    with pytest.raises(CheckpointError, match=r"hub/config\.json: .*num_kv_heads"):
        ModelConfig.from_hf_config({**base, "num_key_value_heads": 5}, source="hub/config.json")
    with pytest.raises(CheckpointError, match="use_sliding_window"):
        ModelConfig.from_hf_config({**base, "architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True})
