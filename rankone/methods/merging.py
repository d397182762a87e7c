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
A method's `merge` may return its update as a dict or yield it as (key, tensor) pairs, one
tensor at a time; the stage reads the task vectors lazily (`load_task_vectors`) and writes
each merged tensor as it comes, so a merge that goes key by key across the tasks holds one
parameter × T, not T task vectors (docs/scaling.md). WA, TA and TIES go key by key; DARE
goes task by task (its documented draw order), holding the update it sums into.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch

from rankone.errors import RankoneError
from rankone.methods.base import BASE_FILE, Method, MethodModel, one_tower_model, register
from rankone.models import VISUAL_PREFIX, build_visual
from rankone.options import AUTO, Options
from rankone.task_vectors import load_task_vectors
from rankone.workspace import Workspace, tensor_shape

MERGED_DIR = "merged"
Progress = Callable[[str], None] | None
TaskVectors = list[Mapping[str, torch.Tensor]]  # one mapping per task: dicts, or files read lazily
Update = Iterable[tuple[str, torch.Tensor]]  # what a streaming merge yields, one tensor at a time


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


def check_vectors(task_vectors: TaskVectors) -> list[str]:
    """The keys every task vector has, with the same shapes (read from the files' headers when they are lazy)."""
    if not task_vectors:
        raise RankoneError("merge: no task vectors given")
    keys = list(task_vectors[0])
    for index, vector in enumerate(task_vectors[1:], start=1):
        if set(vector) != set(keys):
            missing = sorted(set(keys) ^ set(vector))[0]
            raise RankoneError(f"task vector {index}: tensor {missing} is not in every task vector")
        for key in keys:
            shape, first = tensor_shape(vector, key), tensor_shape(task_vectors[0], key)
            if shape != first:
                raise RankoneError(f"task vector {index}: tensor {key} has shape {shape}, task vector 0 has {first}")
    return keys


def magnitude_threshold(tensor: torch.Tensor, top: float) -> torch.Tensor | None:
    """TIES trim's threshold: the k-th largest |value|, k = ceil(top·n); None when every entry is kept."""
    flat = tensor.reshape(-1)
    keep = max(1, math.ceil(top * flat.numel()))
    if keep >= flat.numel():
        return None
    return flat.abs().kthvalue(flat.numel() - keep + 1).values


def trimmed(tensor: torch.Tensor, threshold: torch.Tensor | None) -> torch.Tensor:
    """The entries of `tensor` whose |value| is at least `threshold` (all of them for None), the rest 0."""
    if threshold is None:
        return tensor.clone()
    return torch.where(tensor.abs() >= threshold, tensor, torch.zeros_like(tensor))


def trim_top_magnitudes(tensor: torch.Tensor, top: float) -> torch.Tensor:
    """TIES trim: keep entries whose |value| is at least the k-th largest, k = ceil(top·n).

    Entries tied with the k-th largest magnitude are all kept.
    """
    return trimmed(tensor, magnitude_threshold(tensor, top))


