"""What a workspace or an exported model holds, by role; and what an architecture would cost.

Named `inspection` rather than `inspect`: a module called `inspect` next to cli.py would
shadow the standard library's for anyone running a file of this package as a script.

Reading a workspace touches only the safetensors headers (8-byte length, then JSON with
each tensor's dtype, shape and byte range), so inspecting many gigabytes is instant.
Counting an architecture builds the real RankOne-MoE and WEMoE modules on the `meta`
device: every shape is real, no memory is allocated, ViT-L costs nothing.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rankone.errors import RankoneError
from rankone.methods.rankone import module as rankone_module
from rankone.methods.rankone.pool import mlp_weight_keys, pool_keys
from rankone.methods.wemoe import parameter_counts as wemoe_parameter_counts, wemoe_model
from rankone.models import build_visual
from rankone.options import DEFAULT_LAMBDA
from rankone.workspace import Workspace

ARTIFACT_CONFIG = "rankone.json"
ARTIFACT_WEIGHTS = "model.safetensors"
DEFAULT_KS = (16, 32, 64, 128)
DEFAULT_TASKS = 8
DEFAULT_WEMOE_TASKS = (8, 20)
# Display order of roles; a role not listed here comes last.
ROLES = (
    "pretrained image tower", "pretrained text tower", "image tower", "text tower", "experts", "task vectors", "merged towers",
    "static", "pretrained MLP", "pool", "routers", "coefficients", "task masks", "heads", "checkpoints", "other",
)
_MLP_WEIGHT = re.compile(r"(^|\.)transformer\.resblocks\.\d+\.mlp\.(c_fc|c_proj)\.weight$")
_MAX_HEADER = 100 * 1024 * 1024


@dataclass
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int

    @property
    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count


def read_header(path: Path) -> list[TensorInfo]:
    """The tensors of a safetensors file from its header alone (no tensor data is read)."""
    try:
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) != 8:
                raise RankoneError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (length,) = struct.unpack("<Q", prefix)
            if length > _MAX_HEADER:
                raise RankoneError(f"{path}: not a safetensors file (header length {length} is implausible)")
            header = json.loads(handle.read(length))
    except OSError as error:
        raise RankoneError(f"{path}: not readable ({error.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RankoneError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise RankoneError(f"{path}: not a safetensors file (its header is not a JSON object)")
    tensors = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = entry["data_offsets"]
            tensors.append(TensorInfo(name, entry["dtype"], tuple(entry["shape"]), int(end) - int(start)))
        except (KeyError, TypeError, ValueError):
            raise RankoneError(f"{path}: tensor {name} has a malformed header entry") from None
    return tensors


def role_of(relpath: str, name: str) -> str:
    """The role of tensor `name` in file `relpath` (relative to a workspace or artifact folder)."""
    folder = relpath.split("/", 1)[0] if "/" in relpath else ""
    if folder == "adapted" and "-checkpoints/" in relpath:
        return "checkpoints"
    if folder == "experts":
        return "experts"
    if folder == "task_vectors":
        return "task vectors"
    if folder == "merged" and name.startswith("emr/"):
        # EMR's per-task masks (booleans: their bytes, not their count, are what they cost) and rescalers.
        return "task masks"
    if folder == "merged" and name.startswith("smile/"):
        return "SMILE experts and routers"
    if folder == "merged" or relpath in ("adapted/regmean.safetensors", "adapted/fisher.safetensors"):
        # RegMean and Fisher merging read images, so `rankone adapt` writes them, but each is one merged tower.
        return "merged towers"
    if folder == "heads" or name.startswith("heads."):
        return "heads"
    if relpath == "base.safetensors":
        return "pretrained image tower" if name.startswith("visual.") else "pretrained text tower"
    if relpath == "adapted/adamerging.safetensors":
        return "coefficients"
    if folder == "adapted" or ".mlp.router." in name:
        return "routers"
    if name.endswith((".pool_u", ".pool_v")):
        return "pool"
    if _MLP_WEIGHT.search(name):
        # Outside base.safetensors, unrouted MLP weight matrices are the pretrained ones (docs/method.md §4).
        return "pretrained MLP"
    if name.startswith("static.") or relpath == ARTIFACT_WEIGHTS:
        return "static"
    return "other"


@dataclass
class RoleTotals:
    role: str
    files: set[str] = field(default_factory=set)
    tensors: int = 0
    parameters: int = 0
    nbytes: int = 0


@dataclass
class Inventory:
    """A folder's tensors by role (`kind`: workspace, artifact or file)."""

    path: Path
    kind: str
    roles: list[RoleTotals]
    files: int

    @property
    def total_parameters(self) -> int:
        return sum(row.parameters for row in self.roles)

    @property
    def total_bytes(self) -> int:
        return sum(row.nbytes for row in self.roles)


def _export_files(path: Path) -> tuple[str, list[str]]:
    """(kind, safetensors files) of an exported folder, from the files its rankone.json lists."""
    try:
        record = json.loads((path / ARTIFACT_CONFIG).read_text())
    except (OSError, ValueError) as error:
        raise RankoneError(f"{path / ARTIFACT_CONFIG}: not readable ({error})") from None
    if not isinstance(record, dict):
        raise RankoneError(f"{path / ARTIFACT_CONFIG}: not a JSON object")
    listed = record.get("files") or {ARTIFACT_WEIGHTS: None}
    files = sorted(name for name in listed if name.endswith(".safetensors"))
    missing = [name for name in files if not (path / name).is_file()]
    if missing:
        raise RankoneError(f"{path / missing[0]}: missing; the export is incomplete")
    return ("static export" if record.get("kind") == "static" else "artifact"), files


