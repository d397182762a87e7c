"""The method registry: every module of this package registers one method (or none) when imported.

`methods.get(name)` finds a method, `methods.registered()` lists them in compare's row
order, `methods.load_method` builds one for evaluation. Adding a method is one new module
here that calls `base.register(Method(...))`; nothing else changes.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Any

import torch

from rankone.errors import RankoneError
from rankone.methods import merging
from rankone.methods.artifact import CONFIG_FILE, WEIGHTS_FILE, Classifier, hub_model_folder, read_artifact
from rankone.methods.base import Method, MethodModel, registered
from rankone.methods.merging import add_update
from rankone.methods.rankone.artifact import load_workspace
from rankone.models import FULL_PRECISION, PrecisionEncoder, dtype_name, preprocess_for, resolve_dtype
from rankone.options import Options
from rankone.sources import HF_SCHEME
from rankone.training import AdaptOptions, task_heads
from rankone.workspace import Workspace

# Every module registers its method on import: the package's contents are the registry.
for _module in pkgutil.walk_packages(__path__, prefix=f"{__name__}."):
    importlib.import_module(_module.name)


def names(kind: str | None = None) -> list[str]:
    """Registered method names (of one kind), in compare's row order."""
    return [method.name for method in registered() if kind is None or method.kind == kind]


def get(name: str, kind: str | None = None, option: str = "--method", default: str | None = None) -> Method:
    """The method called `name` (of `kind`, when given); an unknown name lists the known ones, `default` first."""
    found = {method.name: method for method in sorted(registered(), key=lambda method: method.name != default)
             if kind is None or method.kind == kind}
    if name not in found:
        article = "an" if kind and kind[0] in "aeiou" else "a"
        what = f"not {article} {kind} method" if kind and any(method.name == name for method in registered()) else "unknown"
        raise RankoneError(f"{option} {name!r}: {what}; choose from {', '.join(found)}")
    return found[name]


def load_method(
    workspace: Workspace, method: str, device: torch.device | str = "cpu", dtype: str | torch.dtype = FULL_PRECISION
) -> MethodModel:
    """The method's encoders and parameter count, ready for `evaluate.evaluate`.

    `dtype` (fp32, fp16, bf16) is the precision every encoder runs in; loaders build in fp32
    and the encoders are cast here, so every method gets half precision the same way.
    """
    chosen = get(method)
    device = torch.device(device)
    compute_dtype = resolve_dtype(dtype)
    method_model = chosen.load(workspace, method, device)
    if not method_model.name:
        method_model.name = method
    if method_model.preprocess is None:
        method_model.preprocess = preprocess_for(workspace.architecture)
    if compute_dtype != torch.float32:
        full_precision = method_model.encoder_for_task
        method_model.encoder_for_task = lambda task: PrecisionEncoder(full_precision(task), compute_dtype)
    method_model.dtype = dtype_name(compute_dtype)
    return method_model


def option_flag(name: str) -> str:
    """The CLI flag of an option field, looked up in every method's options (`lam` → `--lambda`)."""
    for method in registered():
        for info in method.options.options():
            if info.name == name:
                return info.flag
    return "--" + name.replace("_", "-")


def method_options(method: str | Method, **values: Any) -> Options:
    """`method`'s options from keyword values; None means the default, and a value it does not use is an error.

    The one place the CLI, the YAML runner and library callers turn loose values into a
    method's checked options: `method_options("ties", lam=0.4, top=0.1)`.
    """
    chosen = get(method) if isinstance(method, str) else method
    own = {info.name for info in chosen.options.options()}
    for name, value in values.items():
        if value is not None and name not in own:
            raise RankoneError(f"{option_flag(name)}: not used by --method {chosen.name}")
    return chosen.options.from_values({name: value for name, value in values.items() if name in own})


def merge_task_vectors(task_vectors: list[dict[str, torch.Tensor]], method: str, progress=None, **values: Any) -> dict[str, torch.Tensor]:
    """The update a static `method` adds to θ0, from task vectors alone (options as keyword values)."""
    chosen = get(method, "static")
    return chosen.merge(task_vectors, method_options(chosen, **values), progress)


