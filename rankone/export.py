"""`rankone export`: a method's model as a folder other tools open, with a model card.

- A method that is one image tower for every task (the static merges, AdaMerging's merged
  weights, the pretrained tower) is written as a whole CLIP: its image tower with the base's
  text tower and logit scale. The default layout is open_clip's Hub layout
  (`open_clip_config.json` + `open_clip_model.safetensors`), which
  `open_clip.create_model_and_transforms("local-dir:OUT")` and `hf-hub:` load unmodified;
  `--format transformers` writes a transformers `CLIPModel` folder (`config.json` +
  `model.safetensors`) instead.
- A routed method (RankOne-MoE) needs its routed module: it writes rankone's artifact for
  `rankone.load`, plus an `open_clip_config.json` that tells any tool its tower's
  architecture and preprocessing.

Every export holds `README.md`, the model card, and `rankone.json`, which lists every file
with its sha256. Exporting again into the same folder replaces exactly that folder's files,
and a folder holding anything else (a user's notes) is refused rather than emptied.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rankone import methods
from rankone.convert import config_from_architecture, open_clip_to_transformers
from rankone.errors import RankoneError
from rankone.methods.base import BASE_FILE
from rankone.methods.artifact import ARTIFACT_FORMAT, CONFIG_FILE, package_versions
from rankone.model_card import write_model_card
from rankone.models import DTYPES, FULL_PRECISION, VISUAL_PREFIX, count_parameters, load_clip, open_clip_config
from rankone.options import Options, option
from rankone.workspace import (
    Workspace, replace_folder, save_sharded, sha256_file, staging_folder, tensor_bytes, write_json_atomic,
)

FORMATS = ("open_clip", "transformers")
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
TRANSFORMERS_CONFIG = "config.json"
TRANSFORMERS_WEIGHTS = "model.safetensors"
CARD_FILE = "README.md"
TORCH_DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """`2GB` (10⁹ bytes, as transformers counts), `500MB`, `1GiB` (2³⁰) or a byte count → bytes."""
    match = _SIZE.match(str(text))
    if not match:
        raise RankoneError(f"--shard-size {text!r}: expected a size such as 2GB, 500MB or 1GiB")
    number, unit = match.groups()
    return int(float(number) * _UNITS[(unit or "b").lower()])


@dataclass(frozen=True, kw_only=True)
class ExportOptions(Options):
    out: Path = option(help="Folder to write the model to (created; an earlier export there is replaced).")
    method: str = option("rankone", "Method to export: " + ", ".join(method.name for method in methods.registered() if method.exportable) + ".")
    format: str = option("open_clip", "Layout of a static merge's folder: open_clip (open_clip_config.json + "
                         "open_clip_model.safetensors) or transformers (a CLIPModel's config.json + model.safetensors). "
                         "RankOne-MoE always writes rankone's artifact.", choices=FORMATS)
    dtype: str = option(FULL_PRECISION, "Storage precision: every tensor of a static merge; the pool and routers of "
                        "RankOne-MoE (its tower and heads stay fp32).", choices=tuple(DTYPES))
    shard_size: int | None = option(None, "Split the weights into safetensors shards of at most this size, with an index, "
                                    "as transformers writes them (e.g. 2GB, 500MB). open_clip's layout is one file.",
                                    parse=parse_size, low=1, metavar="SIZE")


# ---- the out folder ----------------------------------------------------------------------------

def earlier_export_files(out: Path) -> set[str] | None:
    """The files an earlier export wrote in `out` (rankone.json included); None when `out` holds no export."""
    try:
        record = json.loads((out / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    # Exports written before the files list existed held rankone.json and model.safetensors only.
    listed = record.get("files") or record.get("sha256") or {TRANSFORMERS_WEIGHTS: None}
    return {CONFIG_FILE, *listed} if isinstance(listed, dict) else None


def check_out_folder(out: Path) -> None:
    """`out` may be written: absent, an empty folder, or an earlier export holding nothing else."""
    if not out.exists():
        return  # a file where a parent folder should be is refused by `staging_folder`
    if not out.is_dir():
        raise RankoneError(f"--out {out}: exists and is not a folder")
    present = sorted(entry.name for entry in out.iterdir())
    if not present:
        return
    written = earlier_export_files(out)
    if written is None:
        raise RankoneError(f"--out {out}: exists and is not an earlier export; choose another folder")
    foreign = [name for name in present if name not in written]
    if foreign:
        raise RankoneError(f"--out {out}: holds {foreign[0]}, which no rankone export wrote; move it or choose another folder")


# ---- what goes in the folder -------------------------------------------------------------------

def whole_clip(workspace: Workspace, visual: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base CLIP with its image tower replaced by `visual`, checked against the architecture."""
    base = workspace.load_tensors(BASE_FILE)
    text = {key: tensor for key, tensor in base.items() if not key.startswith(VISUAL_PREFIX)}
    if not text:
        raise RankoneError(f"{workspace.path(BASE_FILE)}: has no text tower; a whole CLIP cannot be exported")
    state = {**text, **{key: tensor for key, tensor in visual.items() if key.startswith(VISUAL_PREFIX)}}
    load_clip(workspace.architecture, state)  # every tensor present and of the right shape
    return state


