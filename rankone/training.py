"""Test-time adaptation by entropy minimisation, shared by every adaptive method (the adapt stage).

docs/method.md §9: each step, for each task one batch of its unlabeled images, logits
through that task's head, loss = mean Shannon entropy of softmax(logits); the losses are
summed over tasks; Adam. Only the method's own parameters (routers, coefficients) train.

Batches are a pure function of (seed, task, step): step s of task t takes positions
s·B … s·B+B−1 of an endless sequence of per-epoch permutations, each seeded by
(seed, task, epoch). A resumed run therefore sees exactly the batches an uninterrupted run
sees, with no RNG state to save; checkpoints hold the trained tensors, Adam's state and
the losses so far.
"""

from __future__ import annotations

import json
import re
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from rankone import distributed, numerics
from rankone.data import DataFolders, ImageDataset, data_folders, labeled_images, unlabeled_images
from rankone.errors import RankoneError
from rankone.heads import HEAD_SOURCES, classify_logits, fusionbench_classnames_and_templates, heads_for_tasks, read_lines
from rankone.models import preprocess_for
from rankone.options import Options, option, seed_option
from rankone.plots import plot_curves, require_matplotlib
from rankone.progress import shown
from rankone.workspace import Workspace, fault_point, read_tensors_metadata

Checkpoint = Callable[[int, dict], None]


def batch_entropy(logits: Tensor) -> Tensor:
    """Mean over the batch of the Shannon entropy (nats) of softmax(logits)."""
    # softmax rather than log_probs.exp(): torch.exp's CPU kernel differs by CPU vendor (rankone.numerics).
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return -(torch.softmax(logits.float(), dim=-1) * log_probs).sum(dim=-1).mean()


def _stream_seed(seed: int, task: str, epoch: int) -> int:
    return (seed * 0x9E3779B1 + zlib.crc32(task.encode()) * 0x85EBCA77 + epoch * 0xC2B2AE3D) % (2**63 - 1)


def batch_indices(size: int, batch_size: int, seed: int, task: str, step: int) -> list[int]:
    """The dataset indices of `task`'s batch at `step` (a pure function of its arguments)."""
    indices, permutation, epoch = [], None, -1
    for position in range(step * batch_size, (step + 1) * batch_size):
        if position // size != epoch:
            epoch = position // size
            generator = torch.Generator().manual_seed(_stream_seed(seed, task, epoch))
            permutation = torch.randperm(size, generator=generator).tolist()
        indices.append(permutation[position % size])
    return indices


class StepBatches(Sampler[list[int]]):
    """Batch sampler yielding `batch_indices` for steps start … stop−1; with `rank` of `ranks`
    processes, this process's share of each (positions rank, rank + ranks, …)."""

    def __init__(self, size: int, batch_size: int, seed: int, task: str, start: int, stop: int, rank: int = 0, ranks: int = 1) -> None:
        self.size, self.batch_size, self.seed, self.task = size, batch_size, seed, task
        self.start, self.stop, self.rank, self.ranks = start, stop, rank, ranks

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.stop):
            yield batch_indices(self.size, self.batch_size, self.seed, self.task, step)[self.rank :: self.ranks]


def images_only(items: list) -> Tensor:
    """Collate that keeps the image of (image, label) items, or the items themselves."""
    return torch.stack([item[0] if isinstance(item, (tuple, list)) else item for item in items])


