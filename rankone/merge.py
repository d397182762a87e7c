"""Static merges as one generalized function over task vectors.

Every method is the same three steps with different settings (the shape of mergekit's
generalized task arithmetic), then θ_merge = θ0 + scale·merged:

| method            | sparsify                          | combine                          | scale |
|-------------------|-----------------------------------|----------------------------------|-------|
| weight-averaging  | –                                 | sum                              | 1/T   |
| task-arithmetic   | –                                 | sum                              | λ     |
| ties              | keep the top `top` magnitudes     | sign election, disjoint mean     | λ     |
| dare              | drop with prob. `drop`, ×1/(1−q)  | sum                              | λ     |

SPEC ("Static baselines"): weight averaging is mean θt = θ0 + (1/T)Στ; TIES keeps the top
20% magnitudes of each τ (per parameter tensor here), elects the sign of each entry as the
sign of the sum of the kept values, and averages the kept values that agree with it; DARE
drops each entry with probability q, rescales the rest by 1/(1−q), then task arithmetic.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rankone.errors import RankoneError
from rankone.models import VISUAL_PREFIX
from rankone.workspace import Workspace

MERGED_DIR = "merged"


@dataclass(frozen=True)
class MergeSteps:
    sparsify: str | None  # None, "magnitude" (TIES trim) or "random" (DARE)
    sign_consensus: bool
    scale: str  # "lambda" or "mean"


STATIC_METHODS: dict[str, MergeSteps] = {
    "weight-averaging": MergeSteps(sparsify=None, sign_consensus=False, scale="mean"),
    "task-arithmetic": MergeSteps(sparsify=None, sign_consensus=False, scale="lambda"),
    "ties": MergeSteps(sparsify="magnitude", sign_consensus=True, scale="lambda"),
    "dare": MergeSteps(sparsify="random", sign_consensus=False, scale="lambda"),
}
DEFAULT_LAMBDA = 0.3
DEFAULT_TOP = 0.2
DEFAULT_DROP = 0.9


def merged_path(method: str) -> str:
    return f"{MERGED_DIR}/{method}.safetensors"


def method_options(method: str, *, lam: float | None = None, top: float | None = None, drop: float | None = None, seed: int | None = None) -> dict:
    """The options `method` uses, defaults filled in; an option it ignores is an error.

    Returned dict is what goes into the merged file's metadata.
    """
    steps = _steps(method)
    given = {"--lambda": lam, "--top": top, "--drop": drop, "--seed": seed}
    used = {"--lambda": steps.scale == "lambda", "--top": steps.sparsify == "magnitude", "--drop": steps.sparsify == "random", "--seed": steps.sparsify == "random"}
    for option, value in given.items():
        if value is not None and not used[option]:
            raise RankoneError(f"{option}: not used by --method {method}")
    options: dict = {"method": method}
    if used["--lambda"]:
        options["lambda"] = DEFAULT_LAMBDA if lam is None else float(lam)
    if used["--top"]:
        options["top"] = DEFAULT_TOP if top is None else float(top)
    if used["--drop"]:
        options["drop"] = DEFAULT_DROP if drop is None else float(drop)
        options["seed"] = 0 if seed is None else int(seed)
    _check_fractions(steps, options.get("top", DEFAULT_TOP), options.get("drop", DEFAULT_DROP))
    return options


def _check_fractions(steps: MergeSteps, top: float, drop: float) -> None:
    if steps.sparsify == "magnitude" and not 0.0 < top <= 1.0:
        raise RankoneError(f"--top {top}: must be in (0, 1]")
    if steps.sparsify == "random" and not 0.0 <= drop < 1.0:
        raise RankoneError(f"--drop {drop}: must be in [0, 1)")


def merge_step_count(architecture: dict) -> int:
    """How many tensors a merge visits (one progress step each): the image tower's, counted on the meta device."""
    from rankone.models import build_visual

    with torch.device("meta"):
        return len(build_visual(architecture).state_dict())


def _steps(method: str) -> MergeSteps:
    if method not in STATIC_METHODS:
        raise RankoneError(f"--method {method!r}: not a static merge; choose from {', '.join(STATIC_METHODS)}")
    return STATIC_METHODS[method]


def _check_vectors(task_vectors: list[dict[str, torch.Tensor]]) -> list[str]:
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


def merge_task_vectors(
    task_vectors: list[dict[str, torch.Tensor]],
    method: str,
    *,
    lam: float = DEFAULT_LAMBDA,
    top: float = DEFAULT_TOP,
    drop: float = DEFAULT_DROP,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict[str, torch.Tensor]:
    """The update to add to θ0 (already scaled: λ·merged, or (1/T)Στ for weight averaging).

    Computed in float32. DARE draws with a CPU generator seeded by `seed`, task by task in
    list order and, within a task, tensor by tensor in sorted key order: same seed, same
    merge, on any device.
    """
    steps = _steps(method)
    keys = _check_vectors(task_vectors)
    _check_fractions(steps, top, drop)
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


def merged_state(
    base_visual: dict[str, torch.Tensor],
    task_vectors: list[dict[str, torch.Tensor]],
    method: str,
    *,
    lam: float = DEFAULT_LAMBDA,
    top: float = DEFAULT_TOP,
    drop: float = DEFAULT_DROP,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict[str, torch.Tensor]:
    """θ0 + the merged update for every `visual.*` tensor of the base, in the base's dtype."""
    update = merge_task_vectors(task_vectors, method, lam=lam, top=top, drop=drop, seed=seed, progress=progress)
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


def merge_metadata(options: dict, tasks: list[str]) -> dict[str, str]:
    """safetensors metadata (string values only) recording how a merged file was made."""
    return {"rankone": json.dumps({**options, "tasks": tasks})}


def merge_workspace(
    workspace: Workspace,
    method: str,
    *,
    lam: float | None = None,
    top: float | None = None,
    drop: float | None = None,
    seed: int | None = None,
    device: torch.device | str = "cpu",
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Merge the workspace's task vectors into `merged/<method>.safetensors`; returns the options used."""
    from rankone.models import visual_state
    from rankone.task_vectors import load_task_vectors

    options = method_options(method, lam=lam, top=top, drop=drop, seed=seed)
    tasks = workspace.tasks
    task_vectors = [{key: value.to(device) for key, value in vector.items()} for vector in load_task_vectors(workspace, tasks)]
    base_visual = {key: value.to(device) for key, value in visual_state(workspace.load_tensors("base.safetensors")).items()}
    state = merged_state(
        base_visual,
        task_vectors,
        method,
        lam=options.get("lambda", DEFAULT_LAMBDA),
        top=options.get("top", DEFAULT_TOP),
        drop=options.get("drop", DEFAULT_DROP),
        seed=options.get("seed", 0),
        progress=progress,
    )
    with workspace.transaction() as staging:
        staging.save_tensors(merged_path(method), state, metadata=merge_metadata(options, tasks))
    return options