def stored(tensors: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """Floating-point tensors in the storage precision, the others as they are."""
    return {key: tensor.to(DTYPES[dtype]) if tensor.is_floating_point() else tensor for key, tensor in tensors.items()}


def write_static(folder: Path, workspace: Workspace, method: methods.Method, options: ExportOptions) -> dict[str, Any]:
    """A static method's whole CLIP in open_clip's or transformers' layout; returns rankone.json's content."""
    state = stored(whole_clip(workspace, method.tower(workspace)), options.dtype)
    architecture = workspace.architecture
    total = sum(tensor_bytes(tensor) for tensor in state.values())
    if options.format == "open_clip":
        if options.shard_size is not None and total > options.shard_size:
            raise RankoneError(f"--shard-size {options.shard_size}: open_clip loads one weights file and this model is "
                               f"{total} bytes; use --format transformers to shard, or a larger --shard-size")
        write_json_atomic(folder / OPEN_CLIP_CONFIG, open_clip_config(architecture))
        save_sharded(folder, OPEN_CLIP_WEIGHTS, state)
    else:
        config = {**config_from_architecture(architecture), "torch_dtype": TORCH_DTYPE_NAMES[options.dtype]}
        converted = open_clip_to_transformers(state)
        write_json_atomic(folder / TRANSFORMERS_CONFIG, config)
        # transformers refuses safetensors files without the framework tag.
        save_sharded(folder, TRANSFORMERS_WEIGHTS, converted, {"format": "pt"}, options.shard_size)
    visual = sum(tensor.numel() for key, tensor in state.items() if key.startswith(VISUAL_PREFIX))
    return {"format": ARTIFACT_FORMAT, "kind": "static", "method": method.name, "layout": options.format,
            "architecture": architecture, "tasks": workspace.tasks, "dtype": options.dtype,
            "parameters": {"image_tower": visual, "text_tower": count_parameters(state) - visual},
            "versions": package_versions()}


def write_routed(folder: Path, workspace: Workspace, method: methods.Method, options: ExportOptions, device: torch.device) -> dict[str, Any]:
    """rankone's artifact of a routed method, with open_clip's config of its tower."""
    if options.format != "open_clip":
        raise RankoneError(f"--format {options.format}: {method.name} needs its routed module and exports only as "
                           "rankone's artifact (leave --format out)")
    config = method.export(workspace, folder, options.dtype, device, options.shard_size)
    write_json_atomic(folder / OPEN_CLIP_CONFIG, open_clip_config(workspace.architecture))
    return {**config, "kind": "routed", "method": method.name}


def export_method(workspace: Workspace, options: ExportOptions, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Write `options.method`'s model to `options.out` (see the module doc); returns rankone.json's content.

    Everything is written in a staging folder beside `out` and renamed into place, so a failed
    export leaves `out` as it was.
    """
    method = methods.get(options.method, option="--method")
    if not method.exportable:
        exportable = [m.name for m in methods.registered() if m.exportable]
        raise RankoneError(f"--method {method.name}: yields no single model to export (exportable: {', '.join(exportable)})")
    out = Path(options.out)
    check_out_folder(out)
    staging = staging_folder(out.parent, out.name)
    try:
        if method.tower is not None:
            record = write_static(staging, workspace, method, options)
        else:
            record = write_routed(staging, workspace, method, options, torch.device(device))
        write_model_card(staging / CARD_FILE, workspace, method, record, out)
        record["files"] = {path.name: sha256_file(path) for path in sorted(staging.iterdir()) if path.name != CONFIG_FILE}
        write_json_atomic(staging / CONFIG_FILE, record)
        replace_folder(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return record


def export_outputs(options: ExportOptions) -> list[str]:
    """The files the pipeline records for an export: rankone.json lists every other file with its sha256."""
    return [str((Path(options.out) / CONFIG_FILE).resolve())]

