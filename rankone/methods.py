"""The table of evaluable methods: name → how to build its image encoder for each task.

A loader takes (workspace, method name, device) and returns a `MethodModel`. Entries are
either the loader itself or a "module:function" string imported on first use, so adding a
method is one line here and its heavy imports stay out of `rankone --help`.

`parameters` counts every tensor the image model needs at inference, classification heads
excluded (SPEC "Parameter accounting"); for `individual` it is T towers.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rankone.errors import RankoneError
from rankone.models import PrecisionEncoder, count_parameters, dtype_name, load_clip, preprocess_for, resolve_dtype, visual_state
from rankone.workspace import Workspace


@dataclass
class MethodModel:
    """A method ready to evaluate: `encoder_for_task(task)` maps preprocessed images to image embeddings."""

    encoder_for_task: Callable[[str], nn.Module]
    parameters: int
    name: str = ""
    # open_clip's evaluation transform; `load_method` fills it in from the workspace when a loader leaves it None.
    preprocess: Callable[[Any], torch.Tensor] | None = None
    # The precision the encoders run in (`load_method(dtype=...)`); embeddings, heads and logits are fp32 whatever it is.
    dtype: str = "fp32"


Loader = Callable[[Workspace, str, torch.device], MethodModel]


def visual_encoder(architecture: dict[str, Any], visual_tensors: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> nn.Module:
    """The image tower of `architecture` with `visual_tensors` loaded, in eval mode on `device`."""
    model = load_clip(architecture, visual_state(visual_tensors))
    encoder = model.visual
    del model
    return encoder.to(device).eval()


def _pretrained(workspace: Workspace, method: str, device: torch.device) -> MethodModel:
    base_visual = visual_state(workspace.load_tensors("base.safetensors"))
    encoder = visual_encoder(workspace.architecture, base_visual, device)
    return MethodModel(encoder_for_task=lambda task: encoder, parameters=count_parameters(base_visual), name=method)


def one_task_at_a_time(tasks: list[str], method: str, build: Callable[[str], nn.Module]) -> Callable[[str], nn.Module]:
    """`encoder_for_task` for methods with one tower per task, keeping one in memory at a time.

    Evaluation goes task by task, so a T-task method never holds T towers at once.
    """
    loaded: dict[str, nn.Module] = {}

    def encoder_for_task(task: str) -> nn.Module:
        if task not in tasks:
            raise RankoneError(f"--method {method}: no expert for task {task!r}; the workspace has {', '.join(tasks)}")
        if task not in loaded:
            loaded.clear()
            loaded[task] = build(task)
        return loaded[task]

    return encoder_for_task


def _individual(workspace: Workspace, method: str, device: torch.device) -> MethodModel:
    tasks = workspace.tasks
    tower = count_parameters(visual_state(workspace.load_tensors("base.safetensors")))

    def build(task: str) -> nn.Module:
        return visual_encoder(workspace.architecture, workspace.load_tensors(f"experts/{task}.safetensors"), device)

    return MethodModel(encoder_for_task=one_task_at_a_time(tasks, method, build), parameters=len(tasks) * tower, name=method)


def _static_merge(workspace: Workspace, method: str, device: torch.device) -> MethodModel:
    from rankone.merge import merged_path

    relpath = merged_path(method)
    if not workspace.has(relpath):
        raise RankoneError(f"{workspace.path(relpath)}: missing; run `rankone merge --method {method}` first")
    merged = workspace.load_tensors(relpath)
    encoder = visual_encoder(workspace.architecture, merged, device)
    return MethodModel(encoder_for_task=lambda task: encoder, parameters=count_parameters(visual_state(merged)), name=method)


LOADERS: dict[str, Loader | str] = {
    "pretrained": _pretrained,
    "individual": _individual,
    "weight-averaging": _static_merge,
    "task-arithmetic": _static_merge,
    "ties": _static_merge,
    "dare": _static_merge,
    "rankone": "rankone.artifact:rankone_method",
    "adamerging": "rankone.adamerging:adamerging_method",
    "wemoe": "rankone.wemoe:wemoe_method",
    "perfect-router": "rankone.examples.ceiling:perfect_router_method",
}
# A live view: names registered later appear in error messages too.
METHODS = LOADERS.keys()


def register_method(name: str, loader: Loader | str) -> None:
    """Add a method at run time (plugins); built-in methods are listed in LOADERS above."""
    LOADERS[name] = loader


def _resolve(loader: Loader | str) -> Loader:
    if callable(loader):
        return loader
    module_name, _, function = loader.partition(":")
    return getattr(importlib.import_module(module_name), function)


def load_method(
    workspace: Workspace, method: str, device: torch.device | str = "cpu", dtype: str | torch.dtype = "fp32"
) -> MethodModel:
    """The method's encoders and parameter count, ready for `evaluate.evaluate`.

    `dtype` (fp32, fp16, bf16) is the precision every encoder runs in; loaders build in fp32
    and the encoders are cast here, so every method gets half precision the same way.
    """
    if method not in LOADERS:
        raise RankoneError(f"--method {method!r}: unknown; choose from {', '.join(METHODS)}")
    device = torch.device(device)
    compute_dtype = resolve_dtype(dtype)
    method_model = _resolve(LOADERS[method])(workspace, method, device)
    if not method_model.name:
        method_model.name = method
    if method_model.preprocess is None:
        method_model.preprocess = preprocess_for(workspace.architecture)
    if compute_dtype != torch.float32:
        full_precision = method_model.encoder_for_task
        method_model.encoder_for_task = lambda task: PrecisionEncoder(full_precision(task), compute_dtype)
    method_model.dtype = dtype_name(compute_dtype)
    return method_model
