"""Static merges against hand computations written as plain per-entry loops."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rankone.errors import RankoneError
from rankone.methods import merge_task_vectors, merge_workspace, merged_state, method_options
from rankone.models import visual_state
from rankone.task_vectors import compute_task_vectors
from rankone.workspace import read_tensors_metadata


def small_vectors(seed: int = 0, tasks: int = 3) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {"visual.a": torch.randn(2, 3, generator=generator), "visual.b": torch.randn(5, generator=generator)}
        for _ in range(tasks)
    ]


def small_base(seed: int = 9) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"visual.a": torch.randn(2, 3, generator=generator), "visual.b": torch.randn(5, generator=generator)}


def entries(tensor: torch.Tensor) -> list[float]:
    return [float(value) for value in tensor.reshape(-1)]


def test_task_arithmetic_by_hand():
    tau1 = {"visual.w": torch.tensor([1.0, -2.0, 0.5])}
    tau2 = {"visual.w": torch.tensor([3.0, 1.0, -0.5])}
    base = {"visual.w": torch.tensor([10.0, 20.0, 30.0])}
    merged = merged_state(base, [tau1, tau2], "task-arithmetic", lam=0.3)
    # 10 + 0.3·4, 20 + 0.3·(−1), 30 + 0.3·0
    assert torch.allclose(merged["visual.w"], torch.tensor([11.2, 19.7, 30.0]))


def test_task_arithmetic_per_entry_loop():
    vectors, base = small_vectors(), small_base()
    merged = merged_state(base, vectors, "task-arithmetic", lam=0.7)
    for key in base:
        expected = [b + 0.7 * sum(entries(v[key])[i] for v in vectors) for i, b in enumerate(entries(base[key]))]
        assert entries(merged[key]) == pytest.approx(expected, abs=1e-6)


def test_weight_averaging_is_mean_of_experts():
    vectors, base = small_vectors(), small_base()
    experts = [{key: base[key] + vector[key] for key in base} for vector in vectors]
    merged = merged_state(base, vectors, "weight-averaging")
    for key in base:
        expected = torch.stack([expert[key] for expert in experts]).mean(dim=0)
        assert torch.allclose(merged[key], expected, atol=1e-6)


def test_ties_small_case_by_hand():
    # top 0.4 of 5 entries keeps ceil(2.0) = 2 per task.
    tau1 = {"visual.w": torch.tensor([4.0, -3.0, 0.1, 0.2, 0.0])}  # keeps 4, -3
    tau2 = {"visual.w": torch.tensor([-1.0, -5.0, 2.0, 0.1, 0.0])}  # keeps -5, 2
    tau3 = {"visual.w": torch.tensor([-2.0, 1.0, 0.3, -6.0, 0.0])}  # keeps -2, -6
    # sums of kept: [2, -8, 2, -6, 0] → signs [+, -, +, -, 0]
    # agreeing means: [4, (-3-5)/2, 2, -6, 0]
    update = merge_task_vectors([tau1, tau2, tau3], "ties", lam=0.5, top=0.4)
    assert torch.allclose(update["visual.w"], 0.5 * torch.tensor([4.0, -4.0, 2.0, -6.0, 0.0]))


def expected_ties(vectors, top, lam):
    expected = {}
    for key in vectors[0]:
        kept_per_task = []
        for vector in vectors:
            values = entries(vector[key])
            keep = max(1, math.ceil(top * len(values)))
            threshold = sorted((abs(v) for v in values), reverse=True)[keep - 1]
            kept_per_task.append([v if abs(v) >= threshold else 0.0 for v in values])
        merged = []
        for i in range(len(kept_per_task[0])):
            column = [kept[i] for kept in kept_per_task]
            total = sum(column)
            sign = (total > 0) - (total < 0)
            agreeing = [v for v in column if v != 0 and ((v > 0) - (v < 0)) == sign]
            merged.append(lam * sum(agreeing) / len(agreeing) if sign != 0 and agreeing else 0.0)
        expected[key] = merged
    return expected


@pytest.mark.parametrize("top", [0.2, 0.5, 1.0])
def test_ties_per_entry_loop(top):
    vectors = small_vectors(seed=3, tasks=4)
    update = merge_task_vectors(vectors, "ties", lam=0.3, top=top)
    expected = expected_ties(vectors, top, 0.3)
    for key in vectors[0]:
        assert entries(update[key]) == pytest.approx(expected[key], abs=1e-6)


def expected_dare(vectors, drop, seed, lam):
    # The documented draw order: one CPU stream, task by task, tensors in sorted key order.
    generator = torch.Generator().manual_seed(seed)
    draws = [{key: entries(torch.rand(vector[key].shape, generator=generator)) for key in sorted(vector)} for vector in vectors]
    expected = {}
    for key in vectors[0]:
        values = [0.0] * vectors[0][key].numel()
        for vector, draw in zip(vectors, draws):
            for i, value in enumerate(entries(vector[key])):
                if draw[key][i] >= drop:
                    values[i] += value / (1.0 - drop)
        expected[key] = [lam * value for value in values]
    return expected


def test_dare_per_entry_loop():
    vectors = small_vectors(seed=5)
    update = merge_task_vectors(vectors, "dare", lam=0.3, drop=0.5, seed=11)
    expected = expected_dare(vectors, 0.5, 11, 0.3)
    for key in vectors[0]:
        assert entries(update[key]) == pytest.approx(expected[key], abs=1e-6)
    # Some entries must actually have been dropped for the test to mean anything.
    arithmetic = merge_task_vectors(vectors, "task-arithmetic", lam=0.3)
    assert any(not torch.allclose(update[key], arithmetic[key]) for key in update)


def test_dare_deterministic_for_a_seed():
    vectors = small_vectors(seed=7)
    first = merge_task_vectors(vectors, "dare", drop=0.9, seed=4)
    again = merge_task_vectors(vectors, "dare", drop=0.9, seed=4)
    other = merge_task_vectors(vectors, "dare", drop=0.9, seed=5)
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert any(not torch.equal(first[key], other[key]) for key in first)


def test_dare_without_drops_is_task_arithmetic():
    vectors = small_vectors(seed=8)
    dare = merge_task_vectors(vectors, "dare", lam=0.3, drop=0.0, seed=0)
    arithmetic = merge_task_vectors(vectors, "task-arithmetic", lam=0.3)
    assert all(torch.allclose(dare[key], arithmetic[key]) for key in dare)


def test_merged_state_keeps_base_dtype():
    vectors = small_vectors()
    base = {key: value.half() for key, value in small_base().items()}
    merged = merged_state(base, vectors, "task-arithmetic")
    assert all(tensor.dtype == torch.float16 for tensor in merged.values())


def test_bad_options_are_errors():
    vectors = small_vectors()
    with pytest.raises(RankoneError, match="--method 'magic'"):
        merge_task_vectors(vectors, "magic")
    with pytest.raises(RankoneError, match="--top 0"):
        merge_task_vectors(vectors, "ties", top=0.0)
    with pytest.raises(RankoneError, match="--drop 1"):
        merge_task_vectors(vectors, "dare", drop=1.0)
    with pytest.raises(RankoneError, match="--lambda: not used by --method weight-averaging"):
        method_options("weight-averaging", lam=0.3)
    with pytest.raises(RankoneError, match="--top: not used by --method dare"):
        method_options("dare", top=0.2)
    mismatched = small_vectors()
    mismatched[1]["visual.b"] = torch.zeros(4)
    with pytest.raises(RankoneError, match="visual.b"):
        merge_task_vectors(mismatched, "task-arithmetic")


def test_merge_workspace_writes_loadable_file(tiny_workspace, base_state, expert_states):
    compute_task_vectors(tiny_workspace)
    options = merge_workspace(tiny_workspace, "ties", top=0.3)
    assert options == {"method": "ties", "lambda": 0.3, "top": 0.3}
    stored = tiny_workspace.load_tensors("merged/ties.safetensors")
    base_visual = visual_state(base_state)
    vectors = [{key: expert_states[task][key] - base_visual[key] for key in base_visual} for task in tiny_workspace.tasks]
    expected = merged_state(base_visual, vectors, "ties", lam=0.3, top=0.3)
    assert set(stored) == set(base_visual)
    assert all(torch.allclose(stored[key], expected[key], atol=1e-6) for key in expected)
    metadata = json.loads(read_tensors_metadata(tiny_workspace.path("merged/ties.safetensors"))["rankone"])
    assert metadata == {"method": "ties", "lambda": 0.3, "top": 0.3, "tasks": list(tiny_workspace.tasks)}
