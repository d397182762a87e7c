"""Every bad input, as a hostile user would try it: one stderr line naming the culprit, exit code 2,
no traceback, and the workspace (every path, link and file) exactly as it was.

Then the faults: a stage killed at each point of its commit, a full disk, two stages at once.
The workspace is then either as before or fully committed, and the next stage works.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import TASKS, make_base_state, make_expert_state, write_image_folder, write_open_clip_dir
from rankone import methods, pipeline
from rankone.options import base_type
from rankone.workspace import JOURNAL_FILE, STAGING_PREFIX, Workspace

RANKONE = str(Path(sys.executable).parent / "rankone")


def tree_state(root: Path) -> dict[str, tuple]:
    """Every path under `root` with what it is: a folder, a link and its target, a file and its sha256."""
    root = Path(root)
    if not root.exists():
        return {}
    state: dict[str, tuple] = {}
    for path in sorted(root.rglob("*")):
        relpath = str(path.relative_to(root))
        if path.is_symlink():
            state[relpath] = ("link", os.readlink(path))
        elif path.is_dir():
            state[relpath] = ("dir",)
        else:
            state[relpath] = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
    return state


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """Read-only originals: a workspace after every stage, one just fetched, the user's models, image folders."""
    root = tmp_path_factory.mktemp("hostile")
    from conftest import write_workspace
    from rankone.methods import adapt_workspace, merge_workspace
    from rankone.methods.rankone import PoolOptions, build_pool_stage
    from rankone.task_vectors import compute_task_vectors
    from rankone.training import AdaptOptions

    base = make_base_state(0)
    experts = {task: make_expert_state(base, seed=index + 1) for index, task in enumerate(TASKS)}
    fetched = write_workspace(root / "fetched", base, experts)
    done = write_workspace(root / "done", base, experts)
    labeled = write_image_folder(root / "labeled", per_class=3, seed=0, labeled=True)
    unlabeled = write_image_folder(root / "unlabeled", per_class=3, seed=1, labeled=False)
    compute_task_vectors(done)
    merge_workspace(done, "task-arithmetic")
    build_pool_stage(done, PoolOptions(k=2))
    adapt_workspace(done, "rankone", AdaptOptions(data=unlabeled, steps=1, batch_size=2, classnames_from=labeled, progress=False), lr=1e-3)

    models = root / "models"
    write_open_clip_dir(models / "base", base)
    for index, task in enumerate(TASKS):
        save_file(experts[task], models / f"{task}.safetensors")
    torch.save(experts["alpha"], models / "alpha.bin")
    (models / "notes.txt").write_text("not weights")
    (models / "truncated.safetensors").write_bytes((models / "alpha.safetensors").read_bytes()[:100])
    other = {key: value[..., :1].clone() if value.ndim else value for key, value in experts["beta"].items()}
    save_file({key: value.contiguous() for key, value in other.items()}, models / "misshapen.safetensors")
    save_file({key: value.contiguous() for key, value in base.items() if key.startswith("visual.")}, models / "same-as-base.safetensors")
    os.makedirs(models / "src[/x]")
    return {"root": root, "fetched": fetched.root, "done": done.root, "labeled": labeled, "unlabeled": unlabeled, "models": models}


@pytest.fixture
def place(scene, tmp_path):
    """Fresh copies of the scene's workspaces and folders for one test, and a few bad files beside them."""
    for name in ("fetched", "done", "labeled", "unlabeled", "models"):
        shutil.copytree(scene[name], tmp_path / name, symlinks=True)
    (tmp_path / "a-file").write_text("x")
    bad = tmp_path / "bad-data"
    for task in TASKS:
        (bad / task / "only").mkdir(parents=True)
        (bad / task / "only" / "readme.txt").write_text("no images here")
    return tmp_path


def substitute(arguments: list[str], place: Path) -> list[str]:
    names = {"FETCHED": "fetched", "DONE": "done", "LABELED": "labeled", "UNLABELED": "unlabeled", "MODELS": "models",
             "FILE": "a-file", "BAD": "bad-data"}
    out = []
    for argument in arguments:
        for key, name in names.items():
            argument = argument.replace(key, str(place / name))
        out.append(argument.replace("HERE", str(place)))
    return out


