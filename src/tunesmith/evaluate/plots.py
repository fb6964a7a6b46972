"""PNG plots for people who would rather look than read (matplotlib, Agg backend)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def loss_plot(path: str | Path, train: list[tuple[int, float]], evals: list[tuple[int, float]], title: str,
              ylabel: str = "cross-entropy per token", eval_label: str = "eval loss") -> Path:
    """Training loss per step and evaluation loss at each evaluation, in one PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        steps, losses = zip(*train)
        noisy = len(losses) >= 10
        ax.plot(steps, losses, label="train loss", color="#4C72B0", linewidth=1.0, alpha=0.35 if noisy else 0.9)
        if noisy:
            ax.plot(steps, smooth(losses), label="train loss (moving average)", color="#4C72B0", linewidth=1.8)
    if evals:
        steps, losses = zip(*evals)
        ax.plot(steps, losses, "o-", label=eval_label, color="#DD8452", linewidth=1.6)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)


def smooth(values: list[float], window: int = 0) -> list[float]:
    """Trailing moving average (window ~ a tenth of the run) so a noisy curve shows its trend."""
    window = window or max(2, len(values) // 10)
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def confusion_plot(path: str | Path, matrix: list[list[int]], names: list[str], title: str) -> Path:
    """Confusion matrix as a heat map with counts, rows = true class, columns = predicted (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    size = max(4.0, 0.9 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.85), dpi=110)
    ax.imshow(matrix, cmap="Blues")
    peak = max((v for row in matrix for v in row), default=0)
    for t, row in enumerate(matrix):
        for p, value in enumerate(row):
            ax.text(p, t, str(value), ha="center", va="center", color="white" if value > peak / 2 else "black")
    ax.set_xticks(range(len(names)), labels=names, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), labels=names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    return save_figure(fig, path)


def margin_histogram(path: str | Path, margins: dict[str, list[float]], title: str,
                     xlabel: str = "score(chosen) - score(rejected)") -> Path:
    """Histograms of per-pair margins (one per label, e.g. before/after training); right of 0 = ranked correctly."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    values = [v for series in margins.values() for v in series]
    low, high = (min(values), max(values)) if values else (-1.0, 1.0)
    bins = [low + (high - low) * i / 40 for i in range(41)] if high > low else 40
    for (label, series), color in zip(margins.items(), ("#8C8C8C", "#4C72B0", "#DD8452")):
        if series:
            right = sum(1 for v in series if v > 0) / len(series)
            ax.hist(series, bins=bins, alpha=0.55, color=color, label=f"{label}: {right:.1%} > 0, mean {sum(series) / len(series):+.3f}")
    ax.axvline(0.0, color="black", linewidth=1.0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("pairs")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)


def rl_plot(path: str | Path, records: list[dict], title: str) -> Path:
    """Mean reward, KL to the reference and reply length per RL step, stacked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    panels = [("reward_mean", "mean reward"), ("kl", "KL to reference (nats/reply)"), ("length_mean", "reply tokens")]
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 7), dpi=110, sharex=True)
    for ax, (key, label) in zip(axes, panels):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, color="#4C72B0", linewidth=1.0, alpha=0.4 if len(values) >= 10 else 0.9)
            if len(values) >= 10:
                ax.plot(steps, smooth(list(values)), color="#4C72B0", linewidth=1.8)
        if key == "reward_mean":
            evals = [(r["step"], r["eval_reward"]) for r in records if "eval_reward" in r]
            if evals:
                ax.plot(*zip(*evals), "o-", color="#DD8452", label="held-out prompts (greedy)")
                ax.legend()
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("RL step")
    axes[0].set_title(title)
    fig.tight_layout()
    return save_figure(fig, path)


def save_figure(fig, path: Path) -> Path:
    """Write a figure as a PNG atomically (temp file, then rename) and close it."""
    import matplotlib.pyplot as plt

    fd, tmp = tempfile.mkstemp(suffix=".png", dir=path.parent)
    os.close(fd)
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path
