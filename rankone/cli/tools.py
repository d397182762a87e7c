"""`rankone predict`, `push`, `inspect` and `finetune`: the commands around the pipeline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from rankone.cli import render
from rankone.cli.app import DEFAULT_WORKSPACE, DeviceOption, WorkspaceOption, command, console, say, step_bar
from rankone.cli.flags import options_command
from rankone.errors import RankoneError
from rankone.finetune import FinetuneOptions, finetune_expert, load_base
from rankone.heads import read_lines
from rankone.hub import push as push_folder
from rankone.inspection import DEFAULT_TASKS, architecture_report, inventory
from rankone.methods import load, method_classifier
from rankone.methods.artifact import TOP_CLASSES, predict as predict_images
from rankone.models import named_architecture, resolve_device, resolve_dtype
from rankone.sources import HF_SCHEME
from rankone.training import head_requests
from rankone.workspace import Workspace


@command("predict")
def predict(
    paths: Annotated[list[Path], typer.Argument(help="[MODEL] IMAGE...: an exported model folder, hf:ORG/NAME[@REV] or a workspace (default: -w), then image files.", metavar="PATH")],
    task: Annotated[str, typer.Option("--task", help="Which task's classes to predict.")],
    top: Annotated[int, typer.Option("--top", help="How many classes to print.")] = TOP_CLASSES,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="Precision the image tower computes in: fp32 (default), fp16 or bf16.")] = None,
    method: Annotated[Optional[str], typer.Option("--method", help="With a workspace: predict with this method instead of the "
                                                  "adapted RankOne-MoE (any method `rankone eval` runs; emr and individual use --task's own tower).")] = None,
    classnames_from: Annotated[Optional[Path], typer.Option("--classnames-from", help="With --method: a labeled folder "
                                                            "DIR/<task>/<class>/ to take --task's class names from (default: the workspace's data/).")] = None,
    heads_source: Annotated[str, typer.Option("--heads-source", help="With --method: builtin or fusionbench (class names and templates).")] = "builtin",
    workspace: WorkspaceOption = DEFAULT_WORKSPACE,
    device: DeviceOption = "auto",
) -> None:
    """The model is the first argument when it is a folder (an export or a workspace) or hf:ORG/NAME[@REV] (a pushed export, through huggingface_hub's cache); otherwise the workspace's adapted model (-w).

    Example: rankone predict ./rankone-model --task cars photo1.jpg photo2.jpg --json

    Example: rankone predict -w rankone-work --task cars --dtype bf16 photo1.jpg

    Example: rankone predict hf:my-org/rankone-vit-b-32 --task cars photo1.jpg

    Example: rankone predict -w rankone-work --method emr --task cars --classnames-from ./test photo1.jpg
    """
    if dtype is not None:
        resolve_dtype(dtype)
    # An image is never a folder (nor a Hub repo), so a leading folder can only be the model.
    hub = str(paths[0]).startswith(HF_SCHEME)
    if not hub and not paths[0].exists():
        raise RankoneError(f"{paths[0]}: no such model folder or image file")
    model_dir, images = (str(paths[0]) if hub else paths[0], paths[1:]) if hub or paths[0].is_dir() else (workspace, paths)
    if not images:
        raise RankoneError(f"predict: no IMAGE given after the model folder {model_dir}")
    if model_dir == workspace and not Path(workspace).is_dir():
        raise RankoneError(f"-w {workspace}: no such workspace; pass the model folder first (rankone predict DIR --task TASK IMAGE...) or -w WORKSPACE")
    if method is None:
        if classnames_from is not None or heads_source != "builtin":
            raise RankoneError("--classnames-from and --heads-source: only with --method (an export or adapted model has its heads)")
        model = load(model_dir, resolve_device(device), dtype)
    else:
        model = workspace_method_model(Path(model_dir), method, task, classnames_from, heads_source, device, dtype)
    results = predict_images(model, images, task, top)
    if as_json:
        print(json.dumps(results, indent=2))
        return
    for result in results:
        console.print(f"[bold]{escape(result['image'])}[/]", soft_wrap=True, highlight=False)
        for entry in result["top"]:
            console.print(f"  {entry['probability']:7.2%}  {escape(entry['class'])}", highlight=False)


def workspace_method_model(folder: Path, method: str, task: str, classnames_from: Path | None, heads_source: str,
                           device: str, dtype: str | None):
    """`predict --method`: the workspace's `method` for `task`, with a head from the given class names."""
    workspace = Workspace(folder)
    if not workspace.exists():
        raise RankoneError(f"--method {method}: {folder} is not a workspace (an export predicts with its own method)")
    requests = head_requests(workspace, [task], heads_source, classnames_from)
    return method_classifier(workspace, method, task, requests, resolve_device(device), dtype)


@command("push")
def push(
    folder: Annotated[Path, typer.Argument(help="An exported model folder (rankone export --out).", metavar="OUT")],
    repo: Annotated[str, typer.Option("--repo", help="Hub repo to upload to, ORG/NAME (created if missing).", metavar="ORG/NAME")],
    private: Annotated[bool, typer.Option("--private", help="Create the repo private.")] = False,
    revision: Annotated[Optional[str], typer.Option("--revision", help="Branch to upload to (created if missing; default: main).", metavar="BRANCH")] = None,
) -> None:
    """The token is huggingface_hub's (HF_TOKEN or `hf auth login`); it is never printed or
    written. Load the pushed model back with rankone.load("hf:ORG/NAME") or
    `rankone predict hf:ORG/NAME`; a static merge also loads with open_clip
    ("hf-hub:ORG/NAME") or transformers.

    Example: rankone push ./ta-model --repo my-org/clip-vit-b-32-ta8

    Example: rankone push ./rankone-model --repo my-org/rankone-vit-b-32 --private --revision k32
    """
    url = push_folder(folder, repo, private=private, revision=revision)
    say(f"pushed {folder} to {url}")


@command("inspect")
def inspect_command(
    path: Annotated[Optional[Path], typer.Argument(help="A workspace, an exported model folder or a .safetensors file (default: the workspace).", metavar="PATH")] = None,
    architecture: Annotated[Optional[str], typer.Option("--architecture", help="Count from an open_clip architecture alone (e.g. ViT-B-32, ViT-L-14); no weights needed.")] = None,
    tasks: Annotated[int, typer.Option("--tasks", help="With --architecture: number of tasks for RankOne-MoE (WEMoE is shown for 8, 20 and this).")] = DEFAULT_TASKS,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    workspace: WorkspaceOption = DEFAULT_WORKSPACE,
    device: DeviceOption = "auto",
) -> None:
    """Counts and bytes per role, read from safetensors headers only. With
    --architecture: parameter counts of RankOne-MoE (k = 16, 32, 64, 128) and
    WEMoE, from the real modules built on the meta device (no weights needed).

    Examples: rankone inspect ./rankone-model

              rankone inspect --architecture ViT-L-14 --tasks 20
    """
    resolve_device(device)
    if architecture is not None:
        if path is not None:
            raise RankoneError("inspect: give either PATH or --architecture, not both")
        report = architecture_report(named_architecture(architecture), tasks)
        if as_json:
            print(json.dumps(report, indent=2))
            return
        table = Table(title=f"{report['architecture']}: image-model parameters (heads excluded)")
        for column in ("model", "experts", "routers", "total", "× tower"):
            table.add_column(column, justify="left" if column == "model" else "right", no_wrap=True)
        table.add_row("pretrained tower", "", "", f"{report['tower']:,}", "1.000")
        for row in report["rankone"]:
            table.add_row(f"RankOne-MoE T={row['tasks']} k={row['k']}", f"{row['pool']:,}", f"{row['routers']:,}", f"{row['total']:,}", f"{row['relative']:.3f}")
        for row in report["wemoe"]:
            table.add_row(f"WEMoE T={row['tasks']}", f"{row['task_vectors']:,}", f"{row['routers']:,}", f"{row['total']:,}", f"{row['relative']:.3f}")
        console.print(table)
        console.print("experts: RankOne-MoE's rank-one pool, WEMoE's dense MLP task vectors. Counted from open_clip's "
                      "image tower with its projection; every total includes the tower.")
        return
    found = inventory(path if path is not None else workspace)
    if as_json:
        rows = [{"role": row.role, "files": len(row.files), "tensors": row.tensors, "parameters": row.parameters, "bytes": row.nbytes}
                for row in found.roles]
        print(json.dumps({"path": str(found.path), "kind": found.kind, "files": found.files, "roles": rows}, indent=2))
        return
    table = Table(title=escape(f"{found.path} ({found.kind}, {found.files} safetensors file{'s' if found.files != 1 else ''})"))
    for column in ("role", "files", "tensors", "parameters", "size"):
        table.add_column(column, justify="left" if column == "role" else "right")
    for row in found.roles:
        table.add_row(row.role, str(len(row.files)), f"{row.tensors:,}", f"{row.parameters:,}", render.size(row.nbytes))
    table.add_section()
    table.add_row("total", str(found.files), f"{sum(row.tensors for row in found.roles):,}", f"{found.total_parameters:,}", render.size(found.total_bytes))
    console.print(table)



def _finetune(values: dict[str, Any]) -> None:
    resolved = resolve_device(values.pop("device"))
    workspace = values.pop("workspace")
    options = FinetuneOptions.from_values(values)
    architecture, base_state = load_base(options.base, workspace, trust_pickle=options.trust_pickle)
    template_list = read_lines(options.templates, "templates") if options.templates is not None else None
    with step_bar(f"fine-tuning {options.task}", options.steps) as advance:
        result = finetune_expert(
            architecture, base_state, options.task, options.data, options.out, steps=options.steps, lr=options.lr,
            batch_size=options.batch_size, seed=options.seed, templates=template_list, device=resolved, on_step=advance,
            holdout=options.holdout, eval_data=options.eval_data, plot=options.plot,
        )
    say(f"fine-tuned {options.task} on {result.images} images ({len(result.classnames)} classes), "
        f"loss {result.losses[0]:.3f} → {sum(result.losses[-20:]) / len(result.losses[-20:]):.3f} (mean of the last 20 steps)")
    if result.accuracy is not None:
        say(f"top-1 on {result.eval_images} images ({result.eval_source}): zero-shot {result.zero_shot_accuracy:.1f}% → "
            f"fine-tuned {result.accuracy:.1f}%")
    say(f"wrote {result.out}")


options_command("finetune", """Defaults are FusionBench's recipe for ViT-B/32: Adam, lr 1e-5, batch 32, 2000 steps, only the
    image tower trains. Small models need a larger lr: the built-in example's experts were
    made with --lr 5e-5 --steps 600. A seeded 10% of --data (--holdout) is kept out of training
    to report zero-shot and fine-tuned accuracy, or pass --eval-data. Writes an open_clip
    directory that `rankone fetch --expert TASK=DIR` accepts. The base is --base, or the
    workspace's (-w) when --base is not given.

    Example: rankone finetune --base $ZOO/base --task digits --data $ZOO/data/finetune --out my-digits --lr 5e-5 --steps 600

    Example: rankone finetune -w vit-b-32 --task dtd --data ./dtd-train --eval-data ./dtd-test --out dtd-expert
    """, [FinetuneOptions], _finetune)
