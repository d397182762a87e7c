"""export → load → classify, predict, `rankone eval --method rankone`, and the whole CLI on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import rankone
from rankone.methods.artifact import CONFIG_FILE, WEIGHTS_FILE
from rankone.heads import classify_logits
from rankone.methods import load_method
from rankone.task_vectors import compute_task_vectors
from rankone.workspace import Workspace

from conftest import write_open_clip_dir

TASKS = ["alpha", "beta", "gamma"]


@pytest.fixture
def adapted_workspace(tiny_workspace, unlabeled_data, labeled_data, rankone_cli) -> Workspace:
    compute_task_vectors(tiny_workspace)
    for args in (("build-pool", "--k", "4"),
                 ("adapt", "--data", unlabeled_data, "--classnames-from", labeled_data, "--steps", "2", "--batch-size", "4", "--lr", "0.05")):
        code, _, err = rankone_cli(*args, "-w", tiny_workspace.root)
        assert code == 0, err
    return tiny_workspace


def images(seed: int = 0) -> torch.Tensor:
    return torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_export_load_classify_equals_the_workspace_model(tmp_path, adapted_workspace, rankone_cli):
    out = tmp_path / "model"
    code, stdout, err = rankone_cli("export", "-w", adapted_workspace.root, "--out", out)
    assert code == 0, err
    assert sorted(path.name for path in out.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE, "README.md", "open_clip_config.json"])
    config = json.loads((out / CONFIG_FILE).read_text())
    assert config["tasks"] == TASKS and config["k"] == 4 and config["select"] == 0.75 and config["lambda"] == 0.3
    assert config["routing"] == "per-sample" and config["classnames"]["beta"] == ["dark", "grey", "light"]
    assert config["templates"]["alpha"] and "torch" in config["versions"] and config["architecture"]["name"] == "tiny-test"

    exported = rankone.load(out)
    from_workspace = rankone.load(adapted_workspace.root)
    method = load_method(adapted_workspace, "rankone", "cpu")
    batch = images()
    with torch.no_grad():
        for task in TASKS:
            expected = from_workspace.classify(batch, task)
            torch.testing.assert_close(exported.classify(batch, task), expected, atol=1e-5, rtol=0)
            torch.testing.assert_close(classify_logits(method.encoder_for_task(task)(batch), from_workspace.head(task)), expected, atol=1e-5, rtol=0)
        # Independent: exp(logit_scale) · cos(embedding, head row), from the exported tensors and the base.
        embedding = exported.encode_image(batch)
        from safetensors.torch import load_file

        head = load_file(str(out / WEIGHTS_FILE))["heads.beta"]
        scale = float(adapted_workspace.load_tensors("base.safetensors")["logit_scale"].exp())
        cosine = torch.nn.functional.normalize(embedding, dim=-1) @ torch.nn.functional.normalize(head, dim=-1).T
        torch.testing.assert_close(exported.classify(batch, "beta"), scale * cosine)
    assert method.parameters == config["parameters"]["total"] == 41_240



def test_export_and_load_errors(tmp_path, adapted_workspace, tiny_workspace, rankone_cli):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    code, _, err = rankone_cli("export", "-w", adapted_workspace.root, "--out", foreign)
    assert code == 2 and "exists and is not an earlier export" in err
    assert [path.name for path in foreign.iterdir()] == ["notes.txt"]
    code, _, err = rankone_cli("export", "-w", adapted_workspace.root, "--out", tmp_path / "m", "--dtype", "int8")
    assert code == 2 and "--dtype 'int8'" in err and not (tmp_path / "m").exists()

    assert rankone_cli("export", "-w", adapted_workspace.root, "--out", tmp_path / "m")[0] == 0
    weights = tmp_path / "m" / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    code, _, err = rankone_cli("predict", tmp_path / "m", "--task", "alpha", tmp_path / "x.png")
    assert code == 2 and "does not match the sha256" in err
    code, _, err = rankone_cli("predict", tmp_path / "nothing", "--task", "alpha", tmp_path / "x.png")
    assert code == 2 and f"{tmp_path / 'nothing'}: no such model folder or image file" in err
    (tmp_path / "empty").mkdir()
    code, _, err = rankone_cli("predict", tmp_path / "empty", "--task", "alpha", tmp_path / "x.png")
    assert code == 2 and "neither an exported model" in err

    # An export from before heads carried the logit scale: refused, with what to do.
    assert rankone_cli("export", "-w", adapted_workspace.root, "--out", tmp_path / "old")[0] == 0
    config_path = tmp_path / "old" / "rankone.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "format": 1}))
    code, _, err = rankone_cli("predict", tmp_path / "old", "--task", "alpha", tmp_path / "x.png")
    assert code == 2 and f"{config_path}: artifact format 1" in err and "run `rankone export` again" in err


def test_predict_prints_top_classes_and_names_known_tasks(tmp_path, adapted_workspace, labeled_data, rankone_cli):
    out = tmp_path / "model"
    assert rankone_cli("export", "-w", adapted_workspace.root, "--out", out)[0] == 0
    files = [labeled_data / "beta" / "dark" / "0.png", labeled_data / "beta" / "light" / "1.png"]
    code, stdout, err = rankone_cli("predict", out, "--task", "beta", *files, "--json")
    assert code == 0, err
    results = json.loads(stdout)
    model = rankone.load(out)
    pixels = torch.stack([model.preprocess(Image.open(path).convert("RGB")) for path in files])
    with torch.no_grad():
        probabilities = model.classify(pixels, "beta").softmax(-1)
    for result, row in zip(results, probabilities):
        assert result["task"] == "beta" and len(result["top"]) == 3
        names = ["dark", "grey", "light"]
        for entry in result["top"]:
            assert entry["probability"] == pytest.approx(float(row[names.index(entry["class"])]), abs=1e-6)
        assert [entry["probability"] for entry in result["top"]] == sorted((e["probability"] for e in result["top"]), reverse=True)
    code, stdout, _ = rankone_cli("predict", out, "--task", "beta", files[0], "--top", "2")
    assert code == 0 and str(files[0]) in stdout and stdout.count("%") == 2
    code, _, err = rankone_cli("predict", out, "--task", "cars", files[0])
    assert code == 2 and "--task 'cars': unknown task; known tasks: alpha, beta, gamma" in err
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    code, _, err = rankone_cli("predict", out, "--task", "beta", broken)
    assert code == 2 and f"{broken}: not a readable image" in err


def test_eval_rankone_like_every_method(adapted_workspace, labeled_data, rankone_cli):
    code, stdout, err = rankone_cli("eval", "-w", adapted_workspace.root, "--method", "rankone", "--data", labeled_data)
    assert code == 0, err
    report = adapted_workspace.read_json("eval/rankone.json")
    assert report["parameters"] == 41_240 and set(report["tasks"]) == set(TASKS)
    model = rankone.load(adapted_workspace.root)
    from rankone.data import ImageDataset, labeled_images

    found = labeled_images(labeled_data, "gamma")
    dataset = ImageDataset(found.paths, found.labels, model.preprocess)
    with torch.no_grad():
        predicted = model.classify(torch.stack([dataset[i][0] for i in range(len(dataset))]), "gamma").argmax(-1)
    accuracy = 100.0 * float((predicted == torch.tensor(found.labels)).float().mean())
    assert report["tasks"]["gamma"]["accuracy"] == pytest.approx(accuracy)


def test_the_whole_cli_from_fetch_to_predict(tmp_path, base_state, expert_states, labeled_data, unlabeled_data, rankone_cli):
    base = write_open_clip_dir(tmp_path / "models" / "base", base_state)
    experts = [f"{task}={write_open_clip_dir(tmp_path / 'models' / task, {**base_state, **state})}" for task, state in expert_states.items()]
    work = tmp_path / "work"
    steps = [
        ("fetch", "--base", base, *[arg for pair in experts for arg in ("--expert", pair)]),
        ("task-vectors",),
        ("build-pool", "--k", "4", "--lambda", "0.3"),
        ("adapt", "--data", unlabeled_data, "--classnames-from", labeled_data, "--steps", "2", "--batch-size", "4"),
        ("eval", "--method", "rankone", "--data", labeled_data),
        ("export", "--out", tmp_path / "model"),
    ]
    printed = {}
    for args in steps:
        code, printed[args[0]], err = rankone_cli(*args, "-w", work, "--device", "cpu")
        assert code == 0, f"{args[0]}: {err}"
    assert "RankOne-MoE total" in printed["build-pool"] and "41,240" in printed["build-pool"] and "32,768" in printed["build-pool"]
    code, stdout, err = rankone_cli("predict", tmp_path / "model", "--task", "gamma", labeled_data / "gamma" / "left" / "0.png", "--json")
    assert code == 0, err
    (result,) = json.loads(stdout)
    assert {entry["class"] for entry in result["top"]} == {"left", "right"}
    assert sum(entry["probability"] for entry in result["top"]) == pytest.approx(1.0, abs=1e-5)
    assert Workspace(work).read_json("eval/rankone.json")["parameters"] == 41_240


def safetensors_header(path: Path) -> tuple[int, dict]:
    """(header length, header) read from the file's first bytes, independently of safetensors."""
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    return length, json.loads(raw[8 : 8 + length])


