"""`--data` with several roots (a task is looked up in each, in order) and TASK=DIR pairs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import TASKS
from rankone.data import DataFolders, labeled_images
from rankone.errors import RankoneError


def split_roots(data: Path, tmp_path: Path, name: str) -> tuple[Path, Path]:
    """The first task's folder under one root, the others under a second: what a user combining two splits has."""
    first, second = tmp_path / f"{name}-a", tmp_path / f"{name}-b"
    shutil.copytree(data / TASKS[0], first / TASKS[0])
    for task in TASKS[1:]:
        shutil.copytree(data / task, second / task)
    return first, second


def test_parsing_keeps_folders_pairs_and_a_folder_whose_name_holds_an_equals_sign(tmp_path):
    odd = tmp_path / "a=b"
    odd.mkdir()
    folders = DataFolders.from_option(["one", str(odd), "cars=/data/cars-test"])
    assert folders.roots == (Path("one"), odd) and folders.pairs == (("cars", Path("/data/cars-test")),)
    assert folders.plain() == ["one", str(odd), "cars=/data/cars-test"]
    assert DataFolders.from_option("one").plain() == "one"  # one root records as it always did
    assert DataFolders.from_option({"cars": "/x"}) == DataFolders.from_option(["cars=/x"])  # YAML mapping
    with pytest.raises(RankoneError, match="task 'cars' given twice"):
        DataFolders.from_option(["cars=/x", "cars=/y"])
    with pytest.raises(RankoneError, match=r"--data 'cars=': expected TASK=DIR"):
        DataFolders.from_option(["cars="])


def test_a_task_is_taken_from_its_pair_then_the_first_root_that_has_it(labeled_data, tmp_path):
    first, second = split_roots(labeled_data, tmp_path, "labeled")
    shutil.copytree(labeled_data / TASKS[1], first / TASKS[1])  # in both roots: the first wins
    folders = DataFolders((first, second), ((TASKS[2], labeled_data / TASKS[2]),))
    assert folders.find(TASKS[0]) == first / TASKS[0]
    assert folders.find(TASKS[1]) == first / TASKS[1]
    assert folders.find(TASKS[2]) == labeled_data / TASKS[2]
    assert folders.find("delta") is None
    assert labeled_images(folders, TASKS[2]).paths == labeled_images(labeled_data, TASKS[2]).paths
    with pytest.raises(RankoneError, match=rf"{first / 'delta'} or {second / 'delta'}: no folder for task 'delta'"):
        labeled_images(folders, "delta")


def test_eval_and_compare_over_two_roots_or_a_pair_match_one_combined_folder(every_stage_workspace, labeled_data, tmp_path, rankone_cli):
    work = every_stage_workspace
    code, _, err = rankone_cli("eval", "-w", work.root, "--method", "rankone", "--data", labeled_data)
    assert code == 0, err
    combined = work.read_json("eval/rankone.json")
    first, second = split_roots(labeled_data, tmp_path, "test")
    for data in (["--data", first, "--data", second],
                 ["--data", second, "--data", f"{TASKS[0]}={first / TASKS[0]}"]):
        code, out, err = rankone_cli("eval", "-w", work.root, "--method", "rankone", *data, "--json")
        assert code == 0, err
        assert json.loads(out)["tasks"] == combined["tasks"]
    code, _, err = rankone_cli("compare", "-w", work.root, "--methods", "rankone", "--data", first, "--data", second)
    assert code == 0, err
    assert work.read_json("eval/rankone.json")["tasks"] == combined["tasks"]


def test_adapt_over_two_roots_trains_what_one_folder_trains(every_stage_workspace, unlabeled_data, labeled_data,
                                                                             tmp_path, rankone_cli):
    work = every_stage_workspace
    arguments = ["adapt", "-w", work.root, "--steps", "2", "--batch-size", "2", "--seed", "5"]
    code, _, err = rankone_cli(*arguments, "--data", unlabeled_data, "--classnames-from", labeled_data)
    assert code == 0, err
    one_folder = load_file(work.path("adapted/rankone.safetensors"))
    first, second = split_roots(unlabeled_data, tmp_path, "unlabeled")
    class_first, class_second = split_roots(labeled_data, tmp_path, "classes")
    code, _, err = rankone_cli(*arguments, "--data", first, "--data", second, "--classnames-from", class_first,
                               "--classnames-from", class_second)
    assert code == 0, err
    two_roots = load_file(work.path("adapted/rankone.safetensors"))
    assert one_folder.keys() == two_roots.keys()
    assert all((one_folder[name] == two_roots[name]).all() for name in one_folder)


def test_a_pipeline_file_takes_a_list_or_a_mapping(every_stage_workspace, labeled_data, tmp_path, rankone_cli):
    work = every_stage_workspace
    first, second = split_roots(labeled_data, tmp_path, "yaml")
    as_list = f"[{first}, {second}]"
    as_mapping = "{" + ", ".join(f"{task}: {root / task}" for task, root in zip(TASKS, (first, second, second))) + "}"
    for data, recorded in ((as_list, [str(first), str(second)]),
                           (as_mapping, [f"{task}={root / task}" for task, root in zip(TASKS, (first, second, second))])):
        file = tmp_path / "eval.yaml"
        file.write_text(f"workspace: {work.root}\ndevice: cpu\nstages:\n  - eval: {{method: rankone, data: {data}}}\n")
        code, out, err = rankone_cli("run", file)
        assert code == 0, err
        # Printed as the command that runs it by hand: one --data per folder or pair.
        assert "$ rankone eval --method rankone " + " ".join(f"--data {item}" for item in recorded) in out
        assert json.loads(work.path("manifest.json").read_text())["pipeline"]["stages"][0]["options"]["data"] == recorded


def test_bad_data_folders_are_one_line_naming_the_folder(every_stage_workspace, labeled_data, tmp_path, rankone_cli):
    work = every_stage_workspace
    first, second = split_roots(labeled_data, tmp_path, "bad")
    code, _, err = rankone_cli("eval", "-w", work.root, "--method", "rankone", "--data", first, "--data", tmp_path / "nowhere")
    assert code == 2 and err.count("\n") == 1 and f"--data {tmp_path / 'nowhere'}: no such folder" in err
    code, _, err = rankone_cli("eval", "-w", work.root, "--method", "rankone", "--data", first)
    assert code == 2 and err.count("\n") == 1 and f"{first / TASKS[1]}: no folder for task {TASKS[1]!r}" in err
    code, _, err = rankone_cli("adapt", "-w", work.root, "--data", first, "--classnames-from", labeled_data)
    assert code == 2 and err.count("\n") == 1 and f"no images for task {TASKS[1]} (expected {first / TASKS[1]}/)" in err
