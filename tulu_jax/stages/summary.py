"""The pipeline's summary: one row per finished stage (read back from its files), as a table, JSON and a figure.

Held-out accuracy comes with its 95% Wilson score interval (the held-out set is small: 200 problems give about
±7 points at 50%). Training stages are described by their last logged step: the recipe's loss and, for the
token-level stages, the loss per supervised token (`loss_per_token` in metrics.jsonl), which is comparable across
batch sizes and sequence lengths where the recipe's sum loss is not. An RL stage is described by its reward curve:
the verifier accuracy of its temperature-1 samples per iteration.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Any

import numpy as np

STAGE_FILE = "stage.json"
EVAL_FILE = "eval.jsonl"
METRICS_FILE = "metrics.jsonl"
Z_95 = 1.959963984540054  # the standard normal's 0.975 quantile


def read_jsonl(path: pathlib.Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file (blank lines skipped)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_metrics(path: pathlib.Path) -> list[dict[str, Any]]:
    """A run's metrics rows in step order, one per step: after a resume a step appears twice and the later row
    (the one the run continued from) counts."""
    by_step = {row["step"]: row for row in read_jsonl(path)}
    return [by_step[step] for step in sorted(by_step)]


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95% by default): the p whose normal test accepts
    successes / n, which stays inside [0, 1] and is reliable for small n or extreme proportions."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    p = successes / n
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, center - half), min(1.0, center + half)


@dataclasses.dataclass(frozen=True)
class SummaryRow:
    """One stage's line of the summary: accuracy, its 95% interval and mean reward from its eval file (None
    without a model), the wall time and the stage's facts (`info`)."""

    stage: str
    accuracy: float | None
    interval: tuple[float, float] | None
    mean_reward: float | None
    wall_s: float
    info: dict[str, Any]


def summarize(run_dir: pathlib.Path, stages: list[str]) -> list[SummaryRow]:
    """The summary rows of the finished stages, read back from `<stage>/stage.json` and `<stage>/eval.jsonl`."""
    rows = []
    for name in stages:
        marker = run_dir / name / STAGE_FILE
        if not marker.is_file():
            continue
        done = json.loads(marker.read_text())
        accuracy = interval = reward = None
        if done["evaluated"]:
            rewards = [r["reward"] for r in read_jsonl(run_dir / name / EVAL_FILE)]
            correct = sum(r == 1.0 for r in rewards)
            accuracy, interval = correct / len(rewards), wilson_interval(correct, len(rewards))
            reward = sum(rewards) / len(rewards)
        rows.append(SummaryRow(name, accuracy, interval, reward, done["wall_s"], done["info"]))
    return rows


RL_WINDOW = 5  # iterations averaged for an RL stage's first and last sample reward (one batch is noisy)


def training_info(metrics_path: pathlib.Path) -> dict[str, Any]:
    """What the summary says about a training stage: its step count and last logged losses; for an RL stage (its
    metrics have `verifier`) also the verifier accuracy of its samples over its first and last RL_WINDOW
    iterations and the final KL to the reference."""
    rows = [r for r in read_metrics(metrics_path) if "loss" in r]
    info: dict[str, Any] = {"steps": len(rows), "final_loss": rows[-1]["loss"]}
    if "loss_per_token" in rows[-1]:
        info["final_loss_per_token"] = rows[-1]["loss_per_token"]
    if "verifier" in rows[-1]:
        verifier = [r["verifier"] for r in rows]
        info.update(first_sample_reward=float(np.mean(verifier[:RL_WINDOW])),
                    final_sample_reward=float(np.mean(verifier[-RL_WINDOW:])), final_kl=rows[-1]["kl_to_ref"])
    return info


def _describe(row: SummaryRow) -> str:
    info = row.info
    if "pairs" in info:
        return f"{info['pairs']} pairs from {info['prompts']} prompts; sample reward {info['sample_reward']:.3f}"
    if "final_sample_reward" in info:
        return (f"{info['steps']} iterations; sample reward {info['first_sample_reward']:.3f} → "
                f"{info['final_sample_reward']:.3f} (first/last {RL_WINDOW}), KL to reference {info['final_kl']:.3f}")
    if "steps" in info:
        per_token = f" ({info['final_loss_per_token']:.4f} per token)" if "final_loss_per_token" in info else ""
        return f"{info['steps']} steps, final loss {info['final_loss']:.4f}{per_token}"
    return ""


