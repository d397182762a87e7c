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


def plot_routing(routing: dict[str, Any], path: Path) -> Path:
    """One heatmap per block: mean gate by whose images (rows) and whose experts (columns), as `eval --routing` reports it."""
    require_matplotlib()
    from matplotlib.figure import Figure

    experts, gates = routing["experts"], routing["gates"]
    rows = list(gates)
    blocks = len(next(iter(gates.values())))
    columns = min(blocks, 4)
    grid_rows = -(-blocks // columns)
    figure = Figure(figsize=(2.6 * columns + 1.0, 2.4 * grid_rows + 0.4), layout="constrained")
    axes = figure.subplots(grid_rows, columns, squeeze=False)
    largest = max(max(max(block) for block in per_block) for per_block in gates.values()) or 1.0
    for block in range(grid_rows * columns):
        axis = axes[block // columns][block % columns]
        if block >= blocks:
            axis.set_visible(False)
            continue
        image = axis.imshow([gates[task][block] for task in rows], vmin=0.0, vmax=largest, cmap="viridis", aspect="auto")
        axis.set_title(f"block {block}", fontsize=9)
        axis.set_xticks(range(len(experts)), experts, rotation=60, fontsize=7)
        axis.set_yticks(range(len(rows)), rows, fontsize=7)
    figure.colorbar(image, ax=axes, shrink=0.8, label="mean gate (rows: images' task, columns: experts' task)")
    figure.savefig(path, dpi=120)
    return path
