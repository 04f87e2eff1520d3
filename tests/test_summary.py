"""The pipeline summary: 95% Wilson intervals against a brute-force inversion of the score test, the table's
columns, per-step metrics after a resume, the running mean, and the figure from real-shaped files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tulu_jax.stages import summary


def test_wilson_interval_is_the_set_the_score_test_accepts():
    grid = np.linspace(0.0, 1.0, 200_001)
    for successes, n in ((107, 200), (0, 200), (200, 200), (3, 10), (1, 1)):
        accepted = grid[np.abs(successes / n - grid) <= summary.Z_95 * np.sqrt(grid * (1 - grid) / n)]
        low, high = summary.wilson_interval(successes, n)
        assert low == pytest.approx(accepted.min(), abs=1e-5) and high == pytest.approx(accepted.max(), abs=1e-5)
    low, high = summary.wilson_interval(107, 200)  # the README's 0.535 of 200: about ±7 points
    assert (round(low, 3), round(high, 3)) == (0.466, 0.603)
    with pytest.raises(ValueError):
        summary.wilson_interval(0, 0)


def test_smooth_is_the_running_mean():
    values = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0]
    for window in (1, 3, 10):
        expected = [np.mean(values[max(0, i - window + 1): i + 1]) for i in range(len(values))]
        np.testing.assert_allclose(summary.smooth(values, window), expected)


def test_metrics_after_a_resume_count_each_step_once(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "loss": 4.0}, {"step": 2, "loss": 3.0}, {"step": 2, "loss": 2.5, "loss_per_token": 0.5}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [r["loss"] for r in summary.read_metrics(path)] == [4.0, 2.5]
    assert summary.training_info(path) == {"steps": 2, "final_loss": 2.5, "final_loss_per_token": 0.5}


def _row(stage, accuracy, reward, info, n=200):
    interval = None if accuracy is None else summary.wilson_interval(round(accuracy * n), n)
    return summary.SummaryRow(stage, accuracy, interval, reward, 12.0, info)


def test_the_table_shows_mean_reward_only_where_it_differs():
    binary = [_row("sft", 0.535, 0.535, {"steps": 3, "final_loss": 1.5, "final_loss_per_token": 0.25}),
              _row("preferences", None, None, {"pairs": 5, "prompts": 9, "sample_reward": 0.4})]
    table = summary.format_table(binary).splitlines()
    assert table[0] == "| stage | held-out accuracy | 95% interval | wall time | notes |"
    assert table[2] == "| sft | 0.535 | 0.466–0.603 | 12 s | 3 steps, final loss 1.5000 (0.2500 per token) |"
    assert table[3].startswith("| preferences | — | — | 12 s | 5 pairs from 9 prompts")
    partial = summary.format_table([_row("rlvr", 0.5, 0.625, {})]).splitlines()
    assert partial[0].split(" | ")[3] == "mean reward" and partial[2].split(" | ")[3] == "0.625"


def test_the_figure_has_a_panel_per_loss_a_reward_panel_and_intervals(tmp_path):
    for stage, extra in (("sft", {"nll_sum": 8.0, "supervised_tokens": 32, "loss_per_token": 0.25}),
                         ("dpo", {"reward_accuracy": 0.75, "reward_margin": 0.3})):
        (tmp_path / stage).mkdir()
        lines = [json.dumps({"step": s, "loss": 1.0 / s, **extra}) for s in range(1, 41)]
        (tmp_path / stage / summary.METRICS_FILE).write_text("\n".join(lines) + "\n")
    info = {"steps": 40, "final_loss": 0.025}
    rows = [_row("sft", 0.5, 0.5, info), _row("preferences", None, None, {}), _row("dpo", 0.6, 0.6, info)]
    fig = summary.summary_figure(tmp_path, rows)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["sft loss per token", "dpo loss", "dpo rewards (running mean of 2 steps)",
                      "held-out accuracy, 95% interval"]
    [sft_loss] = fig.axes[0].get_lines()
    np.testing.assert_allclose(sft_loss.get_ydata(), 0.25)  # loss_per_token, not the sum loss
    bars = fig.axes[3]
    assert [round(p.get_height(), 3) for p in bars.patches] == [0.5, 0.6]
    assert [t.get_text() for t in bars.get_xticklabels()] == ["sft\n0.500", "dpo\n0.600"]
    [caps] = [c for c in bars.containers if hasattr(c, "has_yerr") and c.has_yerr]
    segments = caps.lines[2][0].get_segments()  # each bar's interval drawn from its low to its high end
    assert [tuple(np.round(s[:, 1], 6)) for s in segments] == [
        tuple(np.round(rows[0].interval, 6)), tuple(np.round(rows[2].interval, 6))]
    summary.plot_summary(tmp_path, rows, tmp_path / "summary.png")
    assert (tmp_path / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_rl_stage_is_described_and_drawn_by_its_sample_reward(tmp_path):
    (tmp_path / "rlvr").mkdir()
    verifier = [0.1 * i for i in range(1, 9)]
    lines = [json.dumps({"step": s, "loss": 0.01, "verifier": v, "kl_to_ref": 0.02 * s})
             for s, v in enumerate(verifier, 1)]
    path = tmp_path / "rlvr" / summary.METRICS_FILE
    path.write_text("\n".join(lines) + "\n")
    info = summary.training_info(path)
    assert info["steps"] == 8 and info["final_kl"] == pytest.approx(0.16)
    assert info["first_sample_reward"] == pytest.approx(np.mean(verifier[:5]))
    assert info["final_sample_reward"] == pytest.approx(np.mean(verifier[-5:]))
    row = _row("rlvr", 0.6, 0.6, info)
    assert summary.format_table([row]).splitlines()[2].endswith(
        "| 8 iterations; sample reward 0.300 → 0.600 (first/last 5), KL to reference 0.160 |")
    fig = summary.summary_figure(tmp_path, [row])
    assert fig.axes[0].get_title() == "rlvr sample reward (verifier, mean of 5)"
    raw, smoothed = fig.axes[0].get_lines()
    np.testing.assert_allclose(raw.get_ydata(), verifier)
    np.testing.assert_allclose(smoothed.get_ydata(), summary.smooth(verifier, 5))
