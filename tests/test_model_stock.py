"""Model Stock, checked against the paper's formula computed in numpy, and run as a user runs it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import task_vectors_of
from rankone.errors import RankoneError
from rankone.methods import merge_task_vectors
from rankone.models import visual_state


def numpy_model_stock(vectors: list[np.ndarray]) -> np.ndarray:
    """θ_merge − θ0 for one tensor: t·mean(τ), t = N·cos θ̄ / ((N − 1)·cos θ̄ + 1), θ̄ the mean pairwise angle."""
    flat = [vector.ravel().astype(np.float64) for vector in vectors]
    angles = [np.arccos(np.clip(a @ b / np.sqrt((a @ a) * (b @ b)), -1, 1)) for i, a in enumerate(flat) for b in flat[i + 1:]]
    cosine, count = np.cos(np.mean(angles)), len(vectors)
    return count * cosine / ((count - 1) * cosine + 1) * np.mean(vectors, axis=0)


def test_update_matches_the_formula(base_state, expert_states):
    task_vectors = task_vectors_of(base_state, expert_states)
    update = merge_task_vectors(task_vectors, "model-stock")
    assert set(update) == set(task_vectors[0])
    for key, tensor in update.items():
        expected = numpy_model_stock([vector[key].double().numpy() for vector in task_vectors])
        np.testing.assert_allclose(tensor.double().numpy(), expected, atol=1e-7, rtol=1e-5)


def test_agreeing_experts_average_and_orthogonal_ones_stay_pretrained():
    same = [{"w": torch.tensor([1.0, 2.0, 3.0])}, {"w": torch.tensor([2.0, 4.0, 6.0])}]
    torch.testing.assert_close(merge_task_vectors(same, "model-stock")["w"], torch.tensor([1.5, 3.0, 4.5]))
    orthogonal = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 1.0])}]
    assert torch.allclose(merge_task_vectors(orthogonal, "model-stock")["w"], torch.zeros(2), atol=1e-6)
    untouched = [{"w": torch.zeros(3)}, {"w": torch.zeros(3)}]
    assert torch.equal(merge_task_vectors(untouched, "model-stock")["w"], torch.zeros(3))
    with pytest.raises(RankoneError, match="model-stock: needs at least 2 experts"):
        merge_task_vectors(same[:1], "model-stock")
    with pytest.raises(RankoneError, match="--lambda: not used by --method model-stock"):
        merge_task_vectors(same, "model-stock", lam=0.3)


def test_merge_eval_and_compare_through_the_cli(tiny_workspace, base_state, expert_states, labeled_data, rankone_cli):
    work = str(tiny_workspace.root)
    assert rankone_cli("task-vectors", "-w", work)[0] == 0
    code, out, err = rankone_cli("merge", "--method", "model-stock", "-w", work)
    assert code == 0, err
    assert "merged/model-stock.safetensors" in out
    stored = tiny_workspace.load_tensors("merged/model-stock.safetensors")
    base_visual = visual_state(base_state)
    task_vectors = task_vectors_of(base_state, expert_states)
    for key, tensor in stored.items():
        expected = base_visual[key].double().numpy() + numpy_model_stock([vector[key].double().numpy() for vector in task_vectors])
        np.testing.assert_allclose(tensor.double().numpy(), expected, atol=1e-6)
    code, _, err = rankone_cli("compare", "--data", labeled_data, "-w", work)
    assert code == 0, err
    rows = [row["method"] for row in json.loads((tiny_workspace.root / "compare.json").read_text())["rows"]]
    assert rows == ["pretrained", "individual", "model-stock"]
    code, _, err = rankone_cli("merge", "--method", "model-stock", "--lambda", "0.3", "-w", work)
    assert code == 2 and "--lambda: not used by --method model-stock" in err
