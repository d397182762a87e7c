"""The `rankone` command line: a thin layer over the library's functions.

Every command takes `-w/--workspace` and `--device`; every user error is a
`RankoneError`, printed as one line with exit code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from rankone.errors import RankoneError

app = typer.Typer(
    name="rankone",
    help="Merge fine-tuned CLIP image towers with RankOne-MoE, stage by stage in a workspace.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
console = Console()
error_console = Console(stderr=True)

WorkspaceOption = Annotated[
    Path, typer.Option("-w", "--workspace", help="Workspace directory every stage reads and writes.")
]
DeviceOption = Annotated[str, typer.Option("--device", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps.")]
DEFAULT_WORKSPACE = Path("rankone-work")

# Options that several commands share, declared once so flags and help read the same everywhere.
TasksOption = Annotated[
    Optional[list[str]],
    typer.Option("--tasks", "-t", help="Tasks: --tasks a b, --tasks a,b (default: every workspace task)."),
]
LabeledDataOption = Annotated[
    Optional[Path], typer.Option("--data", help="Labeled test images DIR/<task>/<class>/<image> (default: WORKSPACE/data).")
]
HeadsSourceOption = Annotated[
    str,
    typer.Option(
        "--heads-source",
        help="builtin (class names from the data folders or files, rankone's templates) or fusionbench "
        "(FusionBench's lists; needed for its checkpoints).",
    ),
]
ClassnamesOption = Annotated[
    Optional[list[str]], typer.Option("--classnames", help="Class names, one per line: FILE (one task) or TASK=FILE; repeatable.")
]
TemplatesOption = Annotated[
    Optional[list[str]], typer.Option("--templates", help="Templates with {}, one per line: FILE (one task) or TASK=FILE; repeatable.")
]
BatchSizeOption = Annotated[int, typer.Option("--batch-size", help="Images per forward pass.")]
DtypeOption = Annotated[
    str, typer.Option("--dtype", help="Precision the image encoder runs in: fp32, fp16 or bf16 (heads and logits stay fp32).")
]


def parse_pairs(values: list[str], option: str) -> dict[str, str]:
    """`TASK=VALUE` pairs from a repeated option, in the order given."""
    pairs: dict[str, str] = {}
    for value in values:
        name, sep, rest = value.partition("=")
        if not sep or not name or not rest:
            raise RankoneError(f"{option} {value!r}: expected TASK=VALUE")
        if name in pairs:
            raise RankoneError(f"{option}: task {name!r} given twice")
        pairs[name] = rest
    return pairs


def _split_tasks(values: Optional[list[str]]) -> Optional[list[str]]:
    if not values:
        return None
    return [task for value in values for task in value.split(",") if task]


def _chosen_tasks(ctx: typer.Context, tasks: Optional[list[str]], workspace, command: str) -> list[str]:
    """`--tasks a b` (the extra words typer leaves in ctx.args), `--tasks a,b`, or every workspace task."""
    extra = list(ctx.args)
    if extra and not tasks:
        raise RankoneError(f"{command}: unexpected argument {extra[0]!r} (tasks go after --tasks)")
    for value in extra:
        if value.startswith("-"):
            raise RankoneError(f"{command}: unknown option {value!r}")
    return _split_tasks((tasks or []) + extra) or workspace.tasks


def _print_version(value: bool) -> None:
    if value:
        from rankone import __version__

        console.print(f"rankone {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Merge fine-tuned CLIP image towers with RankOne-MoE, stage by stage in a workspace.

    Typical run: fetch → task-vectors → build-pool → adapt → eval → export → predict.
    """


# ---- fetch ------------------------------------------------------------------------


