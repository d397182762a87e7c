"""What the merges that read unlabeled images share (RegMean, Fisher merging).

Both compute a statistic of each expert on its own task's unlabeled images, one expert at a
time, and merge once every expert has been seen; neither trains anything, so `rankone adapt
--method NAME` runs them in one pass (no steps, checkpoints or loss curve). Their output is
one image tower, adapted/<name>.safetensors, evaluated and exported like a static merge's.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from rankone.errors import RankoneError
from rankone.methods.base import Method, MethodModel, one_tower_model, pretrained_tower, register
from rankone.methods.merging import add_update
from rankone.models import load_visual, preprocess_for, visual_state
from rankone.options import Options, option
from rankone.progress import shown
from rankone.task_vectors import task_vector_path
from rankone.training import AdaptOptions, batch_indices, head_requests, images_only, task_heads, unlabeled_sets
from rankone.workspace import Workspace

# Adapt-stage options that only training methods use: given to a statistics merge they are an error, not ignored.
TRAINING_ONLY = ("resume", "save_every", "plot")
# (task) → that task's images, in batches on the device.
Batches = Callable[[str], Iterator[Tensor]]
# (workspace, method options, batches, heads by task or None, device) → the merged tower (`visual.*`).
Merge = Callable[[Workspace, Any, Batches, dict[str, Tensor] | None, torch.device], dict[str, Tensor]]


def examples_option() -> Any:
    return option(256, "Unlabeled images per task the statistics are computed on (FusionBench's default).", low=1)


def adapted_path(name: str) -> str:
    return f"adapted/{name}.safetensors"


def expert_towers(workspace: Workspace) -> Iterator[tuple[str, dict[str, Tensor]]]:
    """(task, θ0 + τ_task as `visual.*` tensors), one expert at a time in workspace task order."""
    base = visual_state(pretrained_tower(workspace))
    for task in workspace.tasks:
        yield task, add_update(base, workspace.load_tensors(task_vector_path(task)))


def tower_module(workspace: Workspace, tower: dict[str, Tensor], device: torch.device | str) -> nn.Module:
    """open_clip's image tower with `tower` loaded, on `device`, in eval mode."""
    return load_visual(workspace.architecture, tower).to(device).eval()


def chosen_images(size: int, task: str, examples: int, seed: int) -> list[int]:
    """The first `examples` positions (all, for a smaller folder) of `task`'s seeded order: adaptation's
    (`training.batch_indices`), so the same seed picks the same images."""
    return batch_indices(size, min(examples, size), seed, task, 0)


def adapt_with_statistics(workspace: Workspace, options: AdaptOptions, method_options: Any, name: str, merge: Merge,
                          needs_heads: bool = False) -> str:
    """`rankone adapt --method NAME` for a statistics merge: check the options, read the images, merge, write the tower."""
    for flag in TRAINING_ONLY:
        if getattr(options, flag):
            raise RankoneError(f"--{flag.replace('_', '-')}: not used by --method {name} (it trains nothing)")
    tasks = workspace.tasks
    if options.tasks and set(options.tasks) != set(tasks):
        raise RankoneError(f"--tasks: --method {name} merges every expert of the workspace ({', '.join(tasks)})")
    requests = head_requests(workspace, tasks, options.heads_source, options.classnames_from, options.classnames,
                             options.templates) if needs_heads else None
    unlabeled = unlabeled_sets(options.data, tasks, preprocess_for(workspace.architecture), note=options.note)
    heads = task_heads(workspace, requests, options.device) if requests is not None else None
    chosen = {task: chosen_images(len(dataset), task, method_options.examples, options.seed) for task, dataset in unlabeled.items()}
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   disable=not options.progress, console=Console(stderr=True))

    def batches(task: str) -> Iterator[Tensor]:
        loader = DataLoader(Subset(unlabeled[task], chosen[task]), batch_size=options.batch_size, num_workers=options.workers,
                            collate_fn=images_only)
        for batch in loader:
            yield batch.to(options.device)
            bar.update(progress_task, advance=batch.shape[0])

    began = time.perf_counter()
    with shown(bar):
        progress_task = bar.add_task(f"{name} statistics", total=sum(map(len, chosen.values())))
        tower = merge(workspace, method_options, batches, heads, torch.device(options.device))
    metadata = {"method": name, **method_options.record(), "seed": options.seed, "batch_size": options.batch_size,
                "tasks": tasks, "images": {task: len(positions) for task, positions in chosen.items()},
                "seconds": time.perf_counter() - began}
    if requests is not None:
        metadata["heads"] = {task: {"classnames": names, "templates": templates} for task, (names, templates) in requests.items()}
    relpath = adapted_path(name)
    with workspace.transaction() as staging:
        staging.save_tensors(relpath, {key: value.detach().cpu().contiguous() for key, value in tower.items()},
                             {"rankone": json.dumps(metadata)})
    return relpath


def stored_tower(workspace: Workspace, name: str) -> dict[str, Tensor]:
    """adapted/<name>.safetensors; a missing file names the adapt to run (`Workspace.require`)."""
    return workspace.load_tensors(adapted_path(name))


def load_stored_tower(workspace: Workspace, method: str, device: torch.device) -> MethodModel:
    """The eval loader: adapted/<method>.safetensors as one tower for every task."""
    return one_tower_model(workspace, stored_tower(workspace, method), method, device)


def statistics_merge(name: str, summary: str, row: int, options: type[Options], merge: Merge, needs_heads: bool = False) -> Method:
    """Register a merge computed from each expert's statistics on unlabeled images."""
    return register(Method(
        name=name, kind="adaptive", summary=summary, row=row, load=load_stored_tower, options=options,
        inputs=("base", "task-vectors"), eval_inputs=(), output=adapted_path(name),
        adapt=lambda workspace, adapt_options, method_options: adapt_with_statistics(
            workspace, adapt_options, method_options, name, merge, needs_heads),
        tower=lambda workspace: stored_tower(workspace, name),
    ))
