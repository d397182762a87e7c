"""Shared fixtures: a tiny CLIP architecture, experts made from it, small image folders.

Everything is built here and written in real on-disk formats; nothing is mocked.
"""

from __future__ import annotations

import collections
import copy
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from rankone import numerics
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


@pytest.fixture
def rankone_cli(capsys, monkeypatch):
    """Run `rankone ARGS...` in-process as a user would: returns (exit code, stdout, stderr)."""
    from rankone.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        monkeypatch.setattr("sys.argv", ["rankone", *map(str, args)])
        try:
            main()
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def unlabeled_entropy():
    """`measure(workspace, encode, unlabeled_dir, labeled_dir)`: mean over tasks of the entropy of
    every unlabeled image, through the heads adaptation builds (class names from labeled_dir)."""

    def measure(workspace: Workspace, encode, unlabeled: Path, labeled: Path) -> float:
        from rankone.training import batch_entropy, head_requests, task_heads, unlabeled_sets
        from rankone.heads import classify_logits
        from rankone.models import preprocess_for

        tasks = workspace.tasks
        heads = task_heads(workspace, head_requests(workspace, tasks, classnames_from=labeled), torch.device("cpu"))
        datasets = unlabeled_sets(unlabeled, tasks, preprocess_for(workspace.architecture))
        total = 0.0
        with torch.no_grad():
            for task, dataset in datasets.items():
                items = [dataset[index] for index in range(len(dataset))]
                images = torch.stack([item[0] if isinstance(item, (tuple, list)) else item for item in items])
                total += float(batch_entropy(classify_logits(encode(images), heads[task])))
        return total / len(datasets)

    return measure


# -- transformers CLIP checkpoints on disk (fetch / conversion tests) -----------------------

def tiny_transformers_config(hidden_act: str = "gelu"):
    """A tiny transformers CLIPConfig; vocab 49408 so open_clip's tokenizer ids fit."""
    from transformers import CLIPConfig

    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "max_position_embeddings": 16, "vocab_size": 49408, "hidden_act": hidden_act},
        vision_config={"hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": 32, "patch_size": 8, "hidden_act": hidden_act},
        projection_dim=16,
    )
    return config


def save_transformers_clip(folder: Path, hidden_act: str = "gelu", seed: int = 0):
    """A random transformers CLIPModel saved with save_pretrained (safetensors); returns the model."""
    from transformers import CLIPModel

    torch.manual_seed(seed)
    model = CLIPModel(tiny_transformers_config(hidden_act)).eval()
    model.save_pretrained(folder)
    return model


def save_transformers_expert(folder: Path, base_model, seed: int, scale: float = 0.02):
    """A CLIPVisionModel (no projection, like FusionBench's experts) = base image tower + noise."""
    from transformers import CLIPVisionModel

    expert = CLIPVisionModel(base_model.config.vision_config).eval()
    generator = torch.Generator().manual_seed(seed)
    state = {key: value + scale * torch.randn(value.shape, generator=generator) if value.is_floating_point() else value
             for key, value in base_model.vision_model.state_dict().items()}
    # transformers 5 dropped CLIPVisionModel's `vision_model` wrapper; older versions keep it.
    prefix = "vision_model." if any(key.startswith("vision_model.") for key in expert.state_dict()) else ""
    expert.load_state_dict({prefix + key: value for key, value in state.items()})
    expert.save_pretrained(folder)
    return expert


@pytest.fixture
def transformers_models(tmp_path):
    """(base CLIPModel, {task: CLIPVisionModel}, base dir, {task: dir}) saved as a user has them."""
    base_dir = tmp_path / "hf-base"
    base_model = save_transformers_clip(base_dir)
    expert_dirs = {task: tmp_path / f"hf-{task}" for task in ("mnist", "dtd")}
    experts = {task: save_transformers_expert(folder, base_model, seed=index + 1) for index, (task, folder) in enumerate(expert_dirs.items())}
    return base_model, experts, base_dir, expert_dirs


