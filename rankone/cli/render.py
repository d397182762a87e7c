"""What the commands print: rich tables and summary lines built from the stages' results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from rankone.compare import NEEDS_TASK_NOTE, method_label, relative
from rankone.pipeline import PlannedStep, Step
from rankone.workspace import Workspace


def presets_table(presets: list[tuple[str, str, int]]) -> Table:
    table = Table(title="presets")
    for column in ("name", "experts", "description"):
        table.add_column(column)
    for name, description, count in presets:
        table.add_row(name, str(count), description)
    return table


def fetch_table(workspace: Workspace) -> Table:
    manifest = workspace.manifest()
    experts = manifest["sources"]["experts"]
    table = Table(title=escape(f"{workspace.root}: {len(experts)} experts"))
    for column in ("task", "source", "revision", "test images"):
        table.add_column(column)
    base_entry = manifest["sources"]["base"]
    table.add_row("(base)", escape(base_entry["source"]), (base_entry.get("revision") or "")[:12], "")
    for task, entry in experts.items():
        images = manifest.get("datasets", {}).get(task, {}).get("images")
        table.add_row(escape(task), escape(entry["source"]), (entry.get("revision") or "")[:12], "" if images is None else str(images))
    return table


def analysis_table(analysis: dict[str, Any]) -> Table:
    table = Table(title=f"mean ‖τ‖₂ over {len(analysis['tasks'])} tasks")
    table.add_column("block", justify="right")
    table.add_column("attention", justify="right")
    table.add_column("MLP", justify="right")
    table.add_column("MLP / attention", justify="right")
    for row in analysis["blocks"]:
        ratio = row["mlp"] / row["attention"] if row["attention"] else float("inf")
        table.add_row(str(row["block"]), f"{row['attention']:.4f}", f"{row['mlp']:.4f}", f"{ratio:.2f}")
    return table


def kept_energy_table(report: dict[str, Any], k: int) -> Table:
    table = Table(title=f"fraction of ‖τ‖² kept by k={k}")
    tasks = list(next(iter(report["kept_energy"].values())))
    table.add_column("matrix")
    for task in tasks:
        table.add_column(escape(task), justify="right")
    for key, fractions in report["kept_energy"].items():
        table.add_row(key.removeprefix("visual.transformer.resblocks."), *(f"{fractions[task]:.3f}" for task in tasks))
    return table


def pool_counts(report: dict[str, Any]) -> list[str]:
    counts, tower = report["counts"], report["tower_parameters"]
    kept = [fraction for per_task in report["kept_energy"].values() for fraction in per_task.values()]
    return [
        f"kept ‖τ‖² per matrix and task: {min(kept):.3f} to {max(kept):.3f} (mean {sum(kept) / len(kept):.3f})",
        f"pretrained image tower  {tower:>14,}",
        f"rank-one pool           {counts['pool']:>14,}",
        f"routers                 {counts['routers']:>14,}",
        f"RankOne-MoE total       {counts['total']:>14,}  ({counts['total'] / tower:.4f}× the tower)",
    ]


def eval_table(report: dict[str, Any]) -> Table:
    table = Table(title=f"{report['method']}: top-1 accuracy" + (f" ({report['dtype']})" if report["dtype"] != "fp32" else ""))
    table.add_column("task")
    table.add_column("images", justify="right")
    table.add_column("accuracy %", justify="right")
    for task, result in report["tasks"].items():
        table.add_row(escape(task), str(result["n"]), f"{result['accuracy']:.2f}")
    table.add_section()
    table.add_row("average", "", f"{report['average']:.2f}")
    return table


def routing_table(routing: dict[str, Any]) -> Table:
    """Mean gate per (images of task, experts of task), averaged over blocks; each row's largest in bold."""
    experts = routing["experts"]
    blocks = len(next(iter(routing["gates"].values())))
    table = Table(title=f"mean gate α' by whose experts (columns) for whose images (rows), averaged over {blocks} blocks")
    table.add_column("images")
    for task in experts:
        table.add_column(escape(task), justify="right")
    own_task = routing.get("own_task", {})
    table.add_column("own task picked", justify="right")
    for task, per_block in routing["gates"].items():
        shares = [sum(block[index] for block in per_block) / len(per_block) for index in range(len(experts))]
        largest = max(shares)
        rates = own_task.get(task)
        picked = f"{100 * sum(rates) / len(rates):.0f}%" if rates else "–"
        table.add_row(escape(task), *(f"[bold]{share:.3f}[/bold]" if share == largest else f"{share:.3f}" for share in shares), picked)
    return table