def assert_refused(rankone_cli, place: Path, arguments: list[str], message: str) -> None:
    before = tree_state(place)
    code, out, err = rankone_cli(*substitute(arguments, place))
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (arguments, code, err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), (arguments, err)
    assert substitute([message], place)[0] in lines[0], (arguments, lines[0])
    assert "Traceback" not in err + out
    assert tree_state(place) == before, arguments


# ---- inputs: sources, task names, stage order, data folders, tampering, export and predict ------

CASES = {
    # sources
    "base folder missing": (["fetch", "-w", "HERE/new", "--base", "HERE/nothing", "--expert", "a=MODELS/alpha.safetensors"], "HERE/nothing"),
    "base a text file": (["fetch", "-w", "HERE/new", "--base", "MODELS/notes.txt", "--expert", "a=MODELS/alpha.safetensors"], "notes.txt"),
    "expert without a task": (["fetch", "-w", "HERE/new", "--base", "MODELS/base", "--expert", "MODELS/alpha.safetensors"], "expected TASK=VALUE"),
    "expert with an empty task": (["fetch", "-w", "HERE/new", "--base", "MODELS/base", "--expert", "=MODELS/alpha.safetensors"], "expected TASK=VALUE"),
    "expert task twice": (["fetch", "-w", "HERE/new", "--base", "MODELS/base", "--expert", "a=MODELS/alpha.safetensors",
                           "--expert", "a=MODELS/beta.safetensors"], "task 'a' given twice"),
    "pickle without trust": (["fetch", "-w", "HERE/new", "--base", "MODELS/base", "--expert", "a=MODELS/alpha.bin"], "pass --trust-pickle"),
    "truncated expert": (["fetch", "-w", "HERE/new", "--base", "MODELS/base", "--expert", "a=MODELS/truncated.safetensors"], "truncated.safetensors"),
    "misshapen expert": (["fetch", "-w", "HERE/new", "--base", "MODELS/base", "--expert", "a=MODELS/misshapen.safetensors"], "shape"),
    "expert equals base": (["fetch", "-w", "HERE/new", "--base", "MODELS/base", "--expert", "a=MODELS/same-as-base.safetensors"], "equals the base exactly"),
    "malformed hub source": (["fetch", "-w", "HERE/new", "--base", "hf:no-slash", "--expert", "a=MODELS/alpha.safetensors"], "expected hf:ORG/NAME"),
    "unknown preset": (["fetch", "-w", "HERE/new", "--preset", "vit-z-99"], "--preset 'vit-z-99': unknown preset"),
    "source path with markup": (["fetch", "-w", "HERE/new", "--base", "MODELS/src[/x]", "--expert", "a=MODELS/alpha.safetensors"], "src[/x]"),
    "workspace is a file": (["fetch", "-w", "FILE", "--base", "MODELS/base", "--expert", "a=MODELS/alpha.safetensors"], "FILE"),
    "bad dataset spec": (["fetch", "-w", "HERE/new", "--base", "MODELS/base", "--expert", "a=MODELS/alpha.safetensors", "--dataset", "a"], "--dataset"),
    # task names
    "eval unknown task": (["eval", "-w", "DONE", "--method", "pretrained", "--data", "LABELED", "--tasks", "omega"], "omega"),
    "adapt unknown task": (["adapt", "-w", "DONE", "--data", "UNLABELED", "--classnames-from", "LABELED", "--tasks", "omega"], "--tasks: unknown task 'omega'"),
    "compare unknown task": (["compare", "-w", "DONE", "--data", "LABELED", "--tasks", "omega"], "omega"),
    # stage order
    "build-pool before task-vectors": (["build-pool", "-w", "FETCHED"], "run `rankone task-vectors` first"),
    "merge before task-vectors": (["merge", "-w", "FETCHED", "--method", "ties"], "run `rankone task-vectors` first"),
    "adapt before build-pool": (["adapt", "-w", "FETCHED", "--data", "UNLABELED", "--classnames-from", "LABELED"], "first"),
    "eval wemoe before adapt": (["eval", "-w", "DONE", "--method", "wemoe", "--data", "LABELED"], "run `rankone adapt --method wemoe` first"),
    "eval ties before merge": (["eval", "-w", "DONE", "--method", "ties", "--data", "LABELED"], "run `rankone merge --method ties` first"),
    "export ties before merge": (["export", "-w", "DONE", "--method", "ties", "--out", "HERE/out"], "run `rankone merge --method ties` first"),
    "compare ties before merge": (["compare", "-w", "DONE", "--data", "LABELED", "--methods", "ties"], "merged/ties.safetensors"),
    "no workspace": (["eval", "-w", "HERE/nowhere", "--method", "pretrained", "--data", "LABELED"], "no workspace here"),
    "workspace is a file for eval": (["eval", "-w", "FILE", "--method", "pretrained", "--data", "LABELED"], "is not a folder"),
    # methods and devices
    "unknown method": (["merge", "-w", "DONE", "--method", "magic"], "--method 'magic'"),
    "adaptive method to merge": (["merge", "-w", "DONE", "--method", "rankone"], "--method 'rankone': not a static method"),
    "static method to adapt": (["adapt", "-w", "DONE", "--method", "ties", "--data", "UNLABELED"], "--method 'ties': not an adaptive method"),
    "option the method does not use": (["merge", "-w", "DONE", "--method", "ties", "--drop", "0.5"], "--drop: not used by --method ties"),
    "device meta": (["eval", "-w", "DONE", "--method", "pretrained", "--data", "LABELED", "--device", "meta"], "--device meta: not a device"),
    "device mps here": (["eval", "-w", "DONE", "--method", "pretrained", "--data", "LABELED", "--device", "mps"], "--device mps"),
    "device nonsense": (["eval", "-w", "DONE", "--method", "pretrained", "--data", "LABELED", "--device", "gpu0"], "--device 'gpu0'"),
    "routing report of a method without routers": (["eval", "-w", "DONE", "--method", "pretrained", "--data", "LABELED", "--routing"], "--routing"),
    # data folders
    "data folder missing": (["eval", "-w", "DONE", "--method", "pretrained", "--data", "HERE/nothing"], "HERE/nothing"),
    "data is a file": (["eval", "-w", "DONE", "--method", "pretrained", "--data", "FILE"], "FILE"),
    "data lacks a task": (["eval", "-w", "DONE", "--method", "pretrained", "--data", "LABELED/alpha"], "LABELED/alpha"),
    "data without images": (["eval", "-w", "DONE", "--method", "pretrained", "--data", "BAD"], "no images"),
    "unlabeled data without images": (["adapt", "-w", "DONE", "--data", "BAD", "--classnames-from", "LABELED"], "no images"),
    "unlabeled data missing": (["adapt", "-w", "DONE", "--data", "HERE/nothing", "--classnames-from", "LABELED"], "HERE/nothing"),
    "class names from a missing folder": (["adapt", "-w", "DONE", "--data", "UNLABELED", "--classnames-from", "HERE/nothing"], "HERE/nothing"),
    "class names file missing": (["eval", "-w", "DONE", "--method", "pretrained", "--data", "LABELED", "--tasks", "alpha",
                                  "--classnames", "HERE/names.txt"], "names.txt"),
    # export and predict
    "export into a user's folder": (["export", "-w", "DONE", "--out", "MODELS"], "--out MODELS: exists and is not an earlier export"),
    "export below a file": (["export", "-w", "DONE", "--out", "FILE/model"], "is a file, not a folder"),
    "export onto a file": (["export", "-w", "DONE", "--out", "FILE"], "exists and is not a folder"),
    "export a method without a model": (["export", "-w", "DONE", "--method", "perfect-router", "--out", "HERE/out"], "perfect-router"),
    "export routed as transformers": (["export", "-w", "DONE", "--format", "transformers", "--out", "HERE/out"], "--format transformers"),
    "export static past open_clip's one file": (["export", "-w", "DONE", "--method", "task-arithmetic", "--shard-size", "1kB", "--out", "HERE/out"], "open_clip loads one weights file"),
    "predict a missing image": (["predict", "DONE", "--task", "alpha", "HERE/none.png"], "HERE/none.png: no such"),
    "predict a folder as an image": (["predict", "DONE", "--task", "alpha", "LABELED"], "a folder, not an image file"),
    "predict a text file": (["predict", "DONE", "--task", "alpha", "FILE"], "not a readable image"),
    "predict an unknown task": (["predict", "DONE", "--task", "omega", "FILE"], "--task 'omega': unknown task"),
    "predict top 0": (["predict", "DONE", "--task", "alpha", "--top", "0", "FILE"], "--top 0"),
    "predict from a folder that is no model": (["predict", "LABELED", "--task", "alpha", "FILE"], "neither an exported model"),
    "predict without images": (["predict", "DONE", "--task", "alpha"], "no IMAGE given"),
    "predict an image named like markup": (["predict", "DONE", "--task", "alpha", "HERE/shot[final].png"], "shot[final].png"),
    "predict from an unreachable hub repo": (["predict", "hf:my-org/absent", "--task", "alpha", "FILE"], "hf:my-org/absent"),
    "push a folder that is no export": (["push", "LABELED", "--repo", "org/name"], "not an exported model"),
    "pipeline file missing": (["run", "HERE/absent.yaml"], "no such pipeline file"),
    "finetune output below a file": (["finetune", "--task", "alpha", "--data", "LABELED", "--base", "MODELS/base", "--out", "FILE/expert",
                                      "--steps", "1"], "FILE"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_input_is_one_line_and_changes_nothing(place, rankone_cli, monkeypatch, case):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(place / "hf-cache"))
    arguments, message = CASES[case]
    assert_refused(rankone_cli, place, arguments, message)


def _manifest_without(key: str):
    def tamper(workspace: Path) -> None:
        manifest = json.loads((workspace / "manifest.json").read_text())
        (workspace / "manifest.json").write_text(json.dumps({name: value for name, value in manifest.items() if name != key}))
    return tamper


def _manifest_with(**values):
    def tamper(workspace: Path) -> None:
        manifest = json.loads((workspace / "manifest.json").read_text())
        (workspace / "manifest.json").write_text(json.dumps({**manifest, **values}))
    return tamper


def _replace_by_folder(relpath: str):
    def tamper(workspace: Path) -> None:
        (workspace / relpath).unlink()
        (workspace / relpath).mkdir()
    return tamper


EVAL_RANKONE = ["eval", "-w", "DONE", "--method", "rankone", "--data", "LABELED"]
TAMPERING = {
    "manifest not JSON": (lambda ws: (ws / "manifest.json").write_text("{not json"), EVAL_RANKONE, "corrupt manifest"),
    "manifest a JSON list": (lambda ws: (ws / "manifest.json").write_text("[1, 2]"), EVAL_RANKONE, "corrupt manifest (not a JSON object)"),
    "manifest without architecture": (_manifest_without("architecture"), EVAL_RANKONE, "no 'architecture'"),
    "manifest without tasks": (_manifest_without("tasks"), ["task-vectors", "-w", "DONE"], "no 'tasks'"),
    "manifest of a future format": (_manifest_with(format=99), EVAL_RANKONE, "unsupported manifest format 99"),
    "files entry not an object": (_manifest_with(files=[]), EVAL_RANKONE, "'files' is not a JSON dict"),
    "pool changed by hand": (lambda ws: (ws / "pool.safetensors").write_bytes((ws / "pool.safetensors").read_bytes()[:-4] + b"\0\0\0\0"),
                             EVAL_RANKONE, "pool.safetensors: does not match the workspace manifest"),
    "expert deleted": (lambda ws: (ws / "experts" / "beta.safetensors").unlink(), ["task-vectors", "-w", "DONE"], "experts/beta.safetensors: missing"),
    "task vector replaced by a folder": (_replace_by_folder("task_vectors/gamma.safetensors"), ["merge", "-w", "DONE", "--method", "ties"],
                                         "gamma.safetensors"),
    "a folder where a report goes": (lambda ws: (ws / "eval" / "rankone.json").mkdir(parents=True), EVAL_RANKONE,
                                     "eval/rankone.json: is a folder where this stage writes a file"),
    "a file where a folder goes": (lambda ws: (ws / "eval").write_text("x"), EVAL_RANKONE, "eval: is a file where this stage needs a folder"),
    "routers truncated": (lambda ws: (ws / "adapted" / "rankone.safetensors").write_bytes(b"\0" * 8), EVAL_RANKONE, "adapted/rankone.safetensors"),
}


@pytest.mark.parametrize("case", list(TAMPERING))
def test_a_tampered_workspace_is_one_line_and_stays_as_it_is(place, rankone_cli, case):
    tamper, arguments, message = TAMPERING[case]
    tamper(place / "done")
    assert_refused(rankone_cli, place, arguments, message)


def _out_of_range(info) -> list[str]:
    """Values just outside an option's declared range, and a non-finite one for a float."""
    declared, kind = info.declared, base_type(info.type)[0]
    values = []
    if declared.low is not None:
        values.append(declared.low if declared.low_open else declared.low - 1)
    if declared.high is not None:
        values.append(declared.high if declared.high_open else declared.high + 1)
    return [str(int(value)) if kind is int else repr(float(value)) for value in values] + (["nan"] if kind is float else [])


def _range_cases() -> list[tuple[str, str | None, str, str]]:
    """(stage, method, flag, value) for every numeric option of every stage and of every method a stage takes."""
    cases = []
    for stage in pipeline.STAGES.values():
        owners: list[tuple[str | None, type]] = [(None, stage.options)]
        if stage.method_kind in ("static", "adaptive"):
            owners += [(method.name, method.options) for method in methods.registered() if stage.takes(method)]
        seen = set()
        for method, options_class in owners:
            for info in options_class.options():
                if info.flag in seen or base_type(info.type)[0] not in (int, float) or info.declared.parse is not None:
                    continue
                seen.add(info.flag)
                cases += [(stage.name, method, info.flag, value) for value in _out_of_range(info)]
    return cases


RANGE_CASES = _range_cases()
STAGE_NEEDS = {"adapt": ["--data", "UNLABELED"], "eval": ["--method", "pretrained", "--data", "LABELED"],
               "compare": ["--data", "LABELED"], "export": ["--out", "HERE/out"], "fetch": ["--base", "MODELS/base"]}


@pytest.mark.parametrize("stage, method, flag, value", RANGE_CASES, ids=[f"{s} {m or ''} {f} {v}" for s, m, f, v in RANGE_CASES])
def test_every_numeric_option_refuses_out_of_range_values_before_touching_anything(place, rankone_cli, stage, method, flag, value):
    arguments = [stage, "-w", "DONE", *(["--method", method] if method else []), *STAGE_NEEDS.get(stage, []), flag, value]
    assert_refused(rankone_cli, place, arguments, f"{flag} ")


def test_the_hostile_suite_is_large():
    assert len(CASES) + len(TAMPERING) + len(RANGE_CASES) >= 60


def test_an_export_whose_record_is_not_an_object_is_one_line(place, rankone_cli):
    out = place / "model"
    assert rankone_cli("export", "-w", place / "done", "--out", out)[0] == 0
    (out / "rankone.json").write_text("[]")
    assert_refused(rankone_cli, place, ["predict", "HERE/model", "--task", "alpha", "FILE"], "rankone.json: not a JSON object")
    assert_refused(rankone_cli, place, ["inspect", "HERE/model"], "rankone.json: not a JSON object")


def test_paths_that_look_like_markup_print_as_they_are(place, rankone_cli):
    image = place / "shot[final].png"
    shutil.copy(next((place / "labeled" / "alpha").rglob("*.png")), image)
    code, out, err = rankone_cli("predict", place / "done", "--task", "alpha", image)
    assert code == 0, err
    assert str(image) in out


def test_adapt_says_which_files_it_skipped(place, rankone_cli):
    (place / "unlabeled" / "alpha" / "notes.txt").write_text("not an image")
    code, _, err = rankone_cli("adapt", "-w", place / "done", "--data", place / "unlabeled", "--classnames-from", place / "labeled",
                               "--steps", "1", "--batch-size", "2")
    assert code == 0, err
    assert "alpha: skipped 1 files that are not images" in err


# ---- images and pickles that fight back ------------------------------------------------------

def test_a_decompression_bomb_is_named(place, rankone_cli):
    bomb = place / "labeled" / "alpha" / "red" / "bomb.png"
    Image.new("1", (14_000, 14_000)).save(bomb)  # 196 M pixels: past twice Pillow's limit
    assert_refused(rankone_cli, place, ["eval", "-w", "DONE", "--method", "pretrained", "--data", "LABELED"], "bomb.png: not a readable image")
    assert_refused(rankone_cli, place, ["predict", "DONE", "--task", "alpha", str(bomb)], "bomb.png: not a readable image")


def test_a_trusted_pickle_loads_in_full_with_a_one_line_note(place, rankone_cli):
    experts = place / "models"
    state = {"state_dict": torch.load(experts / "alpha.bin", weights_only=True), "extra": torch.nn.Linear(2, 2)}
    torch.save(state, experts / "full.pt")
    arguments = ["fetch", "-w", place / "new", "--base", experts / "base", "--expert", f"alpha={experts / 'full.pt'}"]
    code, _, err = rankone_cli(*arguments)
    assert code == 2 and "pass --trust-pickle" in err and not (place / "new").exists()
    result = run([*arguments, "--trust-pickle"])
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if line.startswith("note:")]
    assert notes == [f"note: {experts / 'full.pt'}: holds objects besides tensors; loaded as a full pickle because of --trust-pickle"]
    assert torch.equal(Workspace(place / "new").load_tensors("experts/alpha.safetensors")["visual.proj"],
                       torch.load(experts / "alpha.bin", weights_only=True)["visual.proj"])

    # A pickle whose code cannot run: one line, even when trusted.
    (experts / "broken.pt").write_bytes(b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00\x8c\x08no_such.\x94\x8c\x01x\x94\x93\x94.")
    assert_refused(rankone_cli, place, ["fetch", "-w", "HERE/other", "--base", "MODELS/base", "--expert", "a=MODELS/broken.pt", "--trust-pickle"],
                   "broken.pt: not a loadable pickle")


# ---- faults --------------------------------------------------------------------------------

def run(arguments: list[str], env: dict[str, str] | None = None, preexec=None) -> subprocess.CompletedProcess:
    return subprocess.run([RANKONE, *map(str, arguments)], env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=300, preexec_fn=preexec)


def pool_k(workspace: Path) -> int:
    from rankone.methods.rankone.pool import read_pool

    return read_pool(Workspace(workspace)).k


@pytest.mark.parametrize("point, committed", [("before-journal", False), ("after-journal", True), ("after-first-move", True)])
def test_a_stage_killed_while_committing_leaves_the_old_or_the_new_workspace(place, point, committed):
    work = place / "done"
    before = tree_state(work)
    result = run(["build-pool", "-w", work, "--k", "3"], {"RANKONE_TEST_KILL_AT": point})
    assert result.returncode == -signal.SIGKILL, result.stderr
    if not committed:
        # Only the killed stage's staging folder is new; the manifest and every file are as they were.
        left = {path: kind for path, kind in tree_state(work).items() if not path.startswith(STAGING_PREFIX)}
        assert left == before
    # The next command sees a consistent workspace: the old pool (k 2) or the new one (k 3), never a mix.
    assert pool_k(work) == (3 if committed else 2)
    Workspace(work).require("pool.safetensors")
    # The next stage that writes runs, and clears what the killed one left.
    after = run(["merge", "-w", work, "--method", "task-arithmetic", "--lambda", "0.2"])
    assert after.returncode == 0, after.stderr
    names = [path.name for path in work.iterdir()]
    assert JOURNAL_FILE not in names and not [name for name in names if name.startswith(STAGING_PREFIX)]
    for relpath in Workspace(work).manifest()["files"]:
        Workspace(work).require(relpath)


def test_a_full_disk_is_one_line_and_changes_nothing(place):
    work = place / "done"
    before = tree_state(work)
    # A file-size limit makes every write past 64 kB fail as a full disk does (Python ignores SIGXFSZ).
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))  # noqa: E731
    result = run(["merge", "-w", work, "--method", "ties"], preexec=limit)
    lines = [line for line in result.stderr.splitlines() if line.strip() and "━" not in line]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0] == f"error: {work / 'merged' / 'ties.safetensors'}: could not be written (File too large)"
    assert tree_state(work) == before


