"""The pipeline: every stage in run order, with its options, and the YAML runner.

Each `Stage` states its option set, whether it takes `--method` (and of which kind), the
function that runs it and the files it reads and writes. The CLI commands of these stages
(`rankone.cli`) and a pipeline YAML file (`rankone run`) both go through the same
`Stage.run`, so a stage behaves the same typed or described.

A pipeline file:

    workspace: rankone-work          # default: rankone-work
    device: auto
    base: hf:openai/clip-vit-base-patch32
    experts: {dtd: ./dtd-expert, mnist: hf:tanganke/clip-vit-base-patch32_mnist}
    stages:
      - task-vectors
      - build-pool: {k: 32, lambda: 0.3}
      - adapt: {method: rankone, data: ./unlabeled, classnames_from: ./test}
      - eval: {method: rankone, data: ./test, nproc: 2}

`base`/`experts`/`preset`/`datasets`/`trust_pickle` make a first `fetch` stage. Strings may
use `${NAME}` for environment variables, and `${WORKSPACE}` for the workspace folder;
`example: full` (or `quick`) builds the built-in offline example (cached) and sets `${ZOO}`
to its folder. Relative paths are relative to
the current directory, as on the command line. `nproc: N` on an adapt, eval or compare
stage runs it on N processes (`torchrun --nproc-per-node N -m rankone STAGE ...`, see
`rankone.distributed`); it is how the stage runs, not one of its options, so it changes
neither its record nor whether it is skipped.

`rankone run` records each stage it ran in the workspace manifest (`pipeline`): its
options, a hash chained over every earlier stage's options, its outputs' sha256 and its
result. A rerun skips a stage whose record matches and whose outputs are unchanged, as
long as no earlier stage ran; so a rerun after a failure resumes where it stopped, and a
changed option reruns that stage and every stage after it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from rankone import distributed, methods
from rankone.compare import compare
from rankone.errors import RankoneError
from rankone.evaluate import EvaluationOptions, check_tasks, evaluate_workspace, labeled_data_root
from rankone.export import ExportOptions, export_method, export_outputs
from rankone.heads import read_lines
from rankone.label_free import LambdaRuleOptions, resolve_lambda
from rankone.methods.merging import merge_step_count
from rankone.methods.rankone import PoolOptions, build_pool_stage
from rankone.methods.rankone.pool import POOL_FILE
from rankone.models import resolve_device
from rankone.plots import require_matplotlib
from rankone.options import DEFAULT_WORKSPACE, Options, OptionInfo, OptionValue, check_value, option, parse_pairs
from rankone.sources import fetch, preset as preset_sources
from rankone.task_vectors import ANALYSIS_FILE, compute_task_vectors, task_vector_path
from rankone.training import AdaptOptions, curve_path
from rankone.workspace import Workspace, producer_of, sha256_file

RECORD_KEY = "pipeline"
RECORD_FORMAT = 1
# The stages that split their work across the processes torchrun starts; the others refuse to run under it.
SEVERAL_PROCESSES = ("adapt", "eval", "compare")


# ---- what a stage gets besides its options -------------------------------------------------

@contextlib.contextmanager
def _no_bar(description: str, total: int) -> Iterator[Callable[..., None]]:
    yield lambda *_: None


@dataclass
class Context:
    """Run-time settings every stage shares: the device, progress bars, notes for the user."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # bar(description, total) → a context manager yielding `advance()`; the CLI passes rich bars.
    bar: Callable[[str, int], contextlib.AbstractContextManager[Callable[..., None]]] = _no_bar
    note: Callable[[str], None] = lambda line: None
    # Whether long stages draw their own progress (adaptation, evaluation).
    progress: bool = True


# ---- the stages' own option sets -----------------------------------------------------------