def print_compare(console: Console, summary: dict[str, Any]) -> None:
    table = Table(title="top-1 accuracy (%)")
    table.add_column("method", no_wrap=True)
    for task in summary["tasks"]:
        table.add_column(escape(task), justify="right")
    table.add_column("average", justify="right")
    table.add_column("parameters", justify="right")
    for row in summary["rows"]:
        cells = [f"{row['accuracy'][task]:.1f}" for task in summary["tasks"]]
        table.add_row(escape(method_label(row)), *cells, f"{row['average']:.1f}", relative(row["parameters"], summary["tower_parameters"]))
    # One column per task: wider than 80 characters for many tasks, and truncated cells would hide numbers.
    Console(width=max(console.width, 50 + 11 * len(summary["tasks"]))).print(table)
    console.print(f"parameters: image model, heads excluded, relative to the pretrained image tower ({summary['tower_parameters']:,})")
    if any(row.get("needs_task") for row in summary["rows"]):
        console.print(NEEDS_TASK_NOTE)


def size(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1000 or unit == "GB":
            return f"{nbytes:,} {unit}" if unit == "B" else f"{nbytes:,.1f} {unit}"
        nbytes /= 1000
    return ""


def plan_line(index: int, planned: PlannedStep) -> str:
    """`3 run   build-pool  (options changed: k 8 → 4)` for `rankone run --dry-run`."""
    action = "run " if planned.run else "skip"
    processes = f" (on {planned.step.nproc} processes)" if planned.step.nproc > 1 and planned.run else ""
    return f"{index:>2} {action}  {planned.step.label:<28} {planned.reason}{processes}"


def stage_summary(step: Step, result: Any) -> list[str]:
    """A line or two after each stage of `rankone run`: what it measured."""
    if not isinstance(result, dict):
        return []
    name = step.stage.name
    if name == "eval" and "average" in result:
        return [f"{result['method']}: average {result['average']:.2f}% over {len(result['tasks'])} tasks"]
    if name == "compare" and "rows" in result:
        return [f"{row['method']:<18} {row['average']:6.1f}%   {relative(row['parameters'], result['tower_parameters'])}"
                + ("   (needs the task)" if row.get("needs_task") else "") for row in result["rows"]]
    if name == "build-pool" and "counts" in result:
        return [pool_counts(result)[0], f"pool {result['counts']['pool']:,} + routers {result['counts']['routers']:,} parameters "
                f"({result['counts']['total'] / result['tower_parameters']:.4f}× the tower)"]
    if name == "adapt" and "curve" in result:
        return adaptation_lines(result)
    if name == "export" and "out" in result:
        return [f"wrote {result['out']} ({result['method']}, {result.get('layout', 'artifact')}, {result['dtype']}, {result['bytes'] / 1e6:,.2f} MB)"]
    return []


def adaptation_lines(result: dict[str, Any]) -> list[str]:
    """adapt's summary: whether the loss went down, per task, and how fast."""
    if "images" in result:
        counts = ", ".join(f"{task} {count}" for task, count in result["images"].items())
        return [f"statistics of each expert on its own unlabeled images ({counts}), {result['seconds']:.1f} s"]
    if result.get("objective", "").startswith("none"):
        return ["training-free routers: nothing to train, the gates come from the pool itself"]
    if not result.get("loss"):
        return [f"no step to run: the routers are as the checkpoint left them at step {result.get('steps', 0)}"]
    (first, last), steps = result["loss"], f"steps {result['first_step']}-{result['steps']}"
    objective = result.get("objective", "mean entropy")
    lines = [f"loss (sum over tasks of the {objective}) {first:.4f} → {last:.4f} over {steps}"]
    lines.append(f"{objective}, first → last step: " + ", ".join(f"{task} {start:.3f} → {end:.3f}" for task, (start, end) in result["entropy"].items()))
    rate = result.get("images_per_second")
    lines.append((f"{rate:,.1f} images/s, " if rate else "") + f"{result['seconds']:.1f} s")
    return lines


def command_arguments(step: Step, workspace: Path, device: str) -> list[str]:
    """The `rankone STAGE ...` arguments that run a pipeline step by hand (options at their default left out)."""
    return step.arguments(workspace, device)
