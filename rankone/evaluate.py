"""Top-1 accuracy per task through the zero-shot heads, and the JSON report.

Report schema (`eval/<method>.json`):
`{"method": str, "tasks": {task: {"accuracy": percent, "n": images}}, "average": percent,
"parameters": int, "dtype": "fp32" | "fp16" | "bf16"}`; the average is the unweighted mean
of the task accuracies; `dtype` is the precision the image encoder ran in (heads and logits
are always fp32). With `routing` (RankOne-MoE only) the report also has
`"routing": {"experts": [task, ...], "gates": {task: [[share, ...] per block]},
"own_task": {task: [rate per block]}}`: for each task's images, the mean α' each task's experts
get (`module.expert_shares`), block by block, and the fraction of those images whose own
task's experts get the largest total gate (`module.own_task_rate`; a task the pool has no
experts for has none).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.data import Subset
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text

from rankone import distributed
from rankone.data import DataFolders, ImageDataset, LabeledImages, check_batch_size, data_folders, image_loader, labeled_images
from rankone.errors import RankoneError
from rankone.heads import HEAD_SOURCES, classify_logits, fusionbench_classnames_and_templates, heads_for_tasks
from rankone.methods import MethodModel, load_method
from rankone.methods.rankone.module import expert_shares, own_task_rate, recording_gates, routed_tasks
from rankone.plots import plot_routing
from rankone.models import DTYPES, FULL_PRECISION
from rankone.options import Options, option
from rankone.progress import shown
from rankone.workspace import Staging, Workspace

EVAL_DIR = "eval"


_DTYPE_HELP = "Precision the image encoder runs in: fp32, fp16 or bf16 (heads and logits stay fp32)."


@dataclass(frozen=True)
class EvaluationOptions(Options):
    """What eval and compare share: the labeled images, the heads, the batch and the precision."""

    data: DataFolders | None = option(None, "Labeled test images DIR/<task>/<class>/<image> (default: WORKSPACE/data)."
                                      " Several folders are searched in order for <task>/; TASK=DIR names one task's "
                                      "own folder. Repeatable.",
                               existing_folder=True)
    tasks: list[str] | None = option(None, "Tasks: --tasks a b, --tasks a,b (default: every workspace task).", comma_separated=True)
    heads_source: str = option("builtin", "builtin (class names from the data folders or files, rankone's templates) or "
                               "fusionbench (FusionBench's lists; needed for its checkpoints).", choices=HEAD_SOURCES)
    classnames: list[str] | None = option(None, "Class names, one per line: FILE (one task) or TASK=FILE; repeatable.")
    templates: list[str] | None = option(None, "Templates with {}, one per line: FILE (one task) or TASK=FILE; repeatable.")
    batch_size: int = option(64, "Images per forward pass.", low=1)
    dtype: str = option(FULL_PRECISION, _DTYPE_HELP, choices=tuple(DTYPES))



class ImagesPerSecond(ProgressColumn):
    def render(self, task) -> Text:
        # Completed over elapsed, not rich's windowed estimate: that needs several updates.
        elapsed = task.finished_time if task.finished else task.elapsed
        if not elapsed or not task.completed:
            return Text("")
        return Text(f"{task.completed / elapsed:,.1f} img/s", style="progress.data.speed")


def eval_progress(console: Console | None = None) -> Progress:
    """A rich progress bar counting images, with throughput."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        ImagesPerSecond(),
        TimeRemainingColumn(),
        console=console or Console(stderr=True),
    )


class TaskScore(NamedTuple):
    correct: int
    total: int
    loss: float  # mean cross-entropy per image, in nats


