"""The example zoo: suite data, a pretrained tiny CLIP and its fine-tuned experts, cached.

Everything is built deterministically from the recipe's seed and stored under
`$RANKONE_CACHE/examples/<key>` (default `~/.cache/rankone`), the key a hash of the recipe
dict and the package version, so a second run with the same recipe skips the build. The
base and each expert are open_clip model directories that `rankone fetch` reads; the data
are image folders `data/<split>/<task>/<class>/<n>.png`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rankone.examples import suite, tinyclip
from rankone.examples.recipes import RECIPE_FILE, REPORT_FILE, Zoo, cached_zoo, caption_templates, load_zoo, zoo_root
from rankone.finetune import finetune_expert, write_open_clip_dir
from rankone.workspace import staging_folder

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
    root = zoo_root(chosen, cache)
    built = cached_zoo(chosen, cache)
    if built is not None:
        return built
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
    return load_zoo(root)
