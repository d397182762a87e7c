"""Each task's own fine-tuned expert: the ceiling of merging, at T towers' cost."""

from __future__ import annotations

import torch
from torch import nn

from rankone.methods.base import Method, MethodModel, pretrained_tower, one_task_at_a_time, register, visual_encoder
from rankone.models import count_parameters
from rankone.workspace import Workspace


def load_individual(workspace: Workspace, method: str, device: torch.device) -> MethodModel:
    tasks = workspace.tasks
    tower = count_parameters(pretrained_tower(workspace))

    def build(task: str) -> nn.Module:
        return visual_encoder(workspace.architecture, workspace.load_tensors(f"experts/{task}.safetensors"), device)

    return MethodModel(encoder_for_task=one_task_at_a_time(tasks, method, build), parameters=len(tasks) * tower, name=method)


METHOD = register(Method(name="individual", kind="reference", summary="each task's own expert", row=20,
                         load=load_individual, eval_inputs=("base", "experts"), needs_task=True))
