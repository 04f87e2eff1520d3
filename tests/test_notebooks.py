"""The notebooks run top to bottom in a fresh kernel, and the numbers they report are right.

notebooks/loss_ablation.ipynb writes a JSON summary to $ABLATION_OUT; the values below are recomputed here from the
closed forms of the losses (docs/recipe.md, DPO section), independently of the notebook's own in-cell checks.
"""

import json
import math
import pathlib
import sys

import nbclient
import nbformat
import pytest
from jupyter_client import KernelManager
from jupyter_client.kernelspec import KernelSpecManager

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
LOSS_ABLATION = REPO_ROOT / "notebooks" / "loss_ablation.ipynb"
KERNEL_NAME = "tulu-jax-test-python"


def _kernel_manager(tmp_path: pathlib.Path) -> KernelManager:
    """A kernel on THIS interpreter (the venv's), whatever `python3` kernelspec the machine has installed."""
    kernels = tmp_path / "kernels"
    spec_dir = kernels / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "tulu-jax tests",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    ksm = KernelSpecManager(kernel_dirs=[str(kernels)], ensure_native_kernel=False)
    km = KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=ksm)
    assert km.kernel_spec.argv[0] == sys.executable
    return km


def _execute(path: pathlib.Path, tmp_path: pathlib.Path) -> nbformat.NotebookNode:
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, km=_kernel_manager(tmp_path), timeout=300, resources={"metadata": {"path": str(REPO_ROOT)}}
    )
    client.execute()  # raises CellExecutionError on the first failing cell (incl. the notebook's own asserts)
    return nb


def _softplus(x: float) -> float:
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_notebooks_are_stored_without_outputs():
    nb = nbformat.read(LOSS_ABLATION, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, "clear the notebook's outputs before saving"


def test_loss_ablation_notebook(tmp_path, monkeypatch):
    out = tmp_path / "ablation.json"
    monkeypatch.setenv("ABLATION_OUT", str(out))  # the kernel subprocess inherits os.environ
    _execute(LOSS_ABLATION, tmp_path)
    summary = json.loads(out.read_text())
    beta = summary["beta"]
    log2 = math.log(2.0)

    # The recipe's values (docs/recipe.md: dpo_norm β 5; report Table 18 ablation: dpo β 0.1).
    assert beta["dpo_norm"] == 5.0 and beta["dpo"] == 0.1
    assert set(beta) == {"dpo", "dpo_norm", "simpo", "ipo"}

    # Loss and slope at zero margin: −log σ(0) = log 2, slope −β/2; simpo −log σ(−γ); ipo (1/(2β))², slope −1/β.
    zero = summary["zero_margin"]
    for loss_type in ("dpo", "dpo_norm"):
        assert zero[loss_type]["loss"] == pytest.approx(log2, abs=1e-6)
        assert zero[loss_type]["grad"] == pytest.approx(-beta[loss_type] / 2, rel=1e-6)
    gamma = summary["gamma_beta_ratio"] * beta["simpo"]
    assert zero["simpo"]["loss"] == pytest.approx(_softplus(gamma), rel=1e-6)
    assert zero["simpo"]["grad"] == pytest.approx(-beta["simpo"] * _sigmoid(gamma), rel=1e-6)
    assert zero["ipo"]["loss"] == pytest.approx(1 / (4 * beta["ipo"] ** 2), rel=1e-6)
    assert zero["ipo"]["grad"] == pytest.approx(-1 / beta["ipo"], rel=1e-6)

    # Length bias at equal per-token quality: summed log-probs give ℓ = d (L_c − L_r), averaged ones give 0.
    bias = summary["length_bias"]
    chosen_len, shift, rejected_lens = bias["chosen_len"], bias["shift_per_token"], bias["rejected_lens"]
    assert chosen_len in rejected_lens and any(n != chosen_len for n in rejected_lens) and shift != 0
    expected_sum_margin = [shift * (chosen_len - n) for n in rejected_lens]
    for loss_type in ("dpo", "ipo"):
        assert bias["margin"][loss_type] == pytest.approx(expected_sum_margin, abs=1e-6)
    for loss_type in ("dpo_norm", "simpo"):
        assert bias["margin"][loss_type] == pytest.approx([0.0] * len(rejected_lens), abs=1e-6)
    assert any(abs(m) > 1.0 for m in bias["margin"]["dpo"])  # dpo does see length
    assert bias["loss"]["dpo"] == pytest.approx([_softplus(-beta["dpo"] * m) for m in expected_sum_margin], rel=1e-6)
    assert bias["loss"]["dpo_norm"] == pytest.approx([log2] * len(rejected_lens), abs=1e-6)
    assert bias["loss"]["simpo"] == pytest.approx([_softplus(gamma)] * len(rejected_lens), rel=1e-6)
    assert bias["loss"]["ipo"] == pytest.approx(
        [(m - 1 / (2 * beta["ipo"])) ** 2 for m in expected_sum_margin], rel=1e-6
    )

    # Label smoothing ε on dpo: loss(0) = log 2 for every ε; minimum at βℓ* = log((1 − ε)/ε) (0.01-nat grid).
    smoothing = summary["label_smoothing"]
    assert smoothing["loss_type"] == "dpo"
    rows = smoothing["rows"]
    assert {row["eps"] for row in rows} >= {0.0, 0.1, 0.5}
    for row in rows:
        assert row["loss_at_zero"] == pytest.approx(log2, abs=1e-6)
        if row["eps"] > 0:
            expected = math.log((1 - row["eps"]) / row["eps"]) / smoothing["beta"]
            assert row["argmin_margin"] == pytest.approx(expected, abs=0.011)

    assert 0.0 <= summary["numpy_check_max_abs_err"] < 1e-5
