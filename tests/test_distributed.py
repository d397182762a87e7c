"""Several processes (torchrun, gloo on the CPU): the same routers, the same reports, one line when a rank dies.

Each two-process run is a real `python -m torch.distributed.run --standalone --nproc-per-node 2
-m rankone ...`; the one-process references run in this process with one thread, as torchrun's
workers do, so that even the float sums of the reports agree exactly.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TASKS, make_base_state, make_expert_state, run_cli, snapshot, write_image_folder, write_workspace
from rankone import distributed
from rankone.errors import RankoneError
from rankone.methods.rankone import PoolOptions, build_pool_stage
from rankone.pipeline import STAGES, Context, load_pipeline, run_stage, stage_options
from rankone.task_vectors import compute_task_vectors
from rankone.workspace import Workspace

LAUNCH_SECONDS = 240


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A folder with work/ (task vectors, a k=2 pool), labeled/ and unlabeled/; copy work/ before changing it."""
    root = tmp_path_factory.mktemp("distributed")
    base = make_base_state(0)
    workspace = write_workspace(root / "work", base, {task: make_expert_state(base, seed=index + 1) for index, task in enumerate(TASKS)})
    write_image_folder(root / "labeled", per_class=4, seed=0, labeled=True)
    write_image_folder(root / "unlabeled", per_class=4, seed=1, labeled=False)
    compute_task_vectors(workspace)
    build_pool_stage(workspace, PoolOptions(k=2))
    return root


def copy_of(prepared: Path, tmp_path: Path, name: str) -> Workspace:
    shutil.copytree(prepared / "work", tmp_path / name)
    return Workspace(tmp_path / name)


