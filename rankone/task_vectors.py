"""Task vectors τt = θt − θ0 and the per-block norm analysis (the paper's Figure 2).

docs/method.md §3: τt = θt − θ0 for every parameter of the image tower; an expert
whose τ is all zeros is an error naming the task (it is the pretrained model renamed).

The analysis asks where fine-tuning moved the weights: per block l, the L2 norm of the
attention part of τ (in_proj weight and bias, out_proj weight and bias, flattened
together) and of the MLP part (c_fc and c_proj weights and biases), averaged over tasks.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch

from rankone.errors import RankoneError
from rankone.models import VISUAL_PREFIX, visual_state
from rankone.plots import plot_analysis, require_matplotlib
from rankone.workspace import Workspace

TASK_VECTOR_DIR = "task_vectors"
ANALYSIS_FILE = f"{TASK_VECTOR_DIR}/analysis.json"
ANALYSIS_PLOT = f"{TASK_VECTOR_DIR}/analysis.png"

_BLOCK_KEY = re.compile(r"^visual\.transformer\.resblocks\.(\d+)\.(attn|mlp)\.(.+)$")
_ATTENTION_PARTS = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")
_MLP_PARTS = ("c_fc.weight", "c_fc.bias", "c_proj.weight", "c_proj.bias")


def task_vector_path(task: str) -> str:
    return f"{TASK_VECTOR_DIR}/{task}.safetensors"


def task_vector(base_visual: dict[str, torch.Tensor], expert_visual: dict[str, torch.Tensor], task: str) -> dict[str, torch.Tensor]:
    """τ = θt − θ0 for every `visual.*` tensor of the base, in float32.

    float32 because a half-precision difference of two nearby weights loses most of its bits.
    """
    vector: dict[str, torch.Tensor] = {}
    base_keys = [key for key in base_visual if key.startswith(VISUAL_PREFIX)]
    extra = [key for key in expert_visual if key.startswith(VISUAL_PREFIX) and key not in base_visual]
    if extra:
        raise RankoneError(f"expert {task!r}: tensor {extra[0]} is not in the base image tower")
    nonzero = False
    for key in base_keys:
        if key not in expert_visual:
            raise RankoneError(f"expert {task!r}: lacks tensor {key}")
        base, expert = base_visual[key], expert_visual[key]
        if tuple(base.shape) != tuple(expert.shape):
            raise RankoneError(f"expert {task!r}: tensor {key} has shape {tuple(expert.shape)}, the base has {tuple(base.shape)}")
        difference = expert.float() - base.float()
        nonzero = nonzero or bool(difference.any())
        vector[key] = difference
    if not base_keys:
        raise RankoneError("base: has no visual.* tensors")
    if not nonzero:
        raise RankoneError(f"expert {task!r}: task vector is all zeros (the expert is the pretrained model under another name)")
    return vector


def block_norms(vector: dict[str, torch.Tensor]) -> list[dict[str, float]]:
    """Per block: L2 norm of the attention part and of the MLP part of one task vector."""
    squares: dict[int, dict[str, float]] = {}
    for key, tensor in vector.items():
        match = _BLOCK_KEY.match(key)
        if match is None:
            continue
        block, module, part = int(match.group(1)), match.group(2), match.group(3)
        if (module == "attn" and part not in _ATTENTION_PARTS) or (module == "mlp" and part not in _MLP_PARTS):
            continue
        group = "attention" if module == "attn" else "mlp"
        sums = squares.setdefault(block, {"attention": 0.0, "mlp": 0.0})
        # Accumulate in float64: a sum of millions of float32 squares drifts otherwise.
        sums[group] += float(tensor.double().square().sum())
    if not squares:
        raise RankoneError("task vector: has no visual.transformer.resblocks.* attention or MLP tensors")
    return [
        {"block": block, "attention": sums["attention"] ** 0.5, "mlp": sums["mlp"] ** 0.5}
        for block, sums in sorted(squares.items())
    ]


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
    base_visual = visual_state(workspace.load_tensors("base.safetensors"))
    tasks = workspace.tasks
    if not tasks:
        raise RankoneError(f"{workspace.manifest_path}: the workspace has no tasks; run `rankone fetch` with experts first")
    per_task: dict[str, list[dict[str, float]]] = {}
    with workspace.transaction() as staging:
        for task in tasks:
            expert_visual = visual_state(workspace.load_tensors(f"experts/{task}.safetensors"))
            vector = task_vector(base_visual, expert_visual, task)
            per_task[task] = block_norms(vector)
            staging.save_tensors(task_vector_path(task), vector, metadata={"task": task})
            del vector, expert_visual
            if progress is not None:
                progress(task)
        analysis = analyze(per_task)
        staging.write_json(ANALYSIS_FILE, analysis)
        if plot:
            plot_analysis(analysis, staging.path(ANALYSIS_PLOT))
    return analysis


def load_task_vectors(workspace: Workspace, tasks: list[str] | None = None) -> list[dict[str, torch.Tensor]]:
    """The stored task vectors, in workspace task order (or the order of `tasks`)."""
    tasks = workspace.tasks if tasks is None else tasks
    return [workspace.load_tensors(task_vector_path(task)) for task in tasks]


