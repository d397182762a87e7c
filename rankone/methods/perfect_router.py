"""The "perfect router": the ceiling of any routing of MLP weights.

For task t it uses the static part θ0 + λΣτ (as stored in `pool.safetensors`) everywhere
except the MLP weight matrices, which are task t's own fine-tuned ones. No router can do
better by recombining MLP weights, so RankOne-MoE's place between task arithmetic and this
ceiling says how much of the reachable gain it recovers. It is an oracle: it is told the task.
"""

from __future__ import annotations

import torch
from torch import nn

from rankone.errors import RankoneError
from rankone.methods.base import Method, MethodModel, one_task_at_a_time, register, visual_encoder
from rankone.methods.rankone.pool import MLP_WEIGHT, POOL_FILE, read_pool
from rankone.models import count_parameters, visual_state
from rankone.workspace import Workspace


def load_perfect_router(workspace: Workspace, method: str, device: torch.device) -> MethodModel:
    """The eval loader of `rankone eval --method perfect-router` (needs `rankone build-pool`)."""
    if not workspace.has(POOL_FILE):
        raise RankoneError(f"{workspace.path(POOL_FILE)}: missing; run `rankone build-pool` first (its static part is the ceiling's)")
    stored = read_pool(workspace)
    tasks = workspace.tasks

    def build(task: str) -> nn.Module:
        expert = visual_state(workspace.load_tensors(f"experts/{task}.safetensors"))
        tower = {key: (expert[key] if MLP_WEIGHT.match(key) else value) for key, value in stored.static.items()}
        return visual_encoder(workspace.architecture, tower, device)

    mlp = sum(value.numel() for key, value in stored.static.items() if MLP_WEIGHT.match(key))
    return MethodModel(encoder_for_task=one_task_at_a_time(tasks, method, build), parameters=count_parameters(stored.static) + (len(tasks) - 1) * mlp, name=method)


METHOD = register(Method(name="perfect-router", kind="reference", summary="oracle: static part + the task's own MLP weights",
                         row=110, load=load_perfect_router, eval_inputs=("base", "experts", "pool"), oracle=True, needs_task=True))
