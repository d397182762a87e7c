"""Static merges as one generalized function over task vectors (the shape of mergekit's
generalized task arithmetic): sparsify each τ, combine them, scale, add to θ0.

| method            | sparsify                          | combine                          | scale |
|-------------------|-----------------------------------|----------------------------------|-------|
| weight-averaging  | –                                 | sum                              | 1/T   |
| task-arithmetic   | –                                 | sum                              | λ     |
| ties              | keep the top `top` magnitudes     | sign election, disjoint mean     | λ     |
| dare              | drop with prob. `drop`, ×1/(1−q)  | sum                              | λ     |

Each method is its own module (weight_averaging.py, ...) that declares its options and
registers `static_merge(...)` with its row of this table. Weight averaging is mean θt =
θ0 + (1/T)Στ; TIES keeps the top 20% magnitudes of each τ (per parameter tensor here),
elects the sign of each entry as the sign of the sum of the kept values, and averages the
kept values that agree with it; DARE drops each entry with probability q, rescales the
rest by 1/(1−q), then task arithmetic.

`merge_workspace` is the merge stage for every static method, whatever its `merge`
function: read the task vectors, add the update to θ0, write merged/<method>.safetensors.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rankone.errors import RankoneError
from rankone.methods.base import Method, MethodModel, one_tower_model, pretrained_tower, register
from rankone.models import VISUAL_PREFIX, build_visual
from rankone.options import AUTO, Options
from rankone.task_vectors import load_task_vectors
from rankone.workspace import Workspace

MERGED_DIR = "merged"
Progress = Callable[[str], None] | None


@dataclass(frozen=True)
class MergeSteps:
    """One row of the table above."""

    sparsify: str | None  # None, "magnitude" (TIES trim) or "random" (DARE)
    sign_consensus: bool
    scale: str  # "lambda" or "mean"


def merged_path(method: str) -> str:
    return f"{MERGED_DIR}/{method}.safetensors"


def merge_step_count(architecture: dict) -> int:
    """How many tensors a merge visits (one progress step each): the image tower's, counted on the meta device."""
    with torch.device("meta"):
        return len(build_visual(architecture).state_dict())


def check_vectors(task_vectors: list[dict[str, torch.Tensor]]) -> list[str]:
    if not task_vectors:
        raise RankoneError("merge: no task vectors given")
    keys = list(task_vectors[0])
    for index, vector in enumerate(task_vectors[1:], start=1):
        if set(vector) != set(keys):
            missing = sorted(set(keys) ^ set(vector))[0]
            raise RankoneError(f"task vector {index}: tensor {missing} is not in every task vector")
        for key in keys:
            if vector[key].shape != task_vectors[0][key].shape:
                raise RankoneError(f"task vector {index}: tensor {key} has shape {tuple(vector[key].shape)}, task vector 0 has {tuple(task_vectors[0][key].shape)}")
    return keys


def trim_top_magnitudes(tensor: torch.Tensor, top: float) -> torch.Tensor:
    """TIES trim: keep entries whose |value| is at least the k-th largest, k = ceil(top·n).

    Entries tied with the k-th largest magnitude are all kept.
    """
    flat = tensor.reshape(-1)
    keep = max(1, math.ceil(top * flat.numel()))
    if keep >= flat.numel():
        return tensor.clone()
    threshold = flat.abs().kthvalue(flat.numel() - keep + 1).values
    return torch.where(tensor.abs() >= threshold, tensor, torch.zeros_like(tensor))