def merged_state(base_visual: dict[str, torch.Tensor], task_vectors: list[dict[str, torch.Tensor]], method: str,
                 progress=None, **values: Any) -> dict[str, torch.Tensor]:
    """θ0 + the update of a static `method`, for every `visual.*` tensor of the base, in the base's dtype."""
    return add_update(base_visual, merge_task_vectors(task_vectors, method, progress, **values))


def merge_workspace(workspace: Workspace, method: str, *, device: torch.device | str = "cpu", progress=None, **values: Any) -> dict:
    """`rankone merge`: the workspace's task vectors merged by a static `method` into merged/<method>.safetensors.

    Returns the record stored in the file's metadata ({"method", every option by its YAML key}).
    """
    chosen = get(method, "static")
    return merging.merge_workspace(workspace, chosen, method_options(chosen, **values), device=device, progress=progress)


def adapt_workspace(workspace: Workspace, method: str, options: AdaptOptions, **values: Any) -> str:
    """`rankone adapt`: train an adaptive `method` on unlabeled images; returns the relpath written."""
    chosen = get(method, "adaptive")
    return chosen.adapt(workspace, options, method_options(chosen, **values))


def load(path: Path | str, device: torch.device | str = "cpu", dtype: str | torch.dtype | None = None) -> Classifier:
    """An exported routed model (a folder with rankone.json, or `hf:ORG/NAME[@REVISION]` pushed with
    `rankone push`) or a workspace (its adapted RankOne-MoE) as a classifier.

    `dtype` (fp32, fp16, bf16 or a torch dtype) is the precision the image tower runs in
    (default fp32: parts stored in half precision are widened); logits are fp32 whatever it is.
    """
    compute_dtype = resolve_dtype(dtype) if dtype is not None else torch.float32
    folder = hub_model_folder(str(path)) if str(path).startswith(HF_SCHEME) else Path(path)
    if (folder / CONFIG_FILE).is_file():
        config, tower, heads = read_artifact(folder)
        method = get(config.get("method", "rankone"), option=f"{folder / CONFIG_FILE}: method")
        if method.from_export is None:
            raise RankoneError(f"{folder / CONFIG_FILE}: method {method.name} has no exported model to load")
        visual = method.from_export(config, tower, str(folder / WEIGHTS_FILE))
        model = Classifier(visual, heads, config.get("classnames", {}), config)
        return model.to(device=device, dtype=compute_dtype).eval()
    workspace = Workspace(folder)
    if workspace.exists():
        return load_workspace(workspace, device).to(dtype=compute_dtype)
    raise RankoneError(f"{path}: neither an exported model (no {CONFIG_FILE}) nor a workspace (no manifest.json)")


def method_classifier(workspace: Workspace, method: str, task: str, requests: Any, device: torch.device | str = "cpu",
                      dtype: str | torch.dtype | None = None) -> Classifier:
    """Any evaluable method of a workspace as a classifier for one task: that task's encoder (its own tower, for
    methods that need the task) with the zero-shot head of `requests` ({task: (class names, templates)},
    `training.head_requests`). What `rankone predict --method NAME` runs."""
    chosen = get(method)
    device = torch.device(device)
    method_model = load_method(workspace, method, device, dtype or FULL_PRECISION)
    heads = task_heads(workspace, requests, device)
    names, _ = requests[task]
    config = {"architecture": workspace.architecture, "method": method, "needs_task": chosen.needs_task}
    return Classifier(method_model.encoder_for_task(task), heads, {task: list(names)}, config).to(device).eval()


def available_methods(workspace: Workspace, include_oracles: bool = False) -> list[str]:
    """Names of the methods whose inputs the workspace holds, in compare's row order.

    Oracles (told the task) run only when asked for by name, so they are left out unless
    `include_oracles`.
    """
    return [method.name for method in registered()
            if (include_oracles or not method.oracle) and not method.missing_files(workspace)]


__all__ = [
    "Classifier", "Method", "MethodModel", "adapt_workspace", "available_methods", "get", "load", "load_method", "method_classifier",
    "merge_task_vectors", "merge_workspace", "merged_state", "method_options", "names", "registered",
]
