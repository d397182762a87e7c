import json

import pytest
import torch

from rankone.errors import RankoneError
from rankone.workspace import Workspace, sha256_file
from conftest import snapshot


def test_transaction_records_hashes_and_files_load_back(tmp_path):
    workspace = Workspace(tmp_path / "w")
    with workspace.transaction({"tasks": ["a"], "architecture": {}}, create=True) as staging:
        staging.save_tensors("experts/a.safetensors", {"x": torch.arange(3.0)})
    manifest = json.loads((tmp_path / "w" / "manifest.json").read_text())
    assert manifest["files"]["experts/a.safetensors"]["sha256"] == sha256_file(tmp_path / "w" / "experts/a.safetensors")
    assert torch.equal(workspace.load_tensors("experts/a.safetensors")["x"], torch.arange(3.0))


def test_failed_stage_leaves_workspace_untouched(tmp_path):
    workspace = Workspace(tmp_path / "w")
    with workspace.transaction({"tasks": [], "architecture": {}}, create=True) as staging:
        staging.save_tensors("a.safetensors", {"x": torch.zeros(2)})
    before = snapshot(tmp_path / "w")
    with pytest.raises(RuntimeError):
        with workspace.transaction() as staging:
            staging.save_tensors("a.safetensors", {"x": torch.ones(2)})
            staging.save_tensors("b.safetensors", {"x": torch.ones(2)})
            raise RuntimeError("stage failed")
    assert snapshot(tmp_path / "w") == before


def test_failed_first_stage_leaves_no_folder(tmp_path):
    with pytest.raises(RuntimeError):
        with Workspace(tmp_path / "new").transaction({}, create=True):
            raise RuntimeError("boom")
    assert not (tmp_path / "new").exists()


def test_changed_file_is_refused_with_the_command_to_rerun(tiny_workspace):
    path = tiny_workspace.path("experts/alpha.safetensors")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(RankoneError, match=r"experts/alpha.safetensors: does not match .*rankone fetch"):
        tiny_workspace.require("experts/alpha.safetensors")


def test_missing_input_names_the_command_to_run_first(tiny_workspace):
    with pytest.raises(RankoneError, match=r"pool.safetensors: missing; run `rankone build-pool` first"):
        tiny_workspace.require("pool.safetensors")