def random_drop(tensor: torch.Tensor, drop: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: drop each entry with probability `drop` (uniform draw < drop), rescale the rest by 1/(1−drop)."""
    draws = torch.rand(tensor.shape, generator=generator, device=generator.device)
    kept = draws.to(tensor.device) >= drop
    return torch.where(kept, tensor / (1.0 - drop), torch.zeros_like(tensor))


def sign_consensus_mean(values: list[torch.Tensor]) -> torch.Tensor:
    """TIES: elect sign(Σ values) per entry, then average the nonzero values of that sign.

    An entry with no agreeing value (or a zero sum) merges to 0.
    """
    stacked = torch.stack(values)
    elected = torch.sign(stacked.sum(dim=0))
    agrees = (torch.sign(stacked) == elected) & (stacked != 0)
    total = torch.where(agrees, stacked, torch.zeros_like(stacked)).sum(dim=0)
    count = agrees.sum(dim=0)
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


def generalized_merge(
    task_vectors: list[dict[str, torch.Tensor]],
    steps: MergeSteps,
    *,
    lam: float = 0.0,
    top: float = 1.0,
    drop: float = 0.0,
    seed: int = 0,
    progress: Progress = None,
) -> dict[str, torch.Tensor]:
    """The update to add to θ0 (already scaled: λ·merged, or (1/T)Στ for weight averaging).

    Computed in float32. DARE draws with a CPU generator seeded by `seed`, task by task in
    list order and, within a task, tensor by tensor in sorted key order: same seed, same
    merge, on any device. `top` and `drop` are checked by the methods' options.
    """
    keys = check_vectors(task_vectors)
    scale = 1.0 / len(task_vectors) if steps.scale == "mean" else float(lam)

    # One stream for all draws: each (task, tensor) consumes a fixed slice of it.
    generator = torch.Generator(device="cpu").manual_seed(int(seed)) if steps.sparsify == "random" else None
    sparse: list[dict[str, torch.Tensor]] = []
    for vector in task_vectors:
        if steps.sparsify is None:
            sparse.append(vector)
            continue
        kept: dict[str, torch.Tensor] = {}
        for key in sorted(keys):
            tensor = vector[key].float()
            kept[key] = trim_top_magnitudes(tensor, top) if steps.sparsify == "magnitude" else random_drop(tensor, drop, generator)
        sparse.append(kept)

    merged: dict[str, torch.Tensor] = {}
    for key in keys:
        values = [vector[key].float() for vector in sparse]
        combined = sign_consensus_mean(values) if steps.sign_consensus else torch.stack(values).sum(dim=0)
        merged[key] = scale * combined
        if progress is not None:
            progress(key)
    return merged


def add_update(base_visual: dict[str, torch.Tensor], update: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """θ0 + update for every `visual.*` tensor of the base, in the base's dtype."""
    state: dict[str, torch.Tensor] = {}
    for key, tensor in base_visual.items():
        if not key.startswith(VISUAL_PREFIX):
            continue
        if key not in update:
            raise RankoneError(f"task vectors: lack tensor {key} of the base image tower")
        if update[key].shape != tensor.shape:
            raise RankoneError(f"task vectors: tensor {key} has shape {tuple(update[key].shape)}, the base has {tuple(tensor.shape)}")
        state[key] = (tensor.float() + update[key].to(tensor.device)).to(tensor.dtype)
    return state


def merge_metadata(record: dict, tasks: list[str]) -> dict[str, str]:
    """safetensors metadata (string values only) recording how a merged file was made."""
    return {"rankone": json.dumps({**record, "tasks": tasks})}


def merge_workspace(
    workspace: Workspace,
    method: Method,
    options: Options,
    *,
    device: torch.device | str = "cpu",
    progress: Progress = None,
) -> dict:
    """Merge the workspace's task vectors with a static `method` into merged/<name>.safetensors.

    Returns the record stored in the file's metadata: {"method", and every option by its YAML key}.
    """
    record = {"method": method.name, **options.record()}
    tasks = workspace.tasks
    task_vectors = [{key: value.to(device) for key, value in vector.items()} for vector in load_task_vectors(workspace, tasks)]
    base = {key: value.to(device) for key, value in pretrained_tower(workspace).items()}
    update = method.merge(task_vectors, options, progress)
    # A merge may keep tensors of its own beside the tower (EMR's masks); they are stored as they are.
    state = {**add_update(base, update), **{key: value for key, value in update.items() if not key.startswith(VISUAL_PREFIX)}}
    with workspace.transaction() as staging:
        staging.save_tensors(method.output, state, metadata=merge_metadata(record, tasks))
    return record


def merged_tower(workspace: Workspace, method: str) -> dict[str, torch.Tensor]:
    """merged/<method>.safetensors: the merged image tower (`visual.*`); a missing file names the merge to run
    (`Workspace.require`)."""
    return workspace.load_tensors(merged_path(method))


def load_merged(workspace: Workspace, method: str, device: torch.device) -> MethodModel:
    """The eval loader of every static merge: merged/<method>.safetensors as one tower for all tasks."""
    return one_tower_model(workspace, merged_tower(workspace, method), method, device)


def static_merge(name: str, summary: str, row: int, options: type[Options], merge: Callable[..., dict[str, torch.Tensor]]) -> Method:
    """Register a static merge: `merge(task_vectors, options, progress)` returns the update to θ0."""
    return register(Method(
        name=name, kind="static", summary=summary, row=row, load=load_merged, options=options,
        inputs=("base", "task-vectors"), eval_inputs=(), output=merged_path(name), merge=merge,
        tower=lambda workspace: merged_tower(workspace, name),
    ))


def generalized(steps: MergeSteps) -> Callable[..., dict[str, torch.Tensor]]:
    """A `merge` function for one row of the table: reads lam, top, drop and seed from the options it has."""

    def merge(task_vectors: list[dict[str, torch.Tensor]], options: Options, progress: Progress = None) -> dict[str, torch.Tensor]:
        if getattr(options, "lam", None) == AUTO:
            raise RankoneError(f"--lambda {AUTO}: resolved by the merge stage from unlabeled images (rankone merge --lambda auto "
                               "--data DIR, or rankone.label_free.workspace_lambda); give a number here")
        return generalized_merge(
            task_vectors, steps, lam=getattr(options, "lam", 0.0), top=getattr(options, "top", 1.0),
            drop=getattr(options, "drop", 0.0), seed=getattr(options, "seed", 0), progress=progress,
        )

    return merge
