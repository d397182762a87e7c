"""`rankone fetch`, `task-vectors`, `build-pool`, `merge`, `adapt`, `eval`, `compare`, `export`, `run` (and the demo's run):
each a thin command over `pipeline.STAGES` (flags derived by `flags.stage_command`) that prints a summary."""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import shlex
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Optional

import torch
import typer
from rich.markup import escape

from rankone import distributed, label_free, methods, numerics, pipeline
from rankone.cli import render
from rankone.cli.app import command, console, error_console, say, step_bar
from rankone.cli.flags import KEYWORD, stage_command
from rankone.errors import RankoneError
from rankone.evaluate import routing_plot_path
from rankone.examples import demo
from rankone.models import resolve_device
from rankone.sources import describe_presets
from rankone.workspace import Workspace

# What `--help` says after the stage's summary and the methods it takes (both from the registry).
DETAILS = {
    "fetch": """Writes base.safetensors, experts/<task>.safetensors and the manifest in one step; a failure leaves the workspace untouched. Running it again replaces the models and removes what later stages derived from them; fetched test images stay for tasks still present. Conversion runs on the CPU whatever --device says. Offline: HF_HUB_OFFLINE=1 reads only huggingface_hub's cache (HF_HOME, HF_HUB_CACHE).

    Example: rankone fetch --preset vit-b-32-ta8 --dataset mnist=hf:ylecun/mnist -w rankone-work

    Example: rankone fetch --base hf:openai/clip-vit-base-patch32 --expert dtd=./dtd-model --expert stanford-cars=cars.safetensors
    """,
    "task-vectors": """Writes task_vectors/<task>.safetensors and task_vectors/analysis.json: per block, the mean
    over tasks of the L2 norm of the attention and of the MLP task vector (the paper's
    Figure 2). Subtraction runs on the CPU whatever --device says.

    Example: rankone task-vectors -w rankone-work --plot
    """,
    "build-pool": """Reads task_vectors/ (from `rankone task-vectors`), writes pool.safetensors, and prints
    the fraction of ‖τ‖² the experts keep and the merged model's parameter count.

    Example: rankone build-pool -w rankone-work --k 32 --lambda 0.3
    """,
    "merge": """Options are recorded in the file's metadata; an option the method does not use is an error.

    Example: rankone merge --method ties --top 0.2 --lambda 0.3

    Example: rankone merge --method task-arithmetic --lambda auto --data ./unlabeled --classnames-from ./test

    Example: rankone merge --method iso-cts --common-fraction 0.8

    Example: rankone merge --method emr  # a tower per task: eval and compare give each task its own
    """,
    "adapt": """Heads need class names: they come from --heads-source fusionbench, --classnames
    TASK=FILE, --classnames-from DIR, or the workspace's data/<task>/<class>/ folders (from
    `rankone fetch --dataset`). Use the same heads as `rankone eval` will.

    Example: rankone adapt -w rankone-work --data ./unlabeled --classnames-from ./test --steps 1000

    Example: rankone adapt --data ./unlabeled --data cars=/data/cars-unlabeled --classnames-from ./test

    RegMean and Fisher merging train nothing: they read each expert's statistics on --examples
    images per task and write one merged tower (--steps is not used; regmean needs no class names).

    Example: rankone adapt --method regmean --data ./unlabeled --examples 256

    Example: rankone adapt --method fisher --data ./unlabeled --classnames-from ./test

    RankOne-MoE's --router subspace is training-free (no --data); --router task trains the
    routers to tell the folders' tasks apart (no class labels):

    Example: rankone adapt --router subspace --classnames-from ./test

    Example: rankone adapt --router task --data ./unlabeled --steps 200

    On several processes (CPU: gloo; GPUs: nccl, one per process) each takes its share of every
    step's batch; with the same --seed and --batch-size the result is that of one process (to float
    rounding). Rank 0 writes; eval and compare split the test images the same way, with the same numbers:

    Example: torchrun --nproc-per-node 4 -m rankone adapt -w rankone-work --data ./unlabeled --classnames-from ./test
    """,
    "eval": """Heads are zero-shot heads of the pretrained text tower, cached in heads/. --dtype bf16
    runs the image encoder in half precision; the report records the dtype.

    --routing shows whether the routers tell the tasks apart: mean gates by whose images
    (rows) and whose experts (columns), averaged over blocks; per block in the report.

    Example: rankone eval --method ties --tasks sun397 stanford-cars --data data --heads-source fusionbench

    Example: rankone eval --method rankone --dtype bf16

    Example: rankone eval --method rankone --routing --plot

    Example: rankone eval --method ties --data ./my-test --data cars=/data/cars-test
    """,
    "compare": """Rows: every method whose files the workspace holds, in the paper's order (an oracle
    such as perfect-router only when named in --methods). Columns: top-1 % per task, the
    average, and parameters relative to the pretrained image tower. Writes compare.json,
    compare.md and eval/<method>.json (the files `rankone eval` writes), all at the end, so an
    error changes nothing.

    Example: rankone compare -w rankone-work --data data --tasks cars,dtd
    """,
    "export": """A static merge (task-arithmetic, ties, …, adamerging, pretrained) becomes a whole CLIP
    (its image tower, the base's text tower) that open_clip loads unmodified:
    open_clip.create_model_and_transforms("local-dir:OUT"); with --format transformers, a
    CLIPModel folder for transformers. RankOne-MoE becomes rankone's artifact for
    rankone.load and predict. Every export holds a model card (README.md) and rankone.json,
    which lists its files; exporting again into OUT replaces them, and a folder holding
    anything else is refused.

    Example: rankone export --method task-arithmetic -w rankone-work --out ./ta-model

    Example: rankone export --method ties --format transformers --shard-size 2GB --out ./ties-hf

    Example: rankone export -w rankone-work --out ./rankone-model --dtype fp16
    """,
}


