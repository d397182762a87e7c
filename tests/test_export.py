"""`rankone export` for every method that yields one model, the model card, `rankone push` and `hf:` loading.

Static exports are loaded by open_clip's and transformers' own loaders, unmodified, and must
give rankone's image embeddings; the card is parsed back by huggingface_hub; a pushed model
is read back from a huggingface_hub cache laid out as `snapshot_download` leaves it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import rankone
from rankone import methods
from conftest import TASKS, populate_hf_cache, save_transformers_clip, save_transformers_expert, snapshot
from rankone.errors import RankoneError
from rankone.export import parse_size
from rankone.methods import load_method
from rankone.methods.artifact import predict
from rankone.sources import load_directory
from rankone.workspace import Workspace, sha256_file

RANKONE = str(Path(sys.executable).parent / "rankone")


def images(seed: int = 0) -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def rankone_embeddings(workspace: Workspace, method: str, pixels: torch.Tensor) -> torch.Tensor:
    model = load_method(workspace, method, "cpu")
    with torch.no_grad():
        return model.encoder_for_task(TASKS[0])(pixels)


def image_features(output) -> torch.Tensor:
    # transformers 5 returns a model output from get_image_features; older versions a tensor.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


# ---- static merges in open_clip's and transformers' layouts -------------------------------------

STATIC_EXPORTS = [method.name for method in methods.registered() if method.tower is not None]


def test_every_single_model_method_exports_statically():
    assert set(STATIC_EXPORTS) == {"pretrained", "weight-averaging", "task-arithmetic", "ties", "dare", "model-stock", "tsv-merge",
                                   "iso-c", "iso-cts", "wudi", "adamerging", "regmean", "fisher"}


@pytest.mark.parametrize("method", STATIC_EXPORTS)
def test_static_export_loads_in_open_clip_unmodified(tmp_path, every_stage_workspace, rankone_cli, method):
    import open_clip

    if methods.get(method).kind == "static" and not every_stage_workspace.has(methods.get(method).output):
        assert rankone_cli("merge", "--method", method, "-w", every_stage_workspace.root)[0] == 0
    if method in ("regmean", "fisher"):
        # Merges from statistics of unlabeled images: the fixture's heads take their class names from labeled_data.
        from conftest import write_image_folder

        folder = write_image_folder(tmp_path / "images", per_class=1)
        code, _, err = rankone_cli("adapt", "--method", method, "-w", every_stage_workspace.root, "--data", folder,
                                   "--classnames-from", folder, "--examples", "2")
        assert code == 0, err
    out = tmp_path / "exported"
    code, stdout, err = rankone_cli("export", "--method", method, "-w", every_stage_workspace.root, "--out", out)
    assert code == 0, err
    assert f"wrote {out}: {method} as open_clip's layout" in stdout
    names = sorted(path.name for path in out.iterdir())
    assert names == ["README.md", "open_clip_config.json", "open_clip_model.safetensors", "rankone.json"]
    record = json.loads((out / "rankone.json").read_text())
    assert record["kind"] == "static" and record["method"] == method and record["layout"] == "open_clip"
    assert record["files"] == {name: sha256_file(out / name) for name in names if name != "rankone.json"}

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    pixels = images()
    base = every_stage_workspace.load_tensors("base.safetensors")
    reference = open_clip.CLIP(**{key: value for key, value in every_stage_workspace.architecture.items() if key != "name"})
    reference.load_state_dict(base)
    tokens = open_clip.get_tokenizer(f"local-dir:{out}")(["a photo of red", "dark"])
    with torch.no_grad():
        torch.testing.assert_close(model.eval().encode_image(pixels), rankone_embeddings(every_stage_workspace, method, pixels), atol=1e-5, rtol=0)
        # The text tower and logit scale are the base's, so zero-shot heads built from it are the workspace's.
        torch.testing.assert_close(model.encode_text(tokens), reference.eval().encode_text(tokens), atol=1e-6, rtol=0)
        assert torch.equal(model.logit_scale, base["logit_scale"])
    assert preprocess.transforms[1].size == (32, 32)


def test_static_export_loads_through_open_clips_hub_loader_and_reads_like_any_file(tmp_path, every_stage_workspace, rankone_cli, monkeypatch):
    """The folder pushed to the Hub is what `hf-hub:ORG/NAME` loads: read here from a populated cache, offline."""
    import stat

    import huggingface_hub.constants
    import open_clip

    previous = os.umask(0o022)
    try:
        out = tmp_path / "ta"
        assert rankone_cli("export", "--method", "task-arithmetic", "-w", every_stage_workspace.root, "--out", out)[0] == 0
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {stat.S_IMODE(path.stat().st_mode) for path in out.iterdir()} == {0o644}

    cache = tmp_path / "hf-cache"
    populate_hf_cache(cache, "my-org/ta-tiny", {path.name: path for path in out.iterdir()}, "f" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    model, _, _ = open_clip.create_model_and_transforms("hf-hub:my-org/ta-tiny", cache_dir=str(cache))
    pixels = images(5)
    with torch.no_grad():
        torch.testing.assert_close(model.eval().encode_image(pixels), rankone_embeddings(every_stage_workspace, "task-arithmetic", pixels), atol=1e-5, rtol=0)


def test_transformers_export_round_trips(tmp_path, every_stage_workspace, rankone_cli):
    from transformers import CLIPModel

    out = tmp_path / "ta-hf"
    code, _, err = rankone_cli("export", "--method", "task-arithmetic", "--format", "transformers", "-w", every_stage_workspace.root, "--out", out)
    assert code == 0, err
    assert sorted(path.name for path in out.iterdir()) == ["README.md", "config.json", "model.safetensors", "rankone.json"]
    model = CLIPModel.from_pretrained(out).eval()
    pixels = images(1)
    with torch.no_grad():
        embeddings = image_features(model.get_image_features(pixel_values=pixels))
    torch.testing.assert_close(embeddings, rankone_embeddings(every_stage_workspace, "task-arithmetic", pixels), atol=1e-5, rtol=0)

    # And back: rankone's own reader of transformers folders (the one `fetch` uses) gives the merged CLIP.
    architecture, state_dict, kind, _ = load_directory(out)
    assert kind == "transformers"
    assert {key: value for key, value in architecture.items() if key != "name"} == {
        key: value for key, value in every_stage_workspace.architecture.items() if key != "name"} | {
        "text_cfg": {**every_stage_workspace.architecture["text_cfg"], "mlp_ratio": 4.0}}
    merged = every_stage_workspace.load_tensors("merged/task-arithmetic.safetensors")
    whole = {**every_stage_workspace.load_tensors("base.safetensors"), **merged}
    assert set(state_dict) == set(whole)
    for key, tensor in whole.items():
        torch.testing.assert_close(state_dict[key], tensor, atol=1e-6, rtol=0)


def test_shard_size_writes_an_index_that_transformers_and_rankone_load(tmp_path, every_stage_workspace, rankone_cli):
    from transformers import CLIPModel

    out = tmp_path / "sharded"
    code, _, err = rankone_cli("export", "--method", "task-arithmetic", "--format", "transformers", "--shard-size", "100kB",
                               "-w", every_stage_workspace.root, "--out", out)
    assert code == 0, err
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    assert shards == sorted(path.name for path in out.glob("model-*-of-*.safetensors"))
    sizes = []
    for shard in shards:
        with safe_open(str(out / shard), framework="pt") as handle:
            sizes.append(sum(handle.get_tensor(key).numel() * handle.get_tensor(key).element_size() for key in handle.keys()))
    largest_tensor = max(tensor.numel() * 4 for tensor in every_stage_workspace.load_tensors("base.safetensors").values())
    assert all(size <= max(100_000, largest_tensor) for size in sizes) and sum(sizes) == index["metadata"]["total_size"]
    model = CLIPModel.from_pretrained(out).eval()
    pixels = images(2)
    with torch.no_grad():
        embeddings = image_features(model.get_image_features(pixel_values=pixels))
    torch.testing.assert_close(embeddings, rankone_embeddings(every_stage_workspace, "task-arithmetic", pixels), atol=1e-5, rtol=0)

    # RankOne-MoE's artifact shards the same way and loads back whole.
    routed = tmp_path / "routed"
    assert rankone_cli("export", "-w", every_stage_workspace.root, "--out", routed, "--shard-size", "50kB")[0] == 0
    assert (routed / "model.safetensors.index.json").is_file() and not (routed / "model.safetensors").exists()
    exported, in_place = rankone.load(routed), rankone.load(every_stage_workspace.root)
    with torch.no_grad():
        torch.testing.assert_close(exported.classify(pixels, "beta"), in_place.classify(pixels, "beta"), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_wemoe_exports_as_an_artifact_that_loads_back(tmp_path, every_stage_workspace, labeled_data, rankone_cli, dtype):
    from rankone.heads import classify_logits

    out = tmp_path / "wemoe"
    code, stdout, err = rankone_cli("export", "--method", "wemoe", "--dtype", dtype, "-w", every_stage_workspace.root, "--out", out)
    assert code == 0, err
    assert sorted(path.name for path in out.iterdir()) == ["README.md", "model.safetensors", "open_clip_config.json", "rankone.json"]
    record = json.loads((out / "rankone.json").read_text())
    assert record["method"] == "wemoe" and record["kind"] == "routed" and record["tasks"] == list(TASKS)
    exported = rankone.load(out)
    method = load_method(every_stage_workspace, "wemoe", "cpu")
    assert record["parameters"]["total"] == method.parameters
    pixels = images(4)
    with torch.no_grad():
        for task in TASKS:
            expected = classify_logits(method.encoder_for_task(task)(pixels), exported.head(task))
            # fp16 storage rounds the task vectors and routers: the logits move by about that rounding.
            tolerance = 1e-5 if dtype == "fp32" else 2e-2
            torch.testing.assert_close(exported.classify(pixels, task), expected, atol=tolerance, rtol=0)
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        stored = {key: handle.get_slice(key).get_dtype() for key in handle.keys()}
    half = "F16" if dtype == "fp16" else "F32"
    assert {value for key, value in stored.items() if "_tau_" in key or ".mlp.router." in key} == {half}
    assert {value for key, value in stored.items() if "_tau_" not in key and ".mlp.router." not in key} == {"F32"}
    image = next((labeled_data / "alpha").rglob("*.png"))
    code, stdout, err = rankone_cli("predict", out, "--task", "alpha", image, "--json")
    assert code == 0 and json.loads(stdout)[0]["top"][0]["class"] in ("red", "green"), err


def test_export_refusals_are_one_line_and_change_nothing(tmp_path, every_stage_workspace, rankone_cli):
    work = every_stage_workspace.root
    before = snapshot(work)
    cases = [
        (["--method", "individual"], "--method individual: yields no single model to export"),
        (["--method", "task-arithmetic", "--shard-size", "10kB"], "open_clip loads one weights file"),
        (["--method", "task-arithmetic", "--shard-size", "lots"], "--shard-size 'lots': expected a size such as 2GB"),
        (["--method", "task-arithmetic", "--shard-size", "0"], "--shard-size 0: must be at least 1"),
        (["--method", "rankone", "--format", "transformers"], "--format transformers: rankone needs its routed module"),
        (["--method", "task-arithmetic", "--format", "onnx"], "--format 'onnx': expected one of open_clip, transformers"),
    ]
    for arguments, message in cases:
        code, _, err = rankone_cli("export", *arguments, "-w", work, "--out", tmp_path / "out")
        assert code == 2 and message in err, (arguments, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert not (tmp_path / "out").exists() and snapshot(work) == before
    assert not [path.name for path in tmp_path.iterdir() if path.name.startswith(".out")]  # no staging left behind
    assert parse_size("2GB") == 2_000_000_000 and parse_size("1GiB") == 2**30 and parse_size("1.5 MB") == 1_500_000


def test_exporting_again_replaces_only_an_earlier_export(tmp_path, every_stage_workspace, rankone_cli):
    work, out = every_stage_workspace.root, tmp_path / "model"
    assert rankone_cli("export", "-w", work, "--out", out)[0] == 0  # RankOne-MoE's artifact
    assert (out / "model.safetensors").is_file()
    # A static merge in its place: the artifact's weights go, nothing else stays behind.
    assert rankone_cli("export", "--method", "task-arithmetic", "-w", work, "--out", out)[0] == 0
    assert sorted(path.name for path in out.iterdir()) == ["README.md", "open_clip_config.json", "open_clip_model.safetensors", "rankone.json"]

    # A file of the user's beside an export: refused, and the folder is exactly as it was.
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    code, _, err = rankone_cli("export", "--method", "pretrained", "-w", work, "--out", out)
    assert code == 2 and f"--out {out}: holds notes.txt, which no rankone export wrote" in err
    assert snapshot(out) == before

    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    code, _, err = rankone_cli("export", "--method", "task-arithmetic", "-w", work, "--out", a_file)
    assert code == 2 and f"--out {a_file}: exists and is not a folder" in err
    code, _, err = rankone_cli("export", "--method", "task-arithmetic", "-w", work, "--out", a_file / "model")
    assert code == 2 and f"{a_file} is a file, not a folder" in err

    code, _, err = rankone_cli("predict", out, "--task", "alpha", a_file)
    assert code == 2 and "a static merge exported in open_clip's layout; load it with open_clip" in err


# ---- the model card ---------------------------------------------------------------------------

def test_model_card_parses_back_with_every_field(tmp_path, every_stage_workspace, labeled_data, rankone_cli):
    from huggingface_hub import ModelCard

    work = every_stage_workspace.root
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(f"workspace: {work}\ndevice: cpu\nstages:\n  - merge: {{method: ties, top: 0.5}}\n"
                        f"  - eval: {{method: ties, data: {labeled_data}}}\n  - eval: {{method: individual, data: {labeled_data}}}\n")
    code, _, err = rankone_cli("run", pipeline)
    assert code == 0, err
    out = tmp_path / "ties-model"
    assert rankone_cli("export", "--method", "ties", "-w", work, "--out", out)[0] == 0

    card = ModelCard.load(out / "README.md")
    data = card.data
    assert data.library_name == "open_clip" and data.pipeline_tag == "zero-shot-image-classification"
    assert {"model-merging", "rankone", "ties"} <= set(data.tags)
    assert data.base_model is None  # a local base is no Hub id; the body names it by its folder only
    report = json.loads((work / "eval" / "ties.json").read_text())
    individual = json.loads((work / "eval" / "individual.json").read_text())
    by_metric = {(result.dataset_name, result.metric_type): result.metric_value for result in data.eval_results}
    for task in TASKS:
        accuracy = report["tasks"][task]["accuracy"]
        assert by_metric[(task, "accuracy")] == round(accuracy, 2)
        assert by_metric[(task, "normalized_accuracy")] == round(100 * accuracy / individual["tasks"][task]["accuracy"], 2)
    text = card.text
    assert f"| **average** | **{report['average']:.1f}** |" in text
    assert '"top": 0.5' in text and '"lambda": 0.3' in text  # the options the merge recorded
    assert pipeline.read_text().rstrip() in text  # the pipeline file the run came from
    assert f"{every_stage_workspace.architecture['vision_cfg']['width']}" and "| image_tower |" in text
    # Sources are named by their folder only; the pipeline file is quoted as the user wrote it.
    assert str(tmp_path) not in card.content.replace(pipeline.read_text().rstrip(), "")
    assert "import open_clip" in text and f"local-dir:{out.name}" in text

    # The card's three lines run as written, from the folder above the export.
    snippet = text.split("```python\n")[1].split("```")[0]
    result = subprocess.run([sys.executable, "-c", snippet + "\nprint(type(model).__name__, type(tokenizer).__name__)"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["CLIP", "SimpleTokenizer"]


def test_model_card_names_hub_sources(tmp_path, rankone_cli, monkeypatch):
    """A workspace fetched from the Hub: the card's base_model and datasets are the Hub ids."""
    import huggingface_hub.constants

    from test_fetch import write_parquet_split

    base_dir, cache = tmp_path / "hf-base", tmp_path / "hf-cache"
    base_model = save_transformers_clip(base_dir)
    save_transformers_expert(tmp_path / "hf-mnist", base_model, seed=1)
    populate_hf_cache(cache, "openai/tiny-clip", {name: base_dir / name for name in ("config.json", "model.safetensors")}, "a" * 40)
    populate_hf_cache(cache, "tanganke/tiny-clip_mnist", {name: tmp_path / "hf-mnist" / name for name in ("config.json", "model.safetensors")}, "b" * 40)
    shard = tmp_path / "test-00000-of-00001.parquet"
    write_parquet_split(shard, [2, 0, 1, 2, 1, 0])
    populate_hf_cache(cache, "ylecun/tiny-mnist", {"data/test-00000-of-00001.parquet": shard}, "c" * 40, repo_type="dataset")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    work = tmp_path / "work"
    for arguments in (["fetch", "--base", "hf:openai/tiny-clip", "--expert", "mnist=hf:tanganke/tiny-clip_mnist", "--dataset", "mnist=hf:ylecun/tiny-mnist"],
                      ["task-vectors"], ["merge", "--method", "task-arithmetic"], ["eval", "--method", "task-arithmetic", "--data", work / "data"]):
        code, _, err = rankone_cli(*arguments, "-w", work)
        assert code == 0, (arguments, err)
    out = tmp_path / "card-model"
    assert rankone_cli("export", "--method", "task-arithmetic", "--format", "transformers", "-w", work, "--out", out)[0] == 0
    data = huggingface_hub.ModelCard.load(out / "README.md").data
    assert data.base_model == "openai/tiny-clip" and data.datasets == ["ylecun/tiny-mnist"] and data.library_name == "transformers"
    assert [(result.dataset_type, result.metric_type) for result in data.eval_results] == [("ylecun/tiny-mnist", "accuracy")]
    text = (out / "README.md").read_text()
    assert "`hf:tanganke/tiny-clip_mnist`" in text and 'CLIPProcessor.from_pretrained("openai/tiny-clip")' in text