@dataclass(frozen=True)
class FetchOptions(Options):
    base: str | None = option(None, "Pretrained CLIP (both towers): hf:ORG/NAME\\[@REV], a transformers or open_clip "
                              "directory, or open_clip:MODEL:TAG.", metavar="SOURCE")
    experts: dict[str, str] = option(help="A fine-tuned image tower; repeat per task. SOURCE as for --base, or a single "
                                     ".safetensors file.", default_factory=dict, flag="--expert", metavar="TASK=SOURCE")
    preset: str | None = option(None, "A published model set, e.g. vit-b-32-ta8 (see --list-presets); --base/--expert add "
                                "to or override it.", metavar="NAME")
    datasets: dict[str, str] = option(help="A task's test split: hf:ORG/NAME\\[@REV] (Hub parquet) or a local .parquet "
                                      "file/folder; written to WORKSPACE/data/<task>/<class>/.", default_factory=dict,
                                      flag="--dataset", metavar="TASK=SOURCE")
    trust_pickle: bool = option(False, "Allow pickle weights (.bin/.pt), read with torch.load(weights_only=True).")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.preset is None:
            if self.base is None:
                raise RankoneError("--base: missing; give --base SOURCE or --preset NAME")
            if not self.experts:
                raise RankoneError("--expert: give at least one TASK=SOURCE (or --preset)")

    def tasks(self) -> list[str]:
        """The tasks this fetch gives the workspace: the preset's and the explicit experts'."""
        preset = preset_sources(self.preset)[1] if self.preset is not None else {}
        return list({**preset, **self.experts})

    def sources(self) -> tuple[str, dict[str, str]]:
        """(base, {task: source}) with the preset's filled in and the explicit ones on top."""
        base, experts = self.base, {}
        if self.preset is not None:
            preset_base, experts = preset_sources(self.preset)
            base = base or preset_base
        experts.update(self.experts)
        if base is None:
            raise RankoneError("--base: missing; give --base SOURCE or --preset NAME")
        return base, experts


@dataclass(frozen=True)
class TaskVectorsOptions(Options):
    plot: bool = option(False, "Also draw task_vectors/analysis.png (needs matplotlib).")


@dataclass(frozen=True, kw_only=True)
class MergeOptions(LambdaRuleOptions):
    method: str = option(help="Static merge: " + ", ".join(methods.names("static")) + ".")


@dataclass(frozen=True, kw_only=True)
class BuildPoolOptions(PoolOptions, LambdaRuleOptions):
    """build-pool's options: the pool's own, and what `--lambda auto` reads."""

    def pool_options(self) -> PoolOptions:
        return PoolOptions(**{info.name: getattr(self, info.name) for info in PoolOptions.options()})


@dataclass(frozen=True, kw_only=True)
class AdaptStageOptions(AdaptOptions):
    method: str = option("rankone", "Adaptive method to train: " + ", ".join(methods.names("adaptive")) + ".")


@dataclass(frozen=True, kw_only=True)
class EvalOptions(EvaluationOptions):
    method: str = option(help=", ".join(methods.names()) + ".")
    routing: bool = option(False, "Routed methods only: also report, for each task's images, the mean gate its routers give "
                           "each task's experts, and how often an image's own task gets the most.")
    plot: bool = option(False, "With --routing: draw the gates as a heatmap per block, eval/<method>-routing.png (needs matplotlib).")


@dataclass(frozen=True, kw_only=True)
class CompareOptions(EvaluationOptions):
    methods: list[str] | None = option(None, "Only these methods (rows), comma-separated or repeated (default: every one "
                                       "that can run).", comma_separated=True)


# ---- the stages ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Stage:
    """One pipeline stage: a CLI command and a YAML stage name."""

    name: str  # its one-line summary is in rankone.cli.catalog, which `rankone --help` reads without importing torch
    options: type[Options]
    run: Callable[..., Any]  # (workspace, options, method options or None, context) → a JSON-ready result
    # (workspace tasks, options) → the files the stage writes (relative to the workspace, or absolute outside it).
    outputs: Callable[[list[str], Options], list[str]]
    # (workspace tasks, options) → the workspace files the stage reads.
    inputs: Callable[[list[str], Options], list[str]] = lambda tasks, options: []
    method_kind: str | None = None  # "static", "adaptive" or "any" when the stage takes --method
    creates_workspace: bool = False
    needs_export: bool = False  # takes only methods that can be exported

    def takes(self, method: methods.Method) -> bool:
        """Whether `--method` may name `method` here."""
        kind_fits = self.method_kind == "any" or method.kind == self.method_kind
        return self.method_kind is not None and kind_fits and (method.exportable or not self.needs_export)

    def method(self, options: Options) -> methods.Method | None:
        if self.method_kind is None:
            return None
        return self.find_method(options.method)

    def find_method(self, name: str) -> methods.Method:
        """The method `name` if this stage takes it; an error lists the ones it takes, its default first."""
        default = next((info.default for info in self.options.options() if info.name == "method"), None)
        return methods.get(name, None if self.method_kind == "any" else self.method_kind, default=default)

    def method_option_classes(self) -> list[type[Options]]:
        """The options classes of every method this stage can take, for the CLI's flags and the YAML keys."""
        found: list[type[Options]] = []
        for method in methods.registered():
            if self.takes(method) and method.options not in found and method.options.options():
                found.append(method.options)
        return found


