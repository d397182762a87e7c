"""The exported model: one folder, `rankone.json` + `model.safetensors`, and `rankone.load`.

`model.safetensors` holds everything inference needs and nothing else: the static image
tower (θ0 + λΣτ; MLP weights pretrained, MLP biases static), the pool (`*.pool_u`,
`*.pool_v`), the routers (`*.mlp.router.*`) and one zero-shot head per task
(`heads.<task>`). No text tower: the heads are already computed.
"""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor, nn

from rankone.errors import RankoneError
from rankone.heads import classify_logits, templates_for
from rankone.methods.base import load_router_state
from rankone.methods.rankone.module import parameter_counts, routed_model
from rankone.methods.rankone.pool import read_pool
from rankone.models import DTYPES, FULL_PRECISION, dtype_support, preprocess_for, resolve_dtype
from rankone.sources import HF_SCHEME, hf_snapshot
from rankone.training import task_heads
from rankone.workspace import Workspace, check_sha256, load_sharded, read_tensors_metadata, save_sharded

CONFIG_FILE = "rankone.json"
WEIGHTS_FILE = "model.safetensors"
# 2: heads carry the base model's logit scale (heads.py); format 1 heads were unit rows.
ARTIFACT_FORMAT = 2
HEAD_PREFIX = "heads."
ADAPTED_ROUTERS = "adapted/rankone.safetensors"
TOP_CLASSES = 5  # classes `predict` lists per image by default
# What `load("hf:...")` fetches of a pushed export: configs, weights (single or sharded) and the card.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.md"]


class RankOneClassifier(nn.Module):
    """The routed image tower with its heads: `encode_image(images)`, `classify(images, task)`."""

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


# ---- building the model from a workspace ------------------------------------------------

