"""RankOne-MoE's model from a workspace, and in rankone's artifact (`rankone.methods.artifact`).

Its `model.safetensors` holds the static image tower (θ0 + λΣτ; MLP weights pretrained,
MLP biases static), the pool (`*.pool_u`, `*.pool_v`, named as in pool.safetensors), the
routers (`*.mlp.router.*`) and the heads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rankone.errors import RankoneError
from rankone.methods.artifact import Classifier, artifact_tensors, classifier_from_workspace, write_artifact
from rankone.methods.base import load_router_state
from rankone.methods.rankone.module import parameter_counts, routed_model
from rankone.methods.rankone.pool import read_pool
from rankone.methods.rankone.routers import scorer_of
from rankone.models import FULL_PRECISION, resolve_dtype
from rankone.workspace import Workspace, read_tensors_metadata

ADAPTED_ROUTERS = "adapted/rankone.safetensors"


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
    kind = router_kind(metadata)
    model = routed_model(workspace.architecture, stored.static, stored.pool, stored.lam, select, routing, stored.tasks, **kind_arguments(kind))
    load_router_state(model, routers, str(workspace.path(ADAPTED_ROUTERS)))
    settings = {"k": stored.k, "lambda": stored.lam, "select": select, "routing": routing,
                "tasks": stored.tasks, **kind, "heads": metadata.get("heads", {})}
    if "init" in metadata:  # entropy routers started from a fit of another kind (`--init`)
        settings["init"] = metadata["init"]
    return model.to(device).eval(), settings


def router_kind(record: dict[str, Any]) -> dict[str, Any]:
    """The router kind and gate an adapted file or an export records (those written before kinds existed: entropy)."""
    return {"router": record.get("router", "entropy"), "gate": record.get("gate", "top-p"),
            "temperature": record.get("temperature", 1.0), "gate_scale": record.get("gate_scale", 1.0)}


def kind_arguments(kind: dict[str, Any]) -> dict[str, Any]:
    """`router_kind`'s record as `routed_model`'s keyword arguments."""
    return {"scorer": scorer_of(kind["router"]), "gate": kind["gate"], "temperature": kind["temperature"], "scale": kind["gate_scale"]}


def load_workspace(workspace: Workspace, device: torch.device | str = "cpu") -> Classifier:
    """The adapted model of a workspace with heads for the tasks its routers were adapted on."""
    visual, settings = routed_from_workspace(workspace, device)
    heads_record = settings.pop("heads")
    return classifier_from_workspace(workspace, visual, heads_record, {"method": "rankone", **settings}, device)


# The routed tower's parameter names → the pool file's names, so loading reuses `routed_model`.
_POOL_NAMES = {"fc_u": "c_fc.pool_u", "fc_v": "c_fc.pool_v", "proj_u": "c_proj.pool_u", "proj_v": "c_proj.pool_v"}


def stored_name(name: str) -> str:
    stem, _, last = name.rpartition(".")
    return f"{stem}.{_POOL_NAMES[last]}" if stem.endswith(".mlp") and last in _POOL_NAMES else name


def added_by_rankone(name: str) -> bool:
    """The tensors RankOne-MoE adds to the tower: the pool and the routers."""
    return name.endswith((".pool_u", ".pool_v")) or ".mlp.router." in name


def rankone_tensors(model: Classifier, dtype: str = FULL_PRECISION) -> dict[str, Tensor]:
    """model.safetensors: pool and routers in `dtype`, everything else fp32."""
    return artifact_tensors(model, dtype, stored_name, added_by_rankone)


def export(workspace: Workspace, folder: Path, dtype: str = FULL_PRECISION, device: torch.device | str = "cpu",
           max_shard_bytes: int | None = None) -> dict[str, Any]:
    """Write the artifact's weights into `folder`; returns rankone.json's content.

    `dtype` is the storage precision of the pool and the routers, the parts RankOne-MoE
    adds; the tower, pretrained MLP weights and heads stay fp32 (issue 6: the artifact's
    size against the fp32 tower). `rankone.export` owns the folder: staging, the model card,
    rankone.json and the commit.
    """
    resolve_dtype(dtype)
    model = load_workspace(workspace, device)
    config = {**model.config, "dtype": dtype,
              "storage": {"pool": dtype, "routers": dtype, "tower": "fp32", "heads": "fp32"},
              "parameters": {**parameter_counts(model.visual), "heads": sum(model.head(task).numel() for task in model.tasks)}}
    return write_artifact(folder, rankone_tensors(model, dtype), config, max_shard_bytes)


def from_export(config: dict[str, Any], tower: dict[str, Tensor], source: str) -> nn.Module:
    """The routed tower of an exported RankOne-MoE from its tensors; a missing or misshapen one names `source`."""
    routers = {name.removeprefix("visual."): tensor for name, tensor in tower.items() if ".mlp.router." in name}
    rest = {name: tensor for name, tensor in tower.items() if ".mlp.router." not in name}
    pool = {name: tensor for name, tensor in rest.items() if name.endswith((".pool_u", ".pool_v"))}
    static = {name: tensor for name, tensor in rest.items() if name not in pool}
    visual = routed_model(config["architecture"], static, pool, config["lambda"], config["select"], config["routing"], config["tasks"],
                          **kind_arguments(router_kind(config)))
    load_router_state(visual, routers, source)
    return visual