@app.command("fetch")
def fetch_command(
    base: Annotated[Optional[str], typer.Option("--base", metavar="SOURCE", help="Pretrained CLIP (both towers): hf:ORG/NAME\\[@REV], a transformers or open_clip directory, or open_clip:MODEL:TAG.")] = None,
    expert: Annotated[Optional[list[str]], typer.Option("--expert", metavar="TASK=SOURCE", help="A fine-tuned image tower; repeat per task. SOURCE as for --base, or a single .safetensors file.")] = None,
    preset: Annotated[Optional[str], typer.Option("--preset", metavar="NAME", help="A published model set, e.g. vit-b-32-ta8 (see --list-presets); --base/--expert add to or override it.")] = None,
    dataset: Annotated[Optional[list[str]], typer.Option("--dataset", metavar="TASK=SOURCE", help="A task's test split: hf:ORG/NAME\\[@REV] (Hub parquet) or a local .parquet file/folder; written to WORKSPACE/data/<task>/<class>/.")] = None,
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle", help="Allow pickle weights (.bin/.pt), read with torch.load(weights_only=True).")] = False,
    list_presets: Annotated[bool, typer.Option("--list-presets", help="List the presets and exit.")] = False,
    workspace: WorkspaceOption = DEFAULT_WORKSPACE,
    device: DeviceOption = "auto",
) -> None:
    """Fetch the base CLIP and the fine-tuned experts into a workspace, in open_clip's layout.

    Writes base.safetensors, experts/<task>.safetensors and the manifest in one step; a failure leaves the workspace untouched. Running it again replaces the models and removes what later stages derived from them; fetched test images stay for tasks still present. Conversion runs on the CPU whatever --device says. Offline: HF_HUB_OFFLINE=1 reads only huggingface_hub's cache (HF_HOME, HF_HUB_CACHE).

    Example: rankone fetch --preset vit-b-32-ta8 --dataset mnist=hf:ylecun/mnist -w rankone-work

    Example: rankone fetch --base hf:openai/clip-vit-base-patch32 --expert dtd=./dtd-model --expert stanford-cars=cars.safetensors
    """
    from rich.table import Table

    from rankone.models import resolve_device
    from rankone.sources import describe_presets, fetch
    from rankone.sources import preset as preset_sources
    from rankone.workspace import Workspace

    if list_presets:
        table = Table(title="presets")
        for column in ("name", "experts", "description"):
            table.add_column(column)
        for name, description, count in describe_presets():
            table.add_row(name, str(count), description)
        console.print(table)
        return
    resolve_device(device)
    experts: dict[str, str] = {}
    if preset is not None:
        preset_base, experts = preset_sources(preset)
        base = base or preset_base
    experts.update(parse_pairs(expert or [], "--expert"))
    if base is None:
        raise RankoneError("--base: missing; give --base SOURCE or --preset NAME")
    datasets = parse_pairs(dataset or [], "--dataset")
    work = Workspace(workspace)
    fetch(work, base, experts, trust_pickle=trust_pickle, datasets=datasets, progress=True)
    manifest = work.manifest()
    table = Table(title=f"{workspace}: {len(experts)} experts")
    for column in ("task", "source", "revision", "test images"):
        table.add_column(column)
    base_entry = manifest["sources"]["base"]
    table.add_row("(base)", base_entry["source"], (base_entry.get("revision") or "")[:12], "")
    for task, entry in manifest["sources"]["experts"].items():
        images = manifest.get("datasets", {}).get(task, {}).get("images")
        table.add_row(task, entry["source"], (entry.get("revision") or "")[:12], "" if images is None else str(images))
    console.print(table)


# ---- task-vectors, merge, eval -----------------------------------------------------


@app.command("task-vectors")
def task_vectors_command(
    plot: Annotated[bool, typer.Option("--plot", help="Also draw task_vectors/analysis.png (needs matplotlib).")] = False,
    workspace: WorkspaceOption = DEFAULT_WORKSPACE,
    device: DeviceOption = "auto",
) -> None:
    """Compute task vectors τ = θt − θ0 and where fine-tuning moved the weights.

    Writes task_vectors/<task>.safetensors and task_vectors/analysis.json: per block, the mean
    over tasks of the L2 norm of the attention and of the MLP task vector (the paper's
    Figure 2). Subtraction runs on the CPU whatever --device says.

    Example: rankone task-vectors -w rankone-work --plot
    """
    from rich.table import Table

    from rankone.models import resolve_device
    from rankone.task_vectors import ANALYSIS_FILE, ANALYSIS_PLOT, compute_task_vectors
    from rankone.workspace import Workspace

    resolve_device(device)
    work = Workspace(workspace)
    tasks = work.tasks
    # _step_progress lives in the build-pool section: one progress style for every stage.
    progress, advance = _step_progress("task vectors", len(tasks))
    with progress:
        analysis = compute_task_vectors(work, plot=plot, progress=advance)
    table = Table(title=f"mean ‖τ‖₂ over {len(tasks)} tasks")
    table.add_column("block", justify="right")
    table.add_column("attention", justify="right")
    table.add_column("MLP", justify="right")
    table.add_column("MLP / attention", justify="right")
    for row in analysis["blocks"]:
        ratio = row["mlp"] / row["attention"] if row["attention"] else float("inf")
        table.add_row(str(row["block"]), f"{row['attention']:.4f}", f"{row['mlp']:.4f}", f"{ratio:.2f}")
    console.print(table)
    console.print(f"wrote {len(tasks)} task vectors and {work.path(ANALYSIS_FILE)}" + (f" and {work.path(ANALYSIS_PLOT)}" if plot else ""), soft_wrap=True, highlight=False)


