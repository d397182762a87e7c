"""Layer-wise AdaMerging: task arithmetic with one trained coefficient per task and parameter group.

docs/method.md §10: θ = θ0 + Σt λ_{t,g}·τt, where g is the parameter group of each
tensor, λ starts at 0.3 everywhere (so the initial model IS task arithmetic with λ = 0.3)
and is trained by the same entropy objective as the routers (Adam, lr 1e-3 by default).

Parameter groups (our choice, recorded in the saved file): a group is one module's
weight and bias together. A transformer block therefore has six groups (ln_1, attn.in_proj,
attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj); every tensor outside the blocks (conv1,
class_embedding, positional_embedding, ln_pre, ln_post, proj) is a group of its own. The
name of a group is its tensors' key without the trailing weight/bias. ViT-B/32 has
12·6 + 6 = 78 groups, so 8 tasks train 624 numbers. No clamp: the method asks for none.

The merged weights are rebuilt from θ0 and the stacked task vectors at every step and the
open_clip tower runs on them through torch.func.functional_call, so gradients reach the
coefficients and no weight is ever copied into the module.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from rankone.errors import RankoneError
from rankone.methods.base import Method, MethodModel, one_tower_model, pretrained_tower, register
from rankone.models import VISUAL_PREFIX, load_visual, visual_state
from rankone.options import DEFAULT_LAMBDA, Options, learning_rate_option
from rankone.task_vectors import load_task_vectors
from rankone.training import AdaptOptions, adapt_with_checkpoints, adaptation_inputs, classify_with, save_adapted, task_heads
from rankone.workspace import Workspace, read_tensors_metadata

ADAPTED_COEFFICIENTS = "adapted/adamerging.safetensors"
COEFFICIENTS = "coefficients"
# The initial model is task arithmetic at the default λ.
INITIAL_COEFFICIENT = DEFAULT_LAMBDA


@dataclass(frozen=True)
class AdaMergingOptions(Options):
    lr: float = learning_rate_option(1e-3)  # AdaMerging's own rate


_PARAMETER_SUFFIX = re.compile(r"[._](weight|bias)$")


def group_name(key: str) -> str:
    """`visual.transformer.resblocks.0.attn.in_proj_weight` → `visual.transformer.resblocks.0.attn.in_proj`."""
    return _PARAMETER_SUFFIX.sub("", key)


def parameter_groups(keys: list[str]) -> list[str]:
    """The groups of the image-tower `keys`, in order of first appearance."""
    groups: dict[str, None] = {}
    for key in keys:
        if key.startswith(VISUAL_PREFIX):
            groups.setdefault(group_name(key), None)
    return list(groups)


def layerwise_merge(
    pretrained: dict[str, Tensor], task_vectors: dict[str, Tensor], coefficients: Tensor, groups: list[str]
) -> dict[str, Tensor]:
    """θ0 + Σt λ[t, g(key)]·τt[key] for every key of `pretrained`.

    `task_vectors[key]` is the stack (T, *shape) of the tasks' τ for that key;
    `coefficients` is (T, groups). Differentiable in `coefficients`.
    """
    index = {group: position for position, group in enumerate(groups)}
    merged: dict[str, Tensor] = {}
    for key, tensor in pretrained.items():
        group = group_name(key)
        if group not in index:
            raise RankoneError(f"adamerging: tensor {key} belongs to no coefficient group")
        if key not in task_vectors:
            raise RankoneError(f"task vectors: lack tensor {key} of the base image tower")
        stack = task_vectors[key]
        merged[key] = tensor + torch.tensordot(coefficients[:, index[group]].to(stack.dtype), stack, dims=1).to(tensor.dtype)
    return merged


def stack_task_vectors(base_visual: dict[str, Tensor], task_vectors: list[dict[str, Tensor]], consume: bool = False) -> dict[str, Tensor]:
    """{key: (T, *shape)} for every image-tower key of the base, in the base's dtype.

    `consume` removes each key from the task-vector dicts once stacked, so the stacks never
    coexist with a full second copy (T towers of memory, for ViT-L several GB).
    """
    if not task_vectors:
        raise RankoneError("adamerging: no task vectors given")
    stacks: dict[str, Tensor] = {}
    for key, tensor in base_visual.items():
        for position, vector in enumerate(task_vectors):
            if key not in vector:
                raise RankoneError(f"task vector {position}: lacks tensor {key}")
            if vector[key].shape != tensor.shape:
                raise RankoneError(f"task vector {position}: tensor {key} has shape {tuple(vector[key].shape)}, the base has {tuple(tensor.shape)}")
        stacks[key] = torch.stack([vector[key].to(tensor.dtype) for vector in task_vectors])
        if consume:
            for vector in task_vectors:
                del vector[key]
    return stacks


class AdaMergingModel(nn.Module):
    """Images → embeddings of the layer-wise merged tower; `coefficients` (T × groups) is the only trainable tensor."""

    def __init__(
        self,
        architecture: dict[str, Any],
        base_visual: dict[str, Tensor],
        task_vectors: list[dict[str, Tensor]],
        init: float = INITIAL_COEFFICIENT,
        *,
        consume: bool = False,
    ) -> None:
        super().__init__()
        base_visual = visual_state(base_visual)
        # The tower holds θ0; functional_call swaps in the merged tensors for each forward.
        self.tower = load_visual(architecture, base_visual)
        self.tower.requires_grad_(False)
        self.keys = [VISUAL_PREFIX + name for name, _ in self.tower.named_parameters()]
        self.groups = parameter_groups(self.keys)
        stacks = stack_task_vectors({key: base_visual[key] for key in self.keys}, task_vectors, consume=consume)
        # Buffers (not a dict) so that .to(device) moves the task vectors with the model.
        for position, key in enumerate(self.keys):
            self.register_buffer(f"task_vector_{position}", stacks[key], persistent=False)
        self.coefficients = nn.Parameter(torch.full((len(task_vectors), len(self.groups)), float(init)))

    def task_vector_stacks(self) -> dict[str, Tensor]:
        return {key: getattr(self, f"task_vector_{position}") for position, key in enumerate(self.keys)}

    def merged_state(self) -> dict[str, Tensor]:
        """The merged image tower (`visual.*` keys) for the current coefficients."""
        pretrained = {VISUAL_PREFIX + name: parameter for name, parameter in self.tower.named_parameters()}
        return layerwise_merge(pretrained, self.task_vector_stacks(), self.coefficients, self.groups)

    def forward(self, images: Tensor) -> Tensor:
        merged = {key.removeprefix(VISUAL_PREFIX): tensor for key, tensor in self.merged_state().items()}
        return functional_call(self.tower, merged, (images,))

    def load_coefficients(self, coefficients: Tensor, groups: list[str], source: str) -> None:
        if list(groups) != self.groups:
            raise RankoneError(f"{source}: coefficient groups do not match this architecture's (rerun `rankone adapt --method adamerging`)")
        if tuple(coefficients.shape) != tuple(self.coefficients.shape):
            raise RankoneError(f"{source}: tensor {COEFFICIENTS} has shape {tuple(coefficients.shape)}, expected {tuple(self.coefficients.shape)}")
        with torch.no_grad():
            self.coefficients.copy_(coefficients)


def read_coefficients(workspace: Workspace) -> tuple[Tensor, dict[str, Any]]:
    """The trained coefficients (T × groups) and the metadata saved with them."""
    tensors = workspace.load_tensors(ADAPTED_COEFFICIENTS)
    path = workspace.path(ADAPTED_COEFFICIENTS)
    try:
        metadata = json.loads(read_tensors_metadata(path)["rankone"])
        metadata["tasks"], metadata["groups"]
    except (KeyError, ValueError, TypeError):
        raise RankoneError(f"{path}: metadata lacks tasks or groups; rerun `rankone adapt --method adamerging`") from None
    if COEFFICIENTS not in tensors:
        raise RankoneError(f"{path}: lacks tensor {COEFFICIENTS}")
    return tensors[COEFFICIENTS], metadata


def adamerging_from_workspace(workspace: Workspace, device: torch.device | str = "cpu", trained: bool = True) -> AdaMergingModel:
    """The model over every workspace task; with `trained`, the coefficients of adapted/adamerging.safetensors."""
    tasks = workspace.tasks
    if trained:
        coefficients, metadata = read_coefficients(workspace)
        tasks = list(metadata["tasks"])
    model = AdaMergingModel(workspace.architecture, pretrained_tower(workspace), load_task_vectors(workspace, tasks), consume=True)
    if trained:
        model.load_coefficients(coefficients, metadata["groups"], str(workspace.path(ADAPTED_COEFFICIENTS)))
    return model.to(device)


def adamerging_tower(workspace: Workspace) -> dict[str, Tensor]:
    """The merged image tower (`visual.*`) of the trained coefficients."""
    model = adamerging_from_workspace(workspace, "cpu")
    with torch.no_grad():
        return {key: tensor.detach() for key, tensor in model.merged_state().items()}


def load_adamerging(workspace: Workspace, method: str, device: torch.device) -> MethodModel:
    """The eval loader: one merged tower, from the trained coefficients, for every task."""
    return one_tower_model(workspace, adamerging_tower(workspace), method, device)


def adapt_adamerging(workspace: Workspace, options: AdaptOptions, method_options: AdaMergingOptions) -> str:
    """Train the coefficients on unlabeled images; write adapted/adamerging.safetensors."""
    known = workspace.tasks
    inputs = adaptation_inputs(workspace, options, known)
    model = adamerging_from_workspace(workspace, options.device, trained=False)
    heads = task_heads(workspace, inputs.requests, options.device)
    config = {"method": "adamerging", "seed": options.seed, "lr": method_options.lr, "batch_size": options.batch_size,
              "tasks": known, "adapted_on": inputs.tasks, "init": INITIAL_COEFFICIENT}
    log = adapt_with_checkpoints(workspace, "adamerging", classify_with(model, heads), [model.coefficients],
                                    inputs.unlabeled, options, config, method_options.lr)
    return save_adapted(workspace, ADAPTED_COEFFICIENTS, {COEFFICIENTS: model.coefficients.detach()}, config, options,
                        inputs.requests, log, groups=model.groups)


METHOD = register(Method(
    name="adamerging", kind="adaptive", summary="layer-wise task arithmetic, coefficients trained on unlabeled images",
    row=80, load=load_adamerging, options=AdaMergingOptions, inputs=("base", "task-vectors"),
    eval_inputs=("base", "task-vectors"), output=ADAPTED_COEFFICIENTS, adapt=adapt_adamerging,
    tower=adamerging_tower, across_processes=True,
))