def adapted_routers(workspace: Workspace) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Routers and settings from adapted/rankone.safetensors."""
    routers = workspace.load_tensors(ADAPTED_ROUTERS)
    try:
        metadata = json.loads(read_tensors_metadata(workspace.path(ADAPTED_ROUTERS))["rankone"])
    except (KeyError, ValueError):
        raise RankoneError(f"{workspace.path(ADAPTED_ROUTERS)}: metadata missing; rerun `rankone adapt`") from None
    return routers, metadata


def routed_from_workspace(
    workspace: Workspace, device: torch.device | str = "cpu", select: float | None = None, routing: str | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """The adapted routed tower (pool + adapted routers) and the adaptation's settings.

    `select`/`routing` default to those the routers were trained with.
    """
    stored = read_pool(workspace)
    routers, metadata = adapted_routers(workspace)
    if metadata.get("k") != stored.k or metadata.get("lambda") != stored.lam:
        raise RankoneError(f"{workspace.path(ADAPTED_ROUTERS)}: trained on another pool; rerun `rankone adapt`")
    select = metadata.get("select") if select is None else select
    routing = routing or metadata.get("routing", "per-sample")
    model = routed_model(workspace.architecture, stored.static, stored.pool, stored.lam, select, routing, stored.tasks)
    load_router_state(model, routers, str(workspace.path(ADAPTED_ROUTERS)))
    settings = {"k": stored.k, "lambda": stored.lam, "select": select, "routing": routing,
                "tasks": stored.tasks, "heads": metadata.get("heads", {})}
    return model.to(device).eval(), settings


def load_workspace(workspace: Workspace, device: torch.device | str = "cpu") -> RankOneClassifier:
    """The adapted model of a workspace with heads for the tasks its routers were adapted on."""
    device = torch.device(device)
    visual, settings = routed_from_workspace(workspace, device)
    requests = {task: (entry["classnames"], entry["templates"]) for task, entry in settings.pop("heads").items()}
    heads = task_heads(workspace, requests, device)
    classnames = {task: names for task, (names, _) in requests.items()}
    templates = {task: list(templates) if templates is not None else _templates(task) for task, (_, templates) in requests.items()}
    config = {"format": ARTIFACT_FORMAT, "architecture": workspace.architecture, **settings,
              "head_tasks": list(heads), "classnames": classnames, "templates": templates}
    return RankOneClassifier(visual, heads, classnames, config).to(device).eval()


# ---- export and load ---------------------------------------------------------------------

def package_versions() -> dict[str, str]:
    versions = {}
    for package in ("rankone", "torch", "open_clip_torch", "safetensors"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "unknown"
    return versions


def _templates(task: str) -> list[str] | None:
    try:
        return list(templates_for(task))
    except RankoneError:
        return None


def artifact_tensors(model: "RankOneClassifier", dtype: str = FULL_PRECISION) -> dict[str, Tensor]:
    """The tensors of model.safetensors: pool and routers in `dtype`, everything else fp32."""
    tensors = {}
    for name, tensor in model.visual.state_dict().items():
        stored = _stored_name(f"visual.{name}")
        added = stored.endswith((".pool_u", ".pool_v")) or ".mlp.router." in stored
        tensors[stored] = tensor.to(DTYPES[dtype] if added else torch.float32)
    for task in model.tasks:
        tensors[HEAD_PREFIX + task] = model.head(task).float()
    return tensors


def export(workspace: Workspace, folder: Path, dtype: str = FULL_PRECISION, device: torch.device | str = "cpu",
           max_shard_bytes: int | None = None) -> dict[str, Any]:
    """Write the artifact's weights (`model.safetensors`, or shards with an index) into `folder`; returns rankone.json's content.

    `dtype` is the storage precision of the pool and the routers, the parts RankOne-MoE
    adds; the tower, pretrained MLP weights and heads stay fp32 (issue 6: the artifact's
    size against the fp32 tower). `rankone.export` owns the folder: staging, the model card,
    rankone.json and the commit.
    """
    resolve_dtype(dtype)
    model = load_workspace(workspace, device)
    tensors = artifact_tensors(model, dtype)
    config = dict(model.config)
    config.update(
        method="rankone",
        dtype=dtype,
        storage={"pool": dtype, "routers": dtype, "tower": "fp32", "heads": "fp32"},
        parameters={**parameter_counts(model.visual), "heads": sum(model.head(task).numel() for task in model.tasks)},
        versions=package_versions(),
    )
    metadata = {"rankone": json.dumps({key: config[key] for key in ("format", "tasks", "head_tasks", "k", "lambda", "select", "routing", "dtype")})}
    save_sharded(folder, WEIGHTS_FILE, tensors, metadata, max_shard_bytes)
    return config


# The routed tower's parameter names → the pool file's names, so loading reuses `routed_model`.
_POOL_NAMES = {"fc_u": "c_fc.pool_u", "fc_v": "c_fc.pool_v", "proj_u": "c_proj.pool_u", "proj_v": "c_proj.pool_v"}


def _stored_name(name: str) -> str:
    stem, _, last = name.rpartition(".")
    return f"{stem}.{_POOL_NAMES[last]}" if stem.endswith(".mlp") and last in _POOL_NAMES else name


def load_artifact(folder: Path, device: torch.device | str = "cpu", dtype: str | torch.dtype | None = None) -> RankOneClassifier:
    """An exported folder as a classifier; it computes in fp32 unless `dtype` (fp32, fp16, bf16) is given.

    Pool and routers stored in half precision are widened on load, so a half export gives
    the fp32 computation of the rounded experts.
    """
    folder = Path(folder)
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise RankoneError(f"{folder / CONFIG_FILE}: not readable ({error})") from None
    if config.get("kind") == "static":
        raise RankoneError(f"{folder}: a static merge exported in {config.get('layout', 'open_clip')}'s layout; load it with "
                           f"open_clip.create_model_and_transforms('local-dir:{folder}') (see its README.md)")
    if config.get("format") == 1:
        raise RankoneError(f"{folder / CONFIG_FILE}: artifact format 1 (exported before heads carried the logit scale); "
                           "run `rankone export` again")
    if config.get("format") != ARTIFACT_FORMAT:
        raise RankoneError(f"{folder / CONFIG_FILE}: unsupported artifact format {config.get('format')!r}")
    recorded = config.get("files") or config.get("sha256") or {}
    check_sha256(folder, {name: digest for name, digest in recorded.items() if name != CONFIG_FILE}, CONFIG_FILE)
    tensors, _ = load_sharded(folder, WEIGHTS_FILE)
    heads = {name[len(HEAD_PREFIX):]: tensor for name, tensor in tensors.items() if name.startswith(HEAD_PREFIX)}
    routers = {name.removeprefix("visual."): tensor for name, tensor in tensors.items() if ".mlp.router." in name}
    rest = {name: tensor for name, tensor in tensors.items() if not name.startswith(HEAD_PREFIX) and ".mlp.router." not in name}
    pool = {name: tensor for name, tensor in rest.items() if name.endswith((".pool_u", ".pool_v"))}
    static = {name: tensor for name, tensor in rest.items() if name not in pool}
    visual = routed_model(config["architecture"], static, pool, config["lambda"], config["select"], config["routing"], config["tasks"])
    load_router_state(visual, routers, str(folder / WEIGHTS_FILE))
    ordered = {task: heads[task] for task in config.get("head_tasks", list(heads)) if task in heads}
    model = RankOneClassifier(visual, ordered, config.get("classnames", {}), config)
    compute_dtype = resolve_dtype(dtype) if dtype is not None else torch.float32
    return model.to(device=device, dtype=compute_dtype).eval()


def hub_model_folder(source: str) -> Path:
    """The local snapshot of `hf:ORG/NAME[@REVISION]`, downloaded (or, with HF_HUB_OFFLINE=1, found) in huggingface_hub's cache."""
    folder, _ = hf_snapshot(source, HUB_PATTERNS)
    if not (folder / CONFIG_FILE).is_file():
        raise RankoneError(f"{source}: not a model exported by rankone (the repo has no {CONFIG_FILE})")
    return folder


