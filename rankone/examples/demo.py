"""`rankone demo`: the example's pipeline file (demo.yaml, or demo-quick.yaml), run as `rankone run` runs it.

`example: full` in a pipeline file builds (or reuses) the example zoo and defines `${ZOO}`
(its folder) and `${LAMBDA}`: the static λ chosen without test labels, among a grid, as
the one whose task arithmetic merge gives the lowest mean prediction entropy on the
unlabeled split (the objective AdaMerging and RankOne-MoE's adaptation minimise).
RankOne-MoE is adapted with several seeds; their mean and spread are reported next to the
"perfect router" ceiling (static part + each task's own MLP weights). The summary ends with
the zoo's key and weights fingerprint: two builds of one key compare equal only when their
bits do, which the README's numbers depend on.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from rankone import label_free
from rankone.data import labeled_images
from rankone.errors import RankoneError
from rankone.examples.recipes import Zoo, recipe
from rankone.examples.zoo import build_zoo
from rankone.label_free import IMAGES_PER_TASK
from rankone.heads import logit_scale, template_strings, zero_shot_head
from rankone.models import load_clip, preprocess_for, tokenizer_for, visual_state
from rankone.pipeline import Pipeline, Step, load_pipeline
from rankone.sources import load_source
from rankone.task_vectors import task_vector
from rankone.templates import templates_for
from rankone.training import unlabeled_sets
from rankone.workspace import Workspace

PIPELINE_FILES = {"full": "demo.yaml", "quick": "demo-quick.yaml"}
# The grid the λ rule was run over, per example.
LAMBDA_GRIDS = {"full": (0.1, 0.2, 0.3, 0.4), "quick": (0.1, 0.3)}


def pipeline_file(example: str) -> Path:
    """The example's pipeline file inside the installed package."""
    return Path(str(resources.files("rankone.examples") / PIPELINE_FILES[example]))


def lambda_entropies(zoo: Zoo, grid: tuple[float, ...], device: torch.device | str = "cpu", limit: int = IMAGES_PER_TASK) -> dict[float, float]:
    """`label_free.lambda_entropies` (the `--lambda auto` rule) over each task's unlabeled images, from the zoo's own files.

    Read from the zoo's base, experts, unlabeled split and the class names of its fine-tuning
    split, so the rule needs no workspace (the pipeline file's `${LAMBDA}` is needed before
    there is one) and no test label.
    """
    base = load_source(str(zoo.base))
    architecture, base_state = base.architecture, base.state_dict
    tower = visual_state(base_state)
    task_vectors = [task_vector(tower, visual_state(load_source(str(zoo.expert(task)), base_architecture=architecture).state_dict), task)
                    for task in zoo.tasks]
    clip_model = load_clip(architecture, base_state).to(device)
    tokenizer, scale = tokenizer_for(architecture), logit_scale(base_state)
    heads = {task: zero_shot_head(clip_model, tokenizer, labeled_images(zoo.data("finetune"), task).classnames,
                                  template_strings(templates_for(task)), scale, device) for task in zoo.tasks}
    del clip_model
    images = label_free.rule_images(unlabeled_sets(zoo.data("unlabeled"), zoo.tasks, preprocess_for(architecture)), limit)
    return label_free.lambda_entropies(architecture, tower, task_vectors, heads, images, grid, device)


@dataclass
class Example:
    """The built-in example's zoo and the static λ its rule picks, for `${ZOO}` and `${LAMBDA}`."""

    name: str  # full or quick
    zoo: Zoo
    device: torch.device | str = "cpu"

    @cached_property
    def entropies(self) -> dict[float, float]:
        return lambda_entropies(self.zoo, LAMBDA_GRIDS[self.name], self.device)

    @property
    def lam(self) -> float:
        return label_free.choose_lambda(self.entropies)

    def variables(self) -> dict[str, str]:
        return {"ZOO": str(self.zoo.root), "LAMBDA": f"{self.lam:g}"}


def prepare_example(name: str, device: torch.device | str = "cpu", on_stage=None) -> Example:
    """Build (or reuse) the example's zoo; the λ rule is measured when first asked for."""
    if name not in PIPELINE_FILES:
        raise RankoneError(f"example {name!r}: expected one of {', '.join(PIPELINE_FILES)}")
    return Example(name, build_zoo(recipe(quick=name == "quick"), device=device, on_stage=on_stage), device)


def _check_workspace(workspace: Workspace) -> None:
    """A workspace made by an earlier demo (or an empty folder) is fine; any other is left alone."""
    if not workspace.root.exists():
        return
    if workspace.exists():
        recorded = (workspace.manifest().get("pipeline") or {}).get("file", "")
        if Path(recorded).name in PIPELINE_FILES.values():
            return
    elif not any(workspace.root.iterdir()):
        return
    raise RankoneError(f"-w {workspace.root}: exists and was not made by `rankone demo`; pass another -w")


def _router_of(step: Step) -> str | None:
    """The router kind a RankOne-MoE adapt step trains (None for any other step)."""
    if step.stage.name == "adapt" and step.options.method == "rankone":
        return getattr(step.method_options, "router", "entropy")
    return None


def _is_rankone_adapt(step: Step) -> bool:
    """An adapt step of SPEC's entropy routers: the ones `--seeds` repeats."""
    return _router_of(step) == "entropy"


def with_seeds(steps: list[Step], seeds: int) -> list[Step]:
    """The file's steps with RankOne-MoE adapted for seeds 0 … seeds−1, each evaluated before the next."""
    adapts = [index for index, step in enumerate(steps) if _is_rankone_adapt(step)]
    if not adapts:
        return steps
    first, last = adapts[0], adapts[-1]
    evaluation = next(step for step in steps[first:] if step.stage.name == "eval" and step.options.method == "rankone")
    middle: list[Step] = []
    for seed in range(seeds):
        middle.append(dataclasses.replace(steps[first], options=dataclasses.replace(steps[first].options, seed=seed)))
        if seed != seeds - 1:
            middle.append(evaluation)
    return steps[:first] + middle + steps[last + 1:]


def demo_pipeline(example: Example, workspace: Path | str, device: str, seeds: int | None) -> Pipeline:
    """The example's pipeline on `workspace`, with `seeds` RankOne-MoE seeds when given."""
    _check_workspace(Workspace(workspace))
    chosen = load_pipeline(pipeline_file(example.name), workspace=Path(workspace), device=device, examples=lambda _: example.variables())
    if seeds is not None:
        chosen.steps = with_seeds(chosen.steps, seeds)
    return chosen


@dataclass
class DemoResult:
    lam: float
    entropies: dict[float, float]
    summary: dict[str, Any]
    perfect_router: dict[str, Any]
    rankone_seeds: dict[int, dict[str, Any]] = field(default_factory=dict)
    # The router kinds other than entropy: {kind: {seed: eval report}} (subspace has no seed: None), and the pool oracle.
    router_kinds: dict[str, dict[int | None, dict[str, Any]]] = field(default_factory=dict)
    pool_oracle: dict[str, Any] = field(default_factory=dict)
    zoo_key: str = ""
    zoo_fingerprint: str = ""
    # The CPU kernel settings the stages ran with (`numerics.pinned_state`); the README's numbers were made pinned.
    cpu_kernels: dict[str, Any] = field(default_factory=dict)

    def rankone_average(self) -> tuple[float, float]:
        averages = [report["average"] for report in self.rankone_seeds.values()]
        return statistics.mean(averages), (statistics.stdev(averages) if len(averages) > 1 else 0.0)


def demo_result(chosen: Pipeline, records: list[dict[str, Any]], example: Example,
                cpu_kernels: dict[str, Any] | None = None) -> DemoResult:
    """The seeds' reports, the ceiling and the comparison from the run's records, and the λ rule's entropies."""
    rankone_seeds: dict[int, dict[str, Any]] = {}
    router_kinds: dict[str, dict[int | None, dict[str, Any]]] = {}
    seed, lam, summary, perfect, pool_oracle, kind, kind_seed = None, None, {}, {}, {}, None, None
    for step, record in zip(chosen.steps, records):
        result = record.get("result") or {}
        if step.stage.name == "build-pool":
            lam = step.options.lam
        elif _router_of(step) is not None:
            kind = _router_of(step)
            if kind == "entropy":
                seed = step.options.seed
            else:
                kind_seed = None if kind == "subspace" else step.options.seed
        elif step.stage.name == "eval" and step.options.method == "rankone":
            if kind == "entropy":
                rankone_seeds[seed] = result
            else:
                router_kinds.setdefault(kind, {})[kind_seed] = result
        elif step.stage.name == "eval" and step.options.method == "pool-oracle":
            pool_oracle = result
        elif step.stage.name == "eval" and step.options.method == "perfect-router":
            perfect = result
        elif step.stage.name == "compare":
            summary = result
    if seed is not None and seed not in rankone_seeds:
        rankone_seeds[seed] = next(row for row in summary["rows"] if row["method"] == "rankone")
    return DemoResult(lam=lam, entropies=example.entropies, summary=summary, perfect_router=perfect, rankone_seeds=rankone_seeds,
                      router_kinds=router_kinds, pool_oracle=pool_oracle,
                      zoo_key=example.zoo.root.name, zoo_fingerprint=example.zoo.fingerprint, cpu_kernels=cpu_kernels or {})


def own_task_rate(report: dict[str, Any]) -> float | None:
    """How often an image's own task got the largest gate, over every task and block of an `eval --routing` report."""
    rates = [rate for per_block in report.get("routing", {}).get("own_task", {}).values() for rate in per_block]
    return statistics.mean(rates) if rates else None


def kind_summary(reports: dict[int | None, dict[str, Any]]) -> dict[str, Any]:
    """Mean and spread of a router kind's average over its seeds, and its own-task rate."""
    averages = [report["average"] for report in reports.values()]
    rates = [rate for rate in map(own_task_rate, reports.values()) if rate is not None]
    return {"averages": averages, "mean": statistics.mean(averages), "spread": statistics.stdev(averages) if len(averages) > 1 else 0.0,
            "own_task": statistics.mean(rates) if rates else None}


def result_lines(result: DemoResult) -> list[str]:
    """The closing summary: the ceiling row, RankOne-MoE over seeds, its share of the gap."""
    rows = {row["method"]: row for row in result.summary["rows"]}
    mean, spread = result.rankone_average()
    lines = [
        f"perfect router (static part at λ={result.lam:g} + each task's own MLP weights; an oracle told the task): "
        f"average {result.perfect_router['average']:.1f} "
        + " ".join(f"{task} {value['accuracy']:.1f}" for task, value in result.perfect_router["tasks"].items()),
        f"RankOne-MoE over seeds {sorted(result.rankone_seeds)}: {mean:.1f} ± {spread:.1f} "
        "(" + ", ".join(f"{report['average']:.1f}" for report in result.rankone_seeds.values()) + ")",
    ]
    if "task-arithmetic" in rows:
        ta = rows["task-arithmetic"]["average"]
        gap = result.perfect_router["average"] - ta
        share = f"{100 * (mean - ta) / gap:.0f}% of the way from task arithmetic to the ceiling" if abs(gap) > 1e-9 else "no gap to close"
        lines.append(f"task arithmetic (λ={result.lam:g}) {ta:.1f} → RankOne-MoE {mean:.1f} ({mean - ta:+.1f}); {share}")
    if result.pool_oracle and "task-arithmetic" in rows:
        ta, ceiling = rows["task-arithmetic"]["average"], result.pool_oracle["average"]
        lines.append(f"pool oracle (each task's own experts at gate 1; told the task): average {ceiling:.1f}")
        for kind, reports in result.router_kinds.items():
            found = kind_summary(reports)
            closed = f", {100 * (found['mean'] - ta) / (ceiling - ta):.0f}% of the gap from task arithmetic to the pool oracle" \
                if abs(ceiling - ta) > 1e-9 else ""
            picked = f", own task picked {100 * found['own_task']:.0f}%" if found["own_task"] is not None else ""
            spread = f" ± {found['spread']:.1f} over {len(found['averages'])} seeds" if len(found["averages"]) > 1 else ""
            lines.append(f"RankOne-MoE, {kind} routers: {found['mean']:.1f}{spread} ({found['mean'] - ta:+.1f}{closed}{picked})")
    if "pretrained" in rows and "individual" in rows:
        lines.append(f"fine-tuning gain over zero-shot: {rows['individual']['average'] - rows['pretrained']['average']:+.1f} points")
    lines.append(f"example zoo {result.zoo_key}, weights fingerprint {result.zoo_fingerprint} "
                 "(compare it with the one beside the README's table)")
    if result.cpu_kernels:
        kernels = result.cpu_kernels
        lines.append(f"CPU kernels: ATen {kernels['cpu_capability']}, MKL {kernels['mkl_cbwr'] or 'AUTO'}, {kernels['threads']} threads, "
                     f"oneDNN {'on' if kernels['mkldnn'] else 'off'} (the README's: ATen AVX2, MKL COMPATIBLE, 2 threads, oneDNN off)")
    return lines


def write_result_json(result: DemoResult, path: Path) -> None:
    mean, spread = result.rankone_average()
    path.write_text(json.dumps({
        "lambda": result.lam, "entropies": {f"{key:g}": value for key, value in result.entropies.items()},
        "rankone_seeds": {str(seed): report["average"] for seed, report in result.rankone_seeds.items()},
        "rankone_mean": mean, "rankone_std": spread, "perfect_router": result.perfect_router, "compare": result.summary,
        "zoo": {"key": result.zoo_key, "fingerprint": result.zoo_fingerprint},
        "router_kinds": {kind: kind_summary(reports) for kind, reports in result.router_kinds.items()},
        "pool_oracle": result.pool_oracle, "cpu_kernels": result.cpu_kernels,
    }, indent=2) + "\n")