def test_half_precision_export_is_smaller_by_the_tensor_bytes_and_still_classifies(tmp_path, adapted_workspace, labeled_data, rankone_cli):
    from rankone.data import ImageDataset, labeled_images

    sizes, added_values = {}, {}
    for dtype, tag in (("fp32", "F32"), ("fp16", "F16"), ("bf16", "BF16")):
        code, _, err = rankone_cli("export", "-w", adapted_workspace.root, "--out", tmp_path / dtype, "--dtype", dtype)
        assert code == 0, err
        weights = tmp_path / dtype / WEIGHTS_FILE
        length, header = safetensors_header(weights)
        tensors = {name: entry for name, entry in header.items() if name != "__metadata__"}
        added = {name for name in tensors if name.endswith((".pool_u", ".pool_v")) or ".mlp.router." in name}
        assert any(name.endswith(".pool_u") for name in added) and any(".mlp.router." in name for name in added)
        # Pool and routers in the chosen precision; tower, pretrained MLP weights and heads stay fp32.
        assert {tensors[name]["dtype"] for name in added} == {tag}
        assert {entry["dtype"] for name, entry in tensors.items() if name not in added} == {"F32"}
        added_values[dtype] = sum(torch.Size(tensors[name]["shape"]).numel() for name in added)
        sizes[dtype] = weights.stat().st_size - 8 - length
    assert added_values["fp16"] == added_values["bf16"] == added_values["fp32"]
    assert sizes["fp32"] - sizes["fp16"] == sizes["fp32"] - sizes["bf16"] == 2 * added_values["fp32"]

    full = rankone.load(tmp_path / "fp32")
    for dtype in ("fp16", "bf16"):
        half = rankone.load(tmp_path / dtype)
        assert next(half.visual.parameters()).dtype == torch.float32
        for task in TASKS:
            found = labeled_images(labeled_data, task)
            dataset = ImageDataset(found.paths, found.labels, full.preprocess)
            pixels = torch.stack([dataset[index][0] for index in range(len(dataset))])
            with torch.no_grad():
                logits, expected = half.classify(pixels, task), full.classify(pixels, task)
            # Only the experts and routers are rounded (8 or 11 significant bits); the bound
            # follows HALF_LOGIT_TOLERANCE in test_evaluate.py, which rounds the whole tower.
            assert logits.dtype == torch.float32 and (logits - expected).abs().max() < 1.0
            assert torch.equal(logits.argmax(-1), expected.argmax(-1))
    bf16_compute = rankone.load(tmp_path / "bf16", dtype="bf16")
    assert next(bf16_compute.visual.parameters()).dtype == torch.bfloat16
    from rankone.errors import RankoneError

    with pytest.raises(RankoneError, match="--dtype 'fp64'"):
        rankone.load(tmp_path / "fp32", dtype="fp64")


