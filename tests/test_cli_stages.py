"""task-vectors → merge → eval through the real CLI entry point, as a user runs them."""

from __future__ import annotations

import json
import sys

import pytest
from safetensors import safe_open

from rankone.cli import main
from conftest import snapshot


def run(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """`rankone ARGS` in process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["rankone", *args])
    code = 0
    try:
        main()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_stage_by_stage(tiny_workspace, labeled_data, monkeypatch, capsys):
    work = str(tiny_workspace.root)
    data = str(labeled_data)

    # A stage run before its inputs exist names the command to run first and changes nothing.
    before = snapshot(tiny_workspace.root)
    code, out, err = run(monkeypatch, capsys, "merge", "-w", work, "--method", "ties")
    assert code == 2
    assert "run `rankone task-vectors` first" in err and len(err.strip().splitlines()[-1]) > 0
    assert snapshot(tiny_workspace.root) == before

    code, out, err = run(monkeypatch, capsys, "task-vectors", "-w", work, "--device", "cpu")
    assert code == 0, err
    assert "attention" in out and "MLP" in out
    for task in ("alpha", "beta", "gamma"):
        assert tiny_workspace.require(f"task_vectors/{task}.safetensors")
    assert len(tiny_workspace.read_json("task_vectors/analysis.json")["blocks"]) == 2

    code, out, err = run(monkeypatch, capsys, "merge", "-w", work, "--method", "ties", "--top", "0.3", "--lambda", "0.5")
    assert code == 0, err
    path = tiny_workspace.require("merged/ties.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        assert json.loads(handle.metadata()["rankone"])["top"] == 0.3
        assert all(key.startswith("visual.") for key in handle.keys())

    before = snapshot(tiny_workspace.root)
    code, out, err = run(monkeypatch, capsys, "merge", "-w", work, "--method", "task-arithmetic", "--top", "0.3")
    assert (code, err.count("\n")) == (2, 1) and "--top: not used by --method task-arithmetic" in err
    code, out, err = run(monkeypatch, capsys, "eval", "-w", work, "--method", "dare", "--data", data)
    assert code == 2 and "run `rankone merge --method dare` first" in err
    code, out, err = run(monkeypatch, capsys, "eval", "-w", work, "--method", "ties", "--data", data, "--tasks", "delta")
    assert code == 2 and "unknown task 'delta'; the workspace has alpha, beta, gamma" in err
    assert snapshot(tiny_workspace.root) == before

    code, out, err = run(monkeypatch, capsys, "eval", "-w", work, "--method", "ties", "--tasks", "alpha", "beta", "--data", data, "--batch-size", "5")
    assert code == 0, err
    report = tiny_workspace.read_json("eval/ties.json")
    assert report["method"] == "ties" and list(report["tasks"]) == ["alpha", "beta"]
    assert report["tasks"]["beta"]["n"] == 12
    assert f"{report['average']:.2f}" in out
    assert any(relpath.startswith("heads/alpha-") for relpath in tiny_workspace.manifest()["files"])


def test_eval_overrides_from_files(tiny_workspace, labeled_data, tmp_path, monkeypatch, capsys):
    names = tmp_path / "names.txt"
    names.write_text("green\nred\n")
    templates = tmp_path / "templates.txt"
    templates.write_text("a {} square.\n")
    code, out, err = run(
        monkeypatch, capsys, "eval", "-w", str(tiny_workspace.root), "--method", "pretrained", "--data", str(labeled_data),
        "--tasks", "alpha,gamma", "--classnames", f"alpha={names}", "--templates", f"alpha={templates}",
    )
    assert code == 0, err
    assert list(tiny_workspace.read_json("eval/pretrained.json")["tasks"]) == ["alpha", "gamma"]
    head_files = [relpath for relpath in tiny_workspace.manifest()["files"] if relpath.startswith("heads/")]
    assert len(head_files) == 2
    code, out, err = run(
        monkeypatch, capsys, "eval", "-w", str(tiny_workspace.root), "--method", "pretrained", "--data", str(labeled_data),
        "--tasks", "alpha", "gamma", "--classnames", str(names),
    )
    assert code == 2 and "with several tasks, write TASK=FILE" in err


@pytest.mark.parametrize("command", ["task-vectors", "merge", "eval"])
def test_help_shows_an_example(command, monkeypatch, capsys):
    code, out, err = run(monkeypatch, capsys, command, "--help")
    assert code == 0
    assert "Example:" in out and "--workspace" in out and "--device" in out


def test_failed_eval_leaves_no_heads_behind(tiny_workspace, labeled_data, monkeypatch, capsys):
    broken = labeled_data / "gamma" / "left" / "broken.png"
    broken.write_bytes(b"not a png")
    before = snapshot(tiny_workspace.root)
    code, out, err = run(monkeypatch, capsys, "eval", "-w", str(tiny_workspace.root), "--method", "pretrained", "--data", str(labeled_data))
    assert code == 2 and "broken.png: not a readable image" in err
    assert snapshot(tiny_workspace.root) == before