def _run_fetch(workspace: Workspace, options: FetchOptions, method_options: None, context: Context) -> dict:
    base, experts = options.sources()
    fetch(workspace, base, experts, trust_pickle=options.trust_pickle, datasets=options.datasets, progress=context.progress)
    manifest = workspace.manifest()
    return {"sources": manifest["sources"], "datasets": manifest.get("datasets", {})}


def _fetch_outputs(tasks: list[str], options: FetchOptions) -> list[str]:
    return ["base.safetensors", *(f"experts/{task}.safetensors" for task in options.tasks())]


def _run_task_vectors(workspace: Workspace, options: TaskVectorsOptions, method_options: None, context: Context) -> dict:
    with context.bar("task vectors", len(workspace.tasks)) as advance:
        return compute_task_vectors(workspace, plot=options.plot, progress=advance)


def _run_build_pool(workspace: Workspace, options: BuildPoolOptions, method_options: None, context: Context) -> dict:
    pool_options, rule = resolve_lambda(workspace, options.pool_options(), options, context.device, context.note)
    with context.bar("SVD", 2 * int(workspace.architecture["vision_cfg"]["layers"])) as advance:
        report = build_pool_stage(workspace, pool_options, progress=advance, device=context.device)
    return {"kept_energy": report.kept_energy, "tower_parameters": report.tower_parameters, "counts": report.counts,
            **({"lambda_rule": rule} if rule else {})}


def _run_merge(workspace: Workspace, options: MergeOptions, method_options: Options, context: Context) -> dict:
    method_options, rule = resolve_lambda(workspace, method_options, options, context.device, context.note)
    with context.bar(f"merge {options.method}", merge_step_count(workspace.architecture)) as advance:
        record = methods.merging.merge_workspace(workspace, methods.get(options.method, "static"), method_options,
                                                 device=context.device, progress=advance)
    return {**record, **({"lambda_rule": rule} if rule else {})}


def _run_adapt(workspace: Workspace, options: AdaptStageOptions, method_options: Options, context: Context) -> dict:
    run_options = dataclasses.replace(options, device=context.device, progress=context.progress, note=context.note)
    method = methods.get(options.method, "adaptive")
    if distributed.world().distributed:
        if not method.across_processes:
            several = [name for name in methods.names("adaptive") if methods.get(name).across_processes]
            raise RankoneError(f"--method {method.name}: runs in one process; launch it without torchrun "
                               f"(several processes train {', '.join(several)})")
    written = method.adapt(workspace, run_options, method_options)
    if not workspace.has(curve_path(written)):
        # A merge from statistics (RegMean, Fisher) trains nothing: its record says what it read.
        settings = method.settings(workspace)
        return {"written": written, "images": settings.get("images", {}), "seconds": settings.get("seconds", 0.0)}
    return {"written": written, **adaptation_summary(workspace, curve_path(written))}


def adaptation_summary(workspace: Workspace, curve: str) -> dict:
    """The numbers a person reads after `adapt`, from the loss curve it wrote: the loss and each task's
    mean entropy at the first and the last step, images per second and time."""
    log = workspace.read_json(curve)
    losses, task_losses = log["losses"], log["task_losses"]
    return {"curve": curve, "objective": log.get("objective", "mean entropy"), "steps": len(losses), "first_step": log["first_step"],
            "loss": [losses[log["first_step"] - 1], losses[-1]] if len(losses) >= log["first_step"] else [],
            "entropy": {task: [values[0], values[-1]] for task, values in task_losses.items() if values},
            "images_per_second": log["images_per_second"], "seconds": log["seconds"]}


def per_task_lists(values: list[str] | None, option: str, tasks: list[str], what: str) -> dict[str, list[str]]:
    """`FILE` (one evaluated task) or `TASK=FILE` values → {task: lines of FILE}."""
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