def minimise_entropy(
    classify: Callable[[Tensor, str], Tensor],
    parameters: list[nn.Parameter],
    unlabeled: dict[str, Dataset],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: torch.device | str,
    save_every: int = 0,
    checkpoint: Checkpoint | None = None,
    resume: dict | None = None,
    progress: bool = True,
    workers: int = 0,
    objective: Callable[[Tensor, str], Tensor] | None = None,
) -> TrainingLog:
    """Train `parameters` with Adam to minimise Σ_tasks mean entropy of classify(images, task)
    (or Σ_tasks objective(images, task), when given: the task routers' cross-entropy).

    Returns the loss of every step (including those before `resume`), each task's mean
    entropy at every step this call ran, and the throughput. `checkpoint(step,
    state)` is called every `save_every` steps and after the last one, with state = {"step", "parameters" (list of
    tensors), "optimizer" (Adam's state_dict), "losses"}; passing such a state as `resume`
    continues the run exactly.

    Under several processes (`distributed.world()`) each takes its share of every batch; its
    loss is its share's mean scaled by share / batch size, so the gradients summed over the
    processes (one all-reduce per step) and the logged losses are those of the whole batch, as
    in one process. Rank 0 alone checkpoints and draws the bar; every process returns the same losses.
    """
    if steps < 0 or batch_size < 1 or lr <= 0:
        raise RankoneError(f"adapt: need steps ≥ 0, batch size ≥ 1 and lr > 0 (got {steps}, {batch_size}, {lr})")
    current = distributed.world()
    if batch_size < current.size:
        raise RankoneError(f"--batch-size {batch_size}: fewer images per task than processes ({current.size}); "
                           f"each process needs at least one (the batch is split among them)")
    empty = [task for task, dataset in unlabeled.items() if len(dataset) == 0]
    if not unlabeled or empty:
        raise RankoneError(f"adapt: no unlabeled images for task {empty[0] if empty else '(none given)'}")
    device = torch.device(device)
    optimizer = numerics.adam(parameters, device, lr=lr)
    start, losses = 0, []
    if resume is not None:
        if len(resume["parameters"]) != len(parameters):
            raise RankoneError("--resume: checkpoint holds a different number of trained tensors")
        with torch.no_grad():
            for parameter, saved in zip(parameters, resume["parameters"]):
                if parameter.shape != saved.shape:
                    raise RankoneError(f"--resume: checkpoint tensor of shape {tuple(saved.shape)} does not fit {tuple(parameter.shape)}")
                parameter.copy_(saved.to(parameter.device, parameter.dtype))
        optimizer.load_state_dict(resume["optimizer"])
        start, losses = int(resume["step"]), list(resume["losses"])[: int(resume["step"])]
    loaders = {
        task: iter(DataLoader(dataset, batch_sampler=StepBatches(len(dataset), batch_size, seed, task, start, steps,
                                                                 current.rank, current.size),
                              num_workers=workers, collate_fn=images_only))
        for task, dataset in unlabeled.items()
    }
    bar = _progress(progress and current.is_main)
    began, images = time.perf_counter(), 0
    task_losses: dict[str, list[float]] = {task: [] for task in loaders}
    with shown(bar):
        # A resumed run says where it picked up: the bar alone would look like a fresh run that sped through.
        description = f"adapt (resumed at step {start})" if start else "adapt"
        bar_task = bar.add_task(description, total=steps, completed=start, loss=float("nan"), rate=0.0)
        for step in range(start, steps):
            optimizer.zero_grad(set_to_none=True)
            values = []
            for task, loader in loaders.items():
                batch = next(loader).to(device, non_blocking=True)
                # One backward per task frees each task's graph early; gradients add up to those of the sum.
                loss = objective(batch, task) if objective is not None else batch_entropy(classify(batch, task))
                if current.distributed:
                    # Both objectives are means over images: a share's sum over the whole batch's size.
                    loss = loss * (batch.shape[0] / batch_size)
                loss.backward()
                values.append(float(loss.detach()))
                images += batch_size  # the whole batch, over every process
            if current.distributed:
                fault_point(f"rank{current.rank}-step-{step + 1}")
                distributed.sum_gradients(parameters)
                values = distributed.sum_floats(values)
            for task, value in zip(loaders, values):
                task_losses[task].append(value)
            total = sum(values)
            optimizer.step()
            losses.append(total)
            rate = images / max(time.perf_counter() - began, 1e-9)
            bar.update(bar_task, completed=step + 1, loss=total, rate=rate)
            # The last step is checkpointed too, so a finished run can be extended with --resume --steps N.
            if checkpoint is not None and current.is_main and save_every > 0 and ((step + 1) % save_every == 0 or step + 1 == steps):
                checkpoint(step + 1, {
                    "step": step + 1,
                    "parameters": [parameter.detach().cpu().clone() for parameter in parameters],
                    "optimizer": optimizer.state_dict(),
                    "losses": list(losses),
                })
    return TrainingLog(losses=losses, task_losses=task_losses, start=start, images=images, seconds=time.perf_counter() - began)


