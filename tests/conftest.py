"""Shared fixtures: a tiny CLIP architecture, experts made from it, small image folders.

Everything is built here and written in real on-disk formats; nothing is mocked.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rankone.models import build_clip, visual_state
from rankone.workspace import Workspace

TINY_ARCHITECTURE = {
    "name": "tiny-test",
    "embed_dim": 16,
    "quick_gelu": False,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16, "mlp_ratio": 4.0},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
TASKS = ("alpha", "beta", "gamma")
CLASSES = {"alpha": ["red", "green"], "beta": ["dark", "light", "grey"], "gamma": ["left", "right"]}


@pytest.fixture
def tiny_architecture() -> dict:
    return copy.deepcopy(TINY_ARCHITECTURE)


def make_base_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A full CLIP state dict (both towers) with seeded random weights."""
    torch.manual_seed(seed)
    return {key: value.clone() for key, value in build_clip(TINY_ARCHITECTURE).state_dict().items()}


def make_expert_state(base: dict[str, torch.Tensor], seed: int, scale: float = 0.02) -> dict[str, torch.Tensor]:
    """An image tower that differs from the base by a seeded random task vector."""
    generator = torch.Generator().manual_seed(seed)
    return {
        key: value + scale * torch.randn(value.shape, generator=generator, dtype=value.dtype)
        for key, value in visual_state(base).items()
    }


def write_workspace(root: Path, base: dict[str, torch.Tensor], experts: dict[str, dict[str, torch.Tensor]]) -> Workspace:
    """A workspace as `rankone fetch` leaves it, written directly (unit tests of later stages)."""
    workspace = Workspace(root)
    updates = {
        "architecture": copy.deepcopy(TINY_ARCHITECTURE),
        "tasks": list(experts),
        "sources": {"base": {"source": "test"}, "experts": {task: {"source": "test"} for task in experts}},
    }
    with workspace.transaction(updates, create=True) as staging:
        staging.save_tensors("base.safetensors", base)
        for task, state in experts.items():
            staging.save_tensors(f"experts/{task}.safetensors", state)
    return workspace


@pytest.fixture
def base_state() -> dict[str, torch.Tensor]:
    return make_base_state(0)


@pytest.fixture
def expert_states(base_state) -> dict[str, dict[str, torch.Tensor]]:
    return {task: make_expert_state(base_state, seed=index + 1) for index, task in enumerate(TASKS)}


@pytest.fixture
def tiny_workspace(tmp_path, base_state, expert_states) -> Workspace:
    return write_workspace(tmp_path / "work", base_state, expert_states)


def write_image_folder(root: Path, per_class: int = 4, seed: int = 0, labeled: bool = True) -> Path:
    """`root/<task>/<class>/<n>.png` for TASKS/CLASSES: class-dependent colours plus noise."""
    rng = np.random.default_rng(seed)
    for task in TASKS:
        for class_index, class_name in enumerate(CLASSES[task]):
            folder = root / task / (class_name if labeled else f"part{class_index}")
            folder.mkdir(parents=True, exist_ok=True)
            colour = np.array([(37 * class_index + 60 * TASKS.index(task)) % 256, 120 + 40 * class_index, 200 - 50 * class_index])
            for n in range(per_class):
                pixels = np.clip(colour + rng.normal(0, 25, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{n}.png")
    return root


@pytest.fixture
def labeled_data(tmp_path) -> Path:
    return write_image_folder(tmp_path / "labeled", per_class=4, seed=0, labeled=True)


@pytest.fixture
def unlabeled_data(tmp_path) -> Path:
    return write_image_folder(tmp_path / "unlabeled", per_class=4, seed=1, labeled=False)
