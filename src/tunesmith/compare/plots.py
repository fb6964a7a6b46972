"""The report's two PNGs (matplotlib, Agg): quality against cost with interval bars, and per-route bars."""

from __future__ import annotations

from pathlib import Path

from tunesmith.evaluate.plots import save_figure


def quality_cost_plot(path: str | Path, points: list[tuple[str, float, float, float, float]], xlabel: str, ylabel: str,
                      title: str) -> Path:
    """One labelled point per (label, cost, quality, low, high), error bars from low to high; cost on a log axis
    (routes differ by orders of magnitude). Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
    colors = plt.get_cmap("tab10")
    for i, (label, cost, quality, low, high) in enumerate(points):
        cost = max(cost, 0.1)
        ax.errorbar([cost], [quality], yerr=[[quality - low], [high - quality]], fmt="o", color=colors(i % 10),
                    capsize=4, markersize=7)
        ax.annotate(label, (cost, quality), textcoords="offset points", xytext=(7, 5), fontsize=9)
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return save_figure(fig, path)


def route_bars(path: str | Path, labels: list[str], panels: list[tuple[str, list[float], list[tuple[float, float]] | None]],
               title: str) -> Path:
    """Side-by-side horizontal bar charts, one panel per (title, values, optional (low, high) per value)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.0 * len(panels) + 1.5, 0.45 * len(labels) + 1.6), dpi=110,
                             sharey=True, squeeze=False)
    positions = list(range(len(labels)))
    for ax, (name, values, intervals) in zip(axes[0], panels):
        errors = None
        if intervals:
            errors = [[v - lo for v, (lo, _) in zip(values, intervals)], [hi - v for v, (_, hi) in zip(values, intervals)]]
        ax.barh(positions, values, xerr=errors, color="#4C72B0", alpha=0.85, capsize=3)
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3, axis="x")
        ends = [hi for _, hi in intervals] if intervals else values  # labels go past the error bar
        for y, v, end in zip(positions, values, ends):
            ax.annotate(f"{v:.3g}", (end, y), textcoords="offset points", xytext=(4, -3), fontsize=8)
        ax.set_xlim(0, max(max(ends), 1e-9) * 1.25)
    axes[0][0].set_yticks(positions, labels=labels)
    axes[0][0].invert_yaxis()
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)
