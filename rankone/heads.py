"""Zero-shot classification heads: the heads themselves and their cache (the template tables are in `rankone.templates`).

The method: a head is a (classes × embed_dim) matrix. For each class, every template is filled
with the class name, embedded by the pretrained text tower and L2-normalised; the
embeddings are averaged and normalised again. Logits are `s · normalize(emb) @ headᵀ`.

s is the base model's own temperature, exp(logit_scale), as in CLIP's own forward and
FusionBench's classifier. The method writes 100: that is exp(logit_scale) of every released CLIP
(training clamps it there), so for those models nothing differs. A CLIP that learned a
smaller scale (the built-in example's tiny CLIP learned 15) is read at its own scale:
at a fixed 100 its predictions are near one-hot and entropy, the unlabeled objective of
adaptation, stops measuring anything. The stored head carries s (head = s · unit head),
so logits are `normalize(emb) @ headᵀ` wherever a head goes (evaluation, adaptation,
the exported artifact).

Class names and templates come from one of three places: the project's own template sets
(`templates.json`, with class names from the data), FusionBench's lists (needed for heads
that match FusionBench's fine-tuned checkpoints), or files the user passes. Heads are
cached as `heads/<task>-<key>.safetensors`, the key a sha256 over the base model's sha256,
the class names and the templates, so any change to one of them builds a new head.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from rankone import distributed, numerics
from rankone.errors import RankoneError
from rankone.models import load_clip, open_clip, tokenizer_for
from rankone.templates import HEAD_FORMAT, canonical_task, templates_for
from rankone.workspace import Staging, Workspace

HEADS_DIR = "heads"
HEAD_TENSOR = "head"
HEAD_SOURCES = ("builtin", "fusionbench")


def template_strings(templates: Sequence[str | Callable[[str], str]], source: str = "templates") -> list[str]:
    """Templates as `{}` format strings; callables (FusionBench's lambdas) are called with "{}"."""
    strings: list[str] = []
    for template in templates:
        text = template("{}") if callable(template) else template
        if not isinstance(text, str) or "{}" not in text:
            raise RankoneError(f"{source}: template {text!r} has no {{}} placeholder for the class name")
        try:
            text.format("class")
        except (IndexError, KeyError, ValueError):
            raise RankoneError(f"{source}: template {text!r} has braces other than one {{}} placeholder") from None
        strings.append(text)
    if not strings:
        raise RankoneError(f"{source}: no templates")
    return strings


def read_lines(path: Path | str, what: str) -> list[str]:
    """Non-empty lines of a text file (class names or templates), stripped."""
    path = Path(path)
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as error:
        raise RankoneError(f"{path}: cannot read {what} ({error})") from None
    lines = [line for line in lines if line]
    if not lines:
        raise RankoneError(f"{path}: no {what} in the file (expected one per line)")
    return lines


def fusionbench_classnames_and_templates(task: str) -> tuple[list[str], list[str]]:
    """FusionBench's class names and templates for `task`, read from the `fusion-bench` package."""
    try:
        from fusion_bench.tasks.clip_classification import get_classnames_and_templates
    except ImportError as error:
        raise RankoneError(
            f"--heads-source fusionbench: the fusion-bench package is not importable ({error}); "
            "install it with `pip install 'rankone[fusionbench]'`"
        ) from None
    name = canonical_task(task) or task
    try:
        classnames, templates = get_classnames_and_templates(name)
    except (ValueError, KeyError, ImportError, AttributeError):
        raise RankoneError(f"--heads-source fusionbench: FusionBench has no class names for task {task!r}") from None
    return [str(classname) for classname in classnames], template_strings(templates, f"fusion-bench templates of {name}")


# the method's scale, for a base checkpoint that does not carry its own logit_scale.
DEFAULT_LOGIT_SCALE = 100.0


def logit_scale(state_dict: dict[str, torch.Tensor]) -> float:
    """exp(logit_scale) of a CLIP state dict; 100 when it has none."""
    if "logit_scale" not in state_dict:
        return DEFAULT_LOGIT_SCALE
    return float(numerics.exp(state_dict["logit_scale"].float()))


def zero_shot_head(
    clip_model, tokenizer, classnames: Sequence[str], templates: Sequence[str], scale: float, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """(classes × embed_dim) zero-shot head from `clip_model`'s text tower (already on `device`).

    Rows are unit class embeddings times `scale`, the checkpoint's `logit_scale(state_dict)`.
    """
    if not classnames:
        raise RankoneError("class names: none given")
    templates = template_strings(templates)
    with torch.no_grad():
        weights = open_clip.build_zero_shot_classifier(clip_model, tokenizer, list(classnames), templates, device=device)
    return (scale * weights.T.float()).contiguous()


def classify_logits(image_embeddings: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """normalize(embedding) @ headᵀ; the head carries the logit scale."""
    return F.normalize(image_embeddings.float(), dim=-1) @ head.to(image_embeddings.device).float().T


def head_key(base_sha256: str, classnames: Sequence[str], templates: Sequence[str]) -> str:
    payload = json.dumps({"format": HEAD_FORMAT, "base": base_sha256, "classnames": list(classnames), "templates": list(templates)},
                         ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def head_path(workspace: Workspace, task: str, classnames: Sequence[str], templates: Sequence[str]) -> str:
    files = workspace.manifest().get("files", {})
    if "base.safetensors" not in files:
        raise RankoneError(f"{workspace.path('base.safetensors')}: missing; run `rankone fetch` first")
    return f"{HEADS_DIR}/{task}-{head_key(files['base.safetensors']['sha256'], classnames, templates)}.safetensors"


def heads_for_tasks(
    workspace: Workspace,
    requests: dict[str, tuple[Sequence[str], Sequence[str] | None]],
    device: torch.device | str = "cpu",
    staging: Staging | None = None,
) -> dict[str, torch.Tensor]:
    """Heads for several tasks ({task: (classnames, templates or None for built-in)}), on CPU.

    Cached heads are read back; the others are built with one load of the base model and
    written in one transaction, or into `staging` when the caller's stage holds one (then
    they are kept only if that whole stage succeeds). Under several processes rank 0 builds
    or reads them and sends them to the others, which neither build nor write any (every
    process must call this at the same point; `staging` is rank 0's).
    """
    return distributed.from_main(lambda: _heads_for_tasks(workspace, requests, device, staging))


def _heads_for_tasks(
    workspace: Workspace,
    requests: dict[str, tuple[Sequence[str], Sequence[str] | None]],
    device: torch.device | str,
    staging: Staging | None,
) -> dict[str, torch.Tensor]:
    heads: dict[str, torch.Tensor] = {}
    missing: dict[str, tuple[list[str], list[str], str]] = {}
    for task, (classnames, templates) in requests.items():
        templates = template_strings(templates_for(task) if templates is None else templates)
        relpath = head_path(workspace, task, classnames, templates)
        if workspace.has(relpath):
            heads[task] = workspace.load_tensors(relpath)[HEAD_TENSOR]
        else:
            missing[task] = (list(classnames), templates, relpath)
    if missing:
        architecture = workspace.architecture
        base_state = workspace.load_tensors("base.safetensors")
        scale = logit_scale(base_state)
        clip_model = load_clip(architecture, base_state).to(device)
        del base_state
        tokenizer = tokenizer_for(architecture)
        with contextlib.ExitStack() as stack:
            target = staging if staging is not None else stack.enter_context(workspace.transaction())
            for task, (classnames, templates, relpath) in missing.items():
                head = zero_shot_head(clip_model, tokenizer, classnames, templates, scale, device).cpu()
                metadata = {"task": task, "classnames": json.dumps(classnames), "templates": json.dumps(templates), "logit_scale": str(scale)}
                target.save_tensors(relpath, {HEAD_TENSOR: head}, metadata=metadata)
                heads[task] = head
        del clip_model
    return {task: heads[task] for task in requests}


def head_for_task(
    workspace: Workspace,
    task: str,
    classnames: Sequence[str],
    templates: Sequence[str] | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The zero-shot head for `task` (built-in templates when `templates` is None), cached, on CPU."""
    return heads_for_tasks(workspace, {task: (classnames, templates)}, device)[task]