@pytest.fixture(scope="session")
def every_stage_template(tmp_path_factory) -> Workspace:
    """Built once per session (see every_stage_workspace); never modify it, copy it."""
    from rankone.methods import adapt_workspace, merge_workspace
    from rankone.methods.rankone import PoolOptions, build_pool_stage
    from rankone.training import AdaptOptions
    from rankone.task_vectors import compute_task_vectors

    root = tmp_path_factory.mktemp("every-stage")
    base = make_base_state(0)
    workspace = write_workspace(root / "work", base, {task: make_expert_state(base, seed=index + 1) for index, task in enumerate(TASKS)})
    labeled = write_image_folder(root / "labeled", per_class=4, seed=0, labeled=True)
    unlabeled = write_image_folder(root / "unlabeled", per_class=4, seed=1, labeled=False)
    compute_task_vectors(workspace)
    merge_workspace(workspace, "task-arithmetic")
    build_pool_stage(workspace, PoolOptions(k=2))
    for method in ("rankone", "adamerging", "wemoe"):
        options = AdaptOptions(data=unlabeled, steps=1, batch_size=2, classnames_from=labeled, progress=False)
        adapt_workspace(workspace, method, options, lr=1e-3)
    return workspace


@pytest.fixture
def every_stage_workspace(every_stage_template, tmp_path) -> Workspace:
    """A fresh copy of tiny_workspace after task-vectors, a task-arithmetic merge, build-pool (k 2)
    and one adaptation step of rankone, adamerging and wemoe; the heads' class names are those of
    the labeled_data fixture."""
    import shutil

    shutil.copytree(every_stage_template.root, tmp_path / "every-stage")
    return Workspace(tmp_path / "every-stage")


def write_open_clip_dir(folder: Path, state: dict[str, torch.Tensor], architecture: dict = TINY_ARCHITECTURE, pickle: bool = False) -> Path:
    """An open_clip model directory as the Hub keeps them (config + weights)."""
    import json

    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    model_cfg = {key: value for key, value in architecture.items() if key != "name"}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
    if pickle:
        torch.save(state, folder / "open_clip_pytorch_model.bin")
    else:
        save_file({key: value.contiguous() for key, value in state.items()}, folder / "open_clip_model.safetensors")
    return folder


def populate_hf_cache(cache: Path, repo_id: str, files: dict[str, Path], commit: str, repo_type: str = "model", ref: str | None = "main") -> None:
    """Lay files out as huggingface_hub's cache does: blobs by hash, snapshot symlinks, refs."""
    repo = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for relpath, source in files.items():
        data = source.read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        link = repo / "snapshots" / commit / relpath
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(repo / "blobs" / blob, link.parent))
    if ref:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)


def numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().double().numpy()


def reference_gates(mlp, x: np.ndarray, select: float, routing: str) -> np.ndarray:
    """The method's α' of a RankOneMLP for its input x (tokens on the mlp's token axis), computed apart from module.py:
    α = mean over tokens of the router, α' = α·sigmoid(100(α − thr)), thr the round(p·T·k)-th largest α."""
    alpha = (x @ numpy(mlp.router.weight).T + numpy(mlp.router.bias)).mean(axis=1 if mlp.batch_first else 0)
    if routing == "per-batch":
        alpha = np.repeat(alpha.mean(axis=0, keepdims=True), len(alpha), axis=0)
    count = int(np.floor(select * alpha.shape[1] + 0.5))
    threshold = -np.sort(-alpha, axis=1)[:, count - 1 : count]
    return alpha / (1 + np.exp(-100 * (alpha - threshold)))


