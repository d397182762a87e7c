"""rankone's artifact: a routed model exported as one folder, and the classifier it loads back as.

A routed method (RankOne-MoE, WEMoE) cannot be written in open_clip's layout: its MLPs are
not open_clip's. Its folder holds `rankone.json` (what it is: method, architecture, tasks,
settings, class names, the files with their sha256) and `model.safetensors` (or shards with
an index) with everything inference needs: the routed image tower's tensors (`visual.*`,
named as the method states) and one zero-shot head per task (`heads.<task>`). No text
tower: the heads are already computed. Each method states how to write its tower
(`Method.export`) and how to build it back from the tensors (`Method.from_export`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rankone.data import load_image
from rankone.errors import RankoneError
from rankone.heads import classify_logits
from rankone.templates import templates_for
from rankone.models import DTYPES, FULL_PRECISION, dtype_support, preprocess_for
from rankone.sources import hf_snapshot
from rankone.training import task_heads
from rankone.workspace import Workspace, check_sha256, load_sharded, save_sharded

CONFIG_FILE = "rankone.json"
WEIGHTS_FILE = "model.safetensors"
# 2: heads carry the base model's logit scale (heads.py); format 1 heads were unit rows.
ARTIFACT_FORMAT = 2
HEAD_PREFIX = "heads."
TOP_CLASSES = 5  # classes `predict` lists per image by default
# What loading `hf:ORG/NAME` fetches of a pushed export: configs, weights (single or sharded) and the card.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.md"]


class Classifier(nn.Module):
    """A routed image tower with its heads: `encode_image(images)`, `classify(images, task)`."""

    def __init__(self, visual: nn.Module, heads: dict[str, Tensor], classnames: dict[str, list[str]], config: dict[str, Any]) -> None:
        super().__init__()
        self.visual = visual
        self.tasks = list(heads)
        self.classnames = classnames
        self.config = config
        for index, task in enumerate(self.tasks):
            # Task names may hold characters buffer names cannot; buffers are numbered instead.
            self.register_buffer(f"head_{index}", heads[task])

    def head(self, task: str) -> Tensor:
        if task not in self.tasks:
            raise RankoneError(f"--task {task!r}: unknown task; known tasks: {', '.join(self.tasks)}")
        return getattr(self, f"head_{self.tasks.index(task)}")

    @property
    def preprocess(self):
        """The evaluation transform (PIL image → tensor) the model expects."""
        return preprocess_for(self.config["architecture"])

    def encode_image(self, images: Tensor) -> Tensor:
        """Embeddings in the model's dtype (`classify` takes them to fp32 before the heads)."""
        parameter = next(self.visual.parameters())
        with dtype_support(parameter.dtype, parameter.device):
            return self.visual(images.to(parameter.device, parameter.dtype))

    def classify(self, images: Tensor, task: str) -> Tensor:
        """Logits normalize(embedding) @ headᵀ for `task` (the head carries the logit scale)."""
        head = self.head(task)
        return classify_logits(self.encode_image(images).float(), head.float())

    def forward(self, images: Tensor) -> Tensor:
        return self.encode_image(images)


# ---- from a workspace ------------------------------------------------------------------------

def _templates(task: str) -> list[str] | None:
    try:
        return list(templates_for(task))
    except RankoneError:
        return None


def classifier_from_workspace(workspace: Workspace, visual: nn.Module, heads_record: dict[str, Any], settings: dict[str, Any],
                              device: torch.device | str = "cpu") -> Classifier:
    """`visual` with the heads its adaptation used (`heads_record`: {task: {classnames, templates}}, from the adapted file)."""
    device = torch.device(device)
    requests = {task: (entry["classnames"], entry["templates"]) for task, entry in heads_record.items()}
    heads = task_heads(workspace, requests, device)
    classnames = {task: names for task, (names, _) in requests.items()}
    templates = {task: list(templates) if templates is not None else _templates(task) for task, (_, templates) in requests.items()}
    config = {"format": ARTIFACT_FORMAT, "architecture": workspace.architecture, **settings,
              "head_tasks": list(heads), "classnames": classnames, "templates": templates}
    return Classifier(visual.to(device), heads, classnames, config).to(device).eval()


# ---- writing and reading the folder ------------------------------------------------------------

