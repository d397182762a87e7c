"""`rankone demo`: the whole pipeline on the example suite, through the public CLI.

Each stage is the command line a user would type, printed and then run by the same typer
app. The zoo (data, tiny CLIP, experts) comes from the cache (`zoo.build_zoo`).

The static λ is chosen without test labels: among `LAMBDA_GRID`, the one whose task
arithmetic merge gives the lowest mean prediction entropy on the unlabeled split (the
objective AdaMerging and RankOne-MoE's adaptation minimise). RankOne-MoE is then built
on that λ and adapted with several seeds; its mean and spread are reported next to the
"perfect router" ceiling (static part + each task's own MLP weights).
"""

from __future__ import annotations

import json
import shlex
import shutil
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rankone.errors import RankoneError
from rankone.examples.zoo import Zoo
from rankone.workspace import Workspace

LAMBDA_GRID = (0.1, 0.2, 0.3, 0.4)


@dataclass
class DemoSettings:
    k: int = 8
    select: float = 0.75
    adapt_steps: int = 100
    adapt_batch_size: int = 16
    adapt_lr: float = 1e-4  # SPEC's default, not tuned on this suite
    seeds: tuple[int, ...] = (0, 1, 2)
    lambdas: tuple[float, ...] = LAMBDA_GRID
    baselines: tuple[str, ...] = ("adamerging", "wemoe")


QUICK_SETTINGS = DemoSettings(k=2, adapt_steps=4, adapt_batch_size=4, seeds=(0,), lambdas=(0.1, 0.3))
FULL_SETTINGS = DemoSettings()


def unlabeled_entropy(workspace: Workspace, unlabeled: Path, classnames_from: Path, lam: float, device: torch.device | str = "cpu", limit: int = 128) -> float:
    """Mean prediction entropy of task arithmetic at `lam` over each task's unlabeled images."""
    from rankone.adapt import batch_entropy
    from rankone.data import ImageDataset, labeled_images, unlabeled_images
    from rankone.heads import classify_logits, heads_for_tasks
    from rankone.methods import visual_encoder
    from rankone.models import preprocess_for, visual_state
    from rankone.task_vectors import task_vector_path

    tasks = workspace.tasks
    base = visual_state(workspace.load_tensors("base.safetensors"))
    merged = {key: value.clone() for key, value in base.items()}
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


def _prepare_workspace(workspace: Workspace, zoo: Zoo) -> None:
    """A workspace left by an earlier demo run (of any example recipe) is replaced; any other one is left alone."""
    if not workspace.root.exists():
        return
    if workspace.exists():
        sources = workspace.manifest().get("sources", {})
        base_source = Path(str(sources.get("base", {}).get("source", "")))
        if base_source.name == zoo.base.name and base_source.parent.parent == zoo.root.parent:
            shutil.rmtree(workspace.root)
            return
    elif not any(workspace.root.iterdir()):
        return
    raise RankoneError(f"-w {workspace.root}: exists and was not made by `rankone demo`; pass another -w")


def run_demo(
    zoo: Zoo,
    workspace: Path | str,
    settings: DemoSettings,
    device: str = "auto",
    run: Callable[[list[str]], None] | None = None,
    say: Callable[[str], None] = print,
) -> DemoResult:
    """Run every stage as `rankone ...` commands; `run(args)` executes one (the CLI app)."""
    from rankone.cli import app

    def invoke(args: list[str]) -> None:
        say("$ rankone " + " ".join(shlex.quote(arg) for arg in args))
        if run is not None:
            run(args)
        else:
            app(args=args, standalone_mode=False)

    work = Workspace(workspace)
    _prepare_workspace(work, zoo)
    common = ["-w", str(work.root), "--device", device]
    test, unlabeled, classes = str(zoo.data("test")), str(zoo.data("unlabeled")), str(zoo.data("finetune"))
    fetch = ["fetch", "--base", str(zoo.base)]
    for task in zoo.tasks:
        fetch += ["--expert", f"{task}={zoo.expert(task)}"]
    invoke(fetch + common)
    invoke(["task-vectors", *common])

    entropies = {lam: unlabeled_entropy(work, zoo.data("unlabeled"), zoo.data("finetune"), lam) for lam in settings.lambdas}
    lam = min(entropies, key=entropies.get)
    say("static λ by lowest unlabeled entropy of task arithmetic: "
        + ", ".join(f"λ={value:g}: {entropy:.3f}" for value, entropy in entropies.items()) + f" → λ={lam:g}")

    invoke(["merge", "--method", "weight-averaging", *common])
    for method in ("task-arithmetic", "ties", "dare"):
        invoke(["merge", "--method", method, "--lambda", f"{lam:g}", *common])
    invoke(["build-pool", "--k", str(settings.k), "--lambda", f"{lam:g}", *common])
    adapt_options = ["--data", unlabeled, "--classnames-from", classes, "--steps", str(settings.adapt_steps),
                     "--batch-size", str(settings.adapt_batch_size)]
    for method in settings.baselines:
        invoke(["adapt", "--method", method, *adapt_options, *common])
    rankone_seeds: dict[int, dict[str, Any]] = {}
    for seed in settings.seeds:
        invoke(["adapt", "--method", "rankone", *adapt_options, "--lr", f"{settings.adapt_lr:g}", "--select", f"{settings.select:g}",
                "--seed", str(seed), *common])
        if seed != settings.seeds[-1]:
            invoke(["eval", "--method", "rankone", "--data", test, *common])
            rankone_seeds[seed] = work.read_json("eval/rankone.json")
    invoke(["eval", "--method", "perfect-router", "--data", test, *common])
    perfect = work.read_json("eval/perfect-router.json")
    invoke(["compare", "--data", test, *common])
    summary = work.read_json("compare.json")
    rankone_seeds[settings.seeds[-1]] = work.read_json("eval/rankone.json")
    return DemoResult(lam=lam, entropies=entropies, summary=summary, perfect_router=perfect, rankone_seeds=rankone_seeds)


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