def launch(*arguments, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node 2 -m rankone ARGUMENTS` (one thread per process, as torchrun sets)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "rankone", *map(str, arguments)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=LAUNCH_SECONDS)


@contextlib.contextmanager
def one_thread():
    """Run the one-process reference with the one thread each torchrun worker has (the same float reductions)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def cli(*arguments) -> None:
    code, _, err = run_cli(*arguments)
    assert code == 0, err


def assert_close_tensors(first: Workspace, second: Workspace, relpath: str, tolerance: float = 1e-5) -> None:
    expected, found = first.load_tensors(relpath), second.load_tensors(relpath)
    assert expected.keys() == found.keys() and expected
    for name in expected:
        assert torch.allclose(expected[name], found[name], rtol=0, atol=tolerance), f"{relpath}: {name}"


def test_two_processes_train_the_routers_one_process_trains(prepared, tmp_path):
    one, two = copy_of(prepared, tmp_path, "one"), copy_of(prepared, tmp_path, "two")
    common = ["--data", prepared / "unlabeled", "--classnames-from", prepared / "labeled", "--steps", "4", "--batch-size", "5",
              "--lr", "0.01", "--save-every", "2", "--device", "cpu"]
    cli("adapt", "-w", one.root, *common)
    done = launch("adapt", "-w", two.root, *common)
    assert done.returncode == 0, done.stderr
    assert_close_tensors(one, two, "adapted/rankone.safetensors")
    # Rank 0 alone wrote the checkpoints, and they hold what one process saved.
    assert_close_tensors(one, two, "adapted/rankone-checkpoints/step-2.safetensors")
    expected, found = one.read_json("adapted/rankone-curve.json"), two.read_json("adapted/rankone-curve.json")
    assert found["losses"] == pytest.approx(expected["losses"], abs=1e-5)
    assert all(found["task_losses"][task] == pytest.approx(expected["task_losses"][task], abs=1e-5) for task in TASKS)
    # One summary on stdout (rank 0's), not two.
    assert done.stdout.count("wrote ") == 1 and "adapted/rankone.safetensors" in done.stdout


def test_adamerging_resumed_on_two_processes_equals_an_uninterrupted_run(prepared, tmp_path):
    whole, resumed = copy_of(prepared, tmp_path, "whole"), copy_of(prepared, tmp_path, "resumed")
    common = ["--method", "adamerging", "--data", prepared / "unlabeled", "--classnames-from", prepared / "labeled",
              "--batch-size", "4", "--lr", "0.01", "--save-every", "2", "--device", "cpu"]
    cli("adapt", "-w", whole.root, *common, "--steps", "4")
    cli("adapt", "-w", resumed.root, *common, "--steps", "2")
    done = launch("adapt", "-w", resumed.root, *common, "--steps", "4", "--resume")
    assert done.returncode == 0, done.stderr
    assert_close_tensors(whole, resumed, "adapted/adamerging.safetensors")
    assert resumed.read_json("adapted/adamerging-curve.json")["losses"] == pytest.approx(
        whole.read_json("adapted/adamerging-curve.json")["losses"], abs=1e-5)


def test_eval_on_two_processes_writes_the_one_process_report_exactly(prepared, tmp_path):
    one, two = copy_of(prepared, tmp_path, "one"), copy_of(prepared, tmp_path, "two")
    cli("adapt", "-w", one.root, "--router", "subspace", "--classnames-from", prepared / "labeled", "--device", "cpu")
    shutil.rmtree(two.root)
    shutil.copytree(one.root, two.root)
    # Batches of 5 over 8 and 12 images: uneven shares, a short last batch; --routing gathers the gates too.
    arguments = ["eval", "--method", "rankone", "--data", prepared / "labeled", "--batch-size", "5", "--routing", "--device", "cpu"]
    with one_thread():
        cli(*arguments, "-w", one.root)
    done = launch(*arguments, "-w", two.root)
    assert done.returncode == 0, done.stderr
    assert two.read_json("eval/rankone.json") == one.read_json("eval/rankone.json")


def test_compare_stage_with_nproc_in_a_pipeline_file(prepared, tmp_path, rankone_cli):
    one, two = copy_of(prepared, tmp_path, "one"), copy_of(prepared, tmp_path, "two")
    compare = ["compare", "--methods", "pretrained,task-arithmetic", "--data", prepared / "labeled", "--batch-size", "3", "--device", "cpu"]
    cli("merge", "-w", one.root, "--method", "task-arithmetic")
    with one_thread():
        cli(*compare, "-w", one.root)
    file = tmp_path / "pipeline.yaml"
    stage = f"{{methods: [pretrained, task-arithmetic], data: {prepared / 'labeled'}, batch_size: 3, nproc: NPROC}}"
    for nproc in (2, 1):
        file.write_text(f"workspace: {two.root}\ndevice: cpu\nstages:\n  - merge: {{method: task-arithmetic}}\n"
                        f"  - compare: {stage.replace('NPROC', str(nproc))}\n")
        code, out, err = rankone_cli("run", file)
        assert code == 0, err
        if nproc == 2:
            assert "$ torchrun --standalone --nproc-per-node 2 -m rankone compare" in out
            assert two.read_json("compare.json") == one.read_json("compare.json")
            for method in ("pretrained", "task-arithmetic"):
                assert two.read_json(f"eval/{method}.json") == one.read_json(f"eval/{method}.json")
        else:
            # nproc is how a stage runs, not an option: the record still matches.
            assert "skip rankone compare" in out and "up to date" in out


def test_a_killed_rank_stops_the_run_with_one_line_and_leaves_the_workspace_unchanged(prepared, tmp_path):
    workspace = copy_of(prepared, tmp_path, "work")
    common = ["adapt", "-w", workspace.root, "--data", prepared / "unlabeled", "--classnames-from", prepared / "labeled",
              "--batch-size", "4", "--device", "cpu"]
    cli(*common, "--steps", "1")  # heads cached and a first result: a rerun that fails must keep both as they are
    before = snapshot(workspace)
    done = launch(*common, "--steps", "3", "--save-every", "2", env={"RANKONE_TEST_KILL_AT": "rank1-step-1"})
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert lines == ["error: rank 1 of 2 failed: its process ended without an error (killed, or out of memory?)"], done.stderr
    assert snapshot(workspace) == before


def test_stages_that_do_not_split_refuse_several_processes(prepared, tmp_path, monkeypatch):
    workspace = copy_of(prepared, tmp_path, "work")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    merge = STAGES["merge"]
    options, method_options = stage_options(merge, {"method": "task-arithmetic"})
    before = snapshot(workspace)
    with pytest.raises(RankoneError, match=r"rankone merge: runs in one process; launch it without torchrun"):
        run_stage(merge, workspace, options, method_options, None)
    adapt = STAGES["adapt"]
    options, method_options = stage_options(adapt, {"method": "rankone", "data": prepared / "unlabeled", "routing": "per-batch"})
    with pytest.raises(RankoneError, match=r"--routing per-batch: the gate mixes the images of a batch"):
        run_stage(adapt, workspace, options, method_options, Context())
    options, method_options = stage_options(adapt, {"method": "regmean", "data": prepared / "unlabeled"})
    with pytest.raises(RankoneError, match=r"--method regmean: runs in one process; .*\(several processes train [a-z, ]*rankone"):
        run_stage(adapt, workspace, options, method_options, Context())
    assert snapshot(workspace) == before
    assert distributed.world() == distributed.World(rank=1, size=2, local_rank=0)
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(RankoneError, match=r"\$RANK=2, \$WORLD_SIZE=2: not a rank of the run"):
        distributed.world()


def test_pipeline_nproc_is_checked_where_it_is_written(tmp_path):
    file = tmp_path / "pipeline.yaml"
    for stage, message in (("merge: {method: ties, nproc: 2}", "merge runs in one process; only adapt, eval, compare take nproc"),
                           ("eval: {method: ties, nproc: 0}", "0: expected a whole number of processes, at least 1")):
        file.write_text(f"workspace: {tmp_path / 'work'}\nbase: hf:a/b\nexperts: {{x: hf:a/c}}\nstages:\n  - task-vectors\n  - {stage}\n")
        with pytest.raises(RankoneError, match=rf"pipeline.yaml:6: stages\[1\]\.\w+\.nproc: {message}"):
            load_pipeline(file)


def test_the_round_robin_deal_and_its_inverse(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    shares = []
    for rank in range(3):
        monkeypatch.setenv("RANK", str(rank))
        shares.append([f"batch {position}" for position in distributed.own_positions(8)])
    assert shares[0] == ["batch 0", "batch 3", "batch 6"] and shares[2] == ["batch 2", "batch 5"]
    assert distributed.interleave(shares) == [f"batch {position}" for position in range(8)]
