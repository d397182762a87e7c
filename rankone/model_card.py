"""The model card (`README.md` with Hub metadata) every export carries.

Built with huggingface_hub's `ModelCardData`, so the front matter is what the Hub reads:
`library_name`, `base_model`, `tags`, `datasets` and the results as `model-index`. The body
says what the model is, its accuracy per task (normalized by the individual experts' when
the workspace evaluated them), its parameters by role, the options it was made with (and
the pipeline file, when the run came from one) and how to load it.

The card is meant to be published, so the sources it lists show no local path: one that is
not a Hub repo or an open_clip tag is named by its last path component only. The pipeline
file is quoted as the user wrote it, paths included: it is theirs to edit before `push`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Named at use (huggingface_hub loads the card module on first access), out of every command's start-up.
import huggingface_hub

from rankone import methods
from rankone.compare import INDIVIDUAL
from rankone.errors import RankoneError
from rankone.sources import HF_SCHEME, OPEN_CLIP_SCHEME, parse_hf
from rankone.workspace import Workspace



def public_source(source: str) -> str:
    """A source as the card may show it: Hub ids and open_clip tags whole, a local path by its name."""
    if source.startswith((HF_SCHEME, OPEN_CLIP_SCHEME)):
        return source
    return f"local:{Path(source).name}"


def hub_id(source: str | None) -> str | None:
    """`hf:ORG/NAME[@REV]` → `ORG/NAME`; None for any other source."""
    if not source or not source.startswith(HF_SCHEME):
        return None
    try:
        return parse_hf(source)[0]
    except RankoneError:
        return None


def eval_report(workspace: Workspace, method: str) -> dict[str, Any] | None:
    relpath = f"eval/{method}.json"
    if not workspace.path(relpath).is_file():
        return None
    try:
        report = workspace.read_json(relpath)
    except Exception:  # an unreadable report only leaves the card without results
        return None
    return report if isinstance(report, dict) and isinstance(report.get("tasks"), dict) else None


def results(workspace: Workspace, method: str) -> list[dict[str, Any]]:
    """Per task: accuracy, images, and (when eval/individual.json exists) the individual expert's accuracy and the ratio."""
    report = eval_report(workspace, method)
    if report is None:
        return []
    individual = eval_report(workspace, INDIVIDUAL) if method != INDIVIDUAL else None
    rows = []
    for task, entry in report["tasks"].items():
        row = {"task": task, "accuracy": float(entry["accuracy"]), "images": entry.get("n")}
        expert = (individual or {}).get("tasks", {}).get(task)
        if expert and float(expert["accuracy"]) > 0:
            row["individual"] = float(expert["accuracy"])
            row["normalized"] = 100.0 * row["accuracy"] / row["individual"]
        rows.append(row)
    return rows


def pipeline_text(workspace: Workspace) -> str | None:
    """The YAML pipeline file the workspace was last run from, when it is still readable."""
    record = workspace.manifest().get("pipeline")
    if not isinstance(record, dict) or not record.get("file"):
        return None
    try:
        return Path(record["file"]).read_text()
    except OSError:
        return None


def _eval_results(rows: list[dict[str, Any]], datasets: dict[str, str | None]) -> list[huggingface_hub.EvalResult]:
    found = []
    for row in rows:
        dataset = datasets.get(row["task"]) or row["task"]
        found.append(huggingface_hub.EvalResult(task_type="image-classification", dataset_type=dataset, dataset_name=row["task"],
                                dataset_split="test", metric_type="accuracy", metric_name="top-1 accuracy",
                                metric_value=round(row["accuracy"], 2)))
        if "normalized" in row:
            found.append(huggingface_hub.EvalResult(task_type="image-classification", dataset_type=dataset, dataset_name=row["task"],
                                    dataset_split="test", metric_type="normalized_accuracy",
                                    metric_name="accuracy / individual expert's", metric_value=round(row["normalized"], 2)))
    return found


def _results_table(rows: list[dict[str, Any]]) -> str:
    normalized = all("normalized" in row for row in rows)
    head = "| task | accuracy (%) |" + (" individual expert (%) | normalized (%) |" if normalized else "") + " test images |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        extra = f" {row['individual']:.1f} | {row['normalized']:.1f} |" if normalized else ""
        lines.append(f"| {row['task']} | {row['accuracy']:.1f} |{extra} {row['images']} |")
    average = sum(row["accuracy"] for row in rows) / len(rows)
    extra = ""
    if normalized:
        extra = (f" {sum(row['individual'] for row in rows) / len(rows):.1f} |"
                 f" {sum(row['normalized'] for row in rows) / len(rows):.1f} |")
    lines.append(f"| **average** | **{average:.1f}** |{extra} |")
    return "\n".join(lines)


