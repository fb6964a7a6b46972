"""PNG plots for people who would rather look than read (matplotlib, Agg backend)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def loss_plot(path: str | Path, train: list[tuple[int, float]], evals: list[tuple[int, float]], title: str) -> Path:
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
        ax.plot(steps, losses, "o-", label="eval loss", color="#DD8452", linewidth=1.6)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy per token")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=path.parent)
    os.close(fd)
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


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
