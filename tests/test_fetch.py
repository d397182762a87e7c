"""`rankone fetch` as users run it: Hub cache, parquet test splits, presets, every bad input.

The Hub is reached through huggingface_hub's real code, offline, over a cache directory laid
out as huggingface_hub lays it out (blobs, snapshot symlinks, refs).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import make_base_state, make_expert_state, populate_hf_cache, write_open_clip_dir, snapshot
from rankone.errors import RankoneError
from rankone.sources import fetch, locate_dataset, presets
from rankone.workspace import Workspace

RANKONE = str(Path(sys.executable).parent / "rankone")
CLASS_NAMES = ["zero", "one/1", "two"]


# -- helpers ---------------------------------------------------------------------------------

def write_parquet_split(path: Path, labels: list[int], class_names=CLASS_NAMES, seed: int = 0, jpeg_rows=()) -> list[np.ndarray]:
    """A test split as the Hub stores it: image struct {bytes, path}, int labels, ClassLabel names."""
    rng = np.random.default_rng(seed)
    pixels, encoded = [], []
    for row, _ in enumerate(labels):
        array = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG" if row in jpeg_rows else "PNG")
        pixels.append(array)
        encoded.append({"bytes": buffer.getvalue(), "path": f"{row}.png"})
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"image": pa.array(encoded, type=image_type), "label": pa.array(labels, type=pa.int64())})
    features = {"image": {"_type": "Image"}, "label": {"names": list(class_names), "_type": "ClassLabel"}}
    table = table.replace_schema_metadata({b"huggingface": json.dumps({"info": {"features": features}}).encode()})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return pixels


@pytest.fixture
def open_clip_models(tmp_path):
    """An open_clip base directory and two expert .safetensors files (open_clip layout)."""
    base = make_base_state(0)
    write_open_clip_dir(tmp_path / "base", base)
    paths = {}
    for index, task in enumerate(("mnist", "dtd")):
        paths[task] = tmp_path / f"{task}.safetensors"
        save_file(make_expert_state(base, seed=index + 1), paths[task])
    return tmp_path / "base", paths, base


# -- the Hub ---------------------------------------------------------------------------------

def test_hf_sources_and_dataset_through_huggingface_hub_cache(tmp_path, monkeypatch, rankone_cli, transformers_models):
    _, _, base_dir, expert_dirs = transformers_models
    cache = tmp_path / "hf-cache"
    base_commit, old_commit, new_commit, data_commit = "a" * 40, "b" * 40, "c" * 40, "d" * 40
    populate_hf_cache(cache, "openai/tiny-clip", {name: base_dir / name for name in ("config.json", "model.safetensors")}, base_commit)
    populate_hf_cache(cache, "tanganke/tiny-clip_mnist", {name: expert_dirs["mnist"] / name for name in ("config.json", "model.safetensors")}, new_commit)
    # An older revision of the dtd expert, reachable only by its commit.
    populate_hf_cache(cache, "tanganke/tiny-clip_dtd", {name: expert_dirs["dtd"] / name for name in ("config.json", "model.safetensors")}, old_commit, ref=None)
    populate_hf_cache(cache, "tanganke/tiny-clip_dtd", {"config.json": expert_dirs["mnist"] / "config.json"}, new_commit)
    shard = tmp_path / "test-00000-of-00001.parquet"
    pixels = write_parquet_split(shard, [2, 0, 1, 2])
    populate_hf_cache(cache, "ylecun/tiny-mnist", {"data/test-00000-of-00001.parquet": shard, "README.md": shard}, data_commit, repo_type="dataset")

    env = {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    work = tmp_path / "work"
    command = [RANKONE, "fetch", "-w", str(work), "--base", "hf:openai/tiny-clip", "--expert", "mnist=hf:tanganke/tiny-clip_mnist",
               "--expert", f"dtd=hf:tanganke/tiny-clip_dtd@{old_commit}", "--dataset", "mnist=hf:ylecun/tiny-mnist"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr

    workspace = Workspace(work)
    manifest = workspace.manifest()
    assert manifest["tasks"] == ["mnist", "dtd"]
    assert manifest["sources"]["base"] == {"source": "hf:openai/tiny-clip", "kind": "hf-transformers", "revision": base_commit,
                                           "files": ["config.json", "model.safetensors"]}
    assert manifest["sources"]["experts"]["mnist"]["revision"] == new_commit
    assert manifest["sources"]["experts"]["dtd"]["revision"] == old_commit
    assert manifest["datasets"]["mnist"]["revision"] == data_commit
    assert manifest["datasets"]["mnist"]["classes"] == CLASS_NAMES and manifest["datasets"]["mnist"]["images"] == 4
    for relpath in manifest["files"]:
        workspace.require(relpath)  # every stored file matches its recorded sha256
    stored = np.asarray(Image.open(work / "data/mnist/two/0.png"))
    assert np.array_equal(stored, pixels[0])
    assert sorted(p.name for p in (work / "data/mnist").iterdir()) == ["one_1", "two", "zero"]

    # A revision the cache does not hold: huggingface_hub refuses offline, we say which source.
    # In-process, huggingface_hub's constants (read at its import) stand in for the environment.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    arguments = command[1:]
    arguments[arguments.index(f"dtd=hf:tanganke/tiny-clip_dtd@{old_commit}")] = f"dtd=hf:tanganke/tiny-clip_dtd@{'e' * 40}"
    before = snapshot(work)
    code, _, err = rankone_cli(*arguments)
    assert code == 2
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and error_lines[0].startswith(f"error: hf:tanganke/tiny-clip_dtd@{'e' * 40}: could not get")
    assert "HF_HUB_OFFLINE" in " ".join(err.split())
    assert snapshot(work) == before


# -- datasets --------------------------------------------------------------------------------

def test_parquet_dataset_becomes_an_image_folder(tmp_path, open_clip_models):
    base_dir, expert_paths, _ = open_clip_models
    shard = tmp_path / "hub/data/test-00000-of-00001.parquet"
    pixels = write_parquet_split(shard, [1, 1, 0, 2, 0], jpeg_rows={3})
    workspace = Workspace(tmp_path / "work")
    fetch(workspace, str(base_dir), {task: str(path) for task, path in expert_paths.items()}, datasets={"dtd": str(tmp_path / "hub")}, progress=False)
    root = tmp_path / "work/data/dtd"
    found = {str(path.relative_to(root)) for path in root.rglob("*.png")}
    assert found == {"one_1/0.png", "one_1/1.png", "zero/2.png", "two/3.png", "zero/4.png"}
    for index, relpath in ((0, "one_1/0.png"), (2, "zero/2.png"), (4, "zero/4.png")):
        assert np.array_equal(np.asarray(Image.open(root / relpath)), pixels[index])
    # A JPEG row is re-encoded as PNG (pixels as PIL decodes the JPEG).
    assert Image.open(root / "two/3.png").format == "PNG"
    entry = workspace.manifest()["datasets"]["dtd"]
    assert entry["images"] == 5 and entry["classes"] == CLASS_NAMES and entry["files"] == ["test-00000-of-00001.parquet"]
    split = locate_dataset(str(shard))
    assert (split.rows, split.image_column, split.label_column) == (5, "image", "label")


# -- the CLI, presets, re-running ------------------------------------------------------------

def test_cli_fetch_and_refetch_replaces_consistently(tmp_path, rankone_cli, open_clip_models):
    base_dir, expert_paths, base = open_clip_models
    work = tmp_path / "work"
    write_parquet_split(tmp_path / "mnist.parquet", [0, 1])
    write_parquet_split(tmp_path / "dtd.parquet", [2, 2])
    code, _, err = rankone_cli("fetch", "-w", str(work), "--base", str(base_dir), "--expert", f"mnist={expert_paths['mnist']}",
                         "--expert", f"dtd={expert_paths['dtd']}", "--dataset", f"mnist={tmp_path / 'mnist.parquet'}",
                         "--dataset", f"dtd={tmp_path / 'dtd.parquet'}")
    assert code == 0, err
    workspace = Workspace(work)
    assert workspace.tasks == ["mnist", "dtd"]
    stored = workspace.load_tensors("base.safetensors")
    assert all(torch.equal(stored[key], base[key]) for key in base)
    # A later stage's output, which a re-fetch makes stale.
    with workspace.transaction() as staging:
        staging.save_tensors("task_vectors/mnist.safetensors", {"x": torch.zeros(1)})

    code, _, err = rankone_cli("fetch", "-w", str(work), "--base", str(base_dir), "--expert", f"mnist={expert_paths['dtd']}")
    assert code == 0, err
    manifest = workspace.manifest()
    assert manifest["tasks"] == ["mnist"] and list(manifest["sources"]["experts"]) == ["mnist"]
    assert sorted(manifest["files"]) == ["base.safetensors", "data/mnist/one_1/1.png", "data/mnist/zero/0.png", "experts/mnist.safetensors"]
    assert not (work / "experts/dtd.safetensors").exists() and not (work / "task_vectors/mnist.safetensors").exists()
    assert not (work / "data/dtd").exists()
    assert list(manifest["datasets"]) == ["mnist"]
    assert torch.equal(workspace.load_tensors("experts/mnist.safetensors")["visual.proj"], make_expert_state(base, seed=2)["visual.proj"])


def test_presets_cover_fusionbench_checkpoints():
    table = presets()
    assert {"vit-b-32-ta8", "vit-b-16-ta8", "vit-l-14-ta8", "vit-b-32-tall20"} <= set(table)
    ta8 = ["sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"]
    assert list(table["vit-b-32-ta8"]["experts"]) == ta8
    assert table["vit-b-32-ta8"]["base"] == "hf:openai/clip-vit-base-patch32"
    assert table["vit-l-14-ta8"]["experts"]["stanford-cars"] == "hf:tanganke/clip-vit-large-patch14_stanford-cars"
    tall20 = table["vit-b-32-tall20"]["experts"]
    assert len(tall20) == 20 and tall20["oxford_flowers102"] == "hf:tanganke/clip-vit-base-patch32_oxford_flowers102"
    assert tall20["rendered-sst2"] == "hf:tanganke/clip-vit-base-patch32_rendered-sst2"
    templates = json.loads((Path(__file__).parents[1] / "rankone/templates.json").read_text())
    assert all(task in templates for entry in table.values() for task in entry["experts"])


def test_preset_offline_names_the_missing_repo(tmp_path, monkeypatch, rankone_cli):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    code, _, err = rankone_cli("fetch", "-w", str(tmp_path / "work"), "--preset", "vit-b-32-ta8")
    assert code == 2 and "hf:openai/clip-vit-base-patch32" in err
    assert not (tmp_path / "work").exists()


# -- bad input ------------------------------------------------------------------------------

def bad_inputs(tmp_path: Path, base_dir: Path, expert_paths: dict[str, Path], base: dict) -> dict[str, tuple[list[str], str]]:
    """name → (fetch arguments, a fragment the one-line error must contain)."""
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(expert_paths["mnist"].read_bytes()[:100])
    wide = {key: value for key, value in make_expert_state(base, seed=9).items()}
    wide["visual.ln_post.weight"] = torch.ones(48)
    save_file(wide, tmp_path / "wide.safetensors")
    same = tmp_path / "same.safetensors"
    save_file({key: value for key, value in base.items() if key.startswith("visual.")}, same)
    pickled = tmp_path / "expert.bin"
    torch.save(make_expert_state(base, seed=4), pickled)
    empty = tmp_path / "empty.parquet"
    write_parquet_split(empty, [])
    good = ["--base", str(base_dir), "--expert", f"mnist={expert_paths['mnist']}"]
    return {
        "missing dir": (["--base", str(tmp_path / "nowhere"), "--expert", f"mnist={expert_paths['mnist']}"], "nowhere: no such file or directory"),
        "corrupt safetensors": (["--base", str(base_dir), "--expert", f"mnist={corrupt}"], "corrupt.safetensors: not a readable safetensors file"),
        "unknown preset": (["--preset", "vit-h-14"], "known presets: vit-b-32-ta8"),
        "unknown scheme": (["--base", "s3://bucket/clip", "--expert", f"mnist={expert_paths['mnist']}"], "unknown source scheme 's3'"),
        "architecture mismatch": (["--base", str(base_dir), "--expert", f"cars={tmp_path / 'wide.safetensors'}"],
                                  "expert cars (" + str(tmp_path / "wide.safetensors") + "): tensor visual.ln_post.weight has shape (48,), the base's is (32,)"),
        "expert equals base": (["--base", str(base_dir), "--expert", f"dtd={same}"], f"expert dtd ({same}): image tower equals the base exactly"),
        "pickle": (["--base", str(base_dir), "--expert", f"mnist={pickled}"], "pass --trust-pickle"),
        "empty dataset": ([*good, "--dataset", f"mnist={empty}"], "empty dataset"),
        "dataset of no expert": ([*good, "--dataset", f"svhn={empty}"], "--dataset svhn"),
        "bad pair": (["--base", str(base_dir), "--expert", "mnist"], "--expert 'mnist': expected TASK=VALUE"),
    }


def test_bad_inputs_exit_2_with_one_line_and_leave_the_workspace_alone(tmp_path, rankone_cli, open_clip_models):
    base_dir, expert_paths, base = open_clip_models
    work = tmp_path / "work"
    code, _, err = rankone_cli("fetch", "-w", str(work), "--base", str(base_dir), "--expert", f"dtd={expert_paths['dtd']}")
    assert code == 0, err
    before = snapshot(work)
    for name, (arguments, fragment) in bad_inputs(tmp_path, base_dir, expert_paths, base).items():
        code, _, err = rankone_cli("fetch", "-w", str(work), *arguments)
        assert code == 2, (name, err)
        assert fragment in " ".join(err.split()), (name, err)
        assert snapshot(work) == before, name


def test_bad_input_into_a_new_workspace_creates_nothing(tmp_path, open_clip_models):
    base_dir, expert_paths, base = open_clip_models
    same = tmp_path / "same.safetensors"
    save_file({key: value for key, value in base.items() if key.startswith("visual.")}, same)
    with pytest.raises(RankoneError, match="expert svhn .*equals the base exactly"):
        fetch(Workspace(tmp_path / "new"), str(base_dir), {"mnist": str(expert_paths["mnist"]), "svhn": str(same)}, progress=False)
    assert not (tmp_path / "new").exists()


def test_architecture_mismatch_invisible_in_shapes(tmp_path, open_clip_models):
    """Same tensor shapes, different head count: the settings are compared, not only shapes."""
    base_dir, expert_paths, base = open_clip_models
    architecture = json.loads((base_dir / "open_clip_config.json").read_text())["model_cfg"]
    architecture["vision_cfg"]["head_width"] = 8
    write_open_clip_dir(tmp_path / "heads8", make_expert_state(base, seed=7), architecture)
    with pytest.raises(RankoneError, match=r"expert gtsrb .*head_width is 8, the base's is 16"):
        fetch(Workspace(tmp_path / "w"), str(base_dir), {"gtsrb": str(tmp_path / "heads8")}, progress=False)


def test_base_without_text_tower_is_refused(tmp_path, transformers_models):
    _, _, _, expert_dirs = transformers_models
    with pytest.raises(RankoneError, match="base .*has no text tower"):
        fetch(Workspace(tmp_path / "w"), str(expert_dirs["mnist"]), {"dtd": str(expert_dirs["dtd"])}, progress=False)


def test_open_clip_pretrained_tags(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from rankone.sources import load_source

    with pytest.raises(RankoneError, match="open_clip:ViT-B-32:nope: give one of open_clip's pretrained tags for ViT-B-32: .*openai"):
        load_source("open_clip:ViT-B-32:nope")
    with pytest.raises(RankoneError, match="unknown open_clip model 'ViT-Q-99'"):
        load_source("open_clip:ViT-Q-99:openai")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(RankoneError, match="open_clip:ViT-B-32:openai: open_clip could not download or find the weights in its cache"):
        load_source("open_clip:ViT-B-32:openai")