def context(device: str) -> pipeline.Context:
    """The run-time context; under torchrun, this process's device, its place in the process group, and notes from rank 0 only."""
    chosen = distributed.rank_device(resolve_device(device))
    current = distributed.join(chosen)
    if not current.is_main:
        return pipeline.Context(device=chosen, progress=False)
    return pipeline.Context(device=chosen, bar=step_bar, note=lambda line: error_console.print(line, highlight=False, markup=False, soft_wrap=True))


@contextlib.contextmanager
def several_processes() -> Iterator[None]:
    """Under torchrun: only rank 0 prints its summary, and a failure is one line from one process (`distributed.failure_line`)."""
    current = distributed.world()
    if not current.distributed:
        yield
        return
    try:
        # Joined first, so that even an error every process finds in the options is printed once.
        distributed.join()
        with contextlib.redirect_stdout(io.StringIO()) if not current.is_main else contextlib.nullcontext():
            yield
        distributed.leave()
    except typer.Exit:
        raise
    except (Exception, KeyboardInterrupt) as error:
        line = distributed.failure_line(error)
        if line is not None:
            error_console.print(f"[bold red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)
            if not isinstance(error, RankoneError):
                # A bug, not a user's error: its traceback too, from the process it happened in.
                error_console.print(escape("".join(traceback.format_exception(error))), highlight=False, soft_wrap=True)
        raise typer.Exit(distributed.failure_exit_code(error)) from None


def _tasks_with_extra_words(values: dict[str, Any], command: str) -> None:
    """`--tasks a b`: typer leaves `b` in ctx.args; fold it into the list (`--tasks a,b` works as it is)."""
    ctx = values.pop("ctx", None)
    extra = list(ctx.args) if ctx is not None else []
    if extra and not values.get("tasks"):
        raise RankoneError(f"{command}: unexpected argument {extra[0]!r} (tasks go after --tasks)")
    for value in extra:
        if value.startswith("-"):
            raise RankoneError(f"{command}: unknown option {value!r}")
    if extra:
        values["tasks"] = list(values["tasks"]) + extra


def run_command(name: str, values: dict[str, Any]) -> tuple[Workspace, Any]:
    """Check every option, then run the stage: nothing is read or written before the options pass."""
    stage = pipeline.STAGES[name]
    workspace, device = Workspace(values.pop("workspace")), values.pop("device")
    options, method_options = pipeline.stage_options(stage, values)
    run_context = context(device)
    return workspace, pipeline.run_stage(stage, workspace, options, method_options, run_context)


def _fetch(values: dict[str, Any]) -> None:
    if values.pop("list_presets"):
        console.print(render.presets_table(describe_presets()))
        return
    workspace, _ = run_command("fetch", values)
    console.print(render.fetch_table(workspace))


def _task_vectors(values: dict[str, Any]) -> None:
    workspace, analysis = run_command("task-vectors", values)
    console.print(render.analysis_table(analysis))
    written = f"wrote {len(workspace.tasks)} task vectors and {workspace.path(pipeline.ANALYSIS_FILE)}"
    if values.get("plot"):
        written += f" and {workspace.path('task_vectors/analysis.png')}"
    say(written)


def _build_pool(values: dict[str, Any]) -> None:
    workspace, report = run_command("build-pool", values)
    console.print(render.kept_energy_table(report, values["k"]))
    for line in render.pool_counts(report):
        console.print(line)
    say(f"wrote {workspace.path('pool.safetensors')}")


def _merge(values: dict[str, Any]) -> None:
    workspace, record = run_command("merge", values)
    settings = ", ".join(f"{name} {value}" for name, value in record.items() if name not in ("method", "lambda_rule"))
    written = workspace.path(methods.get(record["method"]).output)
    say(f"wrote {written}" + (f" ({settings})" if settings else ""))


def _adapt(values: dict[str, Any]) -> None:
    workspace, result = run_command("adapt", values)
    for line in render.adaptation_lines(result):
        say(line)
    curve = f" and its loss curve {workspace.path(result['curve'])}" if "curve" in result else ""
    say(f"wrote {workspace.path(result['written'])}{curve}")


def _eval(values: dict[str, Any]) -> None:
    _tasks_with_extra_words(values, "eval")
    workspace, report = run_command("eval", values)
    console.print(render.eval_table(report))
    console.print(f"image model parameters (heads excluded): {report['parameters']:,}")
    if values.get("routing"):
        console.print(render.routing_table(report["routing"]))
    plot = f" and {workspace.path(routing_plot_path(report['written']))}" if values.get("plot") else ""
    say(f"wrote {workspace.path(report['written'])}{plot}")


def _compare(values: dict[str, Any]) -> None:
    _tasks_with_extra_words(values, "compare")
    workspace, summary = run_command("compare", values)
    render.print_compare(console, summary)
    say(f"wrote {workspace.path('compare.json')}, {workspace.path('compare.md')} and {len(summary['rows'])} reports in {workspace.path('eval')}")


def _export(values: dict[str, Any]) -> None:
    _, result = run_command("export", values)
    layout = {"open_clip": "open_clip's layout", "transformers": "transformers' layout"}.get(result["layout"], "rankone's artifact")
    say(f"wrote {result['out']}: {result['method']} as {layout} ({', '.join(result['files'])}; "
        f"{result['dtype']}, {result['bytes'] / 1e6:,.2f} MB)")


_LIST_PRESETS = inspect.Parameter("list_presets", KEYWORD, default=False,
                                  annotation=Annotated[bool, typer.Option("--list-presets", help="List the presets and exit.")])
_JSON = inspect.Parameter("as_json", KEYWORD, default=False, annotation=Annotated[bool, typer.Option(
    "--json", help="Print the stage's result as one JSON object on stdout instead of the summary (progress stays on stderr).")])
_TASKS_WORDS = {"allow_extra_args": True}


def _summary_or_json(name: str, summary: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    """The stage's body: its summary for people, or with --json the result `rankone run` records, as one object."""
    def body(values: dict[str, Any]) -> None:
        with several_processes():
            json_body(values)

    def json_body(values: dict[str, Any]) -> None:
        if not values.pop("as_json"):
            summary(values)
            return
        if values.pop("list_presets", False):
            print(json.dumps([{"name": preset, "description": text, "experts": count} for preset, text, count in describe_presets()], indent=2))
            return
        if "ctx" in values:
            _tasks_with_extra_words(values, name)
        _, result = run_command(name, values)
        print(json.dumps(pipeline.jsonable(result), indent=2))

    return body


for _name, _summary, _extra, _settings in (
    ("fetch", _fetch, [_LIST_PRESETS], None), ("task-vectors", _task_vectors, [], None), ("build-pool", _build_pool, [], None),
    ("merge", _merge, [], None), ("adapt", _adapt, [], None), ("eval", _eval, [], _TASKS_WORDS),
    ("compare", _compare, [], _TASKS_WORDS), ("export", _export, [], None),
):
    stage_command(pipeline.STAGES[_name], DETAILS[_name], _summary_or_json(_name, _summary), extra=[*_extra, _JSON],
                  context_settings=_settings)


@command("run")
def run_file(
    file: Annotated[Path, typer.Argument(help="A pipeline YAML file (see examples/).", metavar="PIPELINE.yaml")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan (each stage, run or skipped and why); the workspace is not touched (a file with `example:` builds the example's cached zoo first if it is missing).")] = False,
    workspace: Annotated[Optional[Path], typer.Option("-w", "--workspace", help="Workspace (default: the file's `workspace:`, else rankone-work).")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="Device (default: the file's `device:`, else auto).")] = None,
) -> None:
    """A stage is skipped when the workspace recorded it with the same options, after the same
    earlier stages, and its outputs are unchanged; a changed option reruns that stage and
    every stage after it. A failed run resumes where it stopped. `nproc: N` on an adapt, eval or
    compare stage runs it on N processes (torchrun on this machine).

    Example: rankone run examples/vit-b-32-ta8.yaml --dry-run

    Example: rankone run examples/demo.yaml -w demo-work
    """
    if distributed.world().distributed:
        raise RankoneError("rankone run: starts each stage's processes itself (`nproc: N` on a stage); run it without torchrun")
    chosen = load(file, workspace, device)
    if dry_run:
        for index, planned in enumerate(pipeline.plan(chosen)):
            say(render.plan_line(index, planned))
        return
    execute(chosen)


def load(file: Path, workspace: Path | None, device: str | None) -> pipeline.Pipeline:
    """The pipeline file, with the example zoo built first when it names one (`${ZOO}`, `${LAMBDA}`)."""
    return pipeline.load_pipeline(file, workspace=workspace, device=device,
                                  examples=lambda name: load_example(name, device or "auto").variables())


def load_example(name: str, device: str) -> demo.Example:
    """The built-in example, its zoo built (or reused) with progress bars.

    Whatever runs the example (`rankone demo`, or `rankone run` of a file that names it) reads it before any
    kernel runs, so this is where the process is pinned as the zoo's build is: the README's numbers were made so.
    """
    numerics.pin_this_process()
    bars: list = []

    def on_stage(description: str, total: int):
        while bars:
            bars.pop().__exit__(None, None, None)
        bar = step_bar(description, total)
        advance = bar.__enter__()
        bars.append(bar)
        return advance

    try:
        return demo.prepare_example(name, resolve_device(device), on_stage)
    finally:
        while bars:
            bars.pop().__exit__(None, None, None)


def run_example(example: str, seeds: int | None, workspace: Path, device: str, zoo_path: bool = False) -> None:
    """`rankone demo`: the example's zoo (only its folder printed, with `zoo_path`), then its pipeline file run and the comparison printed."""
    prepared = load_example(example, device)
    if zoo_path:
        print(prepared.zoo.root)
        return
    chosen = demo.demo_pipeline(prepared, workspace, device, seeds)
    say(f"example zoo: {prepared.zoo.root} ({len(prepared.zoo.tasks)} tasks: {', '.join(prepared.zoo.tasks)})")
    say("static " + label_free.describe(prepared.entropies, prepared.lam))
    records = execute(chosen)
    result = demo.demo_result(chosen, records, prepared, cpu_kernels=numerics.pinned_state())
    for line in demo.result_lines(result):
        say(line)
    demo.write_result_json(result, Path(workspace) / "demo.json")
    say(f"wrote {Path(workspace) / 'demo.json'}")


def execute(chosen: pipeline.Pipeline) -> list[dict[str, Any]]:
    """Run the plan, printing each stage as the command that runs it by hand, and a summary after it."""
    run_context = context(chosen.device)

    def on_step(planned: pipeline.PlannedStep, index: int) -> None:
        command = " ".join(shlex.quote(arg) for arg in render.command_arguments(planned.step, chosen.workspace, chosen.device))
        launcher = f"torchrun --standalone --nproc-per-node {planned.step.nproc} -m " if planned.step.nproc > 1 else ""
        say(("$ " if planned.run else "skip ") + launcher + "rankone " + command + ("" if planned.run else f"  ({planned.reason})"))

    def on_result(planned: pipeline.PlannedStep, result: Any) -> None:
        for line in render.stage_summary(planned.step, result):
            say("  " + line)

    return pipeline.run_pipeline(chosen, run_context, on_step=on_step, on_result=on_result)