@app.command("merge")
def merge_command(
    method: Annotated[str, typer.Option("--method", "-m", help="weight-averaging, task-arithmetic, ties or dare.")],
    lam: Annotated[Optional[float], typer.Option("--lambda", help="Scale λ of the merged task vector (default 0.3; not for weight-averaging).")] = None,
    top: Annotated[Optional[float], typer.Option("--top", help="ties: fraction of largest-magnitude entries kept per tensor (default 0.2).")] = None,
    drop: Annotated[Optional[float], typer.Option("--drop", help="dare: probability of dropping each entry (default 0.9).")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="dare: seed of the random drops (default 0).")] = None,
    workspace: WorkspaceOption = DEFAULT_WORKSPACE,
    device: DeviceOption = "auto",
) -> None:
    """Merge the task vectors statically into one image tower: merged/<method>.safetensors.

    weight-averaging: mean θt.  task-arithmetic: θ0 + λΣτ.  ties: trim to the top
    magnitudes, elect signs, disjoint mean, θ0 + λ·merged.  dare: random drop with
    rescale, then task arithmetic. Options are recorded in the file's metadata.

    Example: rankone merge --method ties --top 0.2 --lambda 0.3
    """
    from rankone.merge import merge_step_count, merge_workspace, merged_path, method_options
    from rankone.models import resolve_device
    from rankone.workspace import Workspace

    method_options(method, lam=lam, top=top, drop=drop, seed=seed)
    resolved = resolve_device(device)
    work = Workspace(workspace)
    progress, advance = _step_progress(f"merge {method}", merge_step_count(work.architecture))
    with progress:
        options = merge_workspace(work, method, lam=lam, top=top, drop=drop, seed=seed, device=resolved, progress=advance)
    settings = ", ".join(f"{name} {value}" for name, value in options.items() if name != "method")
    console.print(f"wrote {work.path(merged_path(method))}" + (f" ({settings})" if settings else ""), soft_wrap=True, highlight=False)


def _per_task_lists(values: list[str] | None, option: str, tasks: list[str], what: str) -> dict[str, list[str]]:
    """`FILE` (one evaluated task) or `TASK=FILE` values → {task: lines of FILE}."""
    from rankone.heads import read_lines

    files: dict[str, str] = {}
    pairs: list[str] = []
    for value in values or []:
        name, sep, _ = value.partition("=")
        if sep and name in tasks:
            pairs.append(value)
        elif len(tasks) == 1:
            if tasks[0] in files:
                raise RankoneError(f"{option}: given twice for task {tasks[0]!r}")
            files[tasks[0]] = value
        else:
            raise RankoneError(f"{option} {value!r}: with several tasks, write TASK=FILE (tasks: {', '.join(tasks)})")
    for task, path in parse_pairs(pairs, option).items():
        if task in files:
            raise RankoneError(f"{option}: task {task!r} given twice")
        files[task] = path
    return {task: read_lines(path, what) for task, path in files.items()}


@app.command("eval", context_settings={"allow_extra_args": True})
def eval_command(
    ctx: typer.Context,
    method: Annotated[str, typer.Option("--method", "-m", help="pretrained, individual, weight-averaging, task-arithmetic, ties, dare, rankone, adamerging, wemoe or perfect-router.")],
    tasks: TasksOption = None,
    data: LabeledDataOption = None,
    heads_source: HeadsSourceOption = "builtin",
    classnames: ClassnamesOption = None,
    templates: TemplatesOption = None,
    batch_size: BatchSizeOption = 64,
    dtype: DtypeOption = "fp32",
    routing: Annotated[bool, typer.Option("--routing", help="RankOne-MoE only: also report, for each task's images, the mean gate its routers give each task's experts.")] = False,
    workspace: WorkspaceOption = DEFAULT_WORKSPACE,
    device: DeviceOption = "auto",
) -> None:
    """Top-1 accuracy of a method on each task's labeled test images; writes eval/<method>.json.

    Heads are zero-shot heads of the pretrained text tower, cached in heads/. --dtype bf16
    runs the image encoder in half precision; the report records the dtype.

    --routing shows whether the routers tell the tasks apart: mean gates by whose images
    (rows) and whose experts (columns), averaged over blocks; per block in the report.

    Example: rankone eval --method ties --tasks sun397 stanford-cars --data data --heads-source fusionbench

    Example: rankone eval --method rankone --dtype bf16

    Example: rankone eval --method rankone --routing
    """
    from rich.table import Table

    from rankone.evaluate import check_tasks, evaluate_workspace
    from rankone.models import resolve_device, resolve_dtype
    from rankone.workspace import Workspace

    resolve_dtype(dtype)
    if routing and method != "rankone":
        raise RankoneError(f"--routing: --method {method} has no routers; only --method rankone does")
    work = Workspace(workspace)
    chosen = _chosen_tasks(ctx, tasks, work, "eval")
    check_tasks(work, chosen)
    resolved = resolve_device(device)
    if dtype == "fp16" and resolved.type == "cpu":
        error_console.print("note: fp16 runs slowly on the CPU (measured ~5× slower than fp32); bf16 is the CPU's fast half precision")
    data_root = data if data is not None else work.path("data")
    if not data_root.is_dir():
        raise RankoneError(f"--data {data_root}: no such folder (fetch test splits with `rankone fetch --dataset`, or pass --data DIR)")
    if heads_source == "builtin":
        sources = work.manifest().get("sources", {}).get("experts", {})
        if any("tanganke" in str(entry) or "fusion" in str(entry).lower() for entry in sources.values()):
            error_console.print("note: these experts look like FusionBench checkpoints; their heads need --heads-source fusionbench")

    def report_skipped(datasets) -> None:
        for task, images in datasets.items():
            if images.skipped:
                error_console.print(f"{task}: skipped {images.skipped} files that are not images")

    report, relpath = evaluate_workspace(
        work,
        method,
        chosen,
        data_root,
        heads_source=heads_source,
        classnames=_per_task_lists(classnames, "--classnames", chosen, "class names"),
        templates=_per_task_lists(templates, "--templates", chosen, "templates"),
        device=resolved,
        dtype=dtype,
        batch_size=batch_size,
        routing=routing,
        on_datasets=report_skipped,
    )
    table = Table(title=f"{method}: top-1 accuracy" + (f" ({dtype})" if dtype != "fp32" else ""))
    table.add_column("task")
    table.add_column("images", justify="right")
    table.add_column("accuracy %", justify="right")
    for task, result in report["tasks"].items():
        table.add_row(task, str(result["n"]), f"{result['accuracy']:.2f}")
    table.add_section()
    table.add_row("average", "", f"{report['average']:.2f}")
    console.print(table)
    console.print(f"image model parameters (heads excluded): {report['parameters']:,}")
    if routing:
        console.print(routing_table(report["routing"]))
    console.print(f"wrote {work.path(relpath)}", soft_wrap=True, highlight=False)


