"""The pool oracle: the ceiling of any routing of RankOne-MoE's pool.

Told the task, every block gives that task's k experts gate 1 and every other expert 0:
the static part θ0 + λΣτ with, on the MLPs, θ0 + the task's own rank-k update. A router of
this pool can do no better than pick right everywhere, so a router kind's place between task
arithmetic and this ceiling is the share of the reachable gain it recovers; the perfect
router (the task's full fine-tuned MLPs) is the ceiling of any pool, this one of the one built.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rankone.errors import RankoneError
from rankone.methods.base import Method, MethodModel, register
from rankone.methods.rankone.module import parameter_counts, rankone_mlps, routed_model
from rankone.methods.rankone.pool import read_pool
from rankone.workspace import Workspace

NAME = "pool-oracle"


class TaskPinned(nn.Module):
    """A routed tower that gates every sample to one task's experts (`RankOneMLP.fixed_task`)."""

    def __init__(self, routed: nn.Module, task_index: int) -> None:
        super().__init__()
        self.routed, self.task_index = routed, task_index

    def forward(self, images: Tensor) -> Tensor:
        for mlp in rankone_mlps(self.routed):
            mlp.fixed_task = self.task_index
        return self.routed(images)


def load_pool_oracle(workspace: Workspace, method: str, device: torch.device) -> MethodModel:
    stored = read_pool(workspace)  # a missing pool names `rankone build-pool` (`Workspace.require`)
    routed = routed_model(workspace.architecture, stored.static, stored.pool, stored.lam, None, "per-sample", stored.tasks,
                          scorer="subspace", gate="hard", scale=1.0).to(device).eval()

    def encoder_for_task(task: str) -> nn.Module:
        if task not in stored.tasks:
            raise RankoneError(f"--method {NAME}: the pool has no experts for task {task!r}; it has {', '.join(stored.tasks)}")
        return TaskPinned(routed, stored.tasks.index(task))

    return MethodModel(encoder_for_task=encoder_for_task, parameters=parameter_counts(routed)["total"], name=method)


METHOD = register(Method(name=NAME, kind="reference", summary="oracle: the pool with the task's own experts at gate 1",
                         row=105, load=load_pool_oracle, eval_inputs=("base", "pool"), oracle=True, routed=True, needs_task=True))