def task_accuracy(
    encoder: torch.nn.Module,
    head: torch.Tensor,
    images: LabeledImages,
    transform,
    *,
    device: torch.device | str,
    batch_size: int = EvaluationOptions.batch_size,
    advance=None,
) -> TaskScore:
    """Top-1 predictions of `encoder` + `head` on `images` (correct, total) and the mean cross-entropy.

    Under several processes the batches are dealt round-robin (`distributed.own_positions`), so
    every image is in the same batch as in one process (per-batch routing sees the same batches),
    and the per-batch counts are summed over the processes: the same numbers, the loss summed in
    the same order. `advance(n)` (rank 0's bar) counts the images of every process's batches.
    """
    if head.shape[0] != len(images.classnames):
        raise RankoneError(f"head for task {images.task!r}: has {head.shape[0]} classes, the data has {len(images.classnames)}")
    dataset = ImageDataset(images.paths, images.labels, transform)
    count = len(dataset)
    batches = -(-count // batch_size)
    own = distributed.own_positions(batches)
    positions = [index for batch in own for index in range(batch * batch_size, min((batch + 1) * batch_size, count))]
    loader = image_loader(Subset(dataset, positions), batch_size)
    head = head.to(device)
    # Rows: correct, images, summed cross-entropy; a column per batch (float64 holds the counts exactly).
    scores = torch.zeros(3, batches, dtype=torch.float64)
    encoder.eval()
    with torch.no_grad():
        for position, (batch, labels) in zip(own, loader):
            logits = classify_logits(encoder(batch.to(device)), head)
            scores[0, position] = int((logits.argmax(dim=-1).cpu() == labels).sum())
            scores[1, position] = len(labels)
            scores[2, position] = float(F.cross_entropy(logits.float().cpu(), labels, reduction="sum"))
            if advance is not None:
                advance(min((position + own.step) * batch_size, count) - position * batch_size)
    correct, total, losses = distributed.sum_tensor(scores).tolist()
    return TaskScore(int(sum(correct)), int(sum(total)), sum(losses) / sum(total))


def evaluate(
    method_model: MethodModel,
    heads: dict[str, torch.Tensor],
    datasets: dict[str, LabeledImages],
    *,
    device: torch.device | str = "cpu",
    batch_size: int = EvaluationOptions.batch_size,
    progress: bool = True,
    routing: bool = False,
) -> dict[str, Any]:
    """Top-1 accuracy (percent) of `method_model` on every task of `datasets`, as the report dict.

    `routing` also records, per task, how the routers share their gates among the tasks'
    experts (see the module docstring); the method must be RankOne-MoE.
    """
    if not datasets:
        raise RankoneError("eval: no tasks to evaluate")
    check_batch_size(batch_size)
    if method_model.preprocess is None:
        raise RankoneError(f"method {method_model.name!r}: has no image preprocessing (load it with methods.load_method)")
    for task in datasets:
        if task not in heads:
            raise RankoneError(f"heads: no head for task {task!r}")
    results: dict[str, dict[str, float | int]] = {}
    gates: dict[str, list[list[float]]] = {}
    own_task: dict[str, list[float]] = {}
    expert_tasks: list[str] = []
    bar = eval_progress() if progress and distributed.world().is_main else None
    with shown(bar) if bar is not None else nullcontext():
        for task, images in datasets.items():
            advance = None
            if bar is not None:
                bar_task = bar.add_task(f"{method_model.name or 'eval'} · {task}", total=len(images.paths))
                advance = lambda n, bar_task=bar_task: bar.advance(bar_task, n)  # noqa: E731
            encoder = method_model.encoder_for_task(task)
            if routing:
                expert_tasks = routed_tasks(encoder)
            with recording_gates(encoder) if routing else nullcontext() as blocks:
                score = task_accuracy(
                    encoder, heads[task], images, method_model.preprocess, device=device, batch_size=batch_size, advance=advance
                )
            results[task] = {"accuracy": 100.0 * score.correct / score.total, "n": score.total, "loss": score.loss}
            if routing:
                # Each process holds the gates of its own batches: put every batch back in its place.
                blocks = [torch.cat(distributed.interleave(per_rank)) for per_rank in zip(*distributed.gather(blocks))]
                gates[task] = [expert_shares(block, len(expert_tasks)).tolist() for block in blocks]
                if task in expert_tasks:
                    own_task[task] = [own_task_rate(block, len(expert_tasks), expert_tasks.index(task)) for block in blocks]
    average = sum(result["accuracy"] for result in results.values()) / len(results)
    report = {"method": method_model.name, "tasks": results, "average": average, "parameters": int(method_model.parameters),
              "dtype": method_model.dtype}
    if routing:
        report["routing"] = {"experts": expert_tasks, "gates": gates, "own_task": own_task}
    return report


def fusionbench_report(report: dict[str, Any]) -> dict[str, Any]:
    """An eval report in the layout of FusionBench's CLIP task pool, so the two tools' outputs can be diffed.

    model_info (the tower's parameters, all counted as trainable as FusionBench counts a loaded
    model), per task `accuracy` as a fraction and `loss` (mean cross-entropy), and their
    averages. FusionBench's loss is the mean of per-batch means; this is the mean over images,
    the same number when every batch is full.
    """
    parameters = int(report["parameters"])
    found: dict[str, Any] = {"model_info": {"trainable_params": parameters, "all_params": parameters,
                                            "trainable_percentage": 1.0, "name": report["method"]}}
    for task, result in report["tasks"].items():
        found[task] = {"accuracy": result["accuracy"] / 100.0, "loss": result["loss"]}
    scores = [found[task] for task in report["tasks"]]
    found["average"] = {"accuracy": sum(score["accuracy"] for score in scores) / len(scores),
                        "loss": sum(score["loss"] for score in scores) / len(scores)}
    return found


def labeled_data_root(workspace: Workspace, data: DataFolders | Path | str | None) -> DataFolders:
    """`--data` (folders, TASK=DIR pairs), or the workspace's data/ (test splits from `rankone fetch --dataset`);
    every folder must exist."""
    folders = data_folders(data) if data is not None else data_folders(workspace.path("data"))
    return folders.require_folders("--data", "no such folder (fetch test splits with `rankone fetch --dataset`, or pass --data DIR)")


def check_tasks(workspace: Workspace, tasks: Sequence[str]) -> None:
    """Every task must be a workspace task; the error lists the known ones."""
    known = workspace.tasks
    for task in tasks:
        if task not in known:
            raise RankoneError(f"--tasks: unknown task {task!r}; the workspace has {', '.join(known) or 'no tasks'}")
    if len(set(tasks)) != len(tasks):
        raise RankoneError("--tasks: a task is given twice")


def evaluation_inputs(
    workspace: Workspace,
    tasks: Sequence[str],
    data_root: DataFolders | Path | str,
    *,
    heads_source: str = EvaluationOptions.heads_source,
    classnames: dict[str, list[str]] | None = None,
    templates: dict[str, list[str]] | None = None,
    device: torch.device | str = "cpu",
    staging: Staging | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, LabeledImages]]:
    """Heads and labeled test images for `tasks`.

    `builtin`: class names from the data folders, templates from the built-in table.
    `fusionbench`: both from FusionBench's lists (what its checkpoints were trained with).
    `classnames`/`templates` ({task: list}) override either source for single tasks.
    New heads go into `staging` when given (see `heads.heads_for_tasks`).
    """
    if heads_source not in HEAD_SOURCES:
        raise RankoneError(f"--heads-source {heads_source!r}: choose from {', '.join(HEAD_SOURCES)}")
    check_tasks(workspace, tasks)
    classnames, templates = classnames or {}, templates or {}
    for flag, given in (("--classnames", classnames), ("--templates", templates)):
        for task in given:
            if task not in tasks:
                raise RankoneError(f"{flag}: task {task!r} is not among the evaluated tasks ({', '.join(tasks)})")
    datasets: dict[str, LabeledImages] = {}
    requests: dict[str, tuple[list[str], list[str] | None]] = {}
    for task in tasks:
        task_classnames: list[str] | None = None
        task_templates: list[str] | None = None
        if heads_source == "fusionbench":
            task_classnames, task_templates = fusionbench_classnames_and_templates(task)
        task_classnames = classnames.get(task, task_classnames)
        task_templates = templates.get(task, task_templates)
        datasets[task] = labeled_images(data_root, task, task_classnames)
        requests[task] = (datasets[task].classnames, task_templates)
    heads = heads_for_tasks(workspace, requests, device, staging=staging)
    return heads, datasets


