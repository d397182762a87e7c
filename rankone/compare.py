"""Every method the workspace can run, evaluated on the same heads and images: the paper's Table 1.

A method runs when the files it states it needs (`Method.eval_files`) are in the workspace;
oracles such as the perfect router run only when named with `--methods`. Rows come in the
registry's order (the paper's: references, static merges, adaptive merges, RankOne-MoE
last). Parameter counts are each method's image model (heads excluded, as in `rankone
eval`) relative to the pretrained image tower.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from safetensors import safe_open

from rankone import distributed, methods
from rankone.data import DataFolders
from rankone.errors import RankoneError
from rankone.evaluate import EvaluationOptions, evaluate, evaluation_inputs, fusionbench_report, labeled_data_root, report_path, write_report
from rankone.workspace import Workspace, producer_of

COMPARE_JSON = "compare.json"
COMPARE_MARKDOWN = "compare.md"
COMPARE_FUSIONBENCH = "compare.fusionbench.json"
INDIVIDUAL = "individual"
NEEDS_TASK_NOTE = "†: needs the task at inference (a model per task, or an oracle told the task)"


def method_label(row: dict[str, Any]) -> str:
    """A row's method name, marked † when the method needs the task at inference."""
    return row["method"] + (" †" if row.get("needs_task") else "")


def chosen_methods(workspace: Workspace, names: Sequence[str] | None) -> list[str]:
    """`--methods` (any runnable method, oracles included) or every available one, in row order."""
    available = methods.available_methods(workspace, include_oracles=bool(names))
    if not names:
        return available
    for name in names:
        method = methods.get(name, option="--methods")
        if name not in available:
            missing = method.missing_files(workspace)
            raise RankoneError(f"--methods: {name!r} cannot run in this workspace: it needs {missing[0]}, which is missing "
                               f"(run `{producer_of(missing[0])}`; runnable: {', '.join(available) or 'none'})")
    return [name for name in available if name in names]


def tower_parameters(workspace: Workspace) -> int:
    """Parameters of the pretrained image tower, the unit of the comparison's parameter column."""
    path = workspace.require("base.safetensors")
    total = 0
    # Shapes from the header: no need to load a full CLIP to count its image tower.
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():
            if key.startswith("visual."):
                count = 1
                for size in handle.get_slice(key).get_shape():
                    count *= size
                total += count
    return total


def relative(parameters: int, tower: int) -> str:
    """`1.30×`: a method's parameters as a multiple of the pretrained tower."""
    return f"{parameters / tower:.2f}×"


def compare(
    workspace: Workspace,
    data: DataFolders | Path | str | None,
    tasks: Sequence[str] | None = None,
    method_names: Sequence[str] | None = None,
    *,
    heads_source: str = EvaluationOptions.heads_source,
    classnames: dict[str, list[str]] | None = None,
    templates: dict[str, list[str]] | None = None,
    device: torch.device | str = "cpu",
    dtype: str = EvaluationOptions.dtype,
    batch_size: int = EvaluationOptions.batch_size,
    progress: bool = True,
    on_method=None,
) -> dict[str, Any]:
    """Evaluate every available method (or `method_names`) and write eval/<method>.json, compare.json, compare.md.

    `data` holds the labeled test images (None: the workspace's data/). Everything (new heads included) is committed in one transaction after the last
    evaluation, so a failure leaves the workspace as it was. `dtype` is the precision the
    image encoders run in, as for `rankone eval --dtype`. `on_method(name)` is called
    before each method (for the CLI). Returns the content of compare.json. Under several
    processes each evaluates its share of every task's images and rank 0 writes.
    """
    chosen = chosen_methods(workspace, method_names)
    if not chosen:
        raise RankoneError(f"{workspace.root}: no method can run here; run `rankone fetch` first")
    tasks = list(tasks) if tasks else workspace.tasks
    if len(set(tasks)) != len(tasks):
        raise RankoneError("--tasks: a task is given twice")
    data = labeled_data_root(workspace, data)
    tower = tower_parameters(workspace)
    # One transaction for new heads, every report and the table: a failure leaves no trace.
    with distributed.main_transaction(workspace) as staging:
        heads, datasets = evaluation_inputs(
            workspace, tasks, data, heads_source=heads_source, classnames=classnames, templates=templates,
            device=device, staging=staging,
        )
        reports: dict[str, dict[str, Any]] = {}
        for name in chosen:
            if on_method is not None:
                on_method(name)
            method_model = methods.load_method(workspace, name, device, dtype)
            reports[name] = evaluate(method_model, heads, datasets, device=device, batch_size=batch_size, progress=progress)
            del method_model
            if staging is not None:
                write_report(workspace, reports[name], staging)
        images = {task: len(found.paths) for task, found in datasets.items()}
        individual = individual_accuracy(workspace, reports, images)
        rows = [comparison_row(workspace, name, report, tower, individual) for name, report in reports.items()]
        summary = {"tasks": tasks, "images": images, "heads_source": heads_source, "dtype": dtype, "tower_parameters": tower,
                   "rows": rows}
        if staging is not None:
            staging.write_json(COMPARE_JSON, summary)
            staging.path(COMPARE_MARKDOWN).write_text(markdown_table(summary))
            staging.write_json(COMPARE_FUSIONBENCH, {name: fusionbench_report(report) for name, report in reports.items()})
    return summary