def _run_eval(workspace: Workspace, options: EvalOptions, method_options: None, context: Context) -> dict:
    method = methods.get(options.method)
    if options.routing and not method.routed:
        raise RankoneError(f"--routing: --method {options.method} has no routers; only --method "
                           + ", ".join(m.name for m in methods.registered() if m.routed) + " does")
    if options.plot and not options.routing:
        raise RankoneError("--plot: draws the routing; use it with --routing")
    if options.plot:
        require_matplotlib()
    tasks = options.tasks or workspace.tasks
    check_tasks(workspace, tasks)
    if options.dtype == "fp16" and context.device.type == "cpu":
        context.note("note: fp16 runs slowly on the CPU (measured ~5× slower than fp32); bf16 is the CPU's fast half precision")
    data_root = labeled_data_root(workspace, options.data)
    if options.heads_source == "builtin":
        sources = workspace.manifest().get("sources", {}).get("experts", {})
        if any("tanganke" in str(entry) or "fusion" in str(entry).lower() for entry in sources.values()):
            context.note("note: these experts look like FusionBench checkpoints; their heads need --heads-source fusionbench")

    def report_skipped(datasets) -> None:
        for task, images in datasets.items():
            if images.skipped:
                context.note(f"{task}: skipped {images.skipped} files that are not images")

    report, relpath = evaluate_workspace(
        workspace, options.method, tasks, data_root, heads_source=options.heads_source,
        classnames=per_task_lists(options.classnames, "--classnames", tasks, "class names"),
        templates=per_task_lists(options.templates, "--templates", tasks, "templates"),
        device=context.device, dtype=options.dtype, batch_size=options.batch_size, progress=context.progress,
        routing=options.routing, on_datasets=report_skipped, plot=options.plot,
    )
    return {**report, "written": relpath}


def _run_compare(workspace: Workspace, options: CompareOptions, method_options: None, context: Context) -> dict:
    tasks = options.tasks or workspace.tasks
    return compare(
        workspace, options.data, tasks, options.methods,
        heads_source=options.heads_source,
        classnames=per_task_lists(options.classnames, "--classnames", tasks, "class names"),
        templates=per_task_lists(options.templates, "--templates", tasks, "templates"),
        device=context.device, dtype=options.dtype, batch_size=options.batch_size, progress=context.progress,
        on_method=context.note,
    )


def _run_export(workspace: Workspace, options: ExportOptions, method_options: None, context: Context) -> dict:
    record = export_method(workspace, options, context.device)
    return {"out": str(options.out), "method": record["method"], "kind": record["kind"], "layout": record.get("layout", "artifact"),
            "tasks": record.get("head_tasks", record["tasks"]), "parameters": record["parameters"], "dtype": options.dtype,
            "files": sorted(record["files"]),
            "bytes": sum((Path(options.out) / name).stat().st_size for name in record["files"])}


def _method_output(tasks: list[str], options: Options) -> list[str]:
    output = methods.get(options.method).output
    return [output] if output else []


def _method_inputs(tasks: list[str], options: Options) -> list[str]:
    return methods.get(options.method).input_files(tasks)


def _eval_inputs(tasks: list[str], options: Options) -> list[str]:
    return methods.get(options.method).eval_files(tasks)


STAGES: dict[str, Stage] = {stage.name: stage for stage in (
    Stage("fetch", FetchOptions, _run_fetch, _fetch_outputs, creates_workspace=True),
    Stage("task-vectors", TaskVectorsOptions, _run_task_vectors,
          lambda tasks, options: [*(task_vector_path(task) for task in tasks), ANALYSIS_FILE],
          lambda tasks, options: ["base.safetensors", *(f"experts/{task}.safetensors" for task in tasks)]),
    Stage("build-pool", BuildPoolOptions, _run_build_pool, lambda tasks, options: [POOL_FILE],
          lambda tasks, options: ["base.safetensors", *(task_vector_path(task) for task in tasks)]),
    Stage("merge", MergeOptions, _run_merge, _method_output, _method_inputs, method_kind="static"),
    Stage("adapt", AdaptStageOptions, _run_adapt, _method_output, _method_inputs, method_kind="adaptive"),
    Stage("eval", EvalOptions, _run_eval,
          lambda tasks, options: [f"eval/{options.method}.json", *([f"eval/{options.method}-routing.png"] if options.plot else [])],
          _eval_inputs, method_kind="any"),
    Stage("compare", CompareOptions, _run_compare,
          # It rewrites the eval report of every method it evaluates, so an earlier eval's report is compare's now.
          lambda tasks, options: ["compare.json", "compare.md", "compare.fusionbench.json", *(f"eval/{name}.json" for name in options.methods or methods.names())],
          lambda tasks, options: ["base.safetensors"]),
    Stage("export", ExportOptions, _run_export,
          lambda tasks, options: export_outputs(options),
          _eval_inputs, method_kind="any", needs_export=True),
)}


def stage_options(stage: Stage, values: dict[str, Any]) -> tuple[Options, Options | None]:
    """(stage options, method options) from {field name: value}; None values take the defaults.

    A value for an option the chosen method does not use is an error naming its flag.
    """
    own = {info.name for info in stage.options.options()}
    options = stage.options.from_values({name: value for name, value in values.items() if name in own})
    method = stage.method(options)
    if method is None or stage.method_kind == "any":
        extra = [name for name, value in values.items() if name not in own and value is not None]
        if extra:
            raise RankoneError(f"{methods.option_flag(extra[0])}: not used by `rankone {stage.name}`")
        return options, None
    return options, methods.method_options(method, **{name: value for name, value in values.items() if name not in own})