def load_snippet(record: dict[str, Any], out: Path, base: str | None) -> str:
    """Three lines that load the exported folder with the library its layout is for."""
    folder = out.name
    if record.get("kind") == "routed":
        task = (record.get("head_tasks") or record.get("tasks") or ["TASK"])[0]
        return ("```python\nimport rankone\n"
                f"model = rankone.load(\"{folder}\")  # or \"hf:ORG/NAME\" once pushed with `rankone push`\n"
                f"logits = model.classify(model.preprocess(image).unsqueeze(0), \"{task}\")\n```")
    if record.get("layout") == "transformers":
        return ("```python\nfrom transformers import CLIPModel, CLIPProcessor\n"
                f"model = CLIPModel.from_pretrained(\"{folder}\")  # or \"ORG/NAME\" once pushed\n"
                f"processor = CLIPProcessor.from_pretrained(\"{base or 'BASE'}\")  # the base model's preprocessing and tokenizer\n```")
    return ("```python\nimport open_clip\n"
            f"model, _, preprocess = open_clip.create_model_and_transforms(\"local-dir:{folder}\")  # or \"hf-hub:ORG/NAME\" once pushed\n"
            f"tokenizer = open_clip.get_tokenizer(\"local-dir:{folder}\")\n```")


def model_card(workspace: Workspace, method: methods.Method, record: dict[str, Any], out: Path) -> huggingface_hub.ModelCard:
    """The card of an export of `method` from `workspace`, described by `record` (rankone.json's content)."""
    manifest = workspace.manifest()
    sources = manifest.get("sources", {})
    base_source = (sources.get("base") or {}).get("source")
    datasets = {task: hub_id(entry.get("source")) for task, entry in (manifest.get("datasets") or {}).items() if isinstance(entry, dict)}
    rows = results(workspace, method.name)
    library = "rankone" if record.get("kind") == "routed" else ("transformers" if record.get("layout") == "transformers" else "open_clip")
    data = huggingface_hub.ModelCardData(
        library_name=library,
        base_model=hub_id(base_source),
        tags=["model-merging", "rankone", method.name, "clip", "image-classification"],
        datasets=sorted({dataset for dataset in datasets.values() if dataset}) or None,
        pipeline_tag="image-classification" if record.get("kind") == "routed" else "zero-shot-image-classification",
        model_name=out.name,
        eval_results=_eval_results(rows, datasets) or None,
    )
    version = record.get("versions", {}).get("rankone", "unknown")
    tasks = record.get("tasks") or workspace.tasks
    experts = sources.get("experts", {})
    lines = [
        f"# {out.name}",
        "",
        f"**{method.name}** ({method.summary}) of {len(tasks)} fine-tuned experts on the base CLIP "
        f"`{public_source(base_source) if base_source else 'unknown'}`, made with rankone {version}.",
        "",
        "Tasks: " + ", ".join(f"`{task}`" for task in tasks) + ".",
        "",
        "## Results",
        "",
    ]
    if rows:
        lines += [_results_table(rows), "",
                  f"Top-1 accuracy on each task's labeled test images, from the workspace's `eval/{method.name}.json`"
                  + (" and `eval/individual.json`" if all("normalized" in row for row in rows) else "") + "."]
    else:
        lines += [f"Not evaluated: run `rankone eval --method {method.name}` before exporting to add results here."]
    lines += ["", "## Parameters", "", "| part | parameters |", "|---|---|"]
    lines += [f"| {role} | {count:,} |" for role, count in (record.get("parameters") or {}).items()]
    lines += ["", "## How it was made", "",
              f"- method: `{method.name}`; storage precision `{record.get('dtype')}`",
              f"- base: `{public_source(base_source) if base_source else 'unknown'}`"]
    lines += [f"- expert `{task}`: `{public_source(entry.get('source', ''))}`" for task, entry in experts.items()]
    settings = method.settings(workspace)
    if settings:
        lines += ["", "Options, as the method's output recorded them:", "", "```json", json.dumps(settings, indent=2, sort_keys=True), "```"]
    pipeline = pipeline_text(workspace)
    if pipeline is not None:
        lines += ["", "The run came from this pipeline file (`rankone run`):", "", "```yaml", pipeline.rstrip(), "```"]
    lines += ["", "## Load it", "", load_snippet(record, out, hub_id(base_source)), ""]
    return huggingface_hub.ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def write_model_card(path: Path, workspace: Workspace, method: methods.Method, record: dict[str, Any], out: Path) -> None:
    model_card(workspace, method, record, out).save(path)
