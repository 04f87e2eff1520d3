"""notebooks/distillation_ablation.ipynb runs top to bottom in a fresh kernel, and its reported numbers are right:
each toy student's divergences are recomputed here with NumPy from its reported (μ, σ), and the mode-covering /
mode-seeking claims are checked on them; the toy-world student curves (read from the session's tiny
`tulu-jax distill-compare` run) equal that run's metrics rows and the verifier's counts on its eval files."""

import json
import pathlib

import nbformat
import numpy as np
import pytest

from test_notebooks import _execute
from tulu_jax.rl.verifiers import verify

NOTEBOOK = pathlib.Path(__file__).resolve().parent.parent / "notebooks" / "distillation_ablation.ipynb"


def test_stored_with_the_outputs_of_one_run():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1))
    assert not [o for cell in code for o in cell.outputs if o.output_type == "error"]
    images = [o for cell in code for o in cell.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2  # the toy distributions and the toy-world student curves


def read_jsonl(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_distillation_ablation_notebook(tmp_path, monkeypatch, short_comparison, uninterrupted):
    out, curves_out = tmp_path / "summary.json", tmp_path / "curves.json"
    run = short_comparison[0]
    monkeypatch.setenv("DISTILL_ABLATION_OUT", str(out))
    monkeypatch.setenv("DISTILL_COMPARE_RUN", str(run))
    monkeypatch.setenv("DISTILL_CURVES_OUT", str(curves_out))
    _execute(NOTEBOOK, tmp_path)
    check_student_curves(json.loads(curves_out.read_text()), run, uninterrupted[0])
    summary = json.loads(out.read_text())
    teacher, results = summary["teacher"], summary["results"]
    x = np.arange(teacher["vocab"], dtype=np.float64)
    bumps = [np.exp(-0.5 * ((x - m) / teacher["sigma"]) ** 2) for m in teacher["modes"]]
    p = 0.999 * sum(w * b / b.sum() for w, b in zip(teacher["weights"], bumps)) + 0.001 / len(x)
    for name, r in results.items():
        z = -0.5 * ((x - r["mu"]) / r["sigma"]) ** 2
        log_q = z - np.log(np.sum(np.exp(z - z.max()))) - z.max()
        q = np.exp(log_q)
        forward = np.sum(p * (np.log(p) - log_q))
        reverse = np.sum(q * (log_q - np.log(p)))
        np.testing.assert_allclose(r["forward_kl"], forward, rtol=2e-3, err_msg=name)
        np.testing.assert_allclose(r["reverse_kl"], reverse, rtol=2e-3, err_msg=name)
        np.testing.assert_allclose(r["mass_left"], q[: len(x) // 2].sum(), atol=1e-3, err_msg=name)
    fwd, rev = results["forward KL"], results["reverse KL"]
    assert min(fwd["mass_left"], fwd["mass_right"]) > 0.35  # covering: both modes
    assert max(rev["mass_left"], rev["mass_right"]) > 0.99  # seeking: one mode
    assert results["sparse K=8"]["sigma"] < results["sparse K=32"]["sigma"] < results["sparse K=256"]["sigma"]


def check_student_curves(curves: dict, run: pathlib.Path, teacher_run: pathlib.Path) -> None:
    """Each arm's loss curve is its metrics.jsonl, row for row; its accuracy curve the verifier's counts on the
    eval files of its checkpoints and final model."""
    held_out = read_jsonl(teacher_run / "data" / "eval.jsonl")
    assert list(curves) == ["sft", "offline", "on_policy"]
    for arm, curve in curves.items():
        metrics = read_jsonl(run / arm / "metrics.jsonl")
        assert curve["step"] == [m["step"] for m in metrics] and curve["loss"] == [m["loss"] for m in metrics]
        files = [run / arm / "eval_curve" / f"{s}.jsonl" for s in curve["eval_step"][:-1]] + [run / arm / "eval.jsonl"]
        counts = [sum(verify("gsm8k", r["response"], t["ground_truth"]) == 1.0 for r, t in zip(read_jsonl(f), held_out))
                  for f in files]
        assert curve["correct"] == counts and curve["total"] == len(held_out)
        assert curve["eval_step"][-1] == metrics[-1]["step"]
