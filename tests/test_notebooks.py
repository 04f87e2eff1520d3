"""The notebooks are stored with their outputs (plots visible on the web), run top to bottom in a fresh kernel from
a copy with the outputs cleared, and the numbers they report are right.

notebooks/loss_ablation.ipynb writes a JSON summary to $ABLATION_OUT; the values below are recomputed here from the
closed forms of the losses (docs/recipe.md, DPO section), independently of the notebook's own in-cell checks.
notebooks/dpo_ablation.ipynb runs shortened (one β per loss, one DPO step each) on the shortened pipeline run of
tests/test_pipeline_e2e.py (the session fixture `uninterrupted`); its numbers are recomputed from the files its runs
wrote, by the verifier and by the losses' closed forms.
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
NOTEBOOKS = REPO_ROOT / "notebooks"
LOSS_ABLATION = NOTEBOOKS / "loss_ablation.ipynb"
DPO_ABLATION = NOTEBOOKS / "dpo_ablation.ipynb"
PPO_VS_GRPO = NOTEBOOKS / "ppo_vs_grpo.ipynb"
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
    """Run a copy of the notebook with its stored outputs cleared (the numbers checked are this run's)."""
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    client = nbclient.NotebookClient(
        nb, km=_kernel_manager(tmp_path), timeout=300, resources={"metadata": {"path": str(REPO_ROOT)}}
    )
    client.execute()  # raises CellExecutionError on the first failing cell (incl. the notebook's own asserts)
    return nb


def _softplus(x: float) -> float:
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


@pytest.mark.parametrize("path", [LOSS_ABLATION, DPO_ABLATION, PPO_VS_GRPO], ids=lambda p: p.name)
def test_notebooks_are_stored_with_their_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1)), "run all cells, in order"
    outputs = [output for cell in code for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "save the notebook with its plots"


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


def _snapshot(run_dir: pathlib.Path) -> dict[str, bytes]:
    """Every file's bytes under run_dir: what must not change when a notebook reuses the run."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def _wilson(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval, written out again from its formula."""
    p = successes / n
    center = (successes + z * z / 2) / (n + z * z)
    half = z * math.sqrt(n * p * (1 - p) + z * z / 4) / (n + z * z)
    return center - half, center + half


def _read_jsonl(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _check_eval(eval_file: pathlib.Path, held_out: list[dict], reported: dict) -> None:
    """The reported accuracy, interval and mean length, recomputed from the eval file by the verifier."""
    from tulu_jax.rl.verifiers import verify

    records = _read_jsonl(eval_file)
    assert len(records) == len(held_out) == reported["n"]
    correct = sum(verify("gsm8k", r["response"], row["ground_truth"]) == 1.0 for r, row in zip(records, held_out))
    assert reported["correct"] == correct
    assert reported["accuracy"] == pytest.approx(correct / len(records))
    assert reported["interval"] == pytest.approx(list(_wilson(correct, len(records))), abs=1e-9)
    assert reported["mean_length"] == pytest.approx(sum(r["num_tokens"] for r in records) / len(records))


def _set_env(monkeypatch: pytest.MonkeyPatch, cache: pathlib.Path, settings: dict) -> None:
    """The notebook's settings, for its kernel: one CPU device (the pipeline's cpu-1 mesh) and the compilation cache
    of the shortened pipeline run (the same sampler and scoring programs compile once)."""
    settings = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_COMPILATION_CACHE_DIR": cache,
                "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": 0, "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": 0,
                **settings}
    for key, value in settings.items():
        monkeypatch.setenv(key, str(value))


GRID = {"dpo": [0.5], "dpo_norm": [5.0], "simpo": [2.0], "ipo": [0.5]}


@pytest.mark.slow
def test_dpo_ablation_notebook(uninterrupted, pipeline_cache, tmp_path, monkeypatch):
    import yaml

    from tulu_jax.stages.pipeline_run import FORK_FILE

    source = uninterrupted[0]
    before = _snapshot(source)
    out = tmp_path / "summary.json"
    _set_env(monkeypatch, pipeline_cache, {"TULU_RUN_DIR": source, "DPO_ABLATION_DIR": tmp_path / "ablation",
                                           "DPO_ABLATION_OUT": out, "DPO_ABLATION_GRID": json.dumps(GRID),
                                           "DPO_ABLATION_STEPS": 1})
    _execute(DPO_ABLATION, tmp_path)
    summary = json.loads(out.read_text())
    held_out = _read_jsonl(source / "data" / "eval.jsonl")
    _check_eval(source / "sft" / "eval.jsonl", held_out, summary["sft"])
    assert [(r["loss_type"], r["beta"]) for r in summary["runs"]] == [(k, b) for k, bs in GRID.items() for b in bs]
    for r in summary["runs"]:
        run_dir = pathlib.Path(r["run_dir"])
        # A fork of the finished run: the kept stages are links (nothing copied) and were not trained again.
        assert json.loads((run_dir / FORK_FILE).read_text())["kept"] == ["base", "sft", "preferences"]
        assert all((run_dir / stage / "hf").is_symlink() for stage in ("base", "sft"))
        log = (run_dir / "log.txt").read_text()
        assert all(f"{stage}: finished before, skipped" in log for stage in ("base", "sft", "preferences"))
        config = yaml.safe_load((run_dir / "dpo" / "config.yaml").read_text())
        assert (config["dpo"]["loss_type"], config["dpo"]["beta"]) == (r["loss_type"], r["beta"])
        assert pathlib.Path(config["model"]["path"]).resolve() == (source / "sft" / "hf").resolve()  # the same SFT
        assert config["data"]["sources"][0]["path"] == str(run_dir / "data" / "preferences.jsonl")
        assert (run_dir / "data" / "preferences.jsonl").read_bytes() == (source / "data" / "preferences.jsonl").read_bytes()
        _check_eval(run_dir / "dpo" / "eval.jsonl", held_out, r)
        metrics = _read_jsonl(run_dir / "dpo" / "metrics.jsonl")
        assert r["steps"] == len(metrics) == 1 and r["first_loss"] == metrics[0]["loss"]
        # Step 1: policy = reference, so the reference-based losses sit at their zero-margin closed forms.
        beta, first = r["beta"], metrics[0]
        if r["loss_type"] == "simpo":  # rewards β·(mean log-prob): no reference
            assert first["chosen_reward"] == pytest.approx(beta * first["chosen_logps"], rel=1e-5)
        else:
            zero_margin = 1 / (2 * beta) ** 2 if r["loss_type"] == "ipo" else math.log(2.0)
            assert first["loss"] == pytest.approx(zero_margin, rel=1e-4)
            assert abs(first["reward_margin"]) < 1e-4
    assert _snapshot(source) == before  # the source run is untouched


@pytest.mark.slow
def test_ppo_vs_grpo_notebook(uninterrupted, pipeline_cache, tmp_path, monkeypatch):
    import yaml

    source = uninterrupted[0]
    out = tmp_path / "summary.json"
    _set_env(monkeypatch, pipeline_cache, {"TULU_RUN_DIR": source, "PPO_VS_GRPO_DIR": tmp_path / "rl",
                                           "PPO_VS_GRPO_OUT": out, "PPO_VS_GRPO_RUNS": "ppo,grpo_no_kl",
                                           "PPO_VS_GRPO_ITERATIONS": 2, "PPO_VS_GRPO_BATCH": 16,
                                           "PPO_VS_GRPO_NEW_TOKENS": 12})
    _execute(PPO_VS_GRPO, tmp_path)
    summary = json.loads(out.read_text())
    held_out = _read_jsonl(source / "data" / "eval.jsonl")
    assert summary["start"] == "dpo"  # the latest model of the run
    _check_eval(source / "dpo" / "eval.jsonl", held_out, summary["start_held_out"])
    assert list(summary["runs"]) == ["ppo", "grpo_no_kl"]
    for name, r in summary["runs"].items():
        run_dir = pathlib.Path(r["run_dir"])
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert (config["rlvr"]["algorithm"], config["rlvr"]["kl_coef"]) == (r["algorithm"], r["kl_coef"])
        assert (name == "ppo") == (r["algorithm"] == "ppo" and r["kl_coef"] > 0)
        assert pathlib.Path(config["model"]["path"]).resolve() == (source / "dpo" / "hf").resolve()
        assert (run_dir / "value_hf").is_dir() == (r["algorithm"] == "ppo")  # GRPO trains no value model
        metrics = _read_jsonl(run_dir / "metrics.jsonl")
        curves = r["curves"]
        assert curves["step"] == [m["step"] for m in metrics] == [1, 2]
        for key in ("score", "verifier", "kl_to_ref", "response_length"):
            assert curves[key] == [m[key] for m in metrics]
        assert curves["kl_penalty"] == pytest.approx([config["rlvr"]["kl_coef"] * m["kl_to_ref"] for m in metrics])
        assert all(-10.0 <= s <= 10.0 for s in curves["score"])
        if r["kl_coef"] == 0.0:
            assert curves["kl_penalty"] == [0.0, 0.0]
        _check_eval(run_dir / "eval.jsonl", held_out, r["held_out"])
