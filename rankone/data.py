"""Image folders: labeled `DIR/<task>/<class>/<image>` and unlabeled `DIR/<task>/**/<image>`.

`--data` may name several roots (a task is looked up in each, in order) and `TASK=DIR`
pairs (DIR is that task's own folder); `DataFolders` holds them.

Class names come from the class folder names (underscores read as spaces) unless the
caller passes them; then each folder is matched to one of the given names, and the order
of the given names defines the labels. Files that are not images are skipped and counted.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from rankone.errors import RankoneError
from rankone.options import OptionValue

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})


@dataclass
class LabeledImages:
    paths: list[Path]
    labels: list[int]
    classnames: list[str]
    skipped: int = 0
    task: str = ""


class ImagePaths(list):
    """A list of image paths that also says how many non-image files were skipped."""

    def __init__(self, paths: Sequence[Path] = (), skipped: int = 0) -> None:
        super().__init__(paths)
        self.skipped = skipped


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def class_key(name: str) -> str:
    """What a class folder and a class name are compared by: case ignored, `_`, `/` and runs of
    spaces alike (so `sources.class_folder_name`'s folders map back to their class names)."""
    return " ".join(name.replace("_", " ").replace("/", " ").lower().split())


@dataclass(frozen=True)
class DataFolders(OptionValue):
    """Where each task's images are: its `TASK=DIR` folder when one is given, else ROOT/<task>/
    in the first root that has it."""

    roots: tuple[Path, ...] = ()
    pairs: tuple[tuple[str, Path], ...] = ()
    metavar = "DIR|TASK=DIR"

    @classmethod
    def from_option(cls, value: Any, flag: str = "--data") -> DataFolders:
        """From a folder, a list of folders and `TASK=DIR` pairs, or a {task: folder} mapping."""
        if isinstance(value, DataFolders):
            return value
        if isinstance(value, Mapping):
            items: list[Any] = [f"{task}={folder}" for task, folder in value.items()]
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            items = [value]
        roots: list[Path] = []
        pairs: dict[str, Path] = {}
        for item in items:
            if not isinstance(item, (str, Path)) or not str(item):
                raise RankoneError(f"{flag} {item!r}: expected a folder or TASK=DIR")
            task, sep, folder = str(item).partition("=")
            # A folder whose name holds `=` stays a folder; a pair's task is a bare name.
            if isinstance(item, str) and sep and task and "/" not in task and not Path(item).is_dir():
                if not folder:
                    raise RankoneError(f"{flag} {item!r}: expected TASK=DIR")
                if task in pairs:
                    raise RankoneError(f"{flag}: task {task!r} given twice")
                pairs[task] = Path(folder)
            else:
                roots.append(Path(item))
        if not roots and not pairs:
            raise RankoneError(f"{flag}: expected a folder or TASK=DIR")
        return cls(tuple(roots), tuple(pairs.items()))

    def plain(self) -> str | list[str]:
        """One root as a string (what a single --data always was), else the list as typed."""
        if len(self.roots) == 1 and not self.pairs:
            return str(self.roots[0])
        return [str(root) for root in self.roots] + [f"{task}={folder}" for task, folder in self.pairs]

    def folders(self) -> list[Path]:
        return [*self.roots, *(folder for _, folder in self.pairs)]

    def require_folders(self, flag: str, problem: str) -> DataFolders:
        """Itself, once every folder it names exists; else `FLAG FOLDER: problem` for the first that does not."""
        for folder in self.folders():
            if not folder.is_dir():
                raise RankoneError(f"{flag} {folder}: {problem}")
        return self

    def __str__(self) -> str:
        shown = self.plain()
        return shown if isinstance(shown, str) else ", ".join(shown)

    def find(self, task: str) -> Path | None:
        """The task's folder, or None when no root has one."""
        for name, folder in self.pairs:
            if name == task:
                return folder
        return next((root / task for root in self.roots if (root / task).is_dir()), None)

    def task_folder(self, task: str) -> Path:
        folder = self.find(task)
        if folder is None or not folder.is_dir():
            shown = folder if folder is not None else " or ".join(str(root / task) for root in self.roots)
            raise RankoneError(f"{shown}: no folder for task {task!r} (expected DIR/<task>/... or {task}=DIR)")
        return folder

    def task_names(self) -> list[str]:
        """Every task that has a folder: the pairs', then each root's subfolders (hidden ones left out)."""
        names = [task for task, _ in self.pairs]
        for root in self.roots:
            if root.is_dir():
                names += [entry.name for entry in sorted(root.iterdir()) if entry.is_dir() and not entry.name.startswith(".")]
        return list(dict.fromkeys(names))


def data_folders(data: DataFolders | Path | str) -> DataFolders:
    """`data` as DataFolders (a Path is always one root)."""
    return DataFolders.from_option(data)


def _files_under(folder: Path) -> tuple[list[Path], int]:
    images, skipped = [], 0
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        if is_image(path):
            images.append(path)
        else:
            skipped += 1
    return images, skipped


def labeled_images(root: DataFolders | Path | str, task: str, classnames: Sequence[str] | None = None) -> LabeledImages:
    """Images of `root/<task>/<class>/**` with integer labels.

    Without `classnames`, classes are the sorted folder names with `_` read as a space.
    With them, each folder must match one name (see `class_key`); labels follow their order.
    Files directly in the task folder, and non-image files, are skipped and counted.
    """
    folder = data_folders(root).task_folder(task)
    class_folders = sorted(path for path in folder.iterdir() if path.is_dir() and not path.name.startswith("."))
    skipped = sum(1 for path in folder.iterdir() if path.is_file())
    if not class_folders:
        raise RankoneError(f"{folder}: no class folders (expected {folder}/<class>/<image>)")
    if classnames is None:
        names = [path.name.replace("_", " ") for path in class_folders]
        label_of = {path: index for index, path in enumerate(class_folders)}
    else:
        names = list(classnames)
        index_of: dict[str, int] = {}
        for index, name in enumerate(names):
            index_of.setdefault(class_key(name), index)
        label_of = {}
        for path in class_folders:
            key = class_key(path.name)
            if key not in index_of:
                raise RankoneError(f"{path}: class folder matches none of the {len(names)} class names (for example {names[0]!r})")
            label_of[path] = index_of[key]
    paths: list[Path] = []
    labels: list[int] = []
    for path in class_folders:
        images, skipped_here = _files_under(path)
        skipped += skipped_here
        paths.extend(images)
        labels.extend([label_of[path]] * len(images))
    if not paths:
        raise RankoneError(f"{folder}: no images for task {task!r} (skipped {skipped} non-image files)")
    return LabeledImages(paths=paths, labels=labels, classnames=names, skipped=skipped, task=task)


def unlabeled_images(root: DataFolders | Path | str, task: str) -> ImagePaths:
    """Every image under `root/<task>/` at any depth, sorted; `.skipped` counts non-image files."""
    folder = data_folders(root).task_folder(task)
    images, skipped = _files_under(folder)
    if not images:
        raise RankoneError(f"{folder}: no images for task {task!r} (skipped {skipped} non-image files)")
    return ImagePaths(images, skipped)


def load_image(path: Path) -> Image.Image:
    """An image file as RGB; an unreadable one is an error naming the file."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
        raise RankoneError(f"{path}: not a readable image ({error})") from None


class ImageDataset(Dataset):
    """Images (RGB, transformed) and, when labels are given, (image, label) pairs."""

    def __init__(
        self,
        paths: Sequence[Path],
        labels: Sequence[int] | None = None,
        transform: Callable[[Image.Image], torch.Tensor] | None = None,
    ) -> None:
        if labels is not None and len(labels) != len(paths):
            raise RankoneError(f"dataset: {len(paths)} images but {len(labels)} labels")
        self.paths = list(paths)
        self.labels = None if labels is None else list(labels)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        image = load_image(Path(self.paths[index]))
        tensor = self.transform(image) if self.transform is not None else _to_tensor(image)
        if self.labels is None:
            return tensor
        return tensor, int(self.labels[index])


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise RankoneError(f"--batch-size {batch_size}: must be at least 1")


def image_loader(dataset: Dataset, batch_size: int, shuffle: bool = False, seed: int = 0, workers: int = 0) -> DataLoader:
    """A DataLoader; with `shuffle`, the order is fixed by `seed`."""
    check_batch_size(batch_size)
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=workers)