def format_table(rows: list[SummaryRow]) -> str:
    """The summary as a Markdown table; a mean-reward column only where rewards are not all 0 or 1 (where the mean
    reward differs from the accuracy)."""
    def number(x: float | None) -> str:
        return "—" if x is None else f"{x:.3f}"

    def interval(r: SummaryRow) -> str:
        return "—" if r.interval is None else f"{r.interval[0]:.3f}–{r.interval[1]:.3f}"

    with_reward = any(r.mean_reward is not None and r.mean_reward != r.accuracy for r in rows)
    head = ["stage", "held-out accuracy", "95% interval", *(["mean reward"] if with_reward else []), "wall time",
            "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.stage, number(r.accuracy), interval(r), *([number(r.mean_reward)] if with_reward else []),
                 f"{r.wall_s:.0f} s", _describe(r)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def smooth(values: list[float], window: int) -> np.ndarray:
    """The running mean over `window` steps (shorter at the start, where fewer steps exist)."""
    sums = np.cumsum(np.asarray(values, dtype=np.float64))
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    return (sums - np.concatenate([np.zeros(window), sums[:-window]])[: len(values)]) / counts


def summary_figure(run_dir: pathlib.Path, rows: list[SummaryRow]) -> Any:
    """The summary figure: per training stage its loss (per token where the stage has one, else the recipe's), for
    a preference stage its reward accuracy and margin (running mean), and held-out accuracy with 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = [(r, read_metrics(run_dir / r.stage / METRICS_FILE)) for r in rows if "steps" in r.info]
    preference = [(r, m) for r, m in trained if m and "reward_accuracy" in m[-1]]
    evaluated = [r for r in rows if r.accuracy is not None]
    panels = len(trained) + len(preference) + 1
    fig, axes = plt.subplots(1, panels, figsize=(4 * panels, 3.4))
    axes = list(np.atleast_1d(axes))
    for row, metrics in trained:
        ax = axes.pop(0)
        steps = [m["step"] for m in metrics]
        if metrics and "verifier" in metrics[-1]:  # RL: the reward curve (the clipped surrogate loss says little)
            window = min(RL_WINDOW, len(metrics))
            ax.plot(steps, [m["verifier"] for m in metrics], color="tab:gray", lw=0.8, alpha=0.6)
            ax.plot(steps, smooth([m["verifier"] for m in metrics], window), color="tab:red", lw=1.4)
            ax.set(title=f"{row.stage} sample reward (verifier, mean of {window})", xlabel="iteration",
                   ylim=(0, 1.05))
            ax.grid(alpha=0.3)
            continue
        key = "loss_per_token" if metrics and "loss_per_token" in metrics[-1] else "loss"
        ax.plot(steps, [m[key] for m in metrics], lw=1.2)
        ax.set(title=f"{row.stage} {'loss per token' if key == 'loss_per_token' else 'loss'}", xlabel="step")
        ax.grid(alpha=0.3)
    for row, metrics in preference:
        ax = axes.pop(0)
        steps, window = [m["step"] for m in metrics], max(1, len(metrics) // 20)
        ax.plot(steps, smooth([m["reward_accuracy"] for m in metrics], window), color="tab:blue", lw=1.2)
        mean = f" (running mean of {window} steps)" if window > 1 else ""
        ax.set(title=f"{row.stage} rewards{mean}", xlabel="step", ylim=(0, 1.05))
        ax.set_ylabel("reward accuracy", color="tab:blue")
        margin = ax.twinx()
        margin.plot(steps, smooth([m["reward_margin"] for m in metrics], window), color="tab:orange", lw=1.2)
        margin.set_ylabel("reward margin", color="tab:orange")
        ax.grid(alpha=0.3)
    ax = axes.pop(0)
    accuracy = np.array([r.accuracy for r in evaluated])
    errors = np.array([[a - r.interval[0], r.interval[1] - a] for a, r in zip(accuracy, evaluated)]).T
    ax.bar([f"{r.stage}\n{a:.3f}" for r, a in zip(evaluated, accuracy)], accuracy, yerr=errors.reshape(2, -1),
           capsize=4, color="tab:green")
    ax.set(title="held-out accuracy, 95% interval", ylim=(0, 1.05))
    fig.tight_layout()
    return fig


def plot_summary(run_dir: pathlib.Path, rows: list[SummaryRow], out: pathlib.Path) -> None:
    """Save `summary_figure` as a PNG."""
    import matplotlib.pyplot as plt

    fig = summary_figure(run_dir, rows)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def write_summary(run_dir: pathlib.Path, rows: list[SummaryRow]) -> str:
    """Write summary.json, summary.md and summary.png; returns the table."""
    table = format_table(rows)
    (run_dir / "summary.json").write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=2))
    (run_dir / "summary.md").write_text(table + "\n")
    plot_summary(run_dir, rows, run_dir / "summary.png")
    return table