@dataclass
class TrainingLog:
    """What an adaptation did: the loss (Σ over tasks of the mean entropy, or of `objective`) of every step,
    from step 1 even when resumed; each task's at the steps this run made (from `start`); throughput."""

    losses: list[float]
    task_losses: dict[str, list[float]]
    start: int = 0
    images: int = 0
    seconds: float = 0.0
    objective: str = "mean entropy"

    def curve(self) -> dict[str, Any]:
        """The loss curve as JSON: what `rankone adapt` writes next to the trained tensors."""
        return {"objective": self.objective, "losses": self.losses, "task_losses": self.task_losses, "first_step": self.start + 1,
                "images_per_second": self.images / self.seconds if self.seconds > 0 else None, "seconds": self.seconds}


def _progress(enabled: bool):
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[rate]:.1f} img/s"),
        TimeRemainingColumn(), disable=not enabled, transient=False, console=Console(stderr=True),
    )


@dataclass(frozen=True)
class AdaptOptions(Options):
    """The adapt stage's options, shared by every adaptive method (each adds its own, such as the lr)."""

    data: DataFolders | None = option(None, "Unlabeled images, DATA/<task>/**/<image>. Several folders are searched in order "
                                      "for <task>/; TASK=DIR names one task's own folder. Repeatable. Needed by every "
                                      "method but RankOne-MoE's training-free --router subspace.", existing_folder=True)
    steps: int = option(1000, "Adam steps (each sees one batch of every task).", low=0)
    batch_size: int = option(16, "Images per task per step.", low=1)
    seed: int = seed_option("Seed for the initialisation (routers, coefficients) and the data order.")
    tasks: list[str] | None = option(None, "Tasks to adapt on (repeat or comma-separate); default all.", comma_separated=True)
    save_every: int = option(0, "Checkpoint every N steps (0: never).", low=0)
    resume: bool = option(False, "Continue from the last checkpoint.")
    heads_source: str = option("builtin", "builtin (class names from the data folders or files, rankone's templates) or "
                               "fusionbench (FusionBench's lists; needed for its checkpoints).", choices=HEAD_SOURCES)
    classnames_from: DataFolders | None = option(None, "Labeled folder DIR/<task>/<class>/ to take class names from "
                                                 "(several, or TASK=DIR, as for --data).", existing_folder=True)
    classnames: dict[str, str] = option(help="TASK=FILE, one class name per line; repeatable.", default_factory=dict, metavar="TASK=FILE")
    templates: dict[str, str] = option(help="TASK=FILE, one template with {} per line; repeatable.", default_factory=dict, metavar="TASK=FILE")
    workers: int = option(0, "Image-loading worker processes.", low=0)
    # Run-time context, not options.
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    progress: bool = True
    plot: bool = option(False, "Also draw the loss curve (total and per task) as adapted/<method>-curve.png (needs matplotlib).")
    # Where notes go (files skipped in --data); the CLI prints them on stderr.
    note: Callable[[str], None] = field(default=lambda line: None, compare=False)


# ---- checkpoints as safetensors + JSON (no pickle) --------------------------------------

