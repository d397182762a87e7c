"""Fine-tuning a CLIP image tower against its task's frozen zero-shot head.

This is the recipe behind FusionBench's CLIP checkpoints (and the task-arithmetic papers):
the head is built once from the pretrained text tower and never changes, only the image
tower trains, Adam at lr 1e-5 with batch 32, cross-entropy on `normalize(emb) @ headᵀ` (the
head carries CLIP's logit scale, `heads.py`).
The result is written as an open_clip model directory (`open_clip_config.json` +
`open_clip_model.safetensors`), which `rankone fetch` accepts as an expert.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from rankone import numerics
from rankone.errors import RankoneError
from rankone.data import DataFolders, ImageDataset, LabeledImages, labeled_images
from rankone.evaluate import task_accuracy
from rankone.heads import classify_logits, logit_scale, template_strings, zero_shot_head
from rankone.models import VISUAL_PREFIX, load_clip, load_visual, open_clip_config, preprocess_for, tokenizer_for
from rankone.options import Options, option, seed_option
from rankone.plots import plot_curves, require_matplotlib
from rankone.sources import OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS, check_base, load_source
from rankone.templates import templates_for
from rankone.workspace import Workspace, save_tensors_atomic, staging_folder, write_json_atomic


CURVE_FILE = "finetune-curve.json"


def _batches(dataset: Dataset, batch_size: int, generator: torch.Generator, num_workers: int):
    """Shuffled batches forever: fine-tuning counts steps, not epochs."""
    while True:
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=len(dataset) >= batch_size,
                            generator=generator, num_workers=num_workers)
        yield from loader


@dataclass(frozen=True, kw_only=True)
class FinetuneOptions(Options):
    """`rankone finetune`: FusionBench's recipe for ViT-B/32 by default (Adam, lr 1e-5, batch 32, 2000 steps).

    Small models need a larger step: the built-in example's experts were made with lr 5e-5
    and 600 steps (its `recipe.json`); at 1e-5 they stay far below that accuracy.
    """

    task: str = option(help="Task name: DATA/<task>/<class>/<image> holds its training images.")
    data: DataFolders = option(help="Labeled training images, DATA/<task>/<class>/<image> (several folders are searched "
                               "in order; TASK=DIR names the task's own folder).", existing_folder=True)
    out: Path = option(help="New folder for the expert (open_clip_config.json + open_clip_model.safetensors).")
    base: str | None = option(None, "Pretrained CLIP SOURCE (as for `rankone fetch`); default: the workspace's base.", metavar="SOURCE")
    steps: int = option(2000, "Adam steps (FusionBench's ViT-B/32 recipe; the built-in example's experts used 600).", low=1)
    lr: float = option(1e-5, "Adam learning rate (FusionBench's ViT-B/32 recipe; small models such as the built-in "
                       "example's need more, 5e-5).", low=0.0, low_open=True)
    batch_size: int = option(32, "Images per step.", low=1)
    seed: int = seed_option("Seed for the data order.")
    templates: Path | None = option(None, "FILE of templates with {}, one per line (default: rankone's set for the task).")
    holdout: float = option(0.1, "Fraction of --data's images kept out of training (seeded) to report zero-shot and "
                            "fine-tuned accuracy on; ignored with --eval-data; 0: train on all, report nothing.",
                            low=0.0, high=1.0, high_open=True)
    eval_data: DataFolders | None = option(None, "Labeled images to report accuracy on instead, EVAL_DATA/<task>/<class>/<image> "
                                           "(or TASK=DIR).",
                                    existing_folder=True)
    plot: bool = option(False, "Also draw the loss curve as OUT/finetune-curve.png (needs matplotlib).")
    trust_pickle: bool = option(False, "Allow a pickle base (.bin/.pt), read with torch.load(weights_only=True).")


def finetune_image_tower(
    clip_model: torch.nn.Module,
    head: torch.Tensor,
    dataset: Dataset,
    steps: int = FinetuneOptions.steps,
    lr: float = FinetuneOptions.lr,
    batch_size: int = FinetuneOptions.batch_size,
    seed: int = FinetuneOptions.seed,
    weight_decay: float = 0.0,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Train `clip_model.visual` on (image, label) pairs against the frozen `head`.

    Returns the fine-tuned image tower (`visual.*` keys) and the loss of every step. Only
    the image tower receives gradients; the text tower and logit scale stay as they were.
    """
    if steps < 1:
        raise RankoneError(f"--steps {steps}: must be at least 1")
    if lr <= 0:
        raise RankoneError(f"--lr {lr}: must be positive")
    if batch_size < 1:
        raise RankoneError(f"--batch-size {batch_size}: must be at least 1")
    if len(dataset) == 0:
        raise RankoneError("fine-tuning data: no images")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    visual = clip_model.visual.to(device).train()
    head = head.detach().to(device, torch.float32)
    optimizer = numerics.adam(visual.parameters(), device, lr=lr, weight_decay=weight_decay)
    losses: list[float] = []
    batches = _batches(dataset, batch_size, generator, num_workers)
    for step in range(steps):
        images, labels = next(batches)
        embeddings = visual(images.to(device))
        logits = classify_logits(embeddings, head)
        loss = F.cross_entropy(logits, labels.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
    visual.eval()
    tower = {f"{VISUAL_PREFIX}{key}": value.detach().cpu().clone() for key, value in visual.state_dict().items()}
    return tower, losses


def write_open_clip_dir(
    out: Path | str, architecture: dict[str, Any], state_dict: dict[str, torch.Tensor], extra: dict[str, Any] | None = None,
    curve: dict[str, Any] | None = None,
) -> Path:
    """An open_clip model directory: `open_clip_config.json` (`model_cfg`, `preprocess_cfg`) and
    `open_clip_model.safetensors`, written to a temporary folder and renamed into place.

    `curve` ({"losses", "plot"}): fine-tuning's loss of every step, written beside them as
    `finetune-curve.json` (and `finetune-curve.png` when "plot")."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RankoneError(f"--out {out}: exists and is not an empty directory")
    staging = staging_folder(out.parent, out.name)
    try:
        config = open_clip_config(architecture)
        if extra:
            config["rankone"] = extra
        write_json_atomic(staging / OPEN_CLIP_CONFIG, config)
        save_tensors_atomic(staging / OPEN_CLIP_WEIGHTS, state_dict)
        if curve is not None:
            write_json_atomic(staging / CURVE_FILE, {"losses": curve["losses"]})
            if curve["plot"]:
                plot_curves({"cross-entropy": curve["losses"]}, staging / CURVE_FILE.replace(".json", ".png"), "training loss")
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out



@dataclass
class FinetuneResult:
    out: Path
    classnames: list[str]
    templates: list[str]
    losses: list[float]
    images: int
    # Top-1 % of the pretrained and the fine-tuned tower on the held-out (or --eval-data) images; None without them.
    zero_shot_accuracy: float | None = None
    accuracy: float | None = None
    eval_images: int = 0
    eval_source: str = ""


def split_holdout(labeled: LabeledImages, fraction: float, seed: int) -> tuple[LabeledImages, LabeledImages | None]:
    """(training images, held-out images): a seeded `fraction` of the images, at least one, never all."""
    count = len(labeled.paths)
    held = min(max(round(fraction * count), 1), count - 1) if fraction > 0 and count > 1 else 0
    if not held:
        return labeled, None
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
    chosen = set(order[:held])

    def part(keep) -> LabeledImages:
        indices = [index for index in range(count) if keep(index)]
        return LabeledImages(paths=[labeled.paths[i] for i in indices], labels=[labeled.labels[i] for i in indices],
                             classnames=labeled.classnames, skipped=labeled.skipped, task=labeled.task)

    return part(lambda index: index not in chosen), part(lambda index: index in chosen)


def top1(architecture: dict[str, Any], visual: dict[str, torch.Tensor], head: torch.Tensor, images: LabeledImages,
         device: torch.device | str) -> float:
    """Top-1 % of an image tower with `head` on labeled `images`."""
    encoder = load_visual(architecture, visual).to(device)
    correct, total, _ = task_accuracy(encoder, head, images, preprocess_for(architecture), device=device)
    return 100.0 * correct / total


def finetune_expert(
    architecture: dict[str, Any],
    base_state: dict[str, torch.Tensor],
    task: str,
    data: DataFolders | Path | str,
    out: Path | str,
    steps: int = FinetuneOptions.steps,
    lr: float = FinetuneOptions.lr,
    batch_size: int = FinetuneOptions.batch_size,
    seed: int = FinetuneOptions.seed,
    classnames: list[str] | None = None,
    templates: list[str] | None = None,
    device: torch.device | str = "cpu",
    on_step: Callable[[int, float], None] | None = None,
    holdout: float = FinetuneOptions.holdout,
    eval_data: DataFolders | Path | str | None = None,
    plot: bool = False,
) -> FinetuneResult:
    """What `rankone finetune` does: fine-tune on `data/<task>/<class>/*` against the task's
    zero-shot head (built-in templates unless given) and write an open_clip directory to `out`.

    The directory holds the whole CLIP (the text tower unchanged), so open_clip and
    `rankone fetch` both read it; its config records the task, class names and templates.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RankoneError(f"--out {out}: exists and is not an empty directory")
    if plot:
        require_matplotlib()
    labeled = labeled_images(data, task, classnames)
    if eval_data is not None:
        held, source = labeled_images(eval_data, task, labeled.classnames), f"--eval-data {eval_data}"
    else:
        labeled, held = split_holdout(labeled, holdout, seed)
        source = f"{holdout:.0%} of --data held out"
    templates = template_strings(templates if templates is not None else templates_for(task))
    clip_model = load_clip(architecture, base_state).to(device)
    head = zero_shot_head(clip_model, tokenizer_for(architecture), labeled.classnames, templates, logit_scale(base_state), device)
    dataset = ImageDataset(labeled.paths, labeled.labels, preprocess_for(architecture))
    tower, losses = finetune_image_tower(
        clip_model, head, dataset, steps=steps, lr=lr, batch_size=batch_size, seed=seed, device=device, on_step=on_step
    )
    recipe = {"task": task, "classnames": labeled.classnames, "templates": templates, "steps": steps, "lr": lr,
              "batch_size": batch_size, "seed": seed, "images": len(dataset), "first_loss": losses[0], "last_loss": losses[-1]}
    measured: dict[str, Any] = {}
    if held is not None:
        measured = {"zero_shot_accuracy": top1(architecture, base_state, head, held, device),
                    "accuracy": top1(architecture, tower, head, held, device), "eval_images": len(held.paths), "eval_source": source}
        recipe.update(measured)
    curve = {"losses": losses, "plot": plot}
    write_open_clip_dir(out, architecture, {**base_state, **tower}, extra={"finetune": recipe}, curve=curve)
    return FinetuneResult(out=out, classnames=labeled.classnames, templates=templates, losses=losses, images=len(dataset), **measured)


def load_base(source: str | None, workspace: Path | str, trust_pickle: bool = False) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(architecture, full CLIP state dict) of `--base SOURCE` (anything `rankone fetch` reads),
    or of the workspace's base when no source is given."""
    if source is None:
        space = Workspace(workspace)
        return space.architecture, space.load_tensors("base.safetensors")
    loaded = load_source(source, trust_pickle=trust_pickle)
    if loaded.architecture is None:
        raise RankoneError(f"--base {source}: a weights file carries no architecture; give a model directory")
    return loaded.architecture, check_base(loaded)
