"""`rankone compare`: the rows it finds, the files it writes, and nothing written on error."""

from __future__ import annotations

import json

import pytest

from rankone.compare import tower_parameters
from rankone.methods import available_methods
from rankone.models import count_parameters, visual_state
from rankone.workspace import read_tensors_metadata
from conftest import snapshot

EXPECTED_ROWS = ["pretrained", "individual", "task-arithmetic", "adamerging", "wemoe", "rankone"]


def test_available_methods_follow_the_inputs(tiny_workspace, base_state):
    assert available_methods(tiny_workspace) == ["pretrained", "individual"]
    assert tower_parameters(tiny_workspace) == count_parameters(visual_state(base_state))


def test_compare_writes_table_json_and_the_reports_eval_writes(every_stage_workspace, labeled_data, rankone_cli):
    workspace = every_stage_workspace
    code, out, err = rankone_cli("compare", "-w", workspace.root, "--data", labeled_data, "--device", "cpu")
    assert code == 0, err
    summary = json.loads(workspace.path("compare.json").read_text())
    assert [row["method"] for row in summary["rows"]] == EXPECTED_ROWS
    assert summary["tasks"] == ["alpha", "beta", "gamma"]
    tower = summary["tower_parameters"]
    rows = {row["method"]: row for row in summary["rows"]}
    assert rows["pretrained"]["parameters"] == tower and rows["individual"]["parameters"] == 3 * tower
    assert rows["wemoe"]["parameters"] > rows["rankone"]["parameters"] > tower

    # Normalized accuracy: each task's accuracy over its own expert's, in this same comparison.
    expert = rows["individual"]["accuracy"]
    for row in summary["rows"]:
        expected = {task: 100.0 * row["accuracy"][task] / expert[task] for task in summary["tasks"]}
        assert row["normalized"] == pytest.approx(expected)
        assert row["normalized_average"] == pytest.approx(sum(expected.values()) / len(expected))
    assert rows["individual"]["normalized_average"] == pytest.approx(100.0)
    # Each row carries the options its output recorded.
    merged_record = json.loads(read_tensors_metadata(workspace.path("merged/task-arithmetic.safetensors"))["rankone"])
    assert rows["task-arithmetic"]["options"]["lambda"] == merged_record["lambda"] and rows["pretrained"]["options"] == {}

    markdown = workspace.path("compare.md").read_text()
    assert "| Method | alpha | beta | gamma | Avg. | Norm. | Params |" in markdown
    assert [row["method"] for row in summary["rows"] if row["needs_task"]] == ["individual"]
    assert "†: needs the task at inference" in markdown
    for row in summary["rows"]:
        cells = " | ".join(f"{row['accuracy'][task]:.1f}" for task in summary["tasks"])
        assert (f"| {row['method']}{' †' if row['needs_task'] else ''} | {cells} | {row['average']:.1f} | {row['normalized_average']:.1f} | "
                f"{row['parameters'] / tower:.2f}× |") in markdown

    # FusionBench's report layout, one per method, with every task.
    fusionbench = json.loads(workspace.path("compare.fusionbench.json").read_text())
    assert set(fusionbench) == set(EXPECTED_ROWS)
    for method, layout in fusionbench.items():
        report = json.loads(workspace.path(f"eval/{method}.json").read_text())
        assert set(layout) == {"model_info", "average", *summary["tasks"]}
        assert layout["model_info"]["all_params"] == report["parameters"] and layout["model_info"]["name"] == method
        for task in summary["tasks"]:
            assert layout[task] == {"accuracy": pytest.approx(report["tasks"][task]["accuracy"] / 100), "loss": report["tasks"][task]["loss"]}
        assert layout["average"]["accuracy"] == pytest.approx(report["average"] / 100)
    assert "| individual † |" in markdown and "3.00× |" in markdown
    for method in EXPECTED_ROWS:
        assert method in out
        report = json.loads(workspace.path(f"eval/{method}.json").read_text())
        assert report["tasks"].keys() == {"alpha", "beta", "gamma"}
        assert report["average"] == rows[method]["average"]
        assert workspace.require(f"eval/{method}.json")  # recorded in the manifest

    # `rankone eval` must write the very same bytes for every method compare ran.
    written = {method: workspace.path(f"eval/{method}.json").read_bytes() for method in EXPECTED_ROWS}
    for method in EXPECTED_ROWS:
        code, _, err = rankone_cli("eval", "-w", workspace.root, "--method", method, "--data", labeled_data, "--device", "cpu")
        assert code == 0, err
        assert workspace.path(f"eval/{method}.json").read_bytes() == written[method], method