def run_stage(stage: Stage, workspace: Workspace, options: Options, method_options: Options | None, context: Context) -> Any:
    """Run one stage on `workspace`; a stage other than fetch needs an existing workspace."""
    if distributed.world().distributed and stage.name not in SEVERAL_PROCESSES:
        raise RankoneError(f"rankone {stage.name}: runs in one process; launch it without torchrun "
                           f"(several processes run {', '.join(SEVERAL_PROCESSES)})")
    if not stage.creates_workspace:
        tasks = workspace.tasks
        # Checked before the work: a folder standing where an output goes would only be found at the commit.
        workspace.check_writable([path for path in stage.outputs(tasks, options) if not Path(path).is_absolute()])
    return stage.run(workspace, options, method_options, context)


# ---- the pipeline file ----------------------------------------------------------------------

# A file's own keys; the fetch options (base, experts, preset, datasets, trust_pickle) sit at the top level too.
TOP_LEVEL_KEYS = ("workspace", "device", "example", *(info.key for info in FetchOptions.options()), "stages")
_VARIABLE = re.compile(r"\$\{(\w+)\}")


@dataclass
class Step:
    """One stage of a pipeline with its checked options and where it came from in the file."""

    stage: Stage
    options: Options
    method_options: Options | None
    where: str  # `stages[2].build-pool`, for messages
    line: int
    nproc: int = 1  # processes it runs on: how it runs, not an option (not recorded, not compared)

    @property
    def label(self) -> str:
        method = getattr(self.options, "method", None)
        return f"{self.stage.name} {method}" if method else self.stage.name

    def record(self) -> dict[str, Any]:
        """The options as stored in the manifest and compared on a rerun."""
        values = self.options.record()
        if self.method_options is not None:
            values.update(self.method_options.record())
        return values

    def arguments(self, workspace: Path, device: str) -> list[str]:
        """The `rankone STAGE ...` arguments that run this step by hand (options at their default left out)."""
        args = [self.stage.name]
        method = getattr(self.options, "method", None)
        if method is not None:
            args += ["--method", method]
        for holder in (self.options, self.method_options):
            if holder is not None:
                for info in holder.options():
                    if info.name != "method":
                        args += _flag_arguments(info, getattr(holder, info.name))
        return args + ["-w", str(workspace), "--device", device]


def _flag_arguments(info: OptionInfo, value: Any) -> list[str]:
    if value == info.default or value is None:
        return []
    if isinstance(value, OptionValue):
        value = value.plain()
    if isinstance(value, bool):
        return [info.flag] if value else []
    if isinstance(value, dict):
        return [part for key, item in value.items() for part in (info.flag, f"{key}={item}")]
    if isinstance(value, list):
        return [part for item in value for part in (info.flag, str(item))]
    if isinstance(value, float):
        return [info.flag, f"{value:g}"]
    return [info.flag, str(value)]


@dataclass
class Pipeline:
    """A parsed, checked pipeline file."""

    path: Path
    workspace: Path
    device: str
    steps: list[Step]


class _Lines:
    """Line numbers of the keys and items of a YAML document, by key path."""

    def __init__(self, node: yaml.Node | None) -> None:
        self.lines: dict[tuple, int] = {}
        if node is not None:
            self._walk(node, ())

    def _walk(self, node: yaml.Node, path: tuple) -> None:
        self.lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                child = path + (key.value,)
                self._walk(value, child)
                self.lines[child] = key.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                self._walk(item, path + (index,))

    def of(self, path: tuple) -> int:
        while path and path not in self.lines:
            path = path[:-1]
        return self.lines.get(path, 1)


