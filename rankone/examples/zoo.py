"""The example zoo: suite data, a pretrained tiny CLIP and its fine-tuned experts, cached.

Everything is built deterministically from the recipe's seed and stored under
`$RANKONE_CACHE/examples/<key>` (default `~/.cache/rankone`), the key a hash of the recipe
dict, the package version and the build's pinning, so a second run with the same recipe skips the build. The
base and each expert are open_clip model directories that `rankone fetch` reads; the data
are image folders `data/<split>/<task>/<class>/<n>.png`.

The build runs in a child process (`python -m rankone.examples.zoo`) started with
`numerics.pinned_environment()`, so that on a CPU the bits depend on neither the core count nor the
instruction set (checked on an Intel CPU by changing both): the libraries behind torch's CPU
kernels pick their code path from the machine (MKL's and ATen's by instruction set, reductions
split by thread count), and read the settings that pin it when their first kernel runs, too late
to set them from a process that has run any. The settings do not reach MKL's vector math, which
picks its code by CPU vendor: the build calls none of it (`rankone.numerics`; the pinned build of
the earlier key did, and gave other bits on an AMD EPYC than on an Intel Xeon). For AMD CPUs the
rest rests on Intel's documentation of MKL's COMPATIBLE branch.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

import rankone
from rankone import numerics
from rankone.errors import RankoneError
from rankone.examples import suite, tinyclip
from rankone.examples.recipes import (
    FINGERPRINT_KEY, RECIPE_FILE, REPORT_FILE, Zoo, cached_zoo, caption_templates, load_zoo, part_fingerprints, recipe_key,
    weights_fingerprint, zoo_root,
)
from rankone.finetune import finetune_expert, write_open_clip_dir
from rankone.workspace import staging_folder

OnStage = Callable[[str, int], Callable[[int, float], None]]

# The packages whose code makes the data (images) or runs in the training, besides torch.
BUILD_PACKAGES = ("numpy", "pillow", "matplotlib", "scikit-image", "scikit-learn", "open_clip_torch")


def build_settings(device: str) -> dict[str, Any]:
    """What the bits of a build depend on besides the recipe, as the process building it sees them."""
    return {"device": device, "torch": torch.__version__, **numerics.pinned_state(), "processor": _processor_name(),
            "packages": {name: importlib.metadata.version(name) for name in BUILD_PACKAGES}}


def _processor_name() -> str:
    """The CPU's model name as Linux reports it (empty elsewhere): builds on two vendors are compared by it."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")


def build_zoo(
    chosen: dict[str, Any],
    device: torch.device | str = "cpu",
    cache: Path | str | None = None,
    on_stage: OnStage | None = None,
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
    try:
        _run_build_process(chosen, staging, str(device), on_stage or (lambda description, total: (lambda step, loss: None)))
        try:
            os.replace(staging, root)
        except OSError:
            if not (root / REPORT_FILE).is_file():  # another process built it first: keep theirs
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return load_zoo(root)


def _run_build_process(chosen: dict[str, Any], staging: Path, device: str, on_stage: OnStage) -> None:
    """`build_into(chosen, staging, device)` in a child process, its progress relayed to `on_stage`."""
    package_parent = str(Path(rankone.__file__).resolve().parents[1])
    environment = {**os.environ, **numerics.pinned_environment(numerics.hardware_capability()),
                   "PYTHONPATH": os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "rankone.examples.zoo", str(staging), device]
    with subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=environment, text=True) as child:
        try:
            child.stdin.write(json.dumps(chosen))
            child.stdin.close()
            tick = None
            for line in child.stdout:
                event = json.loads(line)
                if "stage" in event:
                    tick = on_stage(event["stage"], event["total"])
                else:
                    tick(event["step"], event["loss"])
        except BaseException:
            child.kill()
            raise
    if child.returncode != 0:
        raise RankoneError(f"building the example zoo failed (the child process exited with {child.returncode}; its error is above)")


def _event_writer(events: IO[str]) -> OnStage:
    """An `on_stage` that writes each stage and step to `events` as a JSON line, for the parent."""
    def send(event: dict[str, Any]) -> None:
        events.write(json.dumps(event) + "\n")
        events.flush()

    def on_stage(description: str, total: int) -> Callable[[int, float], None]:
        send({"stage": description, "total": total})
        return lambda step, loss: send({"step": step, "loss": loss})

    return on_stage


def build_into(chosen: dict[str, Any], staging: Path, device: torch.device | str, notify: OnStage) -> None:
    """Data, base and experts for `chosen` written to `staging`, its report last (with the weights fingerprint)."""
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
        "key": recipe_key(chosen),
        FINGERPRINT_KEY: weights_fingerprint(staging),
        "parts": part_fingerprints(staging),
        "pretrain": {"pairs": len(captions), "first_loss": pretrain_losses[0], "last_loss": pretrain_losses[-1]},
        "finetune": finetune_report,
        "build": build_settings(str(device)),
        "build_seconds": round(time.perf_counter() - started, 1),
    }
    (staging / RECIPE_FILE).write_text(json.dumps(chosen, indent=2) + "\n")
    (staging / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")


def main(arguments: list[str]) -> None:
    """The child: `python -m rankone.examples.zoo STAGING DEVICE`, the recipe as JSON on stdin."""
    staging, device = Path(arguments[0]), arguments[1]
    chosen = json.loads(sys.stdin.read())
    # The parent reads JSON lines from stdout: keep them on a copy of it and send whatever a
    # library prints there to stderr.
    events = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    numerics.pin_torch()
    build_into(chosen, staging, device, _event_writer(events))


if __name__ == "__main__":
    main(sys.argv[1:])
