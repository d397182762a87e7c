"""What a method is: one `Method` record per module, registered once with `register`.

A method states, in one place, its name, its kind, what it needs from the workspace, its
options dataclass, and the functions that build (static merges), adapt (adaptive methods),
load for evaluation and export it. `rankone.methods` imports every module of this package,
so a new method is one new file; compare's row order, eval's loaders and adapt's table all
read the registry.

`MethodModel.parameters` counts every tensor the image model needs at inference,
classification heads excluded; for `individual` it is T towers.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rankone.errors import RankoneError
from rankone.models import FULL_PRECISION, count_parameters, load_clip, visual_state
from rankone.options import NoOptions, Options
from rankone.task_vectors import task_vector_path
from rankone.workspace import Workspace, read_tensors_metadata

KINDS = ("reference", "static", "adaptive")
BASE_FILE = "base.safetensors"
POOL_FILE = "pool.safetensors"
# What a method can need from the workspace besides its own output file.
NEEDS = ("base", "experts", "task-vectors", "pool")


@dataclass
class MethodModel:
    """A method ready to evaluate: `encoder_for_task(task)` maps preprocessed images to image embeddings."""

    encoder_for_task: Callable[[str], nn.Module]
    parameters: int
    name: str = ""
    # open_clip's evaluation transform; `load_method` fills it in from the workspace when a loader leaves it None.
    preprocess: Callable[[Any], torch.Tensor] | None = None
    # The precision the encoders run in (`load_method(dtype=...)`); embeddings, heads and logits are fp32 whatever it is.
    dtype: str = FULL_PRECISION


Loader = Callable[[Workspace, str, torch.device], MethodModel]


@dataclass(frozen=True)
class Method:
    """One merging method, as the registry knows it."""

    name: str
    kind: str  # reference, static or adaptive
    summary: str  # one line, for --help and error messages
    row: int  # position in compare's table (the paper's order: references, static, adaptive)
    load: Loader  # (workspace, name, device) → MethodModel, for eval and compare
    options: type[Options] = NoOptions  # options of `merge` (static) or `adapt` (adaptive)
    # Workspace inputs that building or adapting the method reads (adaptive methods also read unlabeled images).
    inputs: tuple[str, ...] = ()
    # Workspace inputs that evaluating it reads, besides its own output.
    eval_inputs: tuple[str, ...] = ("base",)
    output: str | None = None  # the file `rankone merge` or `rankone adapt` writes, relative to the workspace
    # Static merges: (task vectors, options, progress) → the update to add to θ0; a plain tensor function.
    merge: Callable[..., dict[str, torch.Tensor]] | None = None
    # Adaptive methods: (workspace, adapt-stage options, method options) → relpath written.
    adapt: Callable[..., str] | None = None
    # Methods that are one image tower for every task: workspace → that tower's `visual.*` tensors
    # (what `rankone export` writes in open_clip's or transformers' layout).
    tower: Callable[[Workspace], dict[str, torch.Tensor]] | None = None
    # Routed methods: (workspace, folder, dtype, device, max shard bytes) → rankone.json's content,
    # after writing the artifact's weights into the folder (rankone.methods.artifact) ...
    export: Callable[..., dict] | None = None
    # ... and (rankone.json's content, the tower's tensors, source for messages) → the routed tower again.
    from_export: Callable[[dict, dict[str, torch.Tensor], str], nn.Module] | None = None
    # An oracle told the task (perfect router): compared only when asked for by name.
    oracle: bool = False
    # Has routers whose gates `rankone eval --routing` can report.
    routed: bool = False
    # Its model depends on the task (one tower per task, or an oracle told it): compare says so beside its row.
    needs_task: bool = False
    # Adaptive methods trained by `training.minimise_entropy`, which splits each step's batch among torchrun's
    # processes; the others (statistics read in one process) refuse to run under torchrun.
    across_processes: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"method {self.name}: kind {self.kind!r} is not one of {KINDS}")
        unknown = [need for need in (*self.inputs, *self.eval_inputs) if need not in NEEDS]
        if unknown:
            raise ValueError(f"method {self.name}: unknown input {unknown[0]!r}")
        if self.kind == "static" and (self.merge is None or self.output is None):
            raise ValueError(f"method {self.name}: a static method needs `merge` and `output`")
        if (self.export is None) != (self.from_export is None):
            raise ValueError(f"method {self.name}: `export` and `from_export` go together")
        if self.kind == "adaptive" and (self.adapt is None or self.output is None):
            raise ValueError(f"method {self.name}: an adaptive method needs `adapt` and `output`")

    @property
    def exportable(self) -> bool:
        return self.tower is not None or self.export is not None

    def input_files(self, tasks: list[str]) -> list[str]:
        """The workspace files building or adapting the method reads."""
        return needed_files(self.inputs, tasks)

    def eval_files(self, tasks: list[str]) -> list[str]:
        """Every workspace file evaluating the method reads, its own output included."""
        return needed_files(self.eval_inputs, tasks) + ([self.output] if self.output else [])

    def missing_files(self, workspace: Workspace) -> list[str]:
        """The files evaluation needs that the workspace's manifest does not record."""
        present = set(workspace.manifest().get("files", {}))
        return [relpath for relpath in self.eval_files(workspace.tasks) if relpath not in present]

    def settings(self, workspace: Workspace) -> dict[str, Any]:
        """The record the method's output file keeps in its metadata (options, seed, steps…), if any."""
        if self.output is None or not workspace.path(self.output).is_file():
            return {}
        try:
            return json.loads(read_tensors_metadata(workspace.path(self.output)).get("rankone", "{}"))
        except ValueError:
            return {}


