"""The pretrained image tower, zero-shot: the floor every merge should clear."""

from __future__ import annotations

import torch

from rankone.methods.base import Method, MethodModel, pretrained_tower, register, visual_encoder
from rankone.models import count_parameters
from rankone.workspace import Workspace


def load_pretrained(workspace: Workspace, method: str, device: torch.device) -> MethodModel:
    tower = pretrained_tower(workspace)
    encoder = visual_encoder(workspace.architecture, tower, device)
    return MethodModel(encoder_for_task=lambda task: encoder, parameters=count_parameters(tower), name=method)


METHOD = register(Method(name="pretrained", kind="reference", summary="the pretrained tower, zero-shot", row=10,
                         load=load_pretrained, eval_inputs=("base",), tower=pretrained_tower))