def test_a_full_tmpfs_is_one_line_and_changes_nothing(place, tmp_path):
    source = place / "fetched"
    used = sum(path.stat().st_size for path in source.rglob("*") if path.is_file())
    expert = (source / "experts" / "alpha.safetensors").stat().st_size
    # Room for the workspace and about one of the three task vectors task-vectors writes.
    size_kb = (used + expert * 3 // 2) // 1024 + 64
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("needs root and permission to mount a tmpfs")
    try:
        work = mount / "work"
        shutil.copytree(source, work)
        before = tree_state(work)
        result = run(["task-vectors", "-w", work])
        lines = [line for line in result.stderr.splitlines() if line.strip() and "━" not in line]
        assert result.returncode == 2 and len(lines) == 1 and "No space left on device" in lines[0], result.stderr
        assert lines[0].startswith(f"error: {work / 'task_vectors'}")
        assert tree_state(work) == before
        assert run(["build-pool", "-w", work]).returncode == 2  # and the workspace still reads: the next stage names what is missing
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def test_a_read_only_workspace_is_one_line(place, tmp_path):
    mount = tmp_path / "ro"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("needs root and permission to mount a tmpfs (as root, file modes alone do not make a folder read-only)")
    try:
        work = mount / "work"
        shutil.copytree(place / "done", work)
        (work / "pool.safetensors").write_bytes((work / "pool.safetensors").read_bytes()[:-4] + b"\0\0\0\0")
        assert subprocess.run(["mount", "-o", "remount,ro", str(mount)], capture_output=True).returncode == 0
        before = tree_state(work)
        for arguments, message in ((["merge", "-w", work, "--method", "ties"], f"-w {work}: cannot write here (Read-only file system)"),
                                   (["eval", "-w", work, "--method", "rankone", "--data", place / "labeled"], "pool.safetensors: does not match")):
            result = run(arguments)
            lines = [line for line in result.stderr.splitlines() if line.strip()]
            assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr
        assert tree_state(work) == before
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def test_two_stages_committing_in_turn_lose_nothing(place):
    """A stage that started before another committed keeps that commit's entries when it commits itself."""
    work = Workspace(place / "done")
    from rankone.methods import merge_workspace

    with work.transaction() as staging:  # a long eval, started first
        staging.write_json("eval/slow.json", {"average": 1.0})
        merge_workspace(work, "ties")  # a merge that commits meanwhile
    files = work.manifest()["files"]
    assert "eval/slow.json" in files and "merged/ties.safetensors" in files
    work.require("merged/ties.safetensors")


def test_two_stages_at_once_both_land(place):
    work = place / "done"
    eval_stage = subprocess.Popen([RANKONE, "eval", "-w", str(work), "--method", "task-arithmetic", "--data", str(place / "labeled")],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    merge = run(["merge", "-w", work, "--method", "ties"])
    _, eval_err = eval_stage.communicate(timeout=300)
    assert merge.returncode == 0 and eval_stage.returncode == 0, (merge.stderr, eval_err)
    files = Workspace(work).manifest()["files"]
    assert "merged/ties.safetensors" in files and "eval/task-arithmetic.json" in files
    after = run(["eval", "-w", work, "--method", "ties", "--data", place / "labeled"])
    assert after.returncode == 0, after.stderr