def summed(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Σ tensors, added one at a time as they come (read lazily, only one is in memory besides the sum).

    The same float32 sums, entry by entry and in the same order, as `torch.stack(tensors).sum(dim=0)`.
    """
    total: torch.Tensor | None = None
    for tensor in tensors:
        if total is None:
            total = tensor.clone()
        else:
            total += tensor
    if total is None:
        raise RankoneError("merge: no task vectors given")
    return total


def random_drop(tensor: torch.Tensor, drop: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: drop each entry with probability `drop` (uniform draw < drop), rescale the rest by 1/(1−drop)."""
    draws = torch.rand(tensor.shape, generator=generator, device=generator.device)
    kept = draws.to(tensor.device) >= drop
    return torch.where(kept, tensor / (1.0 - drop), torch.zeros_like(tensor))


def sign_consensus_mean(values: list[torch.Tensor]) -> torch.Tensor:
    """TIES: elect sign(Σ values) per entry, then average the nonzero values of that sign.

    An entry with no agreeing value (or a zero sum) merges to 0.
    """
    return agreeing_mean(values, values)


def agreeing_mean(for_sign: Iterable[torch.Tensor], for_mean: Iterable[torch.Tensor]) -> torch.Tensor:
    """`sign_consensus_mean` with the values given twice, as two iterables that may produce them one at a time
    (once for the elected sign, once for the agreeing mean): then one value is in memory whatever their number."""
    elected = torch.sign(summed(for_sign))
    agreeing = torch.zeros_like(elected)
    count = torch.zeros(elected.shape, dtype=torch.int64, device=elected.device)
    for value in for_mean:
        agrees = (torch.sign(value) == elected) & (value != 0)
        agreeing += torch.where(agrees, value, torch.zeros_like(value))
        count += agrees
    return torch.where(count > 0, agreeing / count.clamp(min=1), torch.zeros_like(agreeing))


def sparsified(tensor: torch.Tensor, steps: MergeSteps, top: float, drop: float, generator: torch.Generator | None) -> torch.Tensor:
    """One task's tensor after the row's sparsify step (itself when there is none)."""
    if steps.sparsify == "magnitude":
        return trim_top_magnitudes(tensor, top)
    if steps.sparsify == "random":
        return random_drop(tensor, drop, generator)
    return tensor


def generalized_merge(
    task_vectors: TaskVectors,
    steps: MergeSteps,
    *,
    lam: float = 0.0,
    top: float = 1.0,
    drop: float = 0.0,
    seed: int = 0,
    progress: Progress = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """The update to add to θ0 (already scaled: λ·merged, or (1/T)Στ for weight averaging), as (key, tensor) pairs.

    Computed in float32. DARE draws with a CPU generator seeded by `seed`, task by task in
    list order and, within a task, tensor by tensor in sorted key order: same seed, same
    merge, on any device. To keep that order without holding every sparsified τ, DARE goes
    task by task, summing into the update; the other rows go key by key across the tasks
    and yield each tensor as soon as it is merged. `top` and `drop` are checked by the
    methods' options.
    """
    keys = check_vectors(task_vectors)
    scale = 1.0 / len(task_vectors) if steps.scale == "mean" else float(lam)
    if steps.sparsify == "random":
        yield from _task_by_task_sum(task_vectors, keys, steps, scale, drop, seed, progress)
        return
    for key in keys:
        if steps.sign_consensus:
            yield key, scale * ties_combined(task_vectors, key, top if steps.sparsify == "magnitude" else 1.0)
        else:
            yield key, scale * summed(vector[key].float() for vector in task_vectors)
        if progress is not None:
            progress(key)


def ties_combined(task_vectors: TaskVectors, key: str, top: float) -> torch.Tensor:
    """TIES for one tensor: each τ_t[key] trimmed to its top magnitudes, then the sign-consensus mean.

    Each task's tensor is read twice (for the elected sign, then for the agreeing mean) and
    trimmed by the threshold found the first time, so one tensor is in memory at a time.
    """
    thresholds: list[torch.Tensor | None] = []

    def first_pass() -> Iterator[torch.Tensor]:
        for vector in task_vectors:
            tensor = vector[key].float()
            thresholds.append(magnitude_threshold(tensor, top))
            yield trimmed(tensor, thresholds[-1])

    def second_pass() -> Iterator[torch.Tensor]:
        for vector, threshold in zip(task_vectors, thresholds):
            yield trimmed(vector[key].float(), threshold)

    return agreeing_mean(first_pass(), second_pass())


def _task_by_task_sum(task_vectors: TaskVectors, keys: list[str], steps: MergeSteps, scale: float, drop: float, seed: int,
                      progress: Progress) -> Iterator[tuple[str, torch.Tensor]]:
    """scale·Σ sparsify(τ_t), visiting the tasks in order and each task's tensors in sorted key order (DARE's draw order)."""
    # One stream for all draws: each (task, tensor) consumes a fixed slice of it.
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    total: dict[str, torch.Tensor] = {}
    last = len(task_vectors) - 1
    for index, vector in enumerate(task_vectors):
        for key in sorted(keys):
            kept = sparsified(vector[key].float(), steps, 1.0, drop, generator)
            if key in total:
                total[key] += kept
            else:
                total[key] = kept
            if index == last and progress is not None:
                progress(key)
    for key in keys:
        yield key, total.pop(key).mul_(scale)


def updated_tensor(key: str, base: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """θ0 + update for one `visual.*` tensor, in the base's dtype."""
    if tuple(update.shape) != tuple(base.shape):
        raise RankoneError(f"task vectors: tensor {key} has shape {tuple(update.shape)}, the base has {tuple(base.shape)}")
    return (base.float() + update.to(base.device)).to(base.dtype)


def add_update(base_visual: Mapping[str, torch.Tensor], update: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """θ0 + update for every `visual.*` tensor of the base, in the base's dtype."""
    state: dict[str, torch.Tensor] = {}
    for key, tensor in base_visual.items():
        if not key.startswith(VISUAL_PREFIX):
            continue
        if key not in update:
            raise RankoneError(f"task vectors: lack tensor {key} of the base image tower")
        state[key] = updated_tensor(key, tensor, update[key])
    return state


def merged_items(base: Mapping[str, torch.Tensor], update: Update) -> Iterator[tuple[str, torch.Tensor]]:
    """θ0 + update for each tower tensor as the update yields it, the base read a tensor at a time; a merge's own
    tensors beside the tower (EMR's masks) pass as they are. Every `visual.*` tensor of the base must come."""
    tower = [key for key in base if key.startswith(VISUAL_PREFIX)]
    seen: set[str] = set()
    for key, tensor in update:
        if key.startswith(VISUAL_PREFIX):
            if key not in tower:
                raise RankoneError(f"task vectors: tensor {key} is not in the base image tower")
            seen.add(key)
            yield key, updated_tensor(key, base[key], tensor)
        else:
            yield key, tensor
    missing = [key for key in tower if key not in seen]
    if missing:
        raise RankoneError(f"task vectors: lack tensor {missing[0]} of the base image tower")


class OnDevice(Mapping[str, torch.Tensor]):
    """A task vector whose tensors are moved to `device` as they are read (still one at a time)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], device: torch.device | str) -> None:
        self.tensors, self.device = tensors, device

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key].to(self.device)

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tensor_shape(self.tensors, key)


def update_items(merge: Callable[..., object], task_vectors: TaskVectors, options: Options, progress: Progress) -> Update:
    """A method's update as pairs, whether its `merge` returns a dict or yields them."""
    update = merge(task_vectors, options, progress)
    return update.items() if isinstance(update, Mapping) else update


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
    Task vectors and base are read a tensor at a time and each merged tensor is written as the
    method yields it (`merged_items`), so what is in memory is what the method itself holds.
    """
    record = {"method": method.name, **options.record()}
    tasks = workspace.tasks
    task_vectors: TaskVectors = load_task_vectors(workspace, tasks)
    if torch.device(device).type != "cpu":
        task_vectors = [OnDevice(vector, device) for vector in task_vectors]
    base = workspace.lazy_tensors(BASE_FILE)
    merge = getattr(method.merge, "stream", method.merge)
    with workspace.transaction() as staging:
        staging.save_tensor_stream(method.output, merged_items(base, update_items(merge, task_vectors, options, progress)),
                                   metadata=merge_metadata(record, tasks))
    return record


def merged_tower(workspace: Workspace, method: str) -> dict[str, torch.Tensor]:
    """merged/<method>.safetensors: the merged image tower (`visual.*`); a missing file names the merge to run
    (`Workspace.require`)."""
    return workspace.load_tensors(merged_path(method))


def load_merged(workspace: Workspace, method: str, device: torch.device) -> MethodModel:
    """The eval loader of every static merge: merged/<method>.safetensors as one tower for all tasks."""
    return one_tower_model(workspace, merged_tower(workspace, method), method, device)


def collected(stream: Callable[..., object]) -> Callable[..., dict[str, torch.Tensor]]:
    """A `Method.merge` returning the update as a dict, from a merge that may yield it pair by pair; the stage
    reads `.stream` to write each tensor as it comes."""

    def merge(task_vectors: TaskVectors, options: Options, progress: Progress = None) -> dict[str, torch.Tensor]:
        return dict(update_items(stream, task_vectors, options, progress))

    merge.stream = stream  # type: ignore[attr-defined]
    merge.__doc__ = stream.__doc__
    return merge


def static_merge(name: str, summary: str, row: int, options: type[Options], merge: Callable[..., object]) -> Method:
    """Register a static merge: `merge(task_vectors, options, progress)` returns the update to θ0 as a dict, or
    yields it as (key, tensor) pairs, one tensor at a time (then the stage never holds the whole update)."""
    return register(Method(
        name=name, kind="static", summary=summary, row=row, load=load_merged, options=options,
        inputs=("base", "task-vectors"), eval_inputs=(), output=merged_path(name), merge=collected(merge),
        tower=lambda workspace: merged_tower(workspace, name),
    ))


def generalized(steps: MergeSteps) -> Callable[..., Update]:
    """A `merge` function for one row of the table: reads lam, top, drop and seed from the options it has."""

    def merge(task_vectors: TaskVectors, options: Options, progress: Progress = None) -> Update:
        if getattr(options, "lam", None) == AUTO:
            raise RankoneError(f"--lambda {AUTO}: resolved by the merge stage from unlabeled images (rankone merge --lambda auto "
                               "--data DIR, or rankone.label_free.workspace_lambda); give a number here")
        return generalized_merge(
            task_vectors, steps, lam=getattr(options, "lam", 0.0), top=getattr(options, "top", 1.0),
            drop=getattr(options, "drop", 0.0), seed=getattr(options, "seed", 0), progress=progress,
        )

    return merge
