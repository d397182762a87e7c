"""Entropy minimisation: the generic loop, determinism, resume, and `rankone adapt` on a tiny model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from rankone.training import batch_entropy, batch_indices, checkpoint_files, checkpoint_state, minimise_entropy
from rankone.task_vectors import compute_task_vectors
from rankone.workspace import Workspace
from conftest import snapshot


def test_batches_are_seeded_epoch_permutations():
    positions = [index for step in range(5) for index in batch_indices(10, 4, seed=3, task="alpha", step=step)]
    assert sorted(positions[:10]) == list(range(10)) and sorted(positions[10:20]) == list(range(10))
    assert positions[:10] != positions[10:20]
    assert batch_indices(10, 4, 3, "alpha", 2) == positions[8:12]
    assert batch_indices(10, 4, 4, "alpha", 0) != positions[:4]
    assert batch_indices(10, 4, 3, "beta", 0) != positions[:4]


def test_batch_entropy_against_hand_computation():
    logits = torch.tensor([[0.0, 0.0], [torch.log(torch.tensor(3.0)), 0.0]])
    expected = (torch.log(torch.tensor(2.0)) + -(0.75 * torch.log(torch.tensor(0.75)) + 0.25 * torch.log(torch.tensor(0.25)))) / 2
    assert batch_entropy(logits).item() == pytest.approx(expected.item(), abs=1e-6)


class Toy:
    """A shared linear feature map (the trained part) in front of fixed per-task heads."""

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        self.features = torch.nn.Parameter(torch.randn(6, 6, generator=generator) * 0.1)
        self.heads = {"alpha": torch.randn(3, 6, generator=generator), "beta": torch.randn(4, 6, generator=generator)}
        self.data = {task: [torch.randn(6, generator=generator) for _ in range(13)] for task in self.heads}

    def classify(self, images: torch.Tensor, task: str) -> torch.Tensor:
        return (images @ self.features.T) @ self.heads[task].T

    def mean_entropy(self) -> float:
        with torch.no_grad():
            return sum(float(batch_entropy(self.classify(torch.stack(items), task))) for task, items in self.data.items())

    def run(self, **options) -> list[float]:
        defaults = dict(steps=30, batch_size=4, lr=0.05, seed=0, device="cpu", progress=False)
        return minimise_entropy(self.classify, [self.features], self.data, **{**defaults, **options}).losses


def test_loop_lowers_entropy_and_is_deterministic():
    toy = Toy()
    before = toy.mean_entropy()
    losses = toy.run()
    assert toy.mean_entropy() < 0.8 * before
    assert len(losses) == 30 and losses[-1] < losses[0]
    again = Toy()
    assert again.run() == losses and torch.equal(again.features, toy.features)
    other = Toy()
    assert other.run(seed=1) != losses


def test_resume_from_a_saved_checkpoint_equals_an_uninterrupted_run(tmp_path):
    uninterrupted = Toy()
    expected = uninterrupted.run()

    class Crash(Exception):
        pass

    saved: list[Path] = []

    def checkpoint(step: int, state: dict) -> None:
        # Through the on-disk format (safetensors + JSON metadata), as the CLI stores it.
        tensors, metadata = checkpoint_files(state, {"seed": 0})
        path = tmp_path / f"step-{step}.safetensors"
        save_file(tensors, str(path), metadata=metadata)
        saved.append(path)
        if step == 15:
            raise Crash

    first = Toy()
    with pytest.raises(Crash):
        first.run(save_every=5, checkpoint=checkpoint)
    with safe_open(str(saved[-1]), "pt") as handle:
        metadata = handle.metadata()
    state, config = checkpoint_state(load_file(str(saved[-1])), metadata)
    assert state["step"] == 15 and config == {"seed": 0}
    resumed = Toy()
    losses = resumed.run(resume=state)
    assert losses == expected
    assert torch.equal(resumed.features, uninterrupted.features)


def prepared(root: Path, tiny_workspace: Workspace, rankone_cli) -> Workspace:
    compute_task_vectors(tiny_workspace)
    code, _, err = rankone_cli("build-pool", "-w", tiny_workspace.root, "--k", "4")
    assert code == 0, err
    return tiny_workspace


def test_adapt_cli_lowers_entropy_and_resumes_exactly(tmp_path, tiny_workspace, unlabeled_data, labeled_data, rankone_cli):
    from rankone.training import task_heads
    from rankone.methods.rankone.artifact import routed_from_workspace
    from rankone.heads import classify_logits
    from rankone.methods.rankone.module import routed_model
    from rankone.methods.rankone.pool import read_pool

    workspace = prepared(tmp_path, tiny_workspace, rankone_cli)
    copy = Workspace(tmp_path / "copy")
    shutil.copytree(workspace.root, copy.root)
    common = ["--data", unlabeled_data, "--classnames-from", labeled_data, "--batch-size", "4", "--lr", "0.02", "--save-every", "2"]

    code, out, err = rankone_cli("adapt", "-w", workspace.root, "--steps", "5", *common)
    assert code == 0, err
    # A finished 3-step run (checkpoints at step 2 and at its last step, 3), extended to 5.
    assert rankone_cli("adapt", "-w", copy.root, "--steps", "3", *common)[0] == 0
    assert copy.has("adapted/rankone-checkpoints/step-2.safetensors") and copy.has("adapted/rankone-checkpoints/step-3.safetensors")
    code, _, err = rankone_cli("adapt", "-w", copy.root, "--steps", "5", "--resume", *common)
    assert code == 0, err
    routers = workspace.load_tensors("adapted/rankone.safetensors")
    resumed = copy.load_tensors("adapted/rankone.safetensors")
    assert routers.keys() == resumed.keys() and all(torch.equal(routers[name], resumed[name]) for name in routers)
    assert workspace.has("adapted/rankone-checkpoints/step-4.safetensors")

    with safe_open(str(workspace.path("adapted/rankone.safetensors")), "pt") as handle:
        metadata = json.loads(handle.metadata()["rankone"])
    assert metadata["steps"] == 5 and metadata["select"] == 0.75 and metadata["routing"] == "per-sample" and metadata["seed"] == 0
    assert metadata["heads"]["beta"]["classnames"] == ["dark", "grey", "light"]

    # Mean entropy over every unlabeled image: initial routers (same seed) vs adapted routers.
    from rankone.training import unlabeled_sets
    from rankone.models import preprocess_for

    stored = read_pool(workspace)
    initial = routed_model(workspace.architecture, stored.static, stored.pool, stored.lam, 0.75, "per-sample", stored.tasks, seed=0)
    adapted, _ = routed_from_workspace(workspace)
    heads = task_heads(workspace, {task: (entry["classnames"], None) for task, entry in metadata["heads"].items()}, torch.device("cpu"))
    sets = unlabeled_sets(unlabeled_data, stored.tasks, preprocess_for(workspace.architecture))

    def entropy(model) -> float:
        with torch.no_grad():
            return sum(float(batch_entropy(classify_logits(model(torch.stack([sets[t][i] for i in range(len(sets[t]))])), heads[t]))) for t in sets)

    assert entropy(adapted) < entropy(initial)


def test_adapt_errors_name_the_problem_and_leave_the_workspace_unchanged(tmp_path, tiny_workspace, unlabeled_data, labeled_data, rankone_cli):
    code, _, err = rankone_cli("build-pool", "-w", tiny_workspace.root, "--k", "4")
    assert code == 2 and "task_vectors/alpha.safetensors: missing; run `rankone task-vectors` first" in err
    before = snapshot(tiny_workspace)
    code, _, err = rankone_cli("adapt", "-w", tiny_workspace.root, "--data", unlabeled_data, "--classnames-from", labeled_data)
    assert code == 2 and "run `rankone build-pool` first" in err
    assert snapshot(tiny_workspace) == before

    workspace = prepared(tmp_path, tiny_workspace, rankone_cli)
    before = snapshot(workspace)
    code, _, err = rankone_cli("build-pool", "-w", workspace.root, "--k", "40")
    assert code == 2 and "--k 40: larger than the rank limit 32" in err
    (unlabeled_data / "delta").mkdir()
    (unlabeled_data / "delta" / "x.png").write_bytes((unlabeled_data / "alpha" / "part0" / "0.png").read_bytes())
    code, _, err = rankone_cli("adapt", "-w", workspace.root, "--data", unlabeled_data, "--classnames-from", labeled_data, "--steps", "1")
    assert code == 2 and "folder delta/ has images but no head" in err
    shutil.rmtree(unlabeled_data / "delta")
    shutil.rmtree(unlabeled_data / "gamma")
    code, _, err = rankone_cli("adapt", "-w", workspace.root, "--data", unlabeled_data, "--classnames-from", labeled_data, "--steps", "1")
    assert code == 2 and "no images for task gamma" in err
    code, _, err = rankone_cli("adapt", "-w", workspace.root, "--data", unlabeled_data, "--steps", "1", "--tasks", "alpha,beta")
    assert code == 2 and "task alpha: no class names" in err
    code, _, err = rankone_cli("adapt", "-w", workspace.root, "--data", unlabeled_data, "--classnames-from", labeled_data,
                               "--tasks", "alpha,beta", "--resume", "--steps", "1")
    assert code == 2 and "--resume: no checkpoint" in err
    for option, value, message in (("--select", "1.5", "--select 1.5: must be in (0, 1]"), ("--select", "most", "--select 'most'"),
                                   ("--routing", "sideways", "--routing 'sideways': expected one of per-sample, per-batch")):
        code, _, err = rankone_cli("adapt", "-w", workspace.root, "--data", unlabeled_data, "--classnames-from", labeled_data, option, value)
        assert code == 2 and message in err
    code, _, err = rankone_cli("adapt", "-w", workspace.root, "--data", unlabeled_data, "--method", "magic")
    assert code == 2 and "--method 'magic': unknown; choose from rankone" in err
    assert snapshot(workspace) == before


def test_adapt_per_batch_without_top_p_is_recorded_and_reloaded(tmp_path, tiny_workspace, unlabeled_data, labeled_data, rankone_cli):
    import rankone
    from rankone.methods.rankone.module import rankone_mlps

    workspace = prepared(tmp_path, tiny_workspace, rankone_cli)
    code, _, err = rankone_cli("adapt", "-w", workspace.root, "--data", unlabeled_data, "--classnames-from", labeled_data,
                               "--steps", "1", "--batch-size", "2", "--routing", "per-batch", "--select", "off", "--tasks", "beta")
    assert code == 0, err
    with safe_open(str(workspace.path("adapted/rankone.safetensors")), "pt") as handle:
        metadata = json.loads(handle.metadata()["rankone"])
    assert metadata["routing"] == "per-batch" and metadata["select"] is None and metadata["tasks"] == ["beta"]
    model = rankone.load(workspace.root)
    assert model.tasks == ["beta"]
    assert all(mlp.routing == "per-batch" and mlp.select is None for mlp in rankone_mlps(model.visual))