# ---- the Hub: push and load back --------------------------------------------------------------

def test_push_refuses_in_one_line_and_never_prints_the_token(tmp_path, every_stage_workspace, rankone_cli):
    out = tmp_path / "model"
    assert rankone_cli("export", "-w", every_stage_workspace.root, "--out", out)[0] == 0
    secret = "hf_" + "S3CRET" * 6
    base_env = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}
    base_env.update(HF_HOME=str(tmp_path / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1")
    cases = [
        ({"HF_HUB_OFFLINE": "1", "HF_TOKEN": secret}, ["--repo", "org/name"], "--repo org/name: cannot push while HF_HUB_OFFLINE is set"),
        ({}, ["--repo", "org/name"], "push: not logged in to the Hugging Face Hub"),
        # Nothing listens on port 9: the upload fails as it would without a network.
        ({"HF_TOKEN": secret, "HF_ENDPOINT": "http://127.0.0.1:9"}, ["--repo", "org/name", "--private"], "--repo org/name: push failed ("),
        ({"HF_TOKEN": secret}, ["--repo", "not-a-repo"], "hf:not-a-repo: expected hf:ORG/NAME"),
    ]
    for extra, arguments, message in cases:
        result = subprocess.run([RANKONE, "push", str(out), *arguments], env={**base_env, **extra}, capture_output=True, text=True, timeout=300)
        assert result.returncode == 2 and message in result.stderr, (extra, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and secret not in result.stdout + result.stderr
    code, _, err = rankone_cli("push", tmp_path, "--repo", "org/name")
    assert code == 2 and f"{tmp_path}: not an exported model (no rankone.json)" in err


def test_a_pushed_model_loads_from_the_hub_cache_offline(tmp_path, every_stage_workspace, labeled_data, rankone_cli, monkeypatch):
    import huggingface_hub.constants

    out = tmp_path / "model"
    assert rankone_cli("export", "-w", every_stage_workspace.root, "--out", out, "--shard-size", "60kB")[0] == 0
    files = {path.name: path for path in out.iterdir()}
    cache = tmp_path / "hf-cache"
    populate_hf_cache(cache, "my-org/rankone-tiny", files, "d" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))

    pixels = images(3)
    local = rankone.load(out)
    with torch.no_grad():
        for source in ("hf:my-org/rankone-tiny", f"hf:my-org/rankone-tiny@{'d' * 40}"):
            pulled = rankone.load(source)
            torch.testing.assert_close(pulled.classify(pixels, "gamma"), local.classify(pixels, "gamma"), atol=0, rtol=0)
    image = next((labeled_data / "gamma").rglob("*.png"))
    code, stdout, err = rankone_cli("predict", "hf:my-org/rankone-tiny", "--task", "gamma", image, "--json")
    assert code == 0, err
    expected = predict(local, [image], "gamma")
    assert json.loads(stdout) == expected

    code, _, err = rankone_cli("predict", "hf:my-org/absent", "--task", "gamma", image)
    assert code == 2 and err.startswith("error: hf:my-org/absent: could not get model repo my-org/absent") and len(err.strip().splitlines()) <= 2
    populate_hf_cache(cache, "my-org/plain", {"config.json": out / "open_clip_config.json"}, "e" * 40)
    with pytest.raises(RankoneError, match="hf:my-org/plain: not a model exported by rankone"):
        rankone.load("hf:my-org/plain")


def test_lazy_open_clip_does_not_break_a_later_transformers_import(tmp_path):
    # inspect.getmodule walks sys.modules during torch's imports; a lazy module there imported open_clip mid-import.
    code = "import rankone.models\nfrom transformers import CLIPModel\nprint(CLIPModel.__name__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "CLIPModel", result.stderr[-2000:]