def routing_table(routing: dict[str, Any]) -> "Table":
    """Mean gate per (images of task, experts of task), averaged over blocks; each row's largest in bold."""
    from rich.table import Table

    experts = routing["experts"]
    blocks = len(next(iter(routing["gates"].values())))
    table = Table(title=f"mean gate α' by whose experts (columns) for whose images (rows), averaged over {blocks} blocks")
    table.add_column("images")
    for task in experts:
        table.add_column(task, justify="right")
    for task, per_block in routing["gates"].items():
        shares = [sum(block[index] for block in per_block) / len(per_block) for index in range(len(experts))]
        largest = max(shares)
        table.add_row(task, *(f"[bold]{share:.3f}[/bold]" if share == largest else f"{share:.3f}" for share in shares))
    return table


# ---- build-pool, adapt, export, predict -------------------------------------------


def _parse_select(value: str) -> float | None:
    if value.strip().lower() in ("off", "none"):
        return None
    try:
        return float(value)
    except ValueError:
        raise RankoneError(f"--select {value!r}: expected a number in (0, 1] or `off`") from None


def _step_progress(description: str, total: int):
    """A rich progress bar and a callback advancing it by one."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn(f"[bold]{description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=error_console)
    task = progress.add_task(description, total=total)
    return progress, lambda *_: progress.advance(task)


@app.command("build-pool")
def build_pool_command(
    k: Annotated[int, typer.Option("--k", help="Rank-one experts kept per task and MLP matrix.")] = 32,
    lam: Annotated[float, typer.Option("--lambda", help="λ of the static part θ0 + λΣτ (and the routers' initial bias).")] = 0.3,
    svd: Annotated[str, typer.Option("--svd", help="exact (torch.linalg.svd) or randomized (block Krylov, 3 iterations; within 0.1% of the exact kept energy on decaying spectra).")] = "exact",
    workspace: WorkspaceOption = DEFAULT_WORKSPACE,
    device: DeviceOption = "auto",
) -> None:
    """Split every MLP task vector into its top-k rank-one experts; merge the rest statically.

    Reads task_vectors/ (from `rankone task-vectors`), writes pool.safetensors, and prints
    the fraction of ‖τ‖² the experts keep and the merged model's parameter count.

    Example: rankone build-pool -w rankone-work --k 32 --lambda 0.3
    """
    from rich.table import Table

    from rankone.models import resolve_device
    from rankone.pool import build_pool_stage, check_pool_options
    from rankone.workspace import Workspace

    ws = Workspace(workspace)
    resolved = resolve_device(device)
    check_pool_options(ws.architecture, k, svd)
    progress, advance = _step_progress("SVD", 2 * int(ws.architecture["vision_cfg"]["layers"]))
    with progress:
        report = build_pool_stage(ws, k, lam, svd, progress=advance, device=resolved)
    table = Table(title=f"fraction of ‖τ‖² kept by k={k}")
    tasks = list(next(iter(report.kept_energy.values())))
    table.add_column("matrix")
    for task in tasks:
        table.add_column(task, justify="right")
    for key, fractions in report.kept_energy.items():
        table.add_row(key.removeprefix("visual.transformer.resblocks."), *(f"{fractions[task]:.3f}" for task in tasks))
    console.print(table)
    counts = report.counts
    console.print(f"pretrained image tower  {report.tower_parameters:>14,}")
    console.print(f"rank-one pool           {counts['pool']:>14,}")
    console.print(f"routers                 {counts['routers']:>14,}")
    console.print(f"RankOne-MoE total       {counts['total']:>14,}  ({counts['total'] / report.tower_parameters:.4f}× the tower)")
    console.print(f"wrote {ws.path('pool.safetensors')}", soft_wrap=True, highlight=False)


@app.command()
def adapt(
    data: Annotated[Path, typer.Option("--data", help="Unlabeled images, DATA/<task>/**/<image>.")],
    method: Annotated[str, typer.Option("--method", help="Adaptive method to train.")] = "rankone",
    steps: Annotated[int, typer.Option("--steps", help="Adam steps (each sees one batch of every task).")] = 1000,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per task per step.")] = 16,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Adam learning rate (default 1e-4; 1e-3 for adamerging).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed for the router initialisation and data order.")] = 0,
    select: Annotated[str, typer.Option("--select", help="Top-p ratio p of experts kept per sample, or `off`.")] = "0.75",
    routing: Annotated[str, typer.Option("--routing", help="per-sample, or per-batch (α averaged over the batch).")] = "per-sample",
    tasks: Annotated[Optional[list[str]], typer.Option("--tasks", help="Tasks to adapt on (repeat or comma-separate); default all.")] = None,
    save_every: Annotated[int, typer.Option("--save-every", help="Checkpoint every N steps (0: never).")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint.")] = False,
    heads_source: HeadsSourceOption = "builtin",
    classnames_from: Annotated[Optional[Path], typer.Option("--classnames-from", help="Labeled folder DIR/<task>/<class>/ to take class names from.")] = None,
    classnames: Annotated[Optional[list[str]], typer.Option("--classnames", help="TASK=FILE, one class name per line; repeatable.")] = None,
    templates: Annotated[Optional[list[str]], typer.Option("--templates", help="TASK=FILE, one template with {} per line; repeatable.")] = None,
    workers: Annotated[int, typer.Option("--workers", help="Image-loading worker processes.")] = 0,
    workspace: WorkspaceOption = DEFAULT_WORKSPACE,
    device: DeviceOption = "auto",
) -> None:
    """Train the routers on unlabeled test images by entropy minimisation (test-time adaptation).

    Heads need class names: they come from --heads-source fusionbench, --classnames
    TASK=FILE, --classnames-from DIR, or the workspace's data/<task>/<class>/ folders (from
    `rankone fetch --dataset`). Use the same heads as `rankone eval` will.

    Example: rankone adapt -w rankone-work --data ./unlabeled --classnames-from ./test --steps 1000
    """
    from rankone.adapt import ADAPT_METHODS, AdaptOptions
    from rankone.adamerging import DEFAULT_LR as ADAMERGING_LR
    from rankone.models import resolve_device
    from rankone.workspace import Workspace

    if method not in ADAPT_METHODS:
        raise RankoneError(f"--method {method!r}: unknown; choose from {', '.join(ADAPT_METHODS)}")
    options = AdaptOptions(
        data=data, steps=steps, batch_size=batch_size, lr=lr if lr is not None else (ADAMERGING_LR if method == "adamerging" else AdaptOptions.lr), seed=seed, select=_parse_select(select), routing=routing,
        tasks=_split_tasks(tasks), save_every=save_every, resume=resume, device=resolve_device(device),
        heads_source=heads_source, classnames_from=classnames_from, classnames=parse_pairs(classnames or [], "--classnames"),
        templates=parse_pairs(templates or [], "--templates"), workers=workers,
    )
    written = ADAPT_METHODS[method](Workspace(workspace), options)
    console.print(f"wrote {Path(workspace) / written}", soft_wrap=True, highlight=False)


@app.command()
def export(
    out: Annotated[Path, typer.Option("--out", help="Folder to write rankone.json and model.safetensors to.")],
    dtype: Annotated[str, typer.Option("--dtype", help="Storage precision of the pool and routers: fp32, fp16 or bf16 (tower and heads stay fp32).")] = "fp32",
    workspace: WorkspaceOption = DEFAULT_WORKSPACE,
    device: DeviceOption = "auto",
) -> None:
    """Write the adapted RankOne-MoE model as one self-contained folder (no text tower needed).

    Example: rankone export -w rankone-work --out ./rankone-model --dtype fp16
    """
    from rankone.artifact import export as export_artifact
    from rankone.models import resolve_device
    from rankone.workspace import Workspace

    config = export_artifact(Workspace(workspace), out, dtype, resolve_device(device))
    size = (Path(out) / "model.safetensors").stat().st_size
    console.print(f"wrote {out} (tasks: {', '.join(config['head_tasks'])}; {config['parameters']['total']:,} parameters + heads; {dtype}, {size / 1e6:,.2f} MB)", soft_wrap=True, highlight=False)


@app.command()
def predict(
    paths: Annotated[list[Path], typer.Argument(help="[DIR] IMAGE...: an exported model folder or a workspace (default: -w), then image files.", metavar="PATH")],
    task: Annotated[str, typer.Option("--task", help="Which task's classes to predict.")],
    top: Annotated[int, typer.Option("--top", help="How many classes to print.")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="Precision the image tower computes in: fp32 (default), fp16 or bf16.")] = None,
    workspace: WorkspaceOption = DEFAULT_WORKSPACE,
    device: DeviceOption = "auto",
) -> None:
    """Print the top classes of --task with their probabilities for each image.

    The model is DIR when the first argument is a folder (an export or a workspace), otherwise the workspace's adapted model (-w).

    Example: rankone predict ./rankone-model --task cars photo1.jpg photo2.jpg --json

    Example: rankone predict -w rankone-work --task cars --dtype bf16 photo1.jpg
    """
    import json

    from rankone.artifact import load, predict as predict_images
    from rankone.models import resolve_device, resolve_dtype

    if dtype is not None:
        resolve_dtype(dtype)
    # An image is never a folder, so a leading folder can only be the model.
    if not paths[0].exists():
        raise RankoneError(f"{paths[0]}: no such model folder or image file")
    model_dir, images = (paths[0], paths[1:]) if paths[0].is_dir() else (workspace, paths)
    if not images:
        raise RankoneError(f"predict: no IMAGE given after the model folder {model_dir}")
    if model_dir == workspace and not Path(workspace).is_dir():
        raise RankoneError(f"-w {workspace}: no such workspace; pass the model folder first (rankone predict DIR --task TASK IMAGE...) or -w WORKSPACE")
    model = load(model_dir, resolve_device(device), dtype)
    results = predict_images(model, images, task, top)
    if as_json:
        print(json.dumps(results, indent=2))
        return
    for result in results:
        console.print(f"[bold]{result['image']}[/]", soft_wrap=True, highlight=False)
        for entry in result["top"]:
            console.print(f"  {entry['probability']:7.2%}  {entry['class']}", highlight=False)

# ---- compare, inspect --------------------------------------------------------------


@app.command("compare", context_settings={"allow_extra_args": True})
def compare_command(
    ctx: typer.Context,
    data: LabeledDataOption = None,
    tasks: TasksOption = None,
    methods: Annotated[Optional[list[str]], typer.Option("--methods", help="Only these methods (rows), comma-separated or repeated (default: every one that can run).")] = None,
    heads_source: HeadsSourceOption = "builtin",
    classnames: ClassnamesOption = None,
    templates: TemplatesOption = None,
    batch_size: BatchSizeOption = 64,
    dtype: DtypeOption = "fp32",
    workspace: WorkspaceOption = DEFAULT_WORKSPACE,
    device: DeviceOption = "auto",
) -> None:
    """Evaluate every method the workspace can run, like the paper's Table 1.

    Rows: pretrained, individual, each merged/<method>, each adapted/<method>
    (adamerging, wemoe, rankone). Columns: top-1 % per task, the average, and
    parameters relative to the pretrained image tower. Writes compare.json,
    compare.md and eval/<method>.json (the files `rankone eval` writes), all at
    the end, so an error changes nothing.

    Example: rankone compare -w rankone-work --data data --tasks cars,dtd
    """
    from rich.table import Table

    from rankone.compare import COMPARE_JSON, COMPARE_MARKDOWN, compare, relative
    from rankone.models import resolve_device, resolve_dtype
    from rankone.workspace import Workspace

    resolve_dtype(dtype)
    work = Workspace(workspace)
    chosen = _chosen_tasks(ctx, tasks, work, "compare")
    resolved = resolve_device(device)
    summary = compare(
        work, data if data is not None else work.path("data"), chosen, _split_tasks(methods),
        heads_source=heads_source,
        classnames=_per_task_lists(classnames, "--classnames", chosen, "class names"),
        templates=_per_task_lists(templates, "--templates", chosen, "templates"),
        device=resolved, dtype=dtype, batch_size=batch_size, on_method=lambda name: error_console.print(f"[bold]{name}[/]"),
    )
    table = Table(title="top-1 accuracy (%)")
    table.add_column("method", no_wrap=True)
    for task in summary["tasks"]:
        table.add_column(task, justify="right")
    table.add_column("average", justify="right")
    table.add_column("parameters", justify="right")
    for row in summary["rows"]:
        cells = [f"{row['accuracy'][task]:.1f}" for task in summary["tasks"]]
        table.add_row(row["method"], *cells, f"{row['average']:.1f}", relative(row["parameters"], summary["tower_parameters"]))
    # One column per task: wider than 80 characters for many tasks, and truncated cells would hide numbers.
    Console(width=max(console.width, 50 + 11 * len(summary["tasks"]))).print(table)
    console.print(f"parameters: image model, heads excluded, relative to the pretrained image tower ({summary['tower_parameters']:,})")
    console.print(f"wrote {work.path(COMPARE_JSON)}, {work.path(COMPARE_MARKDOWN)} and {len(summary['rows'])} reports in {work.path('eval')}")


def _size(nbytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1000 or unit == "GB":
            return f"{nbytes:,} {unit}" if unit == "B" else f"{nbytes:,.1f} {unit}"
        nbytes /= 1000
    return ""


@app.command("inspect")
def inspect_command(
    path: Annotated[Optional[Path], typer.Argument(help="A workspace, an exported model folder or a .safetensors file (default: the workspace).", metavar="PATH")] = None,
    architecture: Annotated[Optional[str], typer.Option("--architecture", help="Count from an open_clip architecture alone (e.g. ViT-B-32, ViT-L-14); no weights needed.")] = None,
    tasks: Annotated[int, typer.Option("--tasks", help="With --architecture: number of tasks for RankOne-MoE (WEMoE is shown for 8, 20 and this).")] = 8,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    workspace: WorkspaceOption = DEFAULT_WORKSPACE,
    device: DeviceOption = "auto",
) -> None:
    """Tensors by role (towers, experts, task vectors, pool, routers, heads…).

    Counts and bytes per role, read from safetensors headers only. With
    --architecture: parameter counts of RankOne-MoE (k = 16, 32, 64, 128) and
    WEMoE, from the real modules built on the meta device (no weights needed).

    Examples: rankone inspect ./rankone-model

              rankone inspect --architecture ViT-L-14 --tasks 20
    """
    import json

    from rich.table import Table

    from rankone.models import resolve_device

    resolve_device(device)
    if architecture is not None:
        from rankone.inspection import architecture_report
        from rankone.models import named_architecture

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
    from rankone.inspection import inventory

    found = inventory(path if path is not None else workspace)
    if as_json:
        rows = [{"role": row.role, "files": len(row.files), "tensors": row.tensors, "parameters": row.parameters, "bytes": row.nbytes}
                for row in found.roles]
        print(json.dumps({"path": str(found.path), "kind": found.kind, "files": found.files, "roles": rows}, indent=2))
        return
    table = Table(title=f"{found.path} ({found.kind}, {found.files} safetensors file{'s' if found.files != 1 else ''})")
    for column in ("role", "files", "tensors", "parameters", "size"):
        table.add_column(column, justify="left" if column == "role" else "right")
    for row in found.roles:
        table.add_row(row.role, str(len(row.files)), f"{row.tensors:,}", f"{row.parameters:,}", _size(row.nbytes))
    table.add_section()
    table.add_row("total", str(found.files), f"{sum(row.tensors for row in found.roles):,}", f"{found.total_parameters:,}", _size(found.total_bytes))
    console.print(table)


# ---- finetune, demo ----------------------------------------------------------------


@app.command("finetune")
def finetune_command(
    task: Annotated[str, typer.Option("--task", help="Task name: DATA/<task>/<class>/<image> holds its training images.")],
    data: Annotated[Path, typer.Option("--data", help="Labeled training images, DATA/<task>/<class>/<image>.")],
    out: Annotated[Path, typer.Option("--out", help="New folder for the expert (open_clip_config.json + open_clip_model.safetensors).")],
    base: Annotated[Optional[str], typer.Option("--base", help="Pretrained CLIP SOURCE (as for `rankone fetch`); default: the workspace's base.")] = None,
    steps: Annotated[int, typer.Option("--steps", help="Adam steps.")] = 2000,
    lr: Annotated[float, typer.Option("--lr", help="Adam learning rate.")] = 1e-5,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per step.")] = 32,
    seed: Annotated[int, typer.Option("--seed", help="Seed for the data order.")] = 0,
    templates: Annotated[Optional[Path], typer.Option("--templates", help="FILE of templates with {}, one per line (default: rankone's set for the task).")] = None,
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle", help="Allow a pickle base (.bin/.pt), read with torch.load(weights_only=True).")] = False,
    workspace: WorkspaceOption = DEFAULT_WORKSPACE,
    device: DeviceOption = "auto",
) -> None:
    """Fine-tune the image tower on one task against its frozen zero-shot head.

    FusionBench's recipe: Adam, lr 1e-5, batch 32, only the image tower trains. Writes an
    open_clip directory that `rankone fetch --expert TASK=DIR` accepts.

    Example: rankone finetune --base rankone-zoo/base --task digits --data data/finetune --out experts/digits --steps 600
    """
    from rankone.finetune import finetune_expert, load_base
    from rankone.heads import read_lines
    from rankone.models import resolve_device

    resolved = resolve_device(device)
    architecture, base_state = load_base(base, workspace, trust_pickle=trust_pickle)
    template_list = read_lines(templates, "templates") if templates is not None else None
    progress, advance = _step_progress(f"fine-tuning {task}", steps)
    with progress:
        result = finetune_expert(
            architecture, base_state, task, data, out, steps=steps, lr=lr, batch_size=batch_size, seed=seed,
            templates=template_list, device=resolved, on_step=advance,
        )
    console.print(
        f"fine-tuned {task} on {result.images} images ({len(result.classnames)} classes), "
        f"loss {result.losses[0]:.3f} → {sum(result.losses[-20:]) / len(result.losses[-20:]):.3f}; wrote {result.out}",
        highlight=False,
    )


@app.command("demo")
def demo_command(
    quick: Annotated[bool, typer.Option("--quick", help="Toy sizes: the same stages in under 2 minutes.")] = False,
    seeds: Annotated[Optional[int], typer.Option("--seeds", help="RankOne-MoE adaptation seeds to average (default 3; 1 with --quick).")] = None,
    zoo_path: Annotated[bool, typer.Option("--zoo-path", help="Only build (or reuse) the example zoo and print its folder, to run the stages by hand.")] = False,
    workspace: WorkspaceOption = DEFAULT_WORKSPACE,
    device: DeviceOption = "auto",
) -> None:
    """Run the whole pipeline on the built-in offline example suite and print the comparison.

    Builds (once, cached under $RANKONE_CACHE, default ~/.cache/rankone) six small tasks from
    scikit-learn digits, matplotlib's fonts and scikit-image's pictures, a tiny CLIP pretrained
    on them and one expert per task made with `rankone finetune`; then runs fetch,
    task-vectors, merge, build-pool, adapt, eval and compare, printing each command. A toy
    illustration of the method, not a reproduction of the paper's numbers.

    Example: rankone demo --quick -w demo-work

    Example: ZOO=$(rankone demo --zoo-path)  # base/, experts/<task>/, data/{finetune,test,unlabeled}/
    """
    import dataclasses
    import importlib.util

    import torch

    missing = [name for name in ("sklearn", "skimage", "matplotlib") if importlib.util.find_spec(name) is None]
    if missing:
        raise RankoneError(f"demo: the example suite needs {', '.join(missing)}; install them with pip install 'rankone[examples]'")

    from rankone.examples.demo import FULL_SETTINGS, QUICK_SETTINGS, result_lines, run_demo, write_result_json
    from rankone.examples.zoo import build_zoo, recipe
    from rankone.models import resolve_device

    resolved = resolve_device(device)
    settings = QUICK_SETTINGS if quick else FULL_SETTINGS
    if seeds is not None:
        if seeds < 1:
            raise RankoneError(f"--seeds {seeds}: must be at least 1")
        settings = dataclasses.replace(settings, seeds=tuple(range(seeds)))
    if resolved.type == "cpu":
        torch.set_num_threads(min(torch.get_num_threads(), 2))
    bars: list = []

    def on_stage(description: str, total: int):
        if bars:
            bars.pop().stop()
        progress, advance = _step_progress(description, total)
        progress.start()
        bars.append(progress)
        return advance

    try:
        zoo = build_zoo(recipe(quick=quick), device=resolved, on_stage=on_stage)
    finally:
        while bars:
            bars.pop().stop()
    if zoo_path:
        print(zoo.root)
        return
    console.print(f"example zoo: {zoo.root} ({len(zoo.tasks)} tasks: {', '.join(zoo.tasks)})", highlight=False)
    result = run_demo(zoo, workspace, settings, device=device, say=lambda line: console.print(line, highlight=False, markup=False))
    for line in result_lines(result):
        console.print(line, highlight=False, markup=False)
    write_result_json(result, Path(workspace) / "demo.json")
    console.print(f"wrote {Path(workspace) / 'demo.json'}", highlight=False)


def main() -> None:
    try:
        app(standalone_mode=False)
    except RankoneError as error:
        error_console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        error_console.print("aborted")
        sys.exit(130)
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except Exception as error:
        # Usage errors come from the click that typer bundles; recognised by shape, not import.
        if callable(getattr(error, "show", None)) and isinstance(getattr(error, "exit_code", None), int):
            error.show()
            sys.exit(error.exit_code)
        raise


if __name__ == "__main__":
    main()