def individual_accuracy(workspace: Workspace, reports: dict[str, dict[str, Any]], images: dict[str, int]) -> dict[str, float] | None:
    """Each task's accuracy of its own expert on these images: from this comparison, or from an earlier
    eval/individual.json on the same number of images per task; None when neither has every task."""
    report = reports.get(INDIVIDUAL)
    if report is None and workspace.path(report_path(INDIVIDUAL)).is_file():
        report = workspace.read_json(report_path(INDIVIDUAL))
    if report is None:
        return None
    scores = report.get("tasks", {})
    if any(task not in scores or scores[task].get("n") != count or not scores[task]["accuracy"] for task, count in images.items()):
        return None
    return {task: float(scores[task]["accuracy"]) for task in images}


def comparison_row(workspace: Workspace, name: str, report: dict[str, Any], tower: int,
                   individual: dict[str, float] | None) -> dict[str, Any]:
    """One method's row: accuracy per task and averaged, normalized by the individual experts when known
    (accuracy / the task's own expert's, as the merging literature reports it), parameters, and the options
    its output file recorded, so the table can be reproduced from itself."""
    method = methods.get(name)
    accuracy = {task: result["accuracy"] for task, result in report["tasks"].items()}
    row: dict[str, Any] = {"method": name, "accuracy": accuracy, "average": report["average"],
                           "parameters": report["parameters"], "relative_parameters": report["parameters"] / tower,
                           "needs_task": method.needs_task}
    if individual is not None:
        row["normalized"] = {task: 100.0 * value / individual[task] for task, value in accuracy.items()}
        row["normalized_average"] = sum(row["normalized"].values()) / len(row["normalized"])
    row["options"] = {key: value for key, value in method.settings(workspace).items()
                      # How long a run took is no option that reproduces it.
                      if key not in ("method", "seconds") and isinstance(value, (bool, int, float, str))}
    return row


def markdown_table(summary: dict[str, Any]) -> str:
    """compare.json as a Markdown table: a row per method, a column per task, the average, the parameters."""
    tasks = summary["tasks"]
    normalized = all("normalized_average" in row for row in summary["rows"]) and bool(summary["rows"])
    lines = [
        f"Top-1 accuracy (%) on {len(tasks)} tasks; parameters relative to the pretrained image tower "
        f"({summary['tower_parameters']:,}), heads excluded.",
        "",
        "| Method | " + " | ".join(tasks) + " | Avg. |" + (" Norm. |" if normalized else "") + " Params |",
        "|---|" + "---:|" * (len(tasks) + 2 + normalized),
    ]
    for row in summary["rows"]:
        cells = [f"{row['accuracy'][task]:.1f}" for task in tasks] + [f"{row['average']:.1f}"]
        cells += [f"{row['normalized_average']:.1f}"] if normalized else []
        lines.append(f"| {method_label(row)} | " + " | ".join(cells) + f" | {relative(row['parameters'], summary['tower_parameters'])} |")
    if any(row.get("needs_task") for row in summary["rows"]):
        lines += ["", NEEDS_TASK_NOTE + "."]
    if normalized:
        lines += ["", "Norm.: the average over tasks of accuracy / the task's own expert's accuracy (%)."]
    return "\n".join(lines) + "\n"
