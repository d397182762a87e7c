"""`rankone finetune`: the image tower learns against a frozen zero-shot head."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from rankone.cli import app
from rankone.data import ImageDataset, labeled_images
from rankone.errors import RankoneError
from rankone.sources import load_source
from rankone.finetune import OPEN_CLIP_CONFIG, finetune_expert, finetune_image_tower, write_open_clip_dir
from rankone.heads import logit_scale, zero_shot_head
from rankone.templates import templates_for
from rankone.models import load_clip, preprocess_for, tokenizer_for
from rankone.workspace import load_tensors


def read_open_clip_dir(path):
    loaded = load_source(str(path))
    return loaded.architecture, loaded.state_dict


def _training_loss(architecture, state, head, dataset) -> float:
    """Cross-entropy over the whole set, computed apart from the code under test."""
    model = load_clip(architecture, state)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    labels = torch.tensor([dataset[i][1] for i in range(len(dataset))])
    with torch.no_grad():
        logits = model.logit_scale.exp() * F.normalize(model.encode_image(images), dim=-1) @ F.normalize(head, dim=-1).T
    return float(F.cross_entropy(logits, labels))


def test_finetune_lowers_the_loss_and_changes_only_the_image_tower(tiny_architecture, base_state, labeled_data, tmp_path):
    torch.manual_seed(0)
    task = "beta"
    labeled = labeled_images(labeled_data, task)
    model = load_clip(tiny_architecture, base_state)
    head = zero_shot_head(model, tokenizer_for(tiny_architecture), labeled.classnames, templates_for(task), logit_scale(base_state))
    dataset = ImageDataset(labeled.paths, labeled.labels, preprocess_for(tiny_architecture))
    before = _training_loss(tiny_architecture, base_state, head, dataset)

    result = finetune_expert(tiny_architecture, base_state, task, labeled_data, tmp_path / "expert", steps=30, lr=1e-3, batch_size=8)
    architecture, state = read_open_clip_dir(result.out)
    after = _training_loss(architecture, state, head, dataset)
    assert after < before - 0.1

    assert set(state) == set(base_state)
    changed = [key for key in state if not torch.equal(state[key], base_state[key])]
    assert changed and all(key.startswith("visual.") for key in changed)
    assert any(key.startswith("visual.transformer.") for key in changed)
    config = json.loads((result.out / OPEN_CLIP_CONFIG).read_text())
    assert config["model_cfg"]["vision_cfg"] == tiny_architecture["vision_cfg"]
    assert config["rankone"]["finetune"]["classnames"] == labeled.classnames


def test_finetune_is_seeded(tiny_architecture, base_state, labeled_data):
    model_a, model_b = load_clip(tiny_architecture, base_state), load_clip(tiny_architecture, base_state)
    labeled = labeled_images(labeled_data, "alpha")
    head = torch.nn.functional.normalize(torch.randn(2, tiny_architecture["embed_dim"]), dim=-1)
    dataset = ImageDataset(labeled.paths, labeled.labels, preprocess_for(tiny_architecture))
    tower_a, losses_a = finetune_image_tower(model_a, head, dataset, steps=3, lr=1e-3, batch_size=4, seed=5)
    tower_b, losses_b = finetune_image_tower(model_b, head, dataset, steps=3, lr=1e-3, batch_size=4, seed=5)
    assert losses_a == losses_b
    assert all(torch.equal(tower_a[key], tower_b[key]) for key in tower_a)


def test_open_clip_dir_loads_in_open_clip(tiny_architecture, base_state, tmp_path):
    import open_clip

    out = write_open_clip_dir(tmp_path / "model", tiny_architecture, base_state)
    config = json.loads((out / OPEN_CLIP_CONFIG).read_text())
    model = open_clip.CLIP(**config["model_cfg"])
    model.load_state_dict(load_tensors(out / "open_clip_model.safetensors"))


def test_finetune_refuses_a_non_empty_out(tiny_architecture, base_state, labeled_data, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(RankoneError, match="taken: exists"):
        finetune_expert(tiny_architecture, base_state, "alpha", labeled_data, out, steps=1)
    assert [path.name for path in out.iterdir()] == ["keep.txt"]


def test_cli_finetune_writes_an_expert_and_reports_errors(tiny_workspace, labeled_data, tmp_path):
    runner = CliRunner()
    out = tmp_path / "gamma-expert"
    result = runner.invoke(app, ["finetune", "-w", str(tiny_workspace.root), "--task", "gamma", "--data", str(labeled_data),
                                 "--out", str(out), "--steps", "2", "--batch-size", "4", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    architecture, state = read_open_clip_dir(out)
    assert architecture["vision_cfg"] == tiny_workspace.architecture["vision_cfg"]
    assert "visual.proj" in state and "text_projection" in state

    missing = runner.invoke(app, ["finetune", "-w", str(tiny_workspace.root), "--task", "delta", "--data", str(labeled_data),
                                  "--out", str(tmp_path / "delta"), "--steps", "2"])
    assert isinstance(missing.exception, RankoneError) and "delta" in str(missing.exception)
    assert not (tmp_path / "delta").exists()

    bad_steps = runner.invoke(app, ["finetune", "-w", str(tiny_workspace.root), "--task", "gamma", "--data", str(labeled_data),
                                    "--out", str(tmp_path / "zero"), "--steps", "0"])
    assert isinstance(bad_steps.exception, RankoneError) and "--steps" in str(bad_steps.exception)


def test_rankone_fetch_accepts_the_finetuned_expert(tiny_architecture, base_state, labeled_data, tmp_path):
    from rankone.sources import fetch
    from rankone.workspace import Workspace

    base_dir = write_open_clip_dir(tmp_path / "base", tiny_architecture, base_state)
    result = finetune_expert(tiny_architecture, base_state, "alpha", labeled_data, tmp_path / "alpha", steps=3, lr=1e-3, batch_size=4)
    workspace = Workspace(tmp_path / "work")
    fetch(workspace, str(base_dir), {"alpha": str(result.out)}, progress=False)
    expert = workspace.load_tensors("experts/alpha.safetensors")
    _, written = read_open_clip_dir(result.out)
    assert set(expert) == {key for key in written if key.startswith("visual.")}
    assert all(torch.equal(expert[key], written[key]) for key in expert)


def test_finetune_reports_zero_shot_and_fine_tuned_accuracy_as_eval_measures_them(tiny_workspace, labeled_data, tmp_path, rankone_cli):
    """The summary's two numbers are what `rankone eval` gives the base and the new expert on the same images."""
    import json

    from conftest import write_open_clip_dir as write_base_dir

    out = tmp_path / "gamma-expert"
    code, stdout, err = rankone_cli("finetune", "-w", tiny_workspace.root, "--task", "gamma", "--data", labeled_data, "--eval-data",
                                    labeled_data, "--out", out, "--steps", "8", "--batch-size", "4", "--lr", "1e-3")
    assert code == 0, err
    recipe = json.loads((out / "open_clip_config.json").read_text())["rankone"]["finetune"]
    assert recipe["eval_images"] == 8 and recipe["eval_source"] == f"--eval-data {labeled_data}"
    assert (f"top-1 on 8 images (--eval-data {labeled_data}): zero-shot {recipe['zero_shot_accuracy']:.1f}% → "
            f"fine-tuned {recipe['accuracy']:.1f}%") in stdout

    work = tmp_path / "check"
    write_base_dir(tmp_path / "base", tiny_workspace.load_tensors("base.safetensors"))
    assert rankone_cli("fetch", "-w", work, "--base", tmp_path / "base", "--expert", f"gamma={out}")[0] == 0
    for method, key in (("pretrained", "zero_shot_accuracy"), ("individual", "accuracy")):
        code, _, err = rankone_cli("eval", "-w", work, "--method", method, "--data", labeled_data)
        assert code == 0, err
        assert abs(json.loads((work / "eval" / f"{method}.json").read_text())["tasks"]["gamma"]["accuracy"] - recipe[key]) < 1e-9

    # Without --eval-data a seeded tenth of --data is held out, and training sees the rest.
    held_out = tmp_path / "held-out"
    code, stdout, err = rankone_cli("finetune", "-w", tiny_workspace.root, "--task", "beta", "--data", labeled_data, "--out", held_out,
                                    "--steps", "2", "--batch-size", "4")
    assert code == 0, err
    recipe = json.loads((held_out / "open_clip_config.json").read_text())["rankone"]["finetune"]
    assert recipe["eval_images"] == 1 and recipe["images"] == 11 and "10% of --data held out" in stdout