def _tensor_files(path: Path) -> tuple[str, list[str]]:
    """(kind, safetensors files relative to `path`)."""
    if path.is_file():
        return "file", [path.name]
    if not path.is_dir():
        raise RankoneError(f"{path}: no such file or folder")
    if (path / ARTIFACT_CONFIG).is_file():
        return _export_files(path)
    workspace = Workspace(path)
    if workspace.exists():
        files = sorted(relpath for relpath in workspace.manifest().get("files", {}) if relpath.endswith(".safetensors"))
        missing = [relpath for relpath in files if not (path / relpath).is_file()]
        if missing:
            raise RankoneError(f"{path / missing[0]}: listed in the manifest but missing; rerun `rankone fetch`")
        return "workspace", files
    raise RankoneError(f"{path}: neither a workspace (no manifest.json) nor an exported model (no {ARTIFACT_CONFIG})")


def exported_role(name: str) -> str:
    """A static export's tensor (open_clip or transformers keys): the merged image tower or the base's text tower."""
    return "image tower" if name.startswith(("visual.", "vision_model.", "visual_projection.")) else "text tower"


def inventory(path: Path | str) -> Inventory:
    """Counts and bytes by role for a workspace, an exported model folder or one safetensors file."""
    path = Path(path)
    kind, files = _tensor_files(path)
    root = path.parent if kind == "file" else path
    totals: dict[str, RoleTotals] = {}
    for relpath in files:
        for tensor in read_header(root / relpath):
            if kind == "static export":
                role = exported_role(tensor.name)
            else:
                role = role_of(ARTIFACT_WEIGHTS if kind == "artifact" else relpath, tensor.name)
            row = totals.setdefault(role, RoleTotals(role))
            row.files.add(relpath)
            row.tensors += 1
            row.parameters += tensor.numel
            row.nbytes += tensor.nbytes
    order = {role: position for position, role in enumerate(ROLES)}
    rows = sorted(totals.values(), key=lambda row: (order.get(row.role, len(ROLES)), row.role))
    return Inventory(path=path, kind=kind, roles=rows, files=len(files))


# ---- parameter counts from an architecture alone ----------------------------------------

def _meta_tower_state(architecture: dict[str, Any]) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return {f"visual.{name}": tensor for name, tensor in build_visual(architecture).state_dict().items()}


def rankone_counts(architecture: dict[str, Any], tasks: int, k: int, tower: dict[str, torch.Tensor] | None = None) -> dict[str, int]:
    """RankOne-MoE's inference tensors (tower, pool, routers, total), counted from the real module on `meta`.

    `tower`: the architecture's meta image-tower state, when the caller already has it.
    """
    tower = tower if tower is not None else _meta_tower_state(architecture)
    pool: dict[str, torch.Tensor] = {}
    for key in mlp_weight_keys(tower):
        out_dim, in_dim = tower[key].shape
        if k > min(out_dim, in_dim):
            raise RankoneError(f"--k {k}: larger than the rank limit {min(out_dim, in_dim)} of {key}")
        name_u, name_v = pool_keys(key)
        pool[name_u] = torch.empty(out_dim, tasks * k, device="meta")
        pool[name_v] = torch.empty(in_dim, tasks * k, device="meta")
    with torch.device("meta"):
        model = rankone_module.routed_model(architecture, tower, pool, DEFAULT_LAMBDA, tasks=[f"task{index}" for index in range(tasks)])
    return rankone_module.parameter_counts(model)


def wemoe_counts(architecture: dict[str, Any], tasks: int, tower: dict[str, torch.Tensor] | None = None) -> dict[str, int]:
    """WEMoE's inference tensors (tower, task_vectors, routers, total), counted from the real module on `meta`."""
    tower = tower if tower is not None else _meta_tower_state(architecture)
    task_vectors = [{key: torch.empty_like(tensor) for key, tensor in tower.items()} for _ in range(tasks)]
    with torch.device("meta"):
        model = wemoe_model(architecture, tower, task_vectors, DEFAULT_LAMBDA)
    return wemoe_parameter_counts(model)


def architecture_report(
    architecture: dict[str, Any],
    tasks: int = DEFAULT_TASKS,
    ks: Sequence[int] = DEFAULT_KS,
    wemoe_tasks: Sequence[int] = DEFAULT_WEMOE_TASKS,
) -> dict[str, Any]:
    """Parameter counts of the pretrained tower, RankOne-MoE at each k (with `tasks` tasks) and WEMoE at each task count.

    Heads are not included: their size depends on the class counts, not the architecture.
    """
    if tasks < 1:
        raise RankoneError(f"--tasks {tasks}: must be at least 1")
    state = _meta_tower_state(architecture)
    tower = sum(tensor.numel() for tensor in state.values())
    rankone = [{"tasks": tasks, "k": k, **rankone_counts(architecture, tasks, k, state)} for k in ks]
    wemoe = [{"tasks": count, **wemoe_counts(architecture, count, state)} for count in sorted(set(wemoe_tasks) | {tasks})]
    for row in rankone + wemoe:
        row["relative"] = row["total"] / tower
    return {"architecture": architecture.get("name", "custom"), "tower": tower, "rankone": rankone, "wemoe": wemoe}
