"""The figures `--plot` draws (PNG, matplotlib's object API): task-vector norms, loss curves.

matplotlib is an optional extra (`rankone[plot]`); `require_matplotlib` is called before any
work starts, so a missing matplotlib is one line and nothing is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rankone.errors import RankoneError


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise RankoneError("--plot: matplotlib is not installed; install it with `pip install 'rankone[plot]'`") from None


def plot_analysis(analysis: dict[str, Any], path: Path) -> Path:
    """A bar chart of mean attention vs MLP task-vector norm per block, saved as PNG."""
    require_matplotlib()
    # The object API, not pyplot: a library call must not switch the global backend.
    from matplotlib.figure import Figure

    blocks = [row["block"] for row in analysis["blocks"]]
    width = 0.4
    figure = Figure(figsize=(max(4.0, 0.5 * len(blocks) + 2), 3.2), layout="constrained")
    axes = figure.subplots()
    axes.bar([b - width / 2 for b in blocks], [row["attention"] for row in analysis["blocks"]], width, label="attention")
    axes.bar([b + width / 2 for b in blocks], [row["mlp"] for row in analysis["blocks"]], width, label="MLP")
    axes.set_xlabel("transformer block")
    axes.set_ylabel("mean ‖τ‖₂ over tasks")
    axes.set_xticks(blocks)
    # Above the axes: inside, it hides the tallest bars, which are the point of the figure.
    axes.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    figure.savefig(path, dpi=120)
    return path


def plot_curves(curves: dict[str, list[float]], path: Path, ylabel: str, first_step: int = 1) -> Path:
    """Loss curves (one line per name, step on x) saved as PNG."""
    require_matplotlib()
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.0, 3.2), layout="constrained")
    axes = figure.subplots()
    for name, values in curves.items():
        axes.plot(range(first_step, first_step + len(values)), values, label=name, linewidth=1.2)
    axes.set_xlabel("step")
    axes.set_ylabel(ylabel)
    if len(curves) > 1:
        axes.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=min(len(curves), 4), frameon=False)
    figure.savefig(path, dpi=120)
    return path
