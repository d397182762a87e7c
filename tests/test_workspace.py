import json
import os
import time

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


def test_a_settled_file_is_known_by_inode_and_time_and_any_write_after_its_commit_is_caught(tmp_path):
    workspace = Workspace(tmp_path / "w")
    with workspace.transaction({"tasks": ["a"], "architecture": {}}, create=True) as staging:
        staging.save_tensors("settled.safetensors", {"x": torch.arange(4.0)})
        time.sleep(0.1)  # older than SETTLED_NS when the commit hashes it
        staging.save_tensors("fresh.safetensors", {"x": torch.arange(4.0)})
    files = workspace.manifest()["files"]
    settled, fresh = workspace.path("settled.safetensors"), workspace.path("fresh.safetensors")
    assert (files["settled.safetensors"]["inode"], files["settled.safetensors"]["mtime_ns"]) == (settled.stat().st_ino, settled.stat().st_mtime_ns)
    assert "mtime_ns" not in files["fresh.safetensors"]  # written too recently for its time to tell it apart
    for path in (settled, fresh):
        path.write_bytes(path.read_bytes().replace(b"\x00\x00\x80\x3f", b"\x00\x00\x00\x40"))  # 1.0 → 2.0, same size
        with pytest.raises(RankoneError, match="does not match the workspace manifest"):
            workspace.require(path.name)
    # The settled entry is trusted on inode and time alone, as git trusts its index: put the
    # time back and the changed bytes go unnoticed, while the fresh one is hashed again.
    os.utime(settled, ns=(files["settled.safetensors"]["mtime_ns"],) * 2)
    assert workspace.require("settled.safetensors") == settled
    os.utime(fresh, ns=(fresh.stat().st_mtime_ns - 10**9,) * 2)
    with pytest.raises(RankoneError, match="does not match the workspace manifest"):
        workspace.require("fresh.safetensors")


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