def checkpoint_files(state: dict, config: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """A checkpoint state as tensors plus string metadata for one safetensors file."""
    tensors = {f"parameters.{index}": tensor for index, tensor in enumerate(state["parameters"])}
    optimizer = state["optimizer"]
    scalars: dict[str, dict[str, Any]] = {}
    for index, slots in optimizer["state"].items():
        for name, value in slots.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer.{index}.{name}"] = value.detach().cpu()
            else:
                scalars.setdefault(str(index), {})[name] = value
    meta = {"step": state["step"], "losses": state["losses"], "param_groups": optimizer["param_groups"], "scalars": scalars, "config": config}
    return tensors, {"rankone": json.dumps(meta)}


def checkpoint_state(tensors: dict[str, Tensor], metadata: dict[str, str]) -> tuple[dict, dict[str, Any]]:
    """Inverse of `checkpoint_files`: (state, config)."""
    meta = json.loads(metadata["rankone"])
    count = sum(1 for name in tensors if name.startswith("parameters."))
    parameters = [tensors[f"parameters.{index}"] for index in range(count)]
    slots: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        if name.startswith("optimizer."):
            _, index, slot = name.split(".", 2)
            slots.setdefault(int(index), {})[slot] = tensor
    for index, values in meta["scalars"].items():
        slots.setdefault(int(index), {}).update(values)
    optimizer = {"state": slots, "param_groups": meta["param_groups"]}
    return {"step": meta["step"], "parameters": parameters, "optimizer": optimizer, "losses": meta["losses"]}, meta["config"]


def checkpoint_dir(method: str) -> str:
    return f"adapted/{method}-checkpoints"


def save_checkpoint(workspace: Workspace, method: str, step: int, state: dict, config: dict[str, Any]) -> str:
    """Commit one checkpoint on its own, so an interrupted run keeps it."""
    relpath = f"{checkpoint_dir(method)}/step-{step}.safetensors"
    tensors, metadata = checkpoint_files(state, config)
    if distributed.world().is_main:  # the others hold the same state
        with workspace.transaction() as staging:
            staging.save_tensors(relpath, tensors, metadata)
    return relpath


def latest_checkpoint(workspace: Workspace, method: str, config: dict[str, Any]) -> dict | None:
    """The last checkpoint of `method`, after checking it was made with the same settings."""
    pattern = re.compile(rf"^{re.escape(checkpoint_dir(method))}/step-(\d+)\.safetensors$")
    found = [(int(match.group(1)), relpath) for relpath in workspace.manifest().get("files", {})
             if (match := pattern.match(relpath))]
    if not found:
        return None
    _, relpath = max(found)
    state, saved = checkpoint_state(workspace.load_tensors(relpath), read_tensors_metadata(workspace.path(relpath)))
    for key, value in config.items():
        if key != "steps" and saved.get(key) != value:
            raise RankoneError(f"{workspace.path(relpath)}: made with {key}={saved.get(key)!r}, this run has {value!r}; "
                               f"rerun without --resume or with the same options")
    return state


def resume_state(workspace: Workspace, method: str, options: AdaptOptions, config: dict[str, Any]) -> dict | None:
    """The checkpoint `--resume` continues from (None without --resume); checked before any work."""
    if not options.resume:
        return None
    state = latest_checkpoint(workspace, method, config)
    if state is None:
        raise RankoneError(f"--resume: no checkpoint in {workspace.path(checkpoint_dir(method))}; run with --save-every first")
    if state["step"] > options.steps:
        raise RankoneError(f"--resume: the checkpoint is at step {state['step']}, past --steps {options.steps}")
    return state


def adapt_with_checkpoints(
    workspace: Workspace,
    method: str,
    classify: Callable[[Tensor, str], Tensor],
    parameters: list[nn.Parameter],
    unlabeled: dict[str, Dataset],
    options: AdaptOptions,
    config: dict[str, Any],
    lr: float,
    resume: dict | None = None,
    objective: Callable[[Tensor, str], Tensor] | None = None,
) -> TrainingLog:
    """`minimise_entropy` with workspace checkpoints under adapted/<method>-checkpoints/.

    `resume` is `resume_state(...)`, best looked up by the caller before it builds anything
    (so a bad --resume fails before heads are cached); looked up here when not given.
    """
    if resume is None:
        resume = resume_state(workspace, method, options, config)
    return minimise_entropy(
        classify, parameters, unlabeled, steps=options.steps, batch_size=options.batch_size, lr=lr,
        seed=options.seed, device=options.device, save_every=options.save_every,
        checkpoint=lambda step, state: save_checkpoint(workspace, method, step, state, config),
        resume=resume, progress=options.progress, workers=options.workers, objective=objective,
    )


# ---- inputs every adaptive method needs: unlabeled data, class names, heads ------------

def selected_tasks(known: list[str], tasks: list[str] | None) -> list[str]:
    """`--tasks` checked against the tasks the model was built for (all of them when not given)."""
    if not tasks:
        return known
    unknown = [task for task in tasks if task not in known]
    if unknown:
        raise RankoneError(f"--tasks: unknown task {unknown[0]!r} (known: {', '.join(known)})")
    return list(tasks)


def _folder_classnames(root: DataFolders | Path, task: str) -> list[str] | None:
    root = data_folders(root)
    if root.find(task) is None:
        return None
    return list(labeled_images(root, task).classnames)


HeadRequests = dict[str, tuple[list[str], list[str] | None]]


def head_requests(
    workspace: Workspace,
    tasks: list[str],
    heads_source: str = AdaptOptions.heads_source,
    classnames_from: DataFolders | Path | None = None,
    classnames: dict[str, str] | None = None,
    templates: dict[str, str] | None = None,
) -> HeadRequests:
    """{task: (class names, templates or None for the built-in ones)} for the heads adaptation uses.

    Unlabeled images carry no class names, yet heads need them. `fusionbench` takes both from
    FusionBench's lists (as `rankone eval --heads-source fusionbench`); otherwise class names
    come from the first of: `--classnames TASK=FILE`, the class folders of `--classnames-from
    DIR`/<task>/, the workspace's data/<task>/ (from `rankone fetch --dataset`).
    """
    if heads_source not in HEAD_SOURCES:
        raise RankoneError(f"--heads-source {heads_source!r}: choose from {', '.join(HEAD_SOURCES)}")
    classnames, templates = classnames or {}, templates or {}
    for flag, given in (("--classnames", classnames), ("--templates", templates)):
        unknown = [task for task in given if task not in tasks]
        if unknown:
            raise RankoneError(f"{flag}: task {unknown[0]!r} is not among {', '.join(tasks)}")
    if classnames_from is not None:
        classnames_from = data_folders(classnames_from).require_folders("--classnames-from", "not a folder")
    requests: HeadRequests = {}
    for task in tasks:
        names, task_templates = None, None
        if heads_source == "fusionbench":
            names, task_templates = fusionbench_classnames_and_templates(task)
        if task in classnames:
            names = read_lines(classnames[task], "class names")
        if names is None and classnames_from is not None:
            names = _folder_classnames(classnames_from, task)
        if names is None:
            names = _folder_classnames(workspace.path("data"), task)
        if not names:
            raise RankoneError(f"task {task}: no class names for its head; pass --classnames {task}=FILE, "
                               f"--classnames-from DIR (with {task}/<class>/ folders) or --heads-source fusionbench")
        if task in templates:
            task_templates = read_lines(templates[task], "templates")
        requests[task] = (list(names), task_templates)
    return requests


def task_heads(workspace: Workspace, requests: HeadRequests, device: torch.device) -> dict[str, Tensor]:
    """The zero-shot heads (cached in heads/), on `device`; under several processes rank 0's, sent to the others."""
    return {task: head.to(device) for task, head in heads_for_tasks(workspace, requests, device).items()}


def unlabeled_sets(data: DataFolders | Path | None, tasks: list[str], transform, known: list[str] | None = None,
                   note: Callable[[str], None] = lambda line: None) -> dict[str, Dataset]:
    """One dataset of unlabeled images per task from DATA/<task>/ (the first root that has it) or its TASK=DIR.

    A task without a folder is an error, and so is a root's folder that is no task of the
    model (`known`, default `tasks`); folders of known tasks left out with --tasks are skipped.
    """
    if data is None:
        raise RankoneError("--data: required: the unlabeled images, DATA/<task>/**/<image>")
    data = data_folders(data).require_folders("--data", "not a folder")
    missing = [task for task in tasks if data.find(task) is None]
    if missing:
        expected = " or ".join(f"{root / missing[0]}/" for root in data.roots) or f"{missing[0]}=DIR"
        raise RankoneError(f"--data {data}: no images for task {missing[0]} (expected {expected})")
    for root in data.roots:
        extra = [name for name in DataFolders((root,)).task_names() if name not in (known or tasks)]
        if extra:
            raise RankoneError(f"--data {root}: folder {extra[0]}/ has images but no head (the model's tasks: "
                               f"{', '.join(known or tasks)}); move it out of {root}")
    datasets = {}
    for task in tasks:
        images = unlabeled_images(data, task)
        if images.skipped:
            note(f"{task}: skipped {images.skipped} files that are not images")
        datasets[task] = ImageDataset(list(images), None, transform)
    return datasets


def classify_with(encode: Callable[[Tensor], Tensor], heads: dict[str, Tensor]) -> Callable[[Tensor, str], Tensor]:
    return lambda images, task: classify_logits(encode(images), heads[task])


@dataclass
class AdaptationInputs:
    """What every adaptive method needs before it builds its model."""

    tasks: list[str]  # the tasks adapted on (--tasks, default all)
    requests: HeadRequests
    unlabeled: dict[str, Dataset]


def adaptation_inputs(workspace: Workspace, options: AdaptOptions, known: list[str]) -> AdaptationInputs:
    """Tasks, head requests and unlabeled datasets, all checked before any model is built."""
    if options.plot:
        require_matplotlib()
    tasks = selected_tasks(known, options.tasks)
    requests = head_requests(workspace, tasks, options.heads_source, options.classnames_from, options.classnames, options.templates)
    unlabeled = unlabeled_sets(options.data, tasks, preprocess_for(workspace.architecture), known=known, note=options.note)
    return AdaptationInputs(tasks, requests, unlabeled)


def curve_path(relpath: str) -> str:
    """Where the loss curve of adapted/<method>.safetensors goes: adapted/<method>-curve.json."""
    return relpath.removesuffix(".safetensors") + "-curve.json"


def save_adapted(
    workspace: Workspace,
    relpath: str,
    tensors: dict[str, Tensor],
    config: dict[str, Any],
    options: AdaptOptions,
    requests: HeadRequests,
    log: TrainingLog,
    **extra: Any,
) -> str:
    """Write the trained tensors with what made them (config, steps, heads, losses) as metadata, and the loss curve beside them.

    Under several processes rank 0 writes and the others wait for it, so every process returns once the file is there.
    """
    heads = {task: {"classnames": names, "templates": templates} for task, (names, templates) in requests.items()}
    metadata = {**config, "steps": options.steps, **extra, "heads": heads, "losses": log.losses}
    with distributed.main_transaction(workspace) as staging:
        if staging is None:
            return relpath
        staging.save_tensors(relpath, tensors, {"rankone": json.dumps(metadata)})
        staging.write_json(curve_path(relpath), {"method": config.get("method"), **log.curve()})
        if options.plot:
            plot_curves({"total": log.losses[log.start:], **log.task_losses}, staging.path(curve_path(relpath).removesuffix(".json") + ".png"),
                        "mean entropy (total: sum over tasks)", first_step=log.start + 1)
    return relpath