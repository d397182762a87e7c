"""`rankone demo`: the example's pipeline file (demo.yaml, or demo-quick.yaml), run as `rankone run` runs it.

The static λ in the file was chosen without test labels: among a grid, the one whose task
arithmetic merge gives the lowest mean prediction entropy on the unlabeled split (the
objective AdaMerging and RankOne-MoE's adaptation minimise). After the run the demo
measures that rule again on the workspace and says whether it still picks the file's λ.
RankOne-MoE is adapted with several seeds; their mean and spread are reported next to the
"perfect router" ceiling (static part + each task's own MLP weights).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from rankone.data import ImageDataset, labeled_images, unlabeled_images
from rankone.errors import RankoneError
from rankone.heads import classify_logits, heads_for_tasks
from rankone.methods.base import pretrained_tower, visual_encoder
from rankone.models import preprocess_for
from rankone.pipeline import Pipeline, Step, load_pipeline
from rankone.task_vectors import task_vector_path
from rankone.training import batch_entropy
from rankone.workspace import Workspace

PIPELINE_FILES = {"full": "demo.yaml", "quick": "demo-quick.yaml"}
# The grid the λ rule was run over, per example.
LAMBDA_GRIDS = {"full": (0.1, 0.2, 0.3, 0.4), "quick": (0.1, 0.3)}


def pipeline_file(example: str) -> Path:
    """The example's pipeline file inside the installed package."""
    return Path(str(resources.files("rankone.examples") / PIPELINE_FILES[example]))


def unlabeled_entropy(workspace: Workspace, unlabeled: Path, classnames_from: Path, lam: float, device: torch.device | str = "cpu", limit: int = 128) -> float:
    """Mean prediction entropy of task arithmetic at `lam` over each task's unlabeled images."""
    tasks = workspace.tasks
    merged = {key: value.clone() for key, value in pretrained_tower(workspace).items()}
    for task in tasks:
        for key, value in workspace.load_tensors(task_vector_path(task)).items():
            merged[key] += lam * value
    encoder = visual_encoder(workspace.architecture, merged, device)
    heads = heads_for_tasks(workspace, {task: (labeled_images(classnames_from, task).classnames, None) for task in tasks}, device)
    transform = preprocess_for(workspace.architecture)
    entropies = []
    with torch.no_grad():
        for task in tasks:
            paths = unlabeled_images(unlabeled, task)[:limit]
            dataset = ImageDataset(paths, None, transform)
            images = torch.stack([dataset[i] for i in range(len(dataset))]).to(device)
            entropies.append(float(batch_entropy(classify_logits(encoder(images), heads[task].to(device)))))
    return sum(entropies) / len(entropies)


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


def _is_rankone_adapt(step: Step) -> bool:
    return step.stage.name == "adapt" and step.options.method == "rankone"


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


def demo_pipeline(example: str, workspace: Path | str, device: str, seeds: int | None, variables: dict[str, str]) -> Pipeline:
    """The example's pipeline on `workspace`, with `seeds` RankOne-MoE seeds when given."""
    chosen = load_pipeline(pipeline_file(example), workspace=Path(workspace), device=device, examples=lambda name: variables)
    _check_workspace(Workspace(chosen.workspace))
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

    def rankone_average(self) -> tuple[float, float]:
        averages = [report["average"] for report in self.rankone_seeds.values()]
        return statistics.mean(averages), (statistics.stdev(averages) if len(averages) > 1 else 0.0)


def demo_result(chosen: Pipeline, records: list[dict[str, Any]]) -> DemoResult:
    """The seeds' reports, the ceiling and the comparison from the run's records, and the λ rule measured again."""
    rankone_seeds: dict[int, dict[str, Any]] = {}
    seed, lam, summary, perfect, adapt = None, None, {}, {}, None
    for step, record in zip(chosen.steps, records):
        result = record.get("result") or {}
        if step.stage.name == "build-pool":
            lam = step.options.lam
        elif _is_rankone_adapt(step):
            seed, adapt = step.options.seed, step.options
        elif step.stage.name == "eval" and step.options.method == "rankone":
            rankone_seeds[seed] = result
        elif step.stage.name == "eval" and step.options.method == "perfect-router":
            perfect = result
        elif step.stage.name == "compare":
            summary = result
    if seed is not None and seed not in rankone_seeds:
        rankone_seeds[seed] = next(row for row in summary["rows"] if row["method"] == "rankone")
    workspace = Workspace(chosen.workspace)
    grid = LAMBDA_GRIDS[chosen.example or "full"]
    entropies = {value: unlabeled_entropy(workspace, adapt.data, adapt.classnames_from, value) for value in grid}
    return DemoResult(lam=lam, entropies=entropies, summary=summary, perfect_router=perfect, rankone_seeds=rankone_seeds)


def result_lines(result: DemoResult) -> list[str]:
    """The closing summary: the λ rule, the ceiling row, RankOne-MoE over seeds, its share of the gap."""
    rows = {row["method"]: row for row in result.summary["rows"]}
    mean, spread = result.rankone_average()
    picked = min(result.entropies, key=result.entropies.get)
    agreement = "as the pipeline file has" if picked == result.lam else f"but the pipeline file has λ={result.lam:g}"
    lines = [
        "static λ by lowest unlabeled entropy of task arithmetic: "
        + ", ".join(f"λ={value:g}: {entropy:.3f}" for value, entropy in result.entropies.items()) + f" → λ={picked:g}, {agreement}",
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
    if "pretrained" in rows and "individual" in rows:
        lines.append(f"fine-tuning gain over zero-shot: {rows['individual']['average'] - rows['pretrained']['average']:+.1f} points")
    return lines


def write_result_json(result: DemoResult, path: Path) -> None:
    mean, spread = result.rankone_average()
    path.write_text(json.dumps({
        "lambda": result.lam, "entropies": {f"{key:g}": value for key, value in result.entropies.items()},
        "rankone_seeds": {str(seed): report["average"] for seed, report in result.rankone_seeds.items()},
        "rankone_mean": mean, "rankone_std": spread, "perfect_router": result.perfect_router, "compare": result.summary,
    }, indent=2) + "\n")
