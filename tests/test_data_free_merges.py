"""The data-free merges (TSV-Merge, Iso-C, Iso-CTS, WUDI) against FusionBench's own implementations, on the same weights.

tests/reference/data/data_free_merges.safetensors holds a tiny CLIP image tower, three
experts and what FusionBench's algorithm classes merged them into (made by
tests/reference/make_references.py in its own virtualenv). Here the same weights are
written as transformers folders, fetched, turned into task vectors and merged by
`rankone merge` as a user runs it; the merged tower must match FusionBench's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from rankone.convert import convert_state_dict
from rankone.methods.iso_cts import subspace_sizes
from rankone.methods.matrices import weight_matrices
from rankone.methods.tsv_merge import decorrelated_singular_vectors
from rankone.methods.wudi import least_interference

REFERENCE = Path(__file__).parent / "reference" / "data" / "data_free_merges.safetensors"
METHODS = ("tsv-merge", "iso-c", "iso-cts", "wudi")


def reference() -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    with safe_open(str(REFERENCE), framework="pt") as handle:
        metadata = handle.metadata()
        groups: dict[str, dict[str, torch.Tensor]] = {}
        for name in handle.keys():
            group, _, key = name.rpartition("/")
            groups.setdefault(group, {})[key] = handle.get_tensor(name)
    return metadata, groups


def vision_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIPVisionModel state dict without the `vision_model.` wrapper that transformers 4 adds."""
    return {key.removeprefix("vision_model."): value for key, value in state.items()}


def run_cli(*arguments) -> tuple[int, str, str]:
    """`rankone ARGS` in this process, as the rankone_cli fixture runs it (which a module-scoped fixture cannot use)."""
    import sys
    from unittest import mock

    from rankone.cli import main

    with mock.patch.object(sys, "argv", ["rankone", *map(str, arguments)]):
        try:
            main()
        except SystemExit as exit_:
            return (exit_.code if isinstance(exit_.code, int) else 1), "", f"rankone {arguments[0]} exited with {exit_.code}"
    return 0, "", ""


@pytest.fixture(scope="module")
def merged_by_rankone(tmp_path_factory) -> tuple[dict, dict[str, dict[str, torch.Tensor]], dict[str, dict[str, torch.Tensor]]]:
    from transformers import CLIPConfig, CLIPModel, CLIPVisionModel

    from rankone.workspace import Workspace

    metadata, groups = reference()
    root = tmp_path_factory.mktemp("data-free")
    config = CLIPConfig(**json.loads(metadata["config"]))
    torch.manual_seed(0)
    base = CLIPModel(config).eval()
    base.vision_model.load_state_dict(vision_keys(groups["base"]))
    base.save_pretrained(root / "base")
    arguments = ["fetch", "--base", root / "base", "-w", root / "work"]
    for task in json.loads(metadata["tasks"]):
        expert = CLIPVisionModel(config.vision_config).eval()
        getattr(expert, "vision_model", expert).load_state_dict(vision_keys(groups[f"expert/{task}"]))
        expert.save_pretrained(root / task)
        arguments += ["--expert", f"{task}={root / task}"]
    for command in (arguments, ["task-vectors", "-w", root / "work"]):
        code, _, err = run_cli(*command)
        assert code == 0, err
    workspace = Workspace(root / "work")
    merged = {}
    for method in (*METHODS, "emr"):
        code, _, err = run_cli("merge", "--method", method, "-w", root / "work")
        assert code == 0, err
        merged[method] = workspace.load_tensors(f"merged/{method}.safetensors")
    merged["workspace"] = workspace
    return metadata, groups, merged


def assert_same_update(ours: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], base: dict[str, torch.Tensor], what: str) -> None:
    """Compared as updates (merged − θ0), to 1e-5 of the update's largest entry: what the method computes; plus two
    float32 steps of θ0's largest entry, the rounding of θ0 + update itself (EMR reads its update back from the stored
    θ0 + τ_uni, which costs one such step on the LayerNorm weights near 1)."""
    assert set(expected) <= set(ours)
    for key, tensor in expected.items():
        update, our_update = tensor - base[key], ours[key] - base[key]
        scale = update.abs().max().item()
        rounding = 2 * torch.finfo(torch.float32).eps * base[key].abs().max().item()
        error = (our_update - update).abs().max().item()
        assert error <= 1e-5 * max(scale, 1e-12) + rounding, f"{what} {key}: max error {error:.3g} against an update of {scale:.3g}"


