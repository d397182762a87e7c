"""The label-free λ: `--lambda auto` for `merge` and `build-pool`, and the built-in example's `${LAMBDA}`.

For every λ of a grid, merge by task arithmetic (θ0 + λ·Στ) and measure the mean prediction
entropy of each task's unlabeled images through that task's zero-shot head; the λ with the
lowest mean over tasks wins (the smaller λ on a tie). No test label is read: the rule sees
the images adaptation sees, and class names for the heads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from rankone import methods
from rankone.errors import RankoneError
from rankone.data import DataFolders
from rankone.heads import classify_logits
from rankone.methods.base import pretrained_tower, visual_encoder
from rankone.models import preprocess_for
from rankone.options import AUTO, Options, option
from rankone.task_vectors import load_task_vectors
from rankone.training import batch_entropy, head_requests, task_heads, unlabeled_sets

# The grid `--lambda auto` searches: task arithmetic's usual range (its paper tunes λ in [0, 1]; 0.3 is its common pick).
LAMBDA_GRID = (0.1, 0.2, 0.3, 0.4, 0.5)
# Unlabeled images per task the rule looks at: enough for a stable mean, few enough to take seconds.
IMAGES_PER_TASK = 128


def lambda_entropies(
    architecture: dict,
    base_visual: dict[str, Tensor],
    task_vectors: list[dict[str, Tensor]],
    heads: dict[str, Tensor],
    images: dict[str, Tensor],
    grid: Sequence[float] = LAMBDA_GRID,
    device: torch.device | str = "cpu",
) -> dict[float, float]:
    """{λ: mean over tasks of the mean prediction entropy of task arithmetic at λ on each task's `images`}."""
    entropies = {}
    for lam in grid:
        merged = methods.merged_state(base_visual, task_vectors, "task-arithmetic", lam=float(lam))
        encoder = visual_encoder(architecture, merged, device)
        with torch.no_grad():
            per_task = [float(batch_entropy(classify_logits(encoder(images[task].to(device)), heads[task].to(device)))) for task in images]
        entropies[float(lam)] = sum(per_task) / len(per_task)
    return entropies


def rule_images(datasets: dict[str, Dataset], limit: int = IMAGES_PER_TASK) -> dict[str, Tensor]:
    """The first `limit` images of each task's unlabeled dataset, stacked: what the rule measures entropy on."""
    return {task: torch.stack([dataset[index] for index in range(min(len(dataset), limit))]) for task, dataset in datasets.items()}


def choose_lambda(entropies: dict[float, float]) -> float:
    """The λ of lowest entropy; the smaller λ on a tie."""
    return min(entropies, key=lambda lam: (entropies[lam], lam))


def workspace_lambda(workspace, data: DataFolders | Path | None, classnames_from: DataFolders | Path | None = None, grid: Sequence[float] = LAMBDA_GRID,
                     device: torch.device | str = "cpu", limit: int = IMAGES_PER_TASK) -> tuple[float, dict[float, float]]:
    """(chosen λ, {λ: entropy}) for the workspace's experts, on the unlabeled folders DATA/<task>/."""
    if data is None:
        raise RankoneError(f"--lambda {AUTO}: needs --data, the unlabeled images DATA/<task>/ the rule measures entropy on")
    tasks = workspace.tasks
    requests = head_requests(workspace, tasks, classnames_from=classnames_from)
    datasets = unlabeled_sets(data, tasks, preprocess_for(workspace.architecture))
    heads = task_heads(workspace, requests, torch.device(device))
    images = rule_images(datasets, limit)
    entropies = lambda_entropies(workspace.architecture, pretrained_tower(workspace), load_task_vectors(workspace, tasks),
                                 heads, images, grid, device)
    return choose_lambda(entropies), entropies


@dataclass(frozen=True, kw_only=True)
class LambdaRuleOptions(Options):
    """What `--lambda auto` reads, for the stages that take it (merge, build-pool)."""

    data: DataFolders | None = option(None, "With --lambda auto: unlabeled images DATA/<task>/**/<image> to measure "
                                      "entropy on (several folders, or TASK=DIR, as for adapt).",
                               existing_folder=True)
    classnames_from: DataFolders | None = option(None, "With --lambda auto: labeled folder DIR/<task>/<class>/ to take the heads' "
                                          "class names from (default: the workspace's data/).", existing_folder=True)


def resolve_lambda(workspace, options: Options, rule: LambdaRuleOptions, device: torch.device | str,
                   note=lambda line: None) -> tuple[Options, dict | None]:
    """`options` with an `auto` λ replaced by the rule's choice (told to `note`), and the rule's record (None without auto)."""
    if getattr(options, "lam", None) != AUTO:
        return options, None
    chosen, entropies = workspace_lambda(workspace, rule.data, rule.classnames_from, device=device)
    note(describe(entropies, chosen))
    if chosen == max(entropies) and len(entropies) > 1:
        # Entropy still falling at the largest λ: a larger one might be lower still, and the user should know.
        note(f"note: the lowest entropy is at the grid's largest λ ({chosen:g}); pass --lambda with a value to go beyond it")
    return dataclasses.replace(options, lam=chosen), {"grid": list(entropies), "entropies": entropies, "lambda": chosen}


def describe(entropies: dict[float, float], chosen: float) -> str:
    """One line: every λ of the grid with its entropy, then the choice."""
    return ("λ by lowest unlabeled entropy of task arithmetic: " + ", ".join(f"λ={lam:g}: {value:.3f}" for lam, value in entropies.items())
            + f" → λ={chosen:g}")
