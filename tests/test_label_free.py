"""`--lambda auto`: the λ whose task-arithmetic merge has the lowest mean entropy on unlabeled images."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from PIL import Image

from conftest import TASKS, snapshot
from rankone.errors import RankoneError
from rankone.label_free import LAMBDA_GRID, workspace_lambda
from rankone.methods import merge_task_vectors
from rankone.training import head_requests, task_heads
from rankone.workspace import read_tensors_metadata


def hand_entropies(workspace, unlabeled, labeled) -> dict[float, float]:
    """The rule computed apart from rankone: θ0 + λ·Σ(θt − θ0) in open_clip, softmax entropy by hand."""
    base = workspace.load_tensors("base.safetensors")
    experts = [workspace.load_tensors(f"experts/{task}.safetensors") for task in TASKS]
    architecture = {key: value for key, value in workspace.architecture.items() if key != "name"}
    transform = open_clip.image_transform(architecture["vision_cfg"]["image_size"], is_train=False)
    images = {task: torch.stack([transform(Image.open(path).convert("RGB")) for path in sorted((unlabeled / task).rglob("*.png"))])
              for task in TASKS}
    heads = task_heads(workspace, head_requests(workspace, TASKS, classnames_from=labeled), torch.device("cpu"))
    entropies = {}
    for lam in LAMBDA_GRID:
        merged = dict(base)
        for key in base:
            if key.startswith("visual."):
                merged[key] = base[key] + lam * sum(expert[key] - base[key] for expert in experts)
        model = open_clip.CLIP(**architecture)
        model.load_state_dict(merged)
        per_task = []
        with torch.no_grad():
            for task in TASKS:
                embeddings = model.eval().encode_image(images[task])
                logits = torch.nn.functional.normalize(embeddings, dim=-1) @ heads[task].T
                probabilities = logits.softmax(dim=-1)
                per_task.append(float(-(probabilities * probabilities.log()).sum(dim=-1).mean()))
        entropies[lam] = sum(per_task) / len(per_task)
    return entropies


def test_lambda_auto_picks_the_lowest_hand_computed_entropy(every_stage_workspace, unlabeled_data, labeled_data, rankone_cli):
    work = every_stage_workspace
    expected = hand_entropies(work, unlabeled_data, labeled_data)
    chosen, entropies = workspace_lambda(work, unlabeled_data, labeled_data)
    assert list(entropies) == list(LAMBDA_GRID)
    for lam in LAMBDA_GRID:
        assert abs(entropies[lam] - expected[lam]) < 1e-5
    assert chosen == min(expected, key=lambda lam: (expected[lam], lam))

    code, out, err = rankone_cli("merge", "-w", work.root, "--method", "ties", "--lambda", "auto", "--data", unlabeled_data,
                                 "--classnames-from", labeled_data)
    assert code == 0, err
    line = "λ by lowest unlabeled entropy of task arithmetic: " + ", ".join(f"λ={lam:g}: {entropies[lam]:.3f}" for lam in LAMBDA_GRID)
    assert f"{line} → λ={chosen:g}" in err
    assert ("the lowest entropy is at the grid's largest λ" in err) == (chosen == max(LAMBDA_GRID))
    assert json.loads(read_tensors_metadata(work.path("merged/ties.safetensors"))["rankone"])["lambda"] == chosen

    code, out, err = rankone_cli("build-pool", "-w", work.root, "--k", "2", "--lambda", "auto", "--data", unlabeled_data,
                                 "--classnames-from", labeled_data, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["lambda_rule"]["lambda"] == chosen
    assert json.loads(read_tensors_metadata(work.path("pool.safetensors"))["rankone"])["lambda"] == chosen


def test_lambda_auto_refusals(every_stage_workspace, rankone_cli):
    work = every_stage_workspace
    before = snapshot(work)
    code, _, err = rankone_cli("merge", "-w", work.root, "--method", "ties", "--lambda", "auto")
    assert code == 2 and "--lambda auto: needs --data" in err and err.count("\n") == 1
    code, _, err = rankone_cli("merge", "-w", work.root, "--method", "ties", "--lambda", "lots")
    assert code == 2 and "--lambda 'lots': expected a number or auto" in err
    code, _, err = rankone_cli("adapt", "-w", work.root, "--method", "wemoe", "--lambda", "auto", "--data", work.root)
    assert code == 2 and "--lambda" in err
    assert snapshot(work) == before
    with pytest.raises(RankoneError, match="--lambda auto: resolved by the merge stage"):
        merge_task_vectors([{"visual.proj": torch.zeros(2, 2)}], "ties", lam="auto")
