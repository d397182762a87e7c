"""Task vectors τt = θt − θ0 and the per-block norm analysis (the paper's Figure 2).

docs/method.md §3: τt = θt − θ0 for every parameter of the image tower; an expert
whose τ is all zeros is an error naming the task (it is the pretrained model renamed).

The analysis asks where fine-tuning moved the weights: per block l, the L2 norm of the
attention part of τ (in_proj weight and bias, out_proj weight and bias, flattened
together) and of the MLP part (c_fc and c_proj weights and biases), averaged over tasks.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from rankone.errors import RankoneError
from rankone.models import VISUAL_PREFIX
from rankone.plots import plot_analysis, require_matplotlib
from rankone.workspace import LazyTensors, Workspace, tensor_shape

TASK_VECTOR_DIR = "task_vectors"
ANALYSIS_FILE = f"{TASK_VECTOR_DIR}/analysis.json"
ANALYSIS_PLOT = f"{TASK_VECTOR_DIR}/analysis.png"

_BLOCK_KEY = re.compile(r"^visual\.transformer\.resblocks\.(\d+)\.(attn|mlp)\.(.+)$")
_ATTENTION_PARTS = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")
_MLP_PARTS = ("c_fc.weight", "c_fc.bias", "c_proj.weight", "c_proj.bias")


def task_vector_path(task: str) -> str:
    return f"{TASK_VECTOR_DIR}/{task}.safetensors"


def task_vector_items(base_visual: Mapping[str, torch.Tensor], expert_visual: Mapping[str, torch.Tensor],
                      task: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, τ = θt − θ0) for every `visual.*` tensor of the base, in float32, one tensor at a time.

    float32 because a half-precision difference of two nearby weights loses most of its bits.
    Keys are checked before the first difference; an all-zero τ is an error once the last
    tensor is through (a stage writing the items fails before it commits).
    """
    base_keys = [key for key in base_visual if key.startswith(VISUAL_PREFIX)]
    extra = [key for key in expert_visual if key.startswith(VISUAL_PREFIX) and key not in base_visual]
    if extra:
        raise RankoneError(f"expert {task!r}: tensor {extra[0]} is not in the base image tower")
    if not base_keys:
        raise RankoneError("base: has no visual.* tensors")
    missing = [key for key in base_keys if key not in expert_visual]
    if missing:
        raise RankoneError(f"expert {task!r}: lacks tensor {missing[0]}")
    nonzero = False
    for key in base_keys:
        base_shape, expert_shape = tensor_shape(base_visual, key), tensor_shape(expert_visual, key)
        if base_shape != expert_shape:
            raise RankoneError(f"expert {task!r}: tensor {key} has shape {expert_shape}, the base has {base_shape}")
        difference = expert_visual[key].float() - base_visual[key].float()
        nonzero = nonzero or bool(difference.any())
        yield key, difference
    if not nonzero:
        raise RankoneError(f"expert {task!r}: task vector is all zeros (the expert is the pretrained model under another name)")


def task_vector(base_visual: Mapping[str, torch.Tensor], expert_visual: Mapping[str, torch.Tensor], task: str) -> dict[str, torch.Tensor]:
    """τ = θt − θ0 for every `visual.*` tensor of the base, in float32 (`task_vector_items`, collected)."""
    return dict(task_vector_items(base_visual, expert_visual, task))


def block_group(key: str) -> tuple[int, str] | None:
    """(block, "attention" or "mlp") of a tensor the analysis counts, else None."""
    match = _BLOCK_KEY.match(key)
    if match is None:
        return None
    block, module, part = int(match.group(1)), match.group(2), match.group(3)
    if (module == "attn" and part not in _ATTENTION_PARTS) or (module == "mlp" and part not in _MLP_PARTS):
        return None
    return block, "attention" if module == "attn" else "mlp"


