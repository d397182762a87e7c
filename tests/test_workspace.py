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


def test_written_files_follow_the_umask(tmp_path):
    """mkstemp and mkdtemp make 0600 files and 0700 folders; what a stage or export writes must read like any file the user writes."""
    import os
    import stat

    from rankone.workspace import staging_folder

    previous = os.umask(0o022)
    try:
        workspace = Workspace(tmp_path / "w")
        with workspace.transaction({"tasks": [], "architecture": {}}, create=True) as staging:
            staging.save_tensors("experts/a.safetensors", {"x": torch.arange(3.0)})
            staging.write_json("eval/a.json", {"average": 1.0})
        modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in (tmp_path / "w").rglob("*") if path.is_file()}
        assert modes == {"a.safetensors": 0o644, "a.json": 0o644, "manifest.json": 0o644, ".lock": 0o644}
        assert stat.S_IMODE(staging_folder(tmp_path, "export").stat().st_mode) == 0o755
    finally:
        os.umask(previous)
