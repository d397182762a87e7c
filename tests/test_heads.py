"""Zero-shot heads against an independent computation, template tables, the head cache."""

from __future__ import annotations

import math

import importlib.util
import json

import pytest
import torch

from rankone.errors import RankoneError
from rankone.heads import (
    classify_logits,
    logit_scale,
    fusionbench_classnames_and_templates,
    head_for_task,
    read_lines,
    template_strings,
    zero_shot_head,
)
from rankone.templates import canonical_task, template_table, templates_for
from rankone.models import load_clip, tokenizer_for

FUSIONBENCH_TASKS = (
    "sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd", "oxford_flowers102", "pcam",
    "fer2013", "oxford-iiit-pet", "stl10", "cifar100", "cifar10", "food101", "fashion_mnist", "emnist_letters",
    "kmnist", "rendered-sst2",
)


def test_every_task_has_its_own_template_set():
    generic = templates_for("generic")
    for task in FUSIONBENCH_TASKS:
        templates = templates_for(task)
        assert templates and templates != generic, task
        assert all("{}" in template for template in templates), task
    assert set(template_table()) == set(FUSIONBENCH_TASKS) | {"generic"}


def test_template_lookup_names():
    assert canonical_task("stanford_cars") == "stanford-cars"
    assert canonical_task("cars") == "stanford-cars"
    assert canonical_task("Oxford-Flowers102") == "oxford_flowers102"
    assert templates_for("my-own-task") == templates_for("generic")


def test_template_strings():
    assert template_strings([lambda c: f"a photo of {c}."]) == ["a photo of {}."]
    with pytest.raises(RankoneError, match="no {} placeholder"):
        template_strings(["a photo."])
    with pytest.raises(RankoneError, match="braces"):
        template_strings(["a {name} {}."])


def test_read_lines(tmp_path):
    path = tmp_path / "names.txt"
    path.write_text("sea lion\n\n  cat \n")
    assert read_lines(path, "class names") == ["sea lion", "cat"]
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(RankoneError, match="empty.txt: no class names"):
        read_lines(tmp_path / "empty.txt", "class names")


def independent_head(model, tokenizer, classnames, templates):
    """Unit class embeddings times the model's exp(logit_scale), computed apart from heads.py."""
    rows = []
    with torch.no_grad():
        for classname in classnames:
            tokens = tokenizer([template.format(classname) for template in templates])
            embeddings = model.encode_text(tokens)
            embeddings = embeddings / embeddings.norm(dim=-1, keepdim=True)
            mean = embeddings.mean(dim=0)
            rows.append(mean / mean.norm())
        scale = float(torch.exp(model.logit_scale))
    return scale * torch.stack(rows)


def test_zero_shot_head_matches_independent_computation(tiny_architecture, base_state):
    model = load_clip(tiny_architecture, base_state)
    tokenizer = tokenizer_for(tiny_architecture)
    classnames, templates = ["red", "green", "sea lion"], ["a photo of a {}.", "a {} thing.", "{}"]
    head = zero_shot_head(model, tokenizer, classnames, templates, logit_scale(base_state))
    assert head.shape == (3, tiny_architecture["embed_dim"])
    assert torch.allclose(head, independent_head(model, tokenizer, classnames, templates), atol=1e-5)


def test_classify_logits():
    embeddings = torch.tensor([[3.0, 4.0], [0.0, -2.0]])
    head = 100 * torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])  # unit rows at scale 100
    expected = torch.tensor([[60.0, 80.0, 100.0], [0.0, -100.0, -80.0]])
    assert torch.allclose(classify_logits(embeddings, head), expected)


def test_logit_scale_is_the_checkpoints_own_or_specs_100():
    assert logit_scale({"logit_scale": torch.tensor(math.log(100.0))}) == pytest.approx(100.0, rel=1e-6)
    assert logit_scale({"logit_scale": torch.tensor(math.log(15.0))}) == pytest.approx(15.0, rel=1e-6)
    assert logit_scale({"visual.proj": torch.zeros(2, 2)}) == 100.0


def test_head_cache(tiny_workspace, tiny_architecture, base_state):
    classnames = ["red", "green"]
    head = head_for_task(tiny_workspace, "alpha", classnames)
    files = sorted(path.name for path in tiny_workspace.path("heads").iterdir())
    assert len(files) == 1 and files[0].startswith("alpha-")
    model = load_clip(tiny_architecture, base_state)
    expected = independent_head(model, tokenizer_for(tiny_architecture), classnames, templates_for("alpha"))
    assert torch.allclose(head, expected, atol=1e-5)

    manifest = tiny_workspace.manifest_path.read_text()
    again = head_for_task(tiny_workspace, "alpha", classnames)
    assert torch.equal(again, head)
    assert sorted(path.name for path in tiny_workspace.path("heads").iterdir()) == files
    assert tiny_workspace.manifest_path.read_text() == manifest

    other = head_for_task(tiny_workspace, "alpha", classnames, templates=["a photo of {}."])
    names = sorted(path.name for path in tiny_workspace.path("heads").iterdir())
    assert len(names) == 2 and not torch.equal(other, head)
    renamed = head_for_task(tiny_workspace, "alpha", ["green", "red"])
    assert len(list(tiny_workspace.path("heads").iterdir())) == 3
    assert torch.allclose(renamed, head.flip(0), atol=1e-6)
    stored = json.loads(tiny_workspace.manifest_path.read_text())["files"]
    assert sum(1 for relpath in stored if relpath.startswith("heads/")) == 3


@pytest.mark.skipif(importlib.util.find_spec("fusion_bench") is not None, reason="fusion-bench is installed")
def test_fusionbench_missing_says_how_to_install():
    with pytest.raises(RankoneError, match=r"pip install 'rankone\[fusionbench\]'"):
        fusionbench_classnames_and_templates("mnist")