def report_path(method: str) -> str:
    return f"{EVAL_DIR}/{method}.json"


def write_report(workspace: Workspace, report: dict[str, Any], staging: Staging | None = None) -> str:
    """`eval/<method>.json` (whatever its dtype: the report says which), written atomically
    (into `staging` when given) and recorded in the manifest."""
    relpath = report_path(report["method"])
    if staging is not None:
        staging.write_json(relpath, report)
        return relpath
    with workspace.transaction() as own:
        own.write_json(relpath, report)
    return relpath


def evaluate_workspace(
    workspace: Workspace,
    method: str,
    tasks: Sequence[str] | None,
    data_root: DataFolders | Path | str,
    *,
    heads_source: str = EvaluationOptions.heads_source,
    classnames: dict[str, list[str]] | None = None,
    templates: dict[str, list[str]] | None = None,
    device: torch.device | str = "cpu",
    dtype: str = EvaluationOptions.dtype,
    batch_size: int = EvaluationOptions.batch_size,
    progress: bool = True,
    routing: bool = False,
    on_datasets: Callable[[dict[str, LabeledImages]], None] | None = None,
    plot: bool = False,
) -> tuple[dict[str, Any], str]:
    """The whole eval stage: (report, relpath of eval/<method>.json); `dtype` as for `methods.load_method`.

    New heads and the report are committed together, so a failed run leaves no trace. Under
    several processes each evaluates its share of the images and rank 0 writes.
    """
    tasks = list(tasks) if tasks else workspace.tasks
    check_tasks(workspace, tasks)
    # The method first: a missing merge should fail before any head is built.
    method_model = load_method(workspace, method, device, dtype)
    with distributed.main_transaction(workspace) as staging:
        heads, datasets = evaluation_inputs(
            workspace, tasks, data_root, heads_source=heads_source, classnames=classnames, templates=templates,
            device=device, staging=staging,
        )
        if on_datasets is not None:
            on_datasets(datasets)
        report = evaluate(method_model, heads, datasets, device=device, batch_size=batch_size, progress=progress, routing=routing)
        relpath = report_path(report["method"])
        if staging is not None:
            write_report(workspace, report, staging)
            if plot and routing:
                plot_routing(report["routing"], staging.path(routing_plot_path(relpath)))
    return report, relpath


def routing_plot_path(report_relpath: str) -> str:
    """Where `eval --routing --plot` draws the gates: eval/<method>-routing.png, next to the report."""
    return report_relpath.removesuffix(".json") + "-routing.png"