def test_predict_defaults_to_the_workspace_and_takes_dtype(tmp_path, adapted_workspace, labeled_data, rankone_cli):
    image = labeled_data / "beta" / "dark" / "0.png"
    code, stdout, err = rankone_cli("predict", adapted_workspace.root, "--task", "beta", image, "--json")
    assert code == 0, err
    from_dir = json.loads(stdout)
    code, stdout, err = rankone_cli("predict", "-w", adapted_workspace.root, "--task", "beta", image, "--json")
    assert code == 0, err
    assert json.loads(stdout) == from_dir
    code, stdout, err = rankone_cli("predict", "-w", adapted_workspace.root, "--task", "beta", image, "--json", "--dtype", "bf16")
    assert code == 0, err
    (half,) = json.loads(stdout)
    assert half["top"][0]["class"] == from_dir[0]["top"][0]["class"]
    assert half["top"][0]["probability"] == pytest.approx(from_dir[0]["top"][0]["probability"], abs=0.02)
    code, _, err = rankone_cli("predict", adapted_workspace.root, "--task", "beta")
    assert code == 2 and "predict: no IMAGE given" in err
    code, _, err = rankone_cli("predict", "-w", tmp_path / "absent", "--task", "beta", image)
    assert code == 2 and f"-w {tmp_path / 'absent'}: no such workspace" in err
    code, _, err = rankone_cli("predict", adapted_workspace.root, "--task", "beta", tmp_path / "absent.png")
    assert code == 2 and f"{tmp_path / 'absent.png'}: no such image file" in err
    code, _, err = rankone_cli("predict", adapted_workspace.root, "--task", "beta", image, "--top", "0")
    assert code == 2 and "--top 0: must be at least 1" in err
    code, _, err = rankone_cli("predict", "-w", adapted_workspace.root, "--task", "beta", image, "--dtype", "half")
    assert code == 2 and "--dtype 'half'" in err
