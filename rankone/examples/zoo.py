"""The example zoo: suite data, a pretrained tiny CLIP and its fine-tuned experts, cached.

Everything is built deterministically from the recipe's seed and stored under
`$RANKONE_CACHE/examples/<key>` (default `~/.cache/rankone`), the key a hash of the recipe
dict and the package version, so a second run with the same recipe skips the build. The
base and each expert are open_clip model directories that `rankone fetch` reads; the data
are image folders `data/<split>/<task>/<class>/<n>.png`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rankone import __version__
from rankone.errors import RankoneError
from rankone.examples import suite, tinyclip
from rankone.finetune import finetune_expert, write_open_clip_dir
from rankone.heads import HEAD_FORMAT, templates_for
from rankone.workspace import staging_folder

RECIPE_FILE = "recipe.json"
REPORT_FILE = "zoo.json"

FULL_RECIPE: dict[str, Any] = {
    "seed": 0,
    "architecture": tinyclip.TINY_CLIP,
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
        **tinyclip.TINY_CLIP,
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
    """A hash of the recipe, the caption templates it resolves to, the head format and the package version."""
    # The head format is in the key because the experts are fine-tuned against those heads.
    payload = {"recipe": chosen, "version": __version__, "heads": HEAD_FORMAT,
               "templates": {task: caption_templates(task) for task in chosen["tasks"]}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


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


def _load(root: Path) -> Zoo:
    return Zoo(root, json.loads((root / RECIPE_FILE).read_text()), json.loads((root / REPORT_FILE).read_text()))


def build_zoo(
    chosen: dict[str, Any],
    device: torch.device | str = "cpu",
    cache: Path | str | None = None,
    on_stage: Callable[[str, int], Callable[[int, float], None]] | None = None,
) -> Zoo:
    """The cached zoo for `chosen`, built on first use.

    `on_stage(description, total_steps)` is told when a stage starts and returns a per-step
    callback (for a progress bar). The build happens in a temporary folder renamed into
    place, so an interrupted build leaves nothing half-written in the cache.
    """
    root = Path(cache or cache_root()) / "examples" / recipe_key(chosen)
    if (root / REPORT_FILE).is_file():
        return _load(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_folder(root.parent, root.name)
    notify = on_stage or (lambda description, total: (lambda step, loss: None))
    try:
        started = time.perf_counter()
        seed = int(chosen["seed"])
        architecture = chosen["architecture"]
        tasks = list(chosen["tasks"])
        tick = notify("generating the example images", len(tasks))
        data = {}
        for index, task in enumerate(tasks):
            data[task] = suite.generate_task(task, chosen["sizes"], seed)
            tick(index, 0.0)
        suite.write_split_folders(data, staging / "data")

        rng = np.random.default_rng(seed)
        images, captions = [], []
        for task in tasks:
            pretrain = data[task]["pretrain"]
            templates = None if task in chosen["held_out"] else caption_templates(task)
            images.append(tinyclip.images_to_tensor(pretrain.images, architecture))
            captions += suite.captions_for(pretrain, templates, rng)
        settings = chosen["pretrain"]
        base_state, pretrain_losses = tinyclip.pretrain_clip(
            architecture, torch.cat(images), captions, steps=settings["steps"], batch_size=settings["batch_size"],
            lr=settings["lr"], seed=seed, device=device, on_step=notify("pretraining the tiny CLIP", settings["steps"]),
        )
        write_open_clip_dir(staging / "base", architecture, base_state, extra={"example_recipe": chosen})

        settings = chosen["finetune"]
        finetune_report = {}
        for task in tasks:
            result = finetune_expert(
                architecture, base_state, task, staging / "data" / "finetune", staging / "experts" / task,
                steps=settings["steps"], lr=settings["lr"], batch_size=settings["batch_size"], seed=seed, device=device,
                on_step=notify(f"fine-tuning the {task} expert", settings["steps"]), holdout=0.0,
            )
            finetune_report[task] = {"images": result.images, "first_loss": result.losses[0], "last_loss": result.losses[-1]}
        report = {
            "key": root.name,
            "pretrain": {"pairs": len(captions), "first_loss": pretrain_losses[0], "last_loss": pretrain_losses[-1]},
            "finetune": finetune_report,
            "build_seconds": round(time.perf_counter() - started, 1),
        }
        (staging / RECIPE_FILE).write_text(json.dumps(chosen, indent=2) + "\n")
        (staging / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        try:
            os.replace(staging, root)
        except OSError:
            if not (root / REPORT_FILE).is_file():  # another process built it first: keep theirs
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return _load(root)
