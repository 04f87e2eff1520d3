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

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED_DIR = REPO_ROOT.parent / "shared"


@pytest.fixture(scope="session")
def oracles_dir() -> pathlib.Path:
    """The reference data in ../shared/oracles; a test needing it fails loudly if it is absent."""
    path = SHARED_DIR / "oracles"
    if not path.is_dir():
        pytest.fail(f"oracle folder {path} is missing: CI must run with ../shared beside the checkout")
    return path
