"""Labeled and unlabeled image folders, datasets and loaders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CLASSES
from rankone.data import ImageDataset, image_loader, labeled_images, unlabeled_images
from rankone.errors import RankoneError
from rankone.models import preprocess_for


def write_png(path: Path, value: int, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (8, 8, 3) if mode == "RGB" else (8, 8)
    Image.fromarray(np.full(shape, value, dtype=np.uint8), mode=None).convert(mode).save(path)


@pytest.fixture
def pets(tmp_path) -> Path:
    root = tmp_path / "data"
    write_png(root / "pets" / "sea_lion" / "a.png", 10)
    write_png(root / "pets" / "sea_lion" / "nested" / "b.jpg", 20)
    write_png(root / "pets" / "cat" / "c.png", 30, mode="L")
    (root / "pets" / "cat" / "notes.txt").write_text("not an image")
    (root / "pets" / "README.md").write_text("not an image either")
    return root


def test_class_names_from_folders(pets):
    images = labeled_images(pets, "pets")
    assert images.classnames == ["cat", "sea lion"]
    assert [path.name for path in images.paths] == ["c.png", "a.png", "b.jpg"]
    assert images.labels == [0, 1, 1]
    assert images.skipped == 2


def test_given_class_names_define_the_labels(pets):
    images = labeled_images(pets, "pets", ["Sea Lion", "dog", "cat"])
    assert images.classnames == ["Sea Lion", "dog", "cat"]
    assert images.labels == [2, 0, 0]
    with pytest.raises(RankoneError, match=r"pets/sea_lion: class folder matches none"):
        labeled_images(pets, "pets", ["cat", "dog"])
    slashed = pets / "pets" / "Cat_Dog"
    write_png(slashed / "d.png", 40)
    # Folders in sorted order: Cat_Dog, cat, sea_lion.
    assert labeled_images(pets, "pets", ["cat/dog", "cat", "sea lion"]).labels == [0, 1, 2, 2]


def test_conftest_folders(labeled_data):
    images = labeled_images(labeled_data, "beta")
    assert images.classnames == sorted(CLASSES["beta"])
    assert len(images.paths) == 4 * len(CLASSES["beta"]) and images.skipped == 0


def test_missing_and_empty_task_folders(pets):
    with pytest.raises(RankoneError, match=r"data/birds: no folder for task 'birds'"):
        labeled_images(pets, "birds")
    (pets / "empty").mkdir()
    with pytest.raises(RankoneError, match=r"data/empty: no class folders"):
        labeled_images(pets, "empty")
    with pytest.raises(RankoneError, match=r"data/empty: no images for task 'empty'"):
        unlabeled_images(pets, "empty")
    (pets / "text" / "class").mkdir(parents=True)
    (pets / "text" / "class" / "a.txt").write_text("x")
    with pytest.raises(RankoneError, match=r"data/text: no images for task 'text' \(skipped 1 non-image files\)"):
        labeled_images(pets, "text")


def test_unlabeled_images(pets):
    paths = unlabeled_images(pets, "pets")
    assert sorted(path.name for path in paths) == ["a.png", "b.jpg", "c.png"]
    assert paths.skipped == 2
    assert isinstance(paths, list)


def test_dataset_converts_to_rgb_and_transforms(pets, tiny_architecture):
    images = labeled_images(pets, "pets")
    transform = preprocess_for(tiny_architecture)
    dataset = ImageDataset(images.paths, images.labels, transform)
    tensor, label = dataset[0]
    assert tensor.shape == (3, 32, 32) and label == 0
    assert torch.allclose(tensor, transform(Image.open(images.paths[0]).convert("RGB")))
    unlabeled = ImageDataset(images.paths, None, transform)
    assert unlabeled[1].shape == (3, 32, 32)
    with pytest.raises(RankoneError, match="3 images but 2 labels"):
        ImageDataset(images.paths, [0, 1], transform)


def test_unreadable_image_names_the_file(tmp_path):
    bad = tmp_path / "data" / "t" / "c" / "broken.png"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a png")
    dataset = ImageDataset(labeled_images(tmp_path / "data", "t").paths)
    with pytest.raises(RankoneError, match="broken.png: not a readable image"):
        dataset[0]


def test_loader_shuffle_is_seeded(labeled_data):
    images = labeled_images(labeled_data, "beta")
    dataset = ImageDataset(images.paths, images.labels)

    def order(seed):
        return [label for _, labels in image_loader(dataset, 4, shuffle=True, seed=seed) for label in labels.tolist()]

    assert order(3) == order(3)
    assert sorted(order(3)) == sorted(images.labels)
    plain = [label for _, labels in image_loader(dataset, 5) for label in labels.tolist()]
    assert plain == images.labels
