"""The merges that read unlabeled images (RegMean, Fisher merging) against FusionBench and the paper, on the same weights.

tests/reference/data/data_merges.safetensors (made by tests/reference/make_references.py
in its own virtualenv) holds, for the tiny tower and experts of data_free_merges.safetensors,
a few images and a head per task, FusionBench's RegMean Gram matrices and merged tower, and
the paper's per-example Fisher computed by hand on the transformers towers (one backward
pass per image and class) with FusionBench's Fisher-weighted merge of it. Here the same
weights go through `rankone fetch` and `task-vectors` as a user runs them, and rankone's
own functions compute the statistics on the open_clip towers from the same images.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import DATA_FREE, DATA_MERGES, assert_same_update, fetched_reference, reference, vision_keys
from rankone.convert import convert_state_dict
from rankone.methods.fisher import diagonal_fisher, fisher_merge, predictive_covariance
from rankone.methods.regmean import gram_matrices, reduce_off_diagonal, regmean_merge
from rankone.methods.statistics import expert_towers, tower_module

BATCH = 4


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    metadata, groups = reference(DATA_FREE)
    data_metadata, data = reference(DATA_MERGES)
    workspace = fetched_reference(tmp_path_factory.mktemp("data-merges"), metadata, groups)
    towers = dict(expert_towers(workspace))
    return data_metadata, data, workspace, towers


def batches(images: torch.Tensor) -> list[torch.Tensor]:
    return list(images.split(BATCH))


def our_gram_key(module: str) -> str:
    """FusionBench's module name (transformers layout) → the open_clip weight that module's Gram matrix multiplies."""
    layer = module.split(".")[2]
    prefix = f"visual.transformer.resblocks.{layer}."
    for theirs, ours in (("q_proj", "attn.in_proj_weight"), ("k_proj", "attn.in_proj_weight"), ("v_proj", "attn.in_proj_weight"),
                         ("out_proj", "attn.out_proj.weight"), ("fc1", "mlp.c_fc.weight"), ("fc2", "mlp.c_proj.weight")):
        if module.endswith(theirs):
            return prefix + ours
    raise KeyError(module)


def test_gram_matrices_match_fusionbench_s(fixture):
    metadata, data, workspace, towers = fixture
    for task, tower in towers.items():
        ours = gram_matrices(tower_module(workspace, tower, "cpu"), batches(data["images"][task]))
        theirs = data[f"regmean/gram/{task}"]
        assert {our_gram_key(module) for module in theirs} | {"visual.proj"} == set(ours)
        for module, gram in theirs.items():
            torch.testing.assert_close(ours[our_gram_key(module)], gram, rtol=1e-5, atol=1e-5 * gram.abs().max().item())


def test_regmean_merge_matches_fusionbench_s(fixture):
    metadata, data, workspace, towers = fixture
    options = json.loads(metadata["regmean"])
    experts = ((tower, gram_matrices(tower_module(workspace, tower, "cpu"), batches(data["images"][task]))) for task, tower in towers.items())
    experts = list(experts)
    merged = regmean_merge(experts, options["reduce_non_diagonal_ratio"])
    base = convert_state_dict(vision_keys(reference(DATA_FREE)[1]["base"]))
    theirs = convert_state_dict(vision_keys(data["regmean"]))
    solved = {key for key in theirs if key in experts[0][1]}
    assert_same_update(merged, {key: value for key, value in theirs.items() if key not in solved}, base, "regmean")
    # A solved map is as exact as float32 allows for its system: FusionBench inverts Σ G' in float32, so its answer
    # carries up to κ(Σ G')·ε·|W| of rounding (κ is 55-150 here); rankone solves in float64.
    for key in solved:
        summed = sum(reduce_off_diagonal(grams[key], options["reduce_non_diagonal_ratio"]) for _, grams in experts).double()
        eigenvalues = torch.linalg.eigvalsh(summed)
        allowed = 1e-5 * (theirs[key] - base[key]).abs().max() + float(eigenvalues.max() / eigenvalues.min()) * \
            torch.finfo(torch.float32).eps * theirs[key].abs().max()
        assert (merged[key] - theirs[key]).abs().max() <= allowed, key
    # The projection (outside FusionBench's CLIPVisionModel) is left alone by experts that did not change it.
    torch.testing.assert_close(merged["visual.proj"], workspace.load_tensors("base.safetensors")["visual.proj"], rtol=1e-5, atol=1e-6)


def test_off_diagonal_scaling_keeps_the_diagonal():
    gram = torch.tensor([[4.0, 2.0], [2.0, 3.0]])
    assert reduce_off_diagonal(gram, 0.5).tolist() == [[4.0, 1.0], [1.0, 3.0]]
    assert torch.equal(reduce_off_diagonal(gram, 1.0), gram)


def test_diagonal_fisher_matches_the_paper_s_definition_computed_by_hand(fixture):
    metadata, data, workspace, towers = fixture
    for task, tower in towers.items():
        ours = diagonal_fisher(tower_module(workspace, tower, "cpu"), data["head"][task], batches(data["images"][task]))
        theirs = convert_state_dict(vision_keys(data[f"fisher/statistics/{task}"]))
        assert set(theirs) <= set(ours)
        for key, value in theirs.items():
            torch.testing.assert_close(ours[key], value, rtol=1e-4, atol=1e-5 * value.abs().max().item(), msg=f"{task} {key}")


def test_fisher_merge_matches_fusionbench_s(fixture):
    metadata, data, workspace, towers = fixture
    options = json.loads(metadata["fisher"])
    experts = ((tower, diagonal_fisher(tower_module(workspace, tower, "cpu"), data["head"][task], batches(data["images"][task])))
               for task, tower in towers.items())
    merged = fisher_merge(experts, options["minimal_fisher_weight"])
    base = convert_state_dict(vision_keys(reference(DATA_FREE)[1]["base"]))
    assert_same_update(merged, convert_state_dict(vision_keys(data["fisher"])), base, "fisher")
    torch.testing.assert_close(merged["visual.proj"], workspace.load_tensors("base.safetensors")["visual.proj"], rtol=1e-5, atol=1e-6)


def test_predictive_covariance_is_the_covariance_of_the_head_rows_under_p():
    generator = torch.Generator().manual_seed(0)
    head, probabilities = torch.randn(4, 3, generator=generator), torch.softmax(torch.randn(4, generator=generator), dim=0)
    centred = head.double() - probabilities.double() @ head.double()
    expected = sum(p * torch.outer(row, row) for p, row in zip(probabilities.double(), centred))
    torch.testing.assert_close(predictive_covariance(probabilities, head), expected)


# ---- through the CLI, on the tiny fixture ----------------------------------------------------

@pytest.mark.parametrize("method", ["regmean", "fisher"])
def test_adapt_writes_a_tower_that_eval_compare_and_export_use(method, tiny_workspace, unlabeled_data, labeled_data, rankone_cli, tmp_path):
    from conftest import snapshot
    from rankone.methods import get
    from rankone.methods.statistics import chosen_images, stored_tower
    from rankone.models import preprocess_for
    from rankone.training import head_requests, task_heads, unlabeled_sets

    code, _, err = rankone_cli("task-vectors", "-w", tiny_workspace.root)
    assert code == 0, err
    code, out, err = rankone_cli("adapt", "-w", tiny_workspace.root, "--method", method, "--data", unlabeled_data,
                                 "--classnames-from", labeled_data, "--examples", "3", "--batch-size", "2")
    assert code == 0, err
    assert "statistics of each expert on its own unlabeled images" in out
    stored = stored_tower(tiny_workspace, method)
    settings = get(method).settings(tiny_workspace)
    assert settings["examples"] == 3 and set(settings["images"].values()) == {3}

    # The same merge from the plain functions, on the images the seed picked.
    unlabeled = unlabeled_sets(unlabeled_data, tiny_workspace.tasks, preprocess_for(tiny_workspace.architecture))
    def images(task):
        dataset = unlabeled[task]
        return [torch.stack([dataset[index] for index in chosen_images(len(dataset), task, 3, 0)])]
    if method == "regmean":
        expected = regmean_merge(((tower, gram_matrices(tower_module(tiny_workspace, tower, "cpu"), images(task)))
                                  for task, tower in expert_towers(tiny_workspace)), 0.95)
    else:
        requests = head_requests(tiny_workspace, tiny_workspace.tasks, classnames_from=labeled_data)
        heads = task_heads(tiny_workspace, requests, torch.device("cpu"))
        expected = fisher_merge(((tower, diagonal_fisher(tower_module(tiny_workspace, tower, "cpu"), heads[task], images(task)))
                                 for task, tower in expert_towers(tiny_workspace)), 1e-6)
    assert set(expected) == set(stored)
    for key, value in expected.items():
        torch.testing.assert_close(stored[key], value, rtol=1e-5, atol=1e-6, msg=key)

    code, _, err = rankone_cli("compare", "-w", tiny_workspace.root, "--data", labeled_data, "--methods", f"pretrained,{method}")
    assert code == 0, err
    rows = {row["method"]: row for row in tiny_workspace.read_json("compare.json")["rows"]}
    assert rows[method]["options"]["examples"] == 3 and not rows[method]["needs_task"]
    code, _, err = rankone_cli("export", "-w", tiny_workspace.root, "--method", method, "--out", tmp_path / "out")
    assert code == 0, err

    # Options only training uses are refused, and the workspace is left as it was.
    before = snapshot(tiny_workspace.root)
    code, _, err = rankone_cli("adapt", "-w", tiny_workspace.root, "--method", method, "--data", unlabeled_data,
                               "--classnames-from", labeled_data, "--resume")
    assert code == 2 and "--resume: not used by --method" in err
    assert snapshot(tiny_workspace.root) == before


def test_regmean_needs_no_class_names(tiny_workspace, unlabeled_data, rankone_cli):
    code, _, err = rankone_cli("task-vectors", "-w", tiny_workspace.root)
    assert code == 0, err
    code, _, err = rankone_cli("adapt", "-w", tiny_workspace.root, "--method", "regmean", "--data", unlabeled_data, "--examples", "2")
    assert code == 0, err
    code, _, err = rankone_cli("adapt", "-w", tiny_workspace.root, "--method", "fisher", "--data", unlabeled_data, "--examples", "2")
    assert code == 2 and "no class names for its head" in err