def needed_files(needs: tuple[str, ...], tasks: list[str]) -> list[str]:
    """The workspace files behind `needs` (base, experts, task-vectors, pool) for `tasks`."""
    files = {"base": [BASE_FILE], "experts": [f"experts/{task}.safetensors" for task in tasks],
             "task-vectors": [task_vector_path(task) for task in tasks], "pool": [POOL_FILE]}
    return [relpath for need in needs for relpath in files[need]]


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method to the registry (once per name); returns it, so a module can keep `METHOD = register(...)`."""
    if method.name in _REGISTRY and _REGISTRY[method.name] is not method:
        raise ValueError(f"method {method.name!r} is registered twice")
    _REGISTRY[method.name] = method
    return method


def registered() -> list[Method]:
    """Every registered method, in compare's row order."""
    return sorted(_REGISTRY.values(), key=lambda method: (method.row, method.name))


# ---- helpers several loaders share ---------------------------------------------------------

def visual_encoder(architecture: dict[str, Any], visual_tensors: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> nn.Module:
    """The image tower of `architecture` with `visual_tensors` loaded, in eval mode on `device`."""
    model = load_clip(architecture, visual_state(visual_tensors))
    encoder = model.visual
    del model
    return encoder.to(device).eval()


def one_tower_model(workspace: Workspace, tower: dict[str, torch.Tensor], method: str, device: torch.device | str) -> MethodModel:
    """A method that is one image tower (`visual.*` tensors) for every task, ready to evaluate."""
    encoder = visual_encoder(workspace.architecture, tower, device)
    return MethodModel(encoder_for_task=lambda task: encoder, parameters=count_parameters(visual_state(tower)), name=method)


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


def router_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Router tensors of a routed tower under their state-dict names (`transformer.resblocks.N.mlp.router.*`)."""
    return {name: tensor for name, tensor in model.state_dict().items() if ".mlp.router." in name}


def load_router_state(model: nn.Module, routers: dict[str, torch.Tensor], source: str) -> None:
    """Load trained routers into a routed tower; a missing, misshapen or unexpected tensor names `source`."""
    expected = router_state(model)
    for name, tensor in expected.items():
        if name not in routers:
            raise RankoneError(f"{source}: lacks router tensor {name}")
        if routers[name].shape != tensor.shape:
            raise RankoneError(f"{source}: router tensor {name} has shape {tuple(routers[name].shape)}, the model needs {tuple(tensor.shape)}")
    extra = [name for name in routers if name not in expected]
    if extra:
        raise RankoneError(f"{source}: unexpected tensor {extra[0]}")
    model.load_state_dict({name: routers[name] for name in expected}, strict=False)


def pretrained_tower(workspace: Workspace) -> dict[str, torch.Tensor]:
    """The pretrained image tower (`visual.*`) of the workspace base."""
    return visual_state(workspace.load_tensors(BASE_FILE))