def snapshot(root) -> dict[str, bytes]:
    """Every file under a workspace (or any folder) with its bytes: {} when it does not exist.

    Tests compare a snapshot before and after a refused command: nothing may change, not even
    a staging folder left behind.
    """
    root = root.root if isinstance(root, Workspace) else Path(root)
    if not root.exists():
        return {}
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def task_vectors_of(base_state: dict[str, torch.Tensor], expert_states: dict[str, dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """τ = θt − θ0 for every image-tower tensor, computed here rather than by rankone.task_vectors."""
    base_visual = visual_state(base_state)
    return [{key: expert[key] - base_visual[key] for key in base_visual} for expert in expert_states.values()]



# ---- FusionBench's references (tests/reference/make_references.py) ----------------------------

REFERENCE_DATA = Path(__file__).parent / "reference" / "data"
DATA_FREE = REFERENCE_DATA / "data_free_merges.safetensors"
DATA_MERGES = REFERENCE_DATA / "data_merges.safetensors"


def reference(path: Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """A file of tests/reference/data: its metadata and its tensors grouped by name prefix (`expert/alpha/<key>`)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        groups: dict[str, dict[str, torch.Tensor]] = {}
        for name in handle.keys():
            group, _, key = name.rpartition("/")
            groups.setdefault(group, {})[key] = handle.get_tensor(name)
    return metadata, groups


def vision_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIPVisionModel state dict without the `vision_model.` wrapper that transformers 4 adds."""
    return {key.removeprefix("vision_model."): value for key, value in state.items()}


def run_cli(*arguments) -> tuple[int, str, str]:
    """`rankone ARGS` in this process, as the rankone_cli fixture runs it (which a module-scoped fixture cannot use)."""
    import sys
    from unittest import mock

    from rankone.cli import main

    with mock.patch.object(sys, "argv", ["rankone", *map(str, arguments)]):
        try:
            main()
        except SystemExit as exit_:
            return (exit_.code if isinstance(exit_.code, int) else 1), "", f"rankone {arguments[0]} exited with {exit_.code}"
    return 0, "", ""


def fetched_reference(root: Path, metadata: dict, groups: dict[str, dict[str, torch.Tensor]]) -> Workspace:
    """The reference's base and experts written as transformers folders, then `rankone fetch` and `task-vectors`."""
    import json

    from transformers import CLIPConfig, CLIPModel, CLIPVisionModel

    config = CLIPConfig(**json.loads(metadata["config"]))
    torch.manual_seed(0)
    base = CLIPModel(config).eval()
    base.vision_model.load_state_dict(vision_keys(groups["base"]))
    base.save_pretrained(root / "base")
    arguments = ["fetch", "--base", root / "base", "-w", root / "work"]
    for task in json.loads(metadata["tasks"]):
        expert = CLIPVisionModel(config.vision_config).eval()
        getattr(expert, "vision_model", expert).load_state_dict(vision_keys(groups[f"expert/{task}"]))
        expert.save_pretrained(root / task)
        arguments += ["--expert", f"{task}={root / task}"]
    for command in (arguments, ["task-vectors", "-w", root / "work"]):
        code, _, err = run_cli(*command)
        assert code == 0, err
    return Workspace(root / "work")


def assert_same_update(ours: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], base: dict[str, torch.Tensor], what: str,
                       tolerance: float = 1e-5) -> None:
    """Compared as updates (merged − θ0), to `tolerance` of the update's largest entry: what the method computes; plus two
    float32 steps of θ0's largest entry, the rounding of θ0 + update itself (EMR reads its update back from the stored
    θ0 + τ_uni, which costs one such step on the LayerNorm weights near 1)."""
    assert set(expected) <= set(ours)
    for key, tensor in expected.items():
        update, our_update = tensor - base[key], ours[key] - base[key]
        scale = update.abs().max().item()
        rounding = 2 * torch.finfo(torch.float32).eps * base[key].abs().max().item()
        error = (our_update - update).abs().max().item()
        assert error <= tolerance * max(scale, 1e-12) + rounding, f"{what} {key}: max error {error:.3g} against an update of {scale:.3g}"


class OperatorCensus(TorchDispatchMode):
    """Counts every aten operator called while active."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))

    def vendor_dependent(self) -> dict[str, int]:
        return {name: count for name, count in self.calls.items() if name in numerics.VENDOR_DEPENDENT_OPS}


@pytest.fixture
def restores_cpu_settings(monkeypatch):
    """For a test that runs the example in-process (which pins its CPU kernels, numerics.pin_this_process):
    the environment, torch's thread count and oneDNN switch as they were, afterwards."""
    for name in numerics.pinned_environment("AVX2"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", torch.backends.mkldnn.enabled)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