def _key_path(path: tuple) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def load_pipeline(path: Path | str, *, workspace: Path | None = None, device: str | None = None,
                  examples: Callable[[str], dict[str, str]] | None = None) -> Pipeline:
    """Read and check a pipeline file: every error names the file, the key path and the line, before anything runs.

    `workspace`/`device` override the file's. `examples(name)` builds the built-in example
    a file names with `example:` and returns the `${NAME}`s it defines (`ZOO`).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RankoneError(f"{path}: no such pipeline file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise RankoneError(f"{path}: not readable ({error})") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise RankoneError(f"{path}:{line}: not valid YAML ({problem})") from None
    lines = _Lines(node)

    def fail(at: tuple, message: str) -> RankoneError:
        where = _key_path(at)
        return RankoneError(f"{path}:{lines.of(at)}: {where + ': ' if where else ''}{message}")

    if not isinstance(document, dict):
        raise fail((), "expected a mapping with a `stages:` list")
    for key in document:
        if key not in TOP_LEVEL_KEYS:
            raise fail((key,), f"unknown key {key!r} (known: {', '.join(TOP_LEVEL_KEYS)})")
    known_variables: dict[str, str] = dict(os.environ)

    def expand(value: Any, at: tuple) -> Any:
        if isinstance(value, str):
            def substitute(match: re.Match) -> str:
                if match.group(1) not in known_variables:
                    hint = " (set by `example:`)" if match.group(1) == "ZOO" else ""
                    raise fail(at, f"${{{match.group(1)}}}: no such variable{hint}")
                return known_variables[match.group(1)]
            expanded = _VARIABLE.sub(substitute, value)
            if _VARIABLE.fullmatch(value):
                # `k: ${K}` is a number, as `k: 8` is: a whole-value variable is read as YAML.
                typed = yaml.safe_load(expanded) if expanded.strip() else expanded
                return typed if isinstance(typed, (bool, int, float)) else expanded
            return expanded
        if isinstance(value, dict):
            return {key: expand(item, at + (key,)) for key, item in value.items()}
        if isinstance(value, list):
            return [expand(item, at + (index,)) for index, item in enumerate(value)]
        return value

    example = document.get("example")
    if example is not None:
        if examples is None:
            raise fail(("example",), "the built-in example is built by `rankone run`; load the file from there")
        try:
            known_variables.update(examples(str(example)))
        except RankoneError as error:
            raise fail(("example",), str(error)) from None
    for key in ("workspace", "device"):
        if key in document and not isinstance(document[key], str):
            raise fail((key,), f"{document[key]!r}: expected text")
    chosen_workspace = workspace or Path(expand(document.get("workspace", str(DEFAULT_WORKSPACE)), ("workspace",)))
    # ${WORKSPACE}: folders a stage writes into the workspace (data/ from a fetch with datasets).
    known_variables["WORKSPACE"] = str(chosen_workspace)
    chosen_device = device or expand(document.get("device", "auto"), ("device",))
    try:
        resolve_device(chosen_device)
    except RankoneError as error:
        raise fail(("device",), str(error)) from None

    steps: list[Step] = []
    fetch_keys = [info.key for info in FetchOptions.options()]
    if set(fetch_keys) & set(document):
        values = {key: expand(document[key], (key,)) for key in fetch_keys if key in document}
        first = next(key for key in document if key in fetch_keys)
        steps.append(_step(STAGES["fetch"], values, {key: (key,) for key in values}, (first,), "fetch",
                           lines.of((first,)), fail, chosen_workspace))
    stages = document.get("stages")
    if not isinstance(stages, list) or not stages:
        raise fail(("stages",), "expected a list of stages (e.g. `- task-vectors`, `- build-pool: {k: 32}`)")
    for index, entry in enumerate(stages):
        at = ("stages", index)
        if isinstance(entry, str):
            name, values = entry, {}
        elif isinstance(entry, dict) and len(entry) == 1:
            name, values = next(iter(entry.items()))
            values = {} if values is None else values
        else:
            raise fail(at, "expected a stage name, or one `name: {options}` mapping")
        if name not in STAGES:
            raise fail(at, f"unknown stage {name!r} (stages: {', '.join(STAGES)})")
        if not isinstance(values, dict):
            raise fail(at + (name,), f"expected a mapping of options, got {values!r}")
        values = expand(values, at + (name,))
        nproc = _processes(values.pop("nproc", 1), name, lambda message: fail(at + (name, "nproc"), message))
        step = _step(STAGES[name], values, {key: at + (name, key) for key in values}, at + (name,),
                     f"stages[{index}].{name}", lines.of(at), fail, chosen_workspace)
        steps.append(dataclasses.replace(step, nproc=nproc))
    pipeline = Pipeline(path=path, workspace=chosen_workspace, device=chosen_device, steps=steps)
    _check_order(pipeline)
    return pipeline


def _processes(value: Any, stage: str, fail: Callable[[str], RankoneError]) -> int:
    """A stage's `nproc:`, checked: a whole number ≥ 1, above 1 only for the stages that split their work."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise fail(f"{value!r}: expected a whole number of processes, at least 1")
    if value > 1 and stage not in SEVERAL_PROCESSES:
        raise fail(f"{stage} runs in one process; only {', '.join(SEVERAL_PROCESSES)} take nproc")
    return value


