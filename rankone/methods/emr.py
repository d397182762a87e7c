"""EMR-Merging (Huang et al., 2024, "Tuning-Free High-Performance Model Merging"): elect, mask, rescale.

Elect one task vector from all: per entry, the sign of Στ (zero read as negative, as the
reference does), and the largest magnitude among the tasks that agree with it,
τ_uni = sign(Στ) ⊙ max_t |τ_t ⊙ m_t|. Mask: m_t marks the entries where τ_t agrees with
that sign. Rescale: r_t = Σ mean|τ_t| / Σ mean|m_t ⊙ τ_uni|, the sums over the tower's
tensors (attention's packed query, key and value counted as the three tensors the
reference sees). Task t's tower is θ0 + r_t·(m_t ⊙ τ_uni).

So it needs the task at inference, as the individual experts do: `rankone eval` and
`compare` evaluate each task with its own tower, and there is no single model to export.
merged/emr.safetensors holds θ0 + τ_uni (the elected model, `visual.*`), each task's mask
(`emr/mask/<index>/<key>`, booleans, by task order) and the rescalers (`emr/rescalers`, in task order).
Its parameter count is θ0 and τ_uni, T rescalers, and the T masks at one bit an entry
(1/32 of a float32 parameter each): 2N + T·N/32 + T for a tower of N.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn

from rankone.errors import RankoneError
from rankone.methods.base import Method, MethodModel, one_task_at_a_time, pretrained_tower, register, visual_encoder
from rankone.methods.matrices import unpacked
from rankone.methods.merging import Progress, TaskVectors, check_vectors, collected, merged_path, merged_tower, summed
from rankone.models import VISUAL_PREFIX, count_parameters
from rankone.options import NoOptions, Options
from rankone.workspace import Workspace

NAME = "emr"
MASK_PREFIX = "emr/mask/"
RESCALERS = "emr/rescalers"
def mean_magnitude(key: str, tensor: torch.Tensor) -> torch.Tensor:
    """Σ mean|·| over the tensors the reference's transformers layout has for `tensor` (`matrices.unpacked`)."""
    return sum(piece.abs().mean() for piece in unpacked(key, tensor))


def elect_mask_rescale_items(task_vectors: TaskVectors) -> Iterator[tuple[str, torch.Tensor]]:
    """merged/emr.safetensors' tensors key by key: τ_uni[key], then each task's mask of that key; the rescalers r_t last
    (their sums are gathered on the way, so no mask outlives its key)."""
    keys = check_vectors(task_vectors)
    scales = torch.zeros(len(task_vectors))
    kept: list[torch.Tensor | float] = [0.0 for _ in task_vectors]
    for key in keys:
        # Each τ_t[key] is read twice (for the elected sign, then for the masks), so only the masks, a byte an entry,
        # are held T at a time.
        sign = torch.where(summed(vector[key].float() for vector in task_vectors) > 0, 1.0, -1.0)
        largest = torch.zeros_like(sign)
        masks = []
        for index, vector in enumerate(task_vectors):
            tensor = vector[key].float()
            masks.append(tensor * sign > 0)
            largest = torch.maximum(largest, (tensor * masks[index]).abs())
            scales[index] += mean_magnitude(key, tensor)
            del tensor
        unified = largest * sign
        yield key, unified
        for index, mask in enumerate(masks):
            kept[index] = kept[index] + mean_magnitude(key, unified * mask)
            yield f"{MASK_PREFIX}{index}/{key}", mask
    yield RESCALERS, scales / torch.tensor([float(total) for total in kept])


def emr(task_vectors: TaskVectors, options: Options, progress: Progress = None) -> Iterator[tuple[str, torch.Tensor]]:
    """What merged/emr.safetensors holds, tensor by tensor: τ_uni as the update to θ0, the masks and the rescalers (see
    the module's docstring); masks are named by the task's index in the workspace's task order, which the file's
    metadata records. The masks are the file's bulk (T bytes an entry), so they are yielded as made, never all held."""
    for name, tensor in elect_mask_rescale_items(task_vectors):
        yield name, tensor
        if progress is not None and name.startswith(VISUAL_PREFIX):
            progress(name)


def task_tower(stored: dict[str, torch.Tensor], base: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    """θ0 + r_t·(m_t ⊙ τ_uni) for task number `index`, τ_uni read back as stored − θ0."""
    rescaler = stored[RESCALERS][index]
    tower = {}
    for key, pretrained in base.items():
        mask = stored[f"{MASK_PREFIX}{index}/{key}"]
        tower[key] = (pretrained.float() + rescaler * mask * (stored[key].float() - pretrained.float())).to(pretrained.dtype)
    return tower


def load_emr(workspace: Workspace, method: str, device: torch.device) -> MethodModel:
    relpath = merged_path(NAME)
    stored = merged_tower(workspace, NAME)
    base = {key: value for key, value in pretrained_tower(workspace).items() if key.startswith(VISUAL_PREFIX)}
    tasks = workspace.tasks
    if stored[RESCALERS].numel() != len(tasks):
        raise RankoneError(f"{workspace.path(relpath)}: has {stored[RESCALERS].numel()} rescalers, the workspace {len(tasks)} tasks; "
                           f"run `rankone merge --method {NAME}` again")

    def build(task: str) -> nn.Module:
        return visual_encoder(workspace.architecture, task_tower(stored, base, tasks.index(task)), device)

    size = count_parameters(base)
    parameters = 2 * size + math.ceil(len(tasks) * size / 32) + len(tasks)
    return MethodModel(encoder_for_task=one_task_at_a_time(tasks, method, build), parameters=parameters, name=method)


METHOD = register(Method(
    name=NAME, kind="static", summary="elect one task vector, mask and rescale it per task (needs the task at inference)",
    row=79, load=load_emr, options=NoOptions, inputs=("base", "task-vectors"), eval_inputs=("base",),
    output=merged_path(NAME), merge=collected(emr), needs_task=True,
))
