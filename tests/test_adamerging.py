"""Layer-wise AdaMerging: groups, its start at task arithmetic, gradients, and adaptation lowering entropy."""

from __future__ import annotations

import json

import pytest
import torch

from rankone.methods.adamerging import (
    ADAPTED_COEFFICIENTS,
    AdaMergingModel,
    AdaMergingOptions,
    adamerging_from_workspace,
    adapt_adamerging,
    layerwise_merge,
    parameter_groups,
    stack_task_vectors,
)
from rankone.training import AdaptOptions
from rankone.errors import RankoneError
from rankone.methods import merged_state
from rankone.models import build_visual, load_visual, named_architecture, visual_state
from rankone.task_vectors import compute_task_vectors
from conftest import task_vectors_of


def test_groups_are_modules_six_per_block_plus_one_per_outer_tensor():
    with torch.device("meta"):
        keys = [f"visual.{name}" for name in build_visual(named_architecture("ViT-B-32")).state_dict()]
    groups = parameter_groups(keys)
    assert len(groups) == 12 * 6 + 6
    block = [group.removeprefix("visual.transformer.resblocks.0.") for group in groups if group.startswith("visual.transformer.resblocks.0.")]
    assert sorted(block) == ["attn.in_proj", "attn.out_proj", "ln_1", "ln_2", "mlp.c_fc", "mlp.c_proj"]
    assert {"visual.conv1", "visual.class_embedding", "visual.positional_embedding", "visual.ln_pre", "visual.ln_post", "visual.proj"} <= set(groups)


def test_initial_model_is_task_arithmetic(tiny_architecture, base_state, expert_states):
    task_vectors = task_vectors_of(base_state, expert_states)
    model = AdaMergingModel(tiny_architecture, base_state, task_vectors)
    reference = load_visual(tiny_architecture, merged_state(visual_state(base_state), task_vectors, "task-arithmetic", lam=0.3))
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images), rtol=1e-5, atol=1e-5)


def test_each_coefficient_scales_only_its_group(tiny_architecture, base_state, expert_states):
    base_visual = visual_state(base_state)
    task_vectors = task_vectors_of(base_state, expert_states)
    groups = parameter_groups(list(base_visual))
    coefficients = torch.zeros(len(task_vectors), len(groups))
    target = groups.index("visual.transformer.resblocks.1.mlp.c_fc")
    coefficients[1, target] = 0.7
    merged = layerwise_merge(base_visual, stack_task_vectors(base_visual, task_vectors), coefficients, groups)
    for key, tensor in merged.items():
        expected = base_visual[key] + (0.7 * task_vectors[1][key] if key.startswith("visual.transformer.resblocks.1.mlp.c_fc.") else 0)
        torch.testing.assert_close(tensor, expected, rtol=1e-6, atol=1e-7)


def test_gradients_reach_only_the_coefficients(tiny_architecture, base_state, expert_states):
    model = AdaMergingModel(tiny_architecture, base_state, task_vectors_of(base_state, expert_states))
    model(torch.randn(2, 3, 32, 32)).square().sum().backward()
    assert model.coefficients.grad is not None and model.coefficients.grad.abs().min() > 0
    assert [name for name, parameter in model.named_parameters() if parameter.requires_grad] == ["coefficients"]


def test_adaptation_lowers_entropy_and_saves_coefficients(tiny_workspace, unlabeled_data, labeled_data, unlabeled_entropy):
    compute_task_vectors(tiny_workspace)
    before = unlabeled_entropy(tiny_workspace, adamerging_from_workspace(tiny_workspace, trained=False), unlabeled_data, labeled_data)
    options = AdaptOptions(data=unlabeled_data, steps=6, batch_size=2, classnames_from=labeled_data, progress=False)
    assert adapt_adamerging(tiny_workspace, options, AdaMergingOptions(lr=0.1)) == ADAPTED_COEFFICIENTS
    trained = adamerging_from_workspace(tiny_workspace)
    after = unlabeled_entropy(tiny_workspace, trained, unlabeled_data, labeled_data)
    assert after < before - 1e-3
    assert not torch.allclose(trained.coefficients, torch.full_like(trained.coefficients, 0.3))
    stored = tiny_workspace.load_tensors(ADAPTED_COEFFICIENTS)["coefficients"]
    assert stored.shape == (3, 2 * 6 + 6)
    from rankone.workspace import read_tensors_metadata

    metadata = json.loads(read_tensors_metadata(tiny_workspace.path(ADAPTED_COEFFICIENTS))["rankone"])
    assert metadata["groups"] == trained.groups and len(metadata["losses"]) == 6


def test_default_learning_rate_is_adamergings(tiny_workspace, unlabeled_data, labeled_data):
    compute_task_vectors(tiny_workspace)
    options = AdaptOptions(data=unlabeled_data, steps=1, batch_size=2, classnames_from=labeled_data, progress=False)
    adapt_adamerging(tiny_workspace, options, AdaMergingOptions())
    from rankone.workspace import read_tensors_metadata

    assert json.loads(read_tensors_metadata(tiny_workspace.path(ADAPTED_COEFFICIENTS))["rankone"])["lr"] == 1e-3


def test_bad_inputs_are_errors_and_workspace_unchanged(tiny_workspace, unlabeled_data, labeled_data):
    compute_task_vectors(tiny_workspace)
    manifest = tiny_workspace.manifest_path.read_text()
    with pytest.raises(RankoneError, match="adamerging.safetensors: missing"):
        adamerging_from_workspace(tiny_workspace)
    with pytest.raises(RankoneError, match="task alpha: no class names"):
        adapt_adamerging(tiny_workspace, AdaptOptions(data=unlabeled_data, steps=1, progress=False), AdaMergingOptions())
    with pytest.raises(RankoneError, match="--data .*nowhere: not a folder"):
        adapt_adamerging(tiny_workspace, AdaptOptions(data=unlabeled_data / "nowhere", steps=1, classnames_from=labeled_data, progress=False),
                         AdaMergingOptions())
    assert tiny_workspace.manifest_path.read_text() == manifest


def test_cli_adapt_defaults_to_adamergings_learning_rate(tiny_workspace, unlabeled_data, labeled_data, rankone_cli):
    from rankone.workspace import read_tensors_metadata

    compute_task_vectors(tiny_workspace)
    code, out, err = rankone_cli("adapt", "-w", tiny_workspace.root, "--method", "adamerging", "--data", unlabeled_data,
                                 "--classnames-from", labeled_data, "--steps", "1", "--batch-size", "2", "--device", "cpu")
    assert code == 0, err
    metadata = json.loads(read_tensors_metadata(tiny_workspace.path(ADAPTED_COEFFICIENTS))["rankone"])
    assert metadata["lr"] == 1e-3 and metadata["steps"] == 1