def _step(stage: Stage, values: dict[str, Any], paths: dict[str, tuple], stage_at: tuple, where: str, line: int, fail,
          workspace: Path) -> Step:
    """Check one stage's values key by key (so an error points at its own line), then build its options."""
    infos = {info.key: info for info in stage.options.options()}
    method_infos: dict[str, OptionInfo] = {}
    for options_class in stage.method_option_classes():
        for info in options_class.options():
            method_infos.setdefault(info.key, info)
    checked: dict[str, Any] = {}
    if stage.method_kind is not None:
        name = values.get("method", infos["method"].default)
        if name is MISSING:
            raise fail(stage_at, "needs `method:`")
        try:
            stage.find_method(name)
        except RankoneError as error:
            raise fail(paths.get("method", stage_at), str(error)) from None
    for key, value in values.items():
        info = infos.get(key) or method_infos.get(key)
        if info is None:
            known = sorted(set(infos) | set(method_infos))
            raise fail(paths[key], f"unknown option {key!r} for {stage.name} (known: {', '.join(known)})")
        try:
            checked[info.name] = check_value(info, value)
        except RankoneError as error:
            raise fail(paths[key], str(error)) from None
    try:
        options, method_options = stage_options(stage, checked)
    except RankoneError as error:
        message = str(error)
        flags = {key: info.flag for key, info in {**method_infos, **infos}.items()}
        culprit = next((paths[key] for key in values if message.startswith(flags[key])), None)
        raise fail(culprit or paths.get("method") or stage_at, message) from None
    for info in stage.options.options():
        value = getattr(options, info.name)
        if not info.declared.existing_folder or value is None:
            continue
        for folder in value.folders() if isinstance(value, OptionValue) else [Path(value)]:
            # A folder inside the workspace (data/ from a fetch with datasets) is written by an earlier stage.
            inside = folder.resolve().is_relative_to(workspace.resolve())
            if not inside and not folder.is_dir():
                raise fail(paths.get(info.key, stage_at), f"{info.flag} {folder}: no such folder")
    return Step(stage, options, method_options, where, line)


def _planned_tasks(pipeline: Pipeline) -> list[str]:
    """The workspace's tasks once the pipeline's fetch (if any) has run."""
    for step in pipeline.steps:
        if step.stage.name == "fetch":
            return step.options.tasks()
    workspace = Workspace(pipeline.workspace)
    return workspace.tasks if workspace.exists() else []


def _check_order(pipeline: Pipeline) -> None:
    """Every stage's inputs are written by an earlier stage or already in the workspace."""
    workspace = Workspace(pipeline.workspace)
    present = set(workspace.manifest().get("files", {})) if workspace.exists() else set()
    tasks = _planned_tasks(pipeline)
    written: set[str] = set()
    for step in pipeline.steps:
        if step.stage.name == "fetch":
            present = set()  # a fetch replaces the models and drops what was derived from them
        for relpath in step.stage.inputs(tasks, step.options):
            if relpath not in written and relpath not in present:
                producer = producer_of(relpath).removeprefix("rankone ")
                raise RankoneError(f"{pipeline.path}:{step.line}: {step.where}: needs {relpath}, which no earlier stage "
                                   f"writes and the workspace lacks (add a `{producer}` stage before it)")
        written.update(step.stage.outputs(tasks, step.options))


# ---- plan and run -----------------------------------------------------------------------------

@dataclass
class PlannedStep:
    step: Step
    run: bool
    reason: str
    chain: str


def _chain(previous: str, step: Step) -> str:
    payload = json.dumps({"stage": step.stage.name, "options": step.record()}, sort_keys=True, default=str)
    return hashlib.sha256((previous + payload).encode()).hexdigest()


def _records(workspace: Workspace) -> list[dict[str, Any]]:
    if not workspace.exists():
        return []
    entry = workspace.manifest().get(RECORD_KEY) or {}
    return list(entry.get("stages", [])) if isinstance(entry, dict) else []


def _output_hashes(workspace: Workspace, outputs: list[str]) -> dict[str, str | None]:
    """sha256 of each output: from the manifest inside the workspace, from the file outside it."""
    files = workspace.manifest().get("files", {}) if workspace.exists() else {}
    hashes: dict[str, str | None] = {}
    for output in outputs:
        if os.path.isabs(output):
            hashes[output] = sha256_file(Path(output)) if Path(output).is_file() else None
        else:
            entry = files.get(output)
            hashes[output] = entry["sha256"] if entry and workspace.path(output).is_file() else None
    return hashes


