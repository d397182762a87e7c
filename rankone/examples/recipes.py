"""The example zoo's recipes and where each is cached: what `rankone demo --zoo-path` needs.

Light on purpose (no torch): printing the folder of a zoo built before takes a fraction of a
second. Building one is `zoo.build_zoo`. A zoo's weights fingerprint is read from the
safetensors files with numpy, so it needs no torch either.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from safetensors import safe_open

from rankone import __version__
from rankone.errors import RankoneError
from rankone.examples import suite
from rankone.templates import HEAD_FORMAT, templates_for

TINY_CLIP: dict[str, Any] = {
    "name": "rankone-tiny-clip",
    "embed_dim": 64,
    "quick_gelu": False,
    # Patch 8 on 32-px images: 16 tokens + CLS; patch 4 was too slow to pretrain on a CPU.
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 128, "layers": 4, "head_width": 32, "mlp_ratio": 4.0},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


# What `numerics.pinned_environment` pins on a CPU, and what the build avoids. In the key: a zoo built before or without it has
# other bits, so it must not be found under the key of one built with it.
BUILD_PINNING = "mkl-compatible aten-avx2 no-onednn 2-threads no-mkl-vector-math"

RECIPE_FILE = "recipe.json"
REPORT_FILE = "zoo.json"
# The report's entry for `weights_fingerprint`; a zoo built before it was recorded lacks it.
FINGERPRINT_KEY = "fingerprint"

FULL_RECIPE: dict[str, Any] = {
    "seed": 0,
    "architecture": TINY_CLIP,
    "tasks": list(suite.TASKS),
    # Label spaces left out of the pretraining captions: zero-shot is weak there, as for
    # real CLIP on tasks its captions rarely describe, so fine-tuning has something to add.
    "held_out": ["greek", "fonts"],
    "sizes": {"pretrain": 600, "finetune": 600, "test": 320, "unlabeled": 160},
    "pretrain": {"steps": 500, "batch_size": 128, "lr": 2e-3},
    # Gentler than FusionBench's 2000+ steps: smaller task vectors merge better at this scale.
    "finetune": {"steps": 600, "lr": 5e-5, "batch_size": 32},
}

QUICK_RECIPE: dict[str, Any] = {
    "seed": 0,
    "architecture": {
        **TINY_CLIP,
        "name": "rankone-toy-clip",
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16, "mlp_ratio": 4.0},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    },
    "tasks": ["digits", "letters", "textures", "photos"],
    "held_out": ["letters"],
    "sizes": {"pretrain": 96, "finetune": 48, "test": 32, "unlabeled": 16},
    "pretrain": {"steps": 40, "batch_size": 64, "lr": 2e-3},
    "finetune": {"steps": 20, "lr": 1e-4, "batch_size": 16},
}


def recipe(quick: bool = False, **overrides: Any) -> dict[str, Any]:
    """The full or quick recipe, top-level keys replaced by `overrides`."""
    chosen = copy.deepcopy(QUICK_RECIPE if quick else FULL_RECIPE)
    unknown = set(overrides) - set(chosen)
    if unknown:
        raise RankoneError(f"example recipe: unknown key {sorted(unknown)[0]!r}")
    chosen.update(copy.deepcopy(overrides))
    return chosen


def cache_root() -> Path:
    return Path(os.environ.get("RANKONE_CACHE") or Path.home() / ".cache" / "rankone")


def caption_templates(task: str) -> list[str]:
    return templates_for(task)


def recipe_key(chosen: dict[str, Any]) -> str:
    """A hash of the recipe, the caption templates it resolves to, the head format, the package version
    and the build's pinning."""
    # The head format is in the key because the experts are fine-tuned against those heads.
    payload = {"recipe": chosen, "version": __version__, "heads": HEAD_FORMAT, "build": BUILD_PINNING,
               "templates": {task: caption_templates(task) for task in chosen["tasks"]}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def weights_fingerprint(root: Path) -> str:
    """16 hex digits of a sha256 over every tensor of the zoo at `root`: its base's and experts'
    safetensors files in the order of their paths, each file's tensors by name, each hashed as
    (file, name, dtype, shape) then its bytes.

    What two builds of one recipe key are compared by: the key hashes the recipe, not the bits.
    """
    return _tensors_fingerprint(root, [*(root / "base").glob("*.safetensors"), *(root / "experts").glob("*/*.safetensors")])


def part_fingerprints(root: Path) -> dict[str, str]:
    """A fingerprint of each part of the zoo at `root`, in build order (the data's over its files'
    paths and bytes): where two builds of one key differ, the first unequal part is where their
    bits parted."""
    data = hashlib.sha256()
    for path in sorted(item for item in (root / "data").rglob("*") if item.is_file()):
        data.update(path.relative_to(root).as_posix().encode() + b"\n" + path.read_bytes())
    parts = {"data": data.hexdigest()[:16], "base": _tensors_fingerprint(root, list((root / "base").glob("*.safetensors")))}
    for expert in sorted(path for path in (root / "experts").iterdir() if path.is_dir()):
        parts[f"experts/{expert.name}"] = _tensors_fingerprint(root, list(expert.glob("*.safetensors")))
    return parts


def _tensors_fingerprint(root: Path, paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        with safe_open(path, framework="numpy") as weights:
            for name in sorted(weights.keys()):
                tensor = weights.get_slice(name)
                described = [path.relative_to(root).as_posix(), name, tensor.get_dtype(), tensor.get_shape()]
                digest.update(json.dumps(described).encode() + b"\n")
                digest.update(weights.get_tensor(name).tobytes())
    return digest.hexdigest()[:16]


@dataclass
class Zoo:
    root: Path
    recipe: dict[str, Any]
    report: dict[str, Any]

    @property
    def tasks(self) -> list[str]:
        return list(self.recipe["tasks"])

    @property
    def base(self) -> Path:
        return self.root / "base"

    def expert(self, task: str) -> Path:
        return self.root / "experts" / task

    def data(self, split: str) -> Path:
        return self.root / "data" / split

    @cached_property
    def fingerprint(self) -> str:
        """The weights fingerprint its build recorded, or (a zoo built before it was) computed from its files."""
        return self.report.get(FINGERPRINT_KEY) or weights_fingerprint(self.root)


def load_zoo(root: Path) -> Zoo:
    return Zoo(root, json.loads((root / RECIPE_FILE).read_text()), json.loads((root / REPORT_FILE).read_text()))


def zoo_root(chosen: dict[str, Any], cache: Path | str | None = None) -> Path:
    """Where the zoo for `chosen` is (or will be) cached."""
    return Path(cache or cache_root()) / "examples" / recipe_key(chosen)


def cached_zoo(chosen: dict[str, Any], cache: Path | str | None = None) -> Zoo | None:
    """The zoo for `chosen` when it was built before (a build that ended writes its report last), else None."""
    root = zoo_root(chosen, cache)
    return load_zoo(root) if (root / REPORT_FILE).is_file() else None