def package_versions() -> dict[str, str]:
    versions = {}
    for package in ("rankone", "torch", "open_clip_torch", "safetensors"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "unknown"
    return versions


def artifact_tensors(model: Classifier, dtype: str = FULL_PRECISION, stored_name: Callable[[str], str] = lambda name: name,
                     added: Callable[[str], bool] = lambda name: False) -> dict[str, Tensor]:
    """The tensors of model.safetensors: the tower's under `stored_name`, `added` ones (what the method adds
    to the tower) in `dtype`, everything else fp32; then the heads."""
    tensors = {}
    for name, tensor in model.visual.state_dict().items():
        name = stored_name(f"visual.{name}")
        tensors[name] = tensor.to(DTYPES[dtype] if added(name) else torch.float32)
    for task in model.tasks:
        tensors[HEAD_PREFIX + task] = model.head(task).float()
    return tensors


def write_artifact(folder: Path, tensors: dict[str, Tensor], config: dict[str, Any], max_shard_bytes: int | None = None) -> dict[str, Any]:
    """model.safetensors (or shards) in `folder`, its metadata the config's settings; returns the config with versions."""
    config = {**config, "versions": package_versions()}
    settings = {key: config[key] for key in ("format", "method", "tasks", "head_tasks", "dtype") if key in config}
    save_sharded(folder, WEIGHTS_FILE, tensors, {"rankone": json.dumps(settings)}, max_shard_bytes)
    return config


def read_artifact(folder: Path) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, Tensor]]:
    """(rankone.json, the tower's tensors, the heads by task) of an exported folder, every file checked against its sha256."""
    folder = Path(folder)
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise RankoneError(f"{folder / CONFIG_FILE}: not readable ({error})") from None
    if not isinstance(config, dict):
        raise RankoneError(f"{folder / CONFIG_FILE}: not a JSON object")
    if config.get("kind") == "static":
        raise RankoneError(f"{folder}: a static merge exported in {config.get('layout', 'open_clip')}'s layout; load it with "
                           f"open_clip.create_model_and_transforms('local-dir:{folder}') (see its README.md)")
    if config.get("format") == 1:
        raise RankoneError(f"{folder / CONFIG_FILE}: artifact format 1 (exported before heads carried the logit scale); "
                           "run `rankone export` again")
    if config.get("format") != ARTIFACT_FORMAT:
        raise RankoneError(f"{folder / CONFIG_FILE}: unsupported artifact format {config.get('format')!r}")
    # Exports written before the files list recorded only the weights' sha256.
    recorded = config.get("files") or config.get("sha256") or {}
    check_sha256(folder, {name: digest for name, digest in recorded.items() if name != CONFIG_FILE}, CONFIG_FILE)
    tensors, _ = load_sharded(folder, WEIGHTS_FILE)
    heads = {name[len(HEAD_PREFIX):]: tensor for name, tensor in tensors.items() if name.startswith(HEAD_PREFIX)}
    tower = {name: tensor for name, tensor in tensors.items() if not name.startswith(HEAD_PREFIX)}
    ordered = {task: heads[task] for task in config.get("head_tasks", list(heads)) if task in heads}
    return config, tower, ordered


def hub_model_folder(source: str) -> Path:
    """The local snapshot of `hf:ORG/NAME[@REVISION]`, downloaded (or, with HF_HUB_OFFLINE=1, found) in huggingface_hub's cache."""
    folder, _ = hf_snapshot(source, HUB_PATTERNS)
    if not (folder / CONFIG_FILE).is_file():
        raise RankoneError(f"{source}: not a model exported by rankone (the repo has no {CONFIG_FILE})")
    return folder


# ---- predict ------------------------------------------------------------------------------

def predict(model: Classifier, images: list[Path], task: str, top: int = TOP_CLASSES, batch_size: int = 32) -> list[dict[str, Any]]:
    """Per image: the `top` classes of `task` with their softmax probabilities, best first."""
    if top < 1:
        raise RankoneError(f"--top {top}: must be at least 1")
    head = model.head(task)
    for path in images:
        if Path(path).is_dir():
            raise RankoneError(f"{path}: a folder, not an image file (give its images, e.g. {Path(path) / '*.png'})")
        if not Path(path).is_file():
            raise RankoneError(f"{path}: no such image file")
    names = model.classnames.get(task) or [str(index) for index in range(head.shape[0])]
    transform = model.preprocess
    results = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        pixels = [transform(load_image(path)) for path in chunk]
        with torch.no_grad():
            probabilities = model.classify(torch.stack(pixels), task).softmax(dim=-1).cpu()
        values, indices = probabilities.topk(min(top, probabilities.shape[1]), dim=-1)
        for path, row_values, row_indices in zip(chunk, values.tolist(), indices.tolist()):
            results.append({"image": str(path), "task": task,
                            "top": [{"class": names[i], "probability": p} for p, i in zip(row_values, row_indices)]})
    return results