def test_compare_subset_of_methods_and_tasks(every_stage_workspace, labeled_data, rankone_cli):
    workspace = every_stage_workspace
    code, out, err = rankone_cli("compare", "-w", workspace.root, "--data", labeled_data, "--device", "cpu",
                                 "--methods", "rankone,pretrained", "--tasks", "beta", "alpha")
    assert code == 0, err
    summary = json.loads(workspace.path("compare.json").read_text())
    assert [row["method"] for row in summary["rows"]] == ["pretrained", "rankone"]
    assert summary["tasks"] == ["beta", "alpha"]
    assert not workspace.path("eval/wemoe.json").exists()


def test_errors_leave_the_workspace_unchanged(every_stage_workspace, labeled_data, rankone_cli):
    workspace = every_stage_workspace
    before = snapshot(workspace)
    code, _, err = rankone_cli("compare", "-w", workspace.root, "--data", labeled_data, "--methods", "ties")
    assert code == 2 and "--methods: 'ties' cannot run in this workspace" in err
    code, _, err = rankone_cli("compare", "-w", workspace.root, "--data", labeled_data / "missing")
    assert code == 2 and "missing" in err and len(err.strip().splitlines()) == 1
    code, _, err = rankone_cli("compare", "-w", workspace.root, "--data", labeled_data, "--tasks", "delta")
    assert code == 2 and "delta" in err
    assert snapshot(workspace) == before

    # A method failing late (its file changed after it was written) must not leave the earlier reports behind.
    wemoe_file = workspace.path("adapted/wemoe.safetensors")
    data = bytearray(wemoe_file.read_bytes())
    data[-1] ^= 0xFF
    wemoe_file.write_bytes(bytes(data))
    before = snapshot(workspace)
    code, _, err = rankone_cli("compare", "-w", workspace.root, "--data", labeled_data, "--device", "cpu")
    assert code == 2 and "wemoe.safetensors: does not match the workspace manifest" in err
    assert snapshot(workspace) == before
    assert not workspace.path("compare.json").exists() and not workspace.path("eval").exists()


def test_a_late_failure_leaves_no_heads_behind(tiny_workspace, labeled_data, rankone_cli):
    from rankone.methods import merge_workspace
    from rankone.task_vectors import compute_task_vectors

    compute_task_vectors(tiny_workspace)
    merge_workspace(tiny_workspace, "task-arithmetic")
    merged = tiny_workspace.path("merged/task-arithmetic.safetensors")
    merged.write_bytes(merged.read_bytes()[:-4] + b"\x00\x00\x80\x7f")
    before = snapshot(tiny_workspace)
    code, _, err = rankone_cli("compare", "-w", tiny_workspace.root, "--data", labeled_data, "--device", "cpu")
    assert code == 2 and "task-arithmetic.safetensors: does not match" in err
    assert snapshot(tiny_workspace) == before  # the heads built for pretrained and individual were not committed
    assert not tiny_workspace.path("heads").exists()


def test_half_precision_is_recorded(every_stage_workspace, labeled_data, rankone_cli):
    code, _, err = rankone_cli("compare", "-w", every_stage_workspace.root, "--data", labeled_data, "--device", "cpu",
                               "--methods", "wemoe,adamerging", "--dtype", "bf16")
    assert code == 0, err
    summary = json.loads(every_stage_workspace.path("compare.json").read_text())
    assert summary["dtype"] == "bf16"
    assert json.loads(every_stage_workspace.path("eval/wemoe.json").read_text())["dtype"] == "bf16"


def test_compare_runs_the_reference_methods_eval_runs(every_stage_workspace, tiny_workspace, labeled_data, rankone_cli):
    workspace = every_stage_workspace
    code, _, err = rankone_cli("eval", "-w", workspace.root, "--data", labeled_data, "--method", "perfect-router")
    assert code == 0, err
    alone = workspace.read_json("eval/perfect-router.json")
    code, _, err = rankone_cli("compare", "-w", workspace.root, "--data", labeled_data, "--methods", "perfect-router,task-arithmetic")
    assert code == 0, err
    summary = json.loads(workspace.path("compare.json").read_text())
    assert [row["method"] for row in summary["rows"]] == ["task-arithmetic", "perfect-router"]
    assert workspace.read_json("eval/perfect-router.json")["tasks"] == alone["tasks"]
    # Where it cannot run, it says what it needs and which command writes it.
    code, _, err = rankone_cli("compare", "-w", tiny_workspace.root, "--data", labeled_data, "--methods", "perfect-router")
    assert code == 2 and err.count("\n") == 1
    assert "'perfect-router' cannot run in this workspace: it needs pool.safetensors, which is missing (run `rankone build-pool`" in err
