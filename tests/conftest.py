"""Test configuration: a CPU mesh of 8 fake devices, set before JAX is imported anywhere."""
import os

os.environ["JAX_PLATFORMS"] = "cpu"
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pathlib  # noqa: E402

import pytest  # noqa: E402

from oracle_files import decompress_verified  # noqa: E402


@pytest.fixture(scope="session")
def oracles_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """The vendored oracle files (tests/fixtures/oracles), decompressed once and checked against their sha256."""
    return decompress_verified(tmp_path_factory.mktemp("oracles"))


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A random `tiny` preset Llama (hidden 64, 2 layers) with the bundled tokenizer, as an HF directory: what
    `tulu-jax sft` exports, without the training."""
    from flax import nnx

    from tulu_jax.data.tokenizers import load_tokenizer
    from tulu_jax.models import Decoder
    from tulu_jax.models.hf_io import save_hf_checkpoint
    from tulu_jax.models.presets import preset_config

    tokenizer = load_tokenizer(pathlib.Path(__file__).resolve().parent.parent / "tulu_jax" / "assets" / "tiny_tokenizer")
    config = preset_config("tiny", {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id})
    path = tmp_path_factory.mktemp("tiny_hf")
    save_hf_checkpoint(Decoder(config, nnx.Rngs(0)), path)
    tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def pipeline_cache(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A persistent JAX compilation cache shared by the shortened pipeline runs (subprocesses)."""
    return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, pipeline_cache: pathlib.Path) -> tuple[pathlib.Path, str, str]:
    """One full shortened pipeline (tests/test_pipeline_e2e.py's SHORT config, through the console entry point),
    run once per session and reused by the tests that build on a finished run; returns (run dir, stdout, stderr)."""
    from test_pipeline_e2e import finish, start, write_config

    directory = tmp_path_factory.mktemp("pipeline")
    out, err = finish(start(write_config(directory), pipeline_cache))
    return directory / "run", out, err


@pytest.fixture(scope="session")
def short_comparison(tmp_path_factory: pytest.TempPathFactory, uninterrupted: tuple[pathlib.Path, str, str],
                     pipeline_cache: pathlib.Path) -> tuple[pathlib.Path, str]:
    """`tulu-jax distill-compare` with tiny settings, the shortened pipeline's final model as teacher: (its run
    dir, stdout)."""
    from test_distill_compare import run_comparison

    return run_comparison(tmp_path_factory.mktemp("compare"), uninterrupted[0], pipeline_cache)