def load(path: Path | str, device: torch.device | str = "cpu", dtype: str | torch.dtype | None = None) -> RankOneClassifier:
    """An exported folder (with rankone.json), a pushed one (`hf:ORG/NAME[@REVISION]`) or a workspace
    (pool + adapted routers) as a classifier.

    `dtype` (fp32, fp16, bf16 or a torch dtype) is the precision the image tower runs in;
    default: the exported one, fp32 for a workspace. Logits are fp32 whatever it is.
    """
    if dtype is not None:
        resolve_dtype(dtype)
    path = hub_model_folder(str(path)) if str(path).startswith(HF_SCHEME) else Path(path)
    if (path / CONFIG_FILE).is_file():
        return load_artifact(path, device, dtype)
    workspace = Workspace(path)
    if workspace.exists():
        model = load_workspace(workspace, device)
        return model.to(dtype=resolve_dtype(dtype)) if dtype is not None else model
    raise RankoneError(f"{path}: neither an exported model (no {CONFIG_FILE}) nor a workspace (no manifest.json)")


# ---- predict ------------------------------------------------------------------------------

def predict(model: RankOneClassifier, images: list[Path], task: str, top: int = TOP_CLASSES, batch_size: int = 32) -> list[dict[str, Any]]:
    """Per image: the `top` classes of `task` with their softmax probabilities, best first."""
    if top < 1:
        raise RankoneError(f"--top {top}: must be at least 1")
    head = model.head(task)
    for path in images:
        if not Path(path).is_file():
            raise RankoneError(f"{path}: no such image file")
    names = model.classnames.get(task) or [str(index) for index in range(head.shape[0])]
    transform = model.preprocess
    results = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        pixels = []
        for path in chunk:
            try:
                with Image.open(path) as image:
                    pixels.append(transform(image.convert("RGB")))
            except (OSError, UnidentifiedImageError) as error:
                raise RankoneError(f"{path}: not a readable image ({error})") from None
        with torch.no_grad():
            probabilities = model.classify(torch.stack(pixels), task).softmax(dim=-1).cpu()
        values, indices = probabilities.topk(min(top, probabilities.shape[1]), dim=-1)
        for path, row_values, row_indices in zip(chunk, values.tolist(), indices.tolist()):
            results.append({"image": str(path), "task": task,
                            "top": [{"class": names[i], "probability": p} for p, i in zip(row_values, row_indices)]})
    return results