def _options_change(old: dict[str, Any], new: dict[str, Any]) -> str:
    changes = [f"{key} {old.get(key)!r} → {new.get(key)!r}" for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]
    return "options changed: " + ", ".join(changes) if changes else "an earlier stage changed"


def plan(pipeline: Pipeline) -> list[PlannedStep]:
    """Which stages run and why, without touching anything."""
    workspace = Workspace(pipeline.workspace)
    records = _records(workspace)
    tasks = _planned_tasks(pipeline)
    outputs = [step.stage.outputs(tasks, step.options) for step in pipeline.steps]
    # An output written again by a later stage (a second seed's routers) is checked at its last writer only.
    last_writer = {path: index for index, paths in enumerate(outputs) for path in paths}
    planned: list[PlannedStep] = []
    chain, earlier_runs = f"rankone-pipeline-{RECORD_FORMAT}", False
    for index, step in enumerate(pipeline.steps):
        chain = _chain(chain, step)
        record = records[index] if index < len(records) else None
        if earlier_runs:
            run, reason = True, "an earlier stage runs"
        elif record is None:
            run, reason = True, "not run yet"
        elif record.get("stage") != step.stage.name:
            run, reason = True, f"the workspace ran {record.get('stage')} here"
        elif record.get("chain") != chain:
            run, reason = True, _options_change(record.get("options", {}), step.record())
        else:
            own = [path for path in outputs[index] if last_writer[path] == index]
            current = _output_hashes(workspace, own)
            changed = [path for path in own if current[path] != record.get("outputs", {}).get(path)]
            if changed:
                run = True
                reason = f"{changed[0]} is missing" if current[changed[0]] is None else f"{changed[0]} changed since it ran"
            else:
                run, reason = False, "up to date"
        earlier_runs = earlier_runs or run
        planned.append(PlannedStep(step, run, reason, chain))
    return planned


def run_pipeline(
    pipeline: Pipeline,
    context: Context,
    *,
    on_step: Callable[[PlannedStep, int], None] = lambda planned, index: None,
    on_result: Callable[[PlannedStep, Any], None] = lambda planned, result: None,
) -> list[dict[str, Any]]:
    """Run the stages that `plan` says must run, recording each in the manifest as it finishes.

    `on_step(planned, index)` is called before every stage (run or skipped), `on_result`
    after it with its result (the recorded one for a skipped stage). Returns the records.
    """
    workspace = Workspace(pipeline.workspace)
    planned_steps = plan(pipeline)
    records = _records(workspace)
    tasks = _planned_tasks(pipeline)
    for index, planned in enumerate(planned_steps):
        on_step(planned, index)
        if not planned.run:
            on_result(planned, records[index].get("result"))
            continue
        step = planned.step
        if step.nproc > 1:
            result = launch_step(step, pipeline)
        else:
            result = run_stage(step.stage, workspace, step.options, step.method_options, context)
        outputs = step.stage.outputs(workspace.tasks if step.stage.name != "fetch" else tasks, step.options)
        record = {"stage": step.stage.name, "options": step.record(), "chain": planned.chain,
                  "outputs": _output_hashes(workspace, outputs), "result": jsonable(result)}
        records = records[:index] + [record]
        with workspace.transaction({RECORD_KEY: {"format": RECORD_FORMAT, "file": str(pipeline.path.resolve()), "stages": records}}):
            pass
        on_result(planned, result)
    return records


def launch_step(step: Step, pipeline: Pipeline) -> Any:
    """Run `step` on `step.nproc` processes (torchrun, on this machine) and return rank 0's result (`--json`)."""
    command = distributed.launcher_command(step.nproc, [*step.arguments(pipeline.workspace, pipeline.device), "--json"])
    # stdout carries the result; stderr (progress, the failure's one line) goes to the user as it comes.
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=distributed.launcher_environment(step.nproc))
    if done.returncode != 0:
        raise RankoneError(f"{pipeline.path}:{step.line}: {step.where}: failed on {step.nproc} processes "
                           f"(exit code {done.returncode}; the line above says why)")
    try:
        return json.loads(done.stdout)
    except ValueError:
        raise RankoneError(f"{pipeline.path}:{step.line}: {step.where}: its {step.nproc} processes printed no result") from None


def jsonable(value: Any) -> Any:
    """A stage's result as plain JSON values (paths and other objects as their text)."""
    return json.loads(json.dumps(value, default=str))