@pytest.mark.parametrize("method", METHODS)
def test_merge_matches_fusionbench(merged_by_rankone, method):
    _, groups, merged = merged_by_rankone
    base = convert_state_dict(vision_keys(groups["base"]))
    ours = merged[method]
    assert_same_update(ours, convert_state_dict(vision_keys(groups[method])), base, method)
    # The tensor FusionBench's CLIPVisionModel lacks (the projection) is not changed by experts that leave it as it was.
    assert torch.equal(ours["visual.proj"], base.get("visual.proj", ours["visual.proj"]))


def test_emr_gives_each_task_fusionbench_s_tower_and_evaluates_with_it(merged_by_rankone):
    from rankone.methods import load_method
    from rankone.methods.emr import task_tower

    metadata, groups, merged = merged_by_rankone
    workspace = merged["workspace"]
    base = convert_state_dict(vision_keys(groups["base"]))
    ours_base = {key: value for key, value in workspace.load_tensors("base.safetensors").items() if key.startswith("visual.")}
    for index, task in enumerate(json.loads(metadata["tasks"])):
        tower = task_tower(merged["emr"], ours_base, index)
        assert_same_update(tower, convert_state_dict(vision_keys(groups[f"emr/{task}"])), base, f"emr {task}")
    # Evaluation builds each task's own tower; the count is θ0, τ_uni, the masks at a bit an entry and the rescalers.
    model = load_method(workspace, "emr")
    size = sum(value.numel() for value in ours_base.values())
    tasks = len(json.loads(metadata["tasks"]))
    assert model.parameters == 2 * size + -(-tasks * size // 32) + tasks
    assert model.encoder_for_task("alpha") is not model.encoder_for_task("beta")


def test_the_merges_differ_from_task_arithmetic(merged_by_rankone):
    _, groups, merged = merged_by_rankone
    key = "visual.transformer.resblocks.0.mlp.c_fc.weight"
    assert not torch.allclose(merged["iso-c"][key], merged["tsv-merge"][key])
    assert not torch.allclose(merged["iso-c"][key], merged["iso-cts"][key])


def test_packed_attention_is_three_matrices_and_sizes_follow_the_reference_rounding():
    packed = torch.arange(12.0).reshape(6, 2)
    assert [block.tolist() for block in weight_matrices("visual.transformer.resblocks.0.attn.in_proj_weight", packed)] == \
        [packed[:2].tolist(), packed[2:4].tolist(), packed[4:].tolist()]
    assert weight_matrices("visual.conv1.weight", torch.zeros(2, 3, 4, 4)) is None
    # r = 32, T = 3, fraction 0.8: int(25.6) = 25 common, round(7/3)·3 = 6 task directions, so 26 common and 2 per task.
    assert subspace_sizes(32, 3, 0.8) == (26, 2)
    # One task: TSV-Merge keeps its whole spectrum, so it gives the task vector back.
    matrix = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(decorrelated_singular_vectors([matrix]), matrix, atol=1e-5, rtol=0)


def test_wudi_leaves_out_a_task_that_did_not_change_the_matrix():
    generator = torch.Generator().manual_seed(1)
    first, second = torch.randn(4, 3, generator=generator), torch.randn(4, 3, generator=generator)
    pair = least_interference([first, second], steps=20, lr=1e-3)
    assert torch.equal(least_interference([torch.zeros(4, 3), first, second], steps=20, lr=1e-3), pair)
    assert torch.equal(least_interference([torch.zeros(4, 3)] * 2, steps=20, lr=1e-3), torch.zeros(4, 3))
    assert not torch.allclose(pair, first + second)  # the steps moved it away from the sum


def test_emr_is_compared_with_the_task_and_not_exported(merged_by_rankone, tmp_path):
    from conftest import write_image_folder

    workspace = merged_by_rankone[2]["workspace"]
    labeled = write_image_folder(tmp_path / "labeled")
    code, _, err = run_cli("compare", "-w", workspace.root, "--data", labeled, "--methods", "emr,individual,iso-c")
    assert code == 0, err
    rows = {row["method"]: row for row in workspace.read_json("compare.json")["rows"]}
    assert rows["emr"]["needs_task"] and rows["individual"]["needs_task"] and not rows["iso-c"]["needs_task"]
    assert "| emr † |" in workspace.path("compare.md").read_text()
    code, _, _ = run_cli("export", "-w", workspace.root, "--method", "emr", "--out", tmp_path / "out")
    assert code == 2 and not (tmp_path / "out").exists()
