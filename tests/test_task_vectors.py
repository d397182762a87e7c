"""Task vectors, their files, and the Figure-2 norm analysis against direct computations."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from conftest import TASKS, make_expert_state, write_workspace, snapshot
from rankone.errors import RankoneError
from rankone.models import visual_state
from rankone.task_vectors import block_norms, compute_task_vectors, load_task_vectors, task_vector

ATTENTION = ("attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias")
MLP = ("mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")


def test_task_vector_is_difference(base_state, expert_states):
    base_visual = visual_state(base_state)
    vector = task_vector(base_visual, expert_states["alpha"], "alpha")
    assert set(vector) == set(base_visual)
    for key, tensor in vector.items():
        assert torch.equal(tensor, expert_states["alpha"][key] - base_visual[key])


def test_identical_expert_names_the_task(base_state):
    base_visual = visual_state(base_state)
    with pytest.raises(RankoneError, match="'beta'.*all zeros"):
        task_vector(base_visual, {key: value.clone() for key, value in base_visual.items()}, "beta")


def test_mismatched_expert_names_tensor(base_state, expert_states):
    base_visual = visual_state(base_state)
    expert = dict(expert_states["alpha"])
    expert["visual.proj"] = torch.zeros(3, 3)
    with pytest.raises(RankoneError, match="'alpha'.*visual.proj.*shape"):
        task_vector(base_visual, expert, "alpha")
    del expert["visual.proj"]
    with pytest.raises(RankoneError, match="lacks tensor visual.proj"):
        task_vector(base_visual, expert, "alpha")


def test_compute_task_vectors_files_and_analysis(tiny_workspace, base_state, expert_states):
    analysis = compute_task_vectors(tiny_workspace)
    base_visual = visual_state(base_state)
    stored = load_task_vectors(tiny_workspace)
    for task, vector in zip(TASKS, stored):
        for key in base_visual:
            assert torch.allclose(vector[key], expert_states[task][key] - base_visual[key])
    assert tiny_workspace.read_json("task_vectors/analysis.json") == json.loads(json.dumps(analysis))

    layers = 2
    for block in range(layers):
        prefix = f"visual.transformer.resblocks.{block}."
        attention_norms, mlp_norms = [], []
        for task in TASKS:
            tau = {key: expert_states[task][key] - base_visual[key] for key in base_visual}
            attention = torch.cat([tau[prefix + name].flatten() for name in ATTENTION])
            mlp = torch.cat([tau[prefix + name].flatten() for name in MLP])
            attention_norms.append(float(torch.linalg.norm(attention)))
            mlp_norms.append(float(torch.linalg.norm(mlp)))
        row = analysis["blocks"][block]
        assert row["block"] == block
        assert row["attention"] == pytest.approx(sum(attention_norms) / len(TASKS), rel=1e-5)
        assert row["mlp"] == pytest.approx(sum(mlp_norms) / len(TASKS), rel=1e-5)
        assert analysis["per_task"]["gamma"][block]["mlp"] == pytest.approx(mlp_norms[2], rel=1e-5)


def test_block_norms_ignore_other_tensors():
    vector = {
        "visual.transformer.resblocks.0.attn.in_proj_weight": torch.full((2, 2), 1.0),
        "visual.transformer.resblocks.0.mlp.c_fc.bias": torch.tensor([3.0, 4.0]),
        "visual.transformer.resblocks.0.ln_1.weight": torch.full((2,), 100.0),
        "visual.conv1.weight": torch.full((2,), 100.0),
    }
    assert block_norms(vector) == [{"block": 0, "attention": pytest.approx(2.0), "mlp": pytest.approx(5.0)}]


def test_failure_leaves_workspace_unchanged(tmp_path, base_state):
    experts = {"alpha": make_expert_state(base_state, seed=1), "same": visual_state(base_state)}
    workspace = write_workspace(tmp_path / "work", base_state, experts)
    before = snapshot(workspace.root)
    with pytest.raises(RankoneError, match="'same'"):
        compute_task_vectors(workspace)
    assert snapshot(workspace.root) == before


def test_plot_writes_png(tiny_workspace):
    compute_task_vectors(tiny_workspace, plot=True)
    assert tiny_workspace.require("task_vectors/analysis.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_how_to_install(tiny_workspace, monkeypatch):
    # A None entry in sys.modules makes `import matplotlib` raise ImportError.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    before = snapshot(tiny_workspace.root)
    with pytest.raises(RankoneError, match=r"pip install 'rankone\[plot\]'"):
        compute_task_vectors(tiny_workspace, plot=True)
    assert snapshot(tiny_workspace.root) == before