def add_squares(squares: dict[int, dict[str, float]], key: str, tensor: torch.Tensor) -> None:
    """Add ‖tensor‖² to its block's attention or MLP sum, when the analysis counts `key`."""
    group = block_group(key)
    if group is None:
        return
    sums = squares.setdefault(group[0], {"attention": 0.0, "mlp": 0.0})
    # Accumulated in float64 (a sum of millions of float32 squares drifts otherwise), without a float64 copy of τ.
    sums[group[1]] += float(torch.linalg.vector_norm(tensor, dtype=torch.float64)) ** 2


def norms_of(squares: dict[int, dict[str, float]]) -> list[dict[str, float]]:
    if not squares:
        raise RankoneError("task vector: has no visual.transformer.resblocks.* attention or MLP tensors")
    return [
        {"block": block, "attention": sums["attention"] ** 0.5, "mlp": sums["mlp"] ** 0.5}
        for block, sums in sorted(squares.items())
    ]


def block_norms(vector: Mapping[str, torch.Tensor]) -> list[dict[str, float]]:
    """Per block: L2 norm of the attention part and of the MLP part of one task vector."""
    squares: dict[int, dict[str, float]] = {}
    for key, tensor in vector.items():
        add_squares(squares, key, tensor)
    return norms_of(squares)


def analyze(per_task: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    """Mean over tasks of the per-block norms (`block_norms` of each task vector)."""
    if not per_task:
        raise RankoneError("analysis: no task vectors")
    tasks = list(per_task)
    blocks = [row["block"] for row in per_task[tasks[0]]]
    for task in tasks:
        if [row["block"] for row in per_task[task]] != blocks:
            raise RankoneError(f"task vector {task!r}: has different transformer blocks than {tasks[0]!r}")
    mean = []
    for index, block in enumerate(blocks):
        attention = sum(per_task[task][index]["attention"] for task in tasks) / len(tasks)
        mlp = sum(per_task[task][index]["mlp"] for task in tasks) / len(tasks)
        mean.append({"block": block, "attention": attention, "mlp": mlp})
    return {"tasks": tasks, "blocks": mean, "per_task": per_task}


def compute_task_vectors(
    workspace: Workspace,
    plot: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write `task_vectors/<task>.safetensors` for every workspace task and the analysis.

    Returns the analysis (also written to `task_vectors/analysis.json`; with `plot`, the
    figure goes to `task_vectors/analysis.png`). One task vector is in memory at a time.
    """
    if plot:
        require_matplotlib()
    tasks = workspace.tasks
    if not tasks:
        raise RankoneError(f"{workspace.manifest_path}: the workspace has no tasks; run `rankone fetch` with experts first")
    # Both read a tensor at a time (only `visual.*` keys are asked for, so the base's text tower is never read).
    base = workspace.lazy_tensors("base.safetensors")
    per_task: dict[str, list[dict[str, float]]] = {}
    with workspace.transaction() as staging:
        for task in tasks:
            expert = workspace.lazy_tensors(f"experts/{task}.safetensors")
            squares: dict[int, dict[str, float]] = {}

            def counted(items: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
                for key, tensor in items:
                    add_squares(squares, key, tensor)
                    yield key, tensor

            # One tensor of τ in memory at a time: each difference is written as it is made.
            staging.save_tensor_stream(task_vector_path(task), counted(task_vector_items(base, expert, task)),
                                       metadata={"task": task})
            per_task[task] = norms_of(squares)
            if progress is not None:
                progress(task)
        analysis = analyze(per_task)
        staging.write_json(ANALYSIS_FILE, analysis)
        if plot:
            plot_analysis(analysis, staging.path(ANALYSIS_PLOT))
    return analysis


def load_task_vectors(workspace: Workspace, tasks: list[str] | None = None) -> list[LazyTensors]:
    """The stored task vectors, in workspace task order (or the order of `tasks`), each tensor read when asked for.

    Every file is checked against the manifest now; no tensor is in memory until a caller
    takes it, so a stage that goes one parameter at a time across the T tasks holds one
    parameter × T, not T task vectors (docs/scaling.md).
    """
    tasks = workspace.tasks if tasks is None else tasks
    return [workspace.lazy_tensors(task_vector_path(task)) for task in tasks]


