"""Router kinds of RankOne-MoE: training-free subspace scores, per-task hard and soft gates, the grouped hard path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from rankone.methods.rankone.module import RankOneMLP, subspace_scores, task_gate

TASKS, K, D, HIDDEN = 3, 4, 8, 32


def orthonormal_columns(rows: int, columns: int, generator: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, columns, generator=generator, dtype=torch.float64))[0]


def subspace_mlp(gate: str, batch_first: bool = True, temperature: float = 1.0, scale: float = 1.0, seed: int = 0) -> RankOneMLP:
    """A routed MLP whose V̂ blocks are S·V with V orthonormal per task, as the pool stores them."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    c_fc, c_proj = nn.Linear(D, HIDDEN).double(), nn.Linear(HIDDEN, D).double()
    singular = torch.rand(TASKS * K, generator=generator, dtype=torch.float64) + 0.5
    fc_v = torch.cat([orthonormal_columns(D, K, generator) for _ in range(TASKS)], dim=1) * singular
    pool = [torch.randn(HIDDEN, TASKS * K, generator=generator, dtype=torch.float64), fc_v,
            torch.randn(D, TASKS * K, generator=generator, dtype=torch.float64),
            torch.randn(HIDDEN, TASKS * K, generator=generator, dtype=torch.float64) / HIDDEN]
    return RankOneMLP(c_fc, nn.GELU(), c_proj, *pool, lam=0.3, select=None, routing="per-sample", batch_first=batch_first,
                      tasks=TASKS, scorer="subspace", gate=gate, temperature=temperature, scale=scale)


def test_subspace_scores_against_numpy():
    mlp = subspace_mlp("hard")
    mean = torch.randn(5, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    expected = np.zeros((5, TASKS))
    fc_v = mlp.fc_v.detach().numpy()
    for task in range(TASKS):
        # The unit right singular vectors of the task's block: V̂'s columns divided by their norms (the singular values).
        basis = fc_v[:, task * K:(task + 1) * K] / np.linalg.norm(fc_v[:, task * K:(task + 1) * K], axis=0)
        for sample in range(5):
            x = mean[sample].numpy()
            expected[sample, task] = np.linalg.norm(basis.T @ x) / np.linalg.norm(x)
    np.testing.assert_allclose(subspace_scores(mean, mlp.fc_v, TASKS).numpy(), expected, rtol=1e-12)
    # An input inside task 1's span scores 1 for it.
    inside = mlp.fc_v[:, K:2 * K] @ torch.randn(K, dtype=torch.float64)
    assert subspace_scores(inside[None], mlp.fc_v, TASKS)[0, 1].item() == pytest.approx(1.0)


def test_task_gates_hard_and_soft():
    scores = torch.tensor([[0.1, 0.7, 0.2], [0.9, 0.0, 0.3]])
    hard = task_gate(scores, "hard", 2, 1.0, 0.5)
    assert hard.tolist() == [[0, 0, 0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0, 0, 0]]
    soft = task_gate(scores, "soft", 2, 0.1, 1.0)
    expected = torch.softmax(scores / 0.1, dim=-1).repeat_interleave(2, dim=-1)
    torch.testing.assert_close(soft, expected)


@pytest.mark.parametrize("batch_first", [True, False])
def test_grouped_hard_path_equals_the_dense_hard_gated_computation(batch_first):
    mlp = subspace_mlp("hard", batch_first=batch_first, scale=0.8)
    x = torch.randn(6, 5, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    inputs = x if batch_first else x.transpose(0, 1)
    with torch.no_grad():
        grouped = mlp(inputs)
        dense = mlp.plain_forward(inputs)
    chosen = subspace_scores(x.mean(dim=1), mlp.fc_v, TASKS).argmax(dim=-1)
    assert len(chosen.unique()) > 1  # the batch really is split between tasks
    torch.testing.assert_close(grouped, dense, rtol=1e-10, atol=1e-10)


def test_fixed_task_routes_every_sample_to_that_task_at_scale_one():
    mlp = subspace_mlp("soft", scale=1.0)
    mlp.fixed_task = 2
    x = torch.randn(3, 5, D, dtype=torch.float64)
    gate = mlp.expert_weights(x)
    assert gate.tolist() == [[0.0] * (2 * K) + [1.0] * K] * 3
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), mlp.plain_forward(x))


def test_a_subspace_router_has_no_tensors_of_its_own():
    mlp = subspace_mlp("hard")
    assert mlp.router is None and not [name for name, _ in mlp.named_parameters() if "router" in name]


# ---- through the CLI, on the tiny fixture ----------------------------------------------------

def test_subspace_routers_need_no_data_and_load_export_and_predict(every_stage_workspace, labeled_data, rankone_cli, tmp_path):
    from rankone.methods import load
    from rankone.methods.rankone.module import rankone_mlps

    workspace = every_stage_workspace
    code, out, err = rankone_cli("adapt", "-w", workspace.root, "--router", "subspace", "--classnames-from", labeled_data)
    assert code == 0, err
    assert "training-free routers" in out
    model = load(workspace.root)
    assert model.config["router"] == "subspace" and all(mlp.router is None and mlp.gate == "hard" for mlp in rankone_mlps(model.visual))
    code, out, err = rankone_cli("eval", "-w", workspace.root, "--method", "rankone", "--data", labeled_data, "--routing", "--plot")
    assert code == 0, err
    report = workspace.read_json("eval/rankone.json")
    own = report["routing"]["own_task"]
    assert set(own) == set(workspace.tasks) and all(0.0 <= rate <= 1.0 for rates in own.values() for rate in rates)
    # A hard gate at scale 1 gives each image one task's experts: a row's mean gates (one per task) sum to 1.
    for per_block in report["routing"]["gates"].values():
        assert all(sum(block) == pytest.approx(1.0) for block in per_block)
    assert workspace.path("eval/rankone-routing.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, _, err = rankone_cli("export", "-w", workspace.root, "--method", "rankone", "--out", tmp_path / "out")
    assert code == 0, err
    exported = load(tmp_path / "out")
    images = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(exported.encode_image(images), model.encode_image(images))
    image = next((labeled_data / workspace.tasks[0]).rglob("*.png"))
    code, _, err = rankone_cli("predict", tmp_path / "out", "--task", workspace.tasks[0], image)
    assert code == 0, err


def test_task_routers_lower_their_cross_entropy_and_repeat_for_a_seed(every_stage_workspace, unlabeled_data, rankone_cli):
    workspace = every_stage_workspace
    arguments = ("adapt", "-w", workspace.root, "--router", "task", "--data", unlabeled_data, "--steps", "12", "--batch-size", "4")
    code, out, err = rankone_cli(*arguments)
    assert code == 0, err
    curve = workspace.read_json("adapted/rankone-curve.json")
    assert curve["objective"].startswith("cross-entropy") and curve["losses"][-1] < curve["losses"][0]
    first = workspace.load_tensors("adapted/rankone.safetensors")
    code, _, err = rankone_cli(*arguments)
    assert code == 0, err
    second = workspace.load_tensors("adapted/rankone.safetensors")
    assert set(first) == set(second) and all(torch.equal(first[name], second[name]) for name in first)


def test_pool_oracle_routes_each_task_to_its_own_experts(every_stage_workspace, labeled_data, rankone_cli):
    workspace = every_stage_workspace
    code, _, err = rankone_cli("eval", "-w", workspace.root, "--method", "pool-oracle", "--data", labeled_data, "--routing")
    assert code == 0, err
    report = workspace.read_json("eval/pool-oracle.json")
    experts = report["routing"]["experts"]
    for task, per_block in report["routing"]["gates"].items():
        for block in per_block:
            # Gate 1 on each of the task's k experts and 0 elsewhere: the mean gate of its experts is 1.
            assert block == [1.0 if name == task else 0.0 for name in experts]
        assert report["routing"]["own_task"][task] == [1.0] * len(per_block)


def test_router_options_are_checked(every_stage_workspace, rankone_cli):
    from conftest import snapshot

    before = snapshot(every_stage_workspace.root)
    code, _, err = rankone_cli("adapt", "-w", every_stage_workspace.root, "--router", "oracle")
    assert code == 2 and "--router" in err
    code, _, err = rankone_cli("adapt", "-w", every_stage_workspace.root, "--router", "task")
    assert code == 2 and "--data: required" in err
    assert snapshot(every_stage_workspace.root) == before


# ---- --init: entropy routers started from another kind's routing ------------------------------

def test_ridge_fit_against_numpy():
    from rankone.methods.rankone.routers import ridge_fit

    generator = np.random.default_rng(5)
    means, targets, ridge = generator.normal(size=(12, 6)), generator.normal(size=(12, 3)), 0.1
    weight, bias = ridge_fit(torch.from_numpy(means), torch.from_numpy(targets), ridge)
    # Independently: centre, then least squares on the system stacked with √ρ·I (the ridge as extra rows).
    centred, centred_targets = means - means.mean(axis=0), targets - targets.mean(axis=0)
    penalty = ridge * np.mean(np.diag(centred.T @ centred))
    stacked = np.vstack([centred, np.sqrt(penalty) * np.eye(6)])
    expected = np.linalg.lstsq(stacked, np.vstack([centred_targets, np.zeros((6, 3))]), rcond=None)[0].T
    np.testing.assert_allclose(weight.numpy(), expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(bias.numpy(), targets.mean(axis=0) - expected @ means.mean(axis=0), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["task", "subspace"])
def test_fitted_routers_reproduce_the_kinds_hard_gate(every_stage_workspace, unlabeled_data, kind):
    from rankone.methods.rankone.module import rankone_mlps, routed_model
    from rankone.methods.rankone.pool import read_pool
    from rankone.methods.rankone.routers import fit_routers, kind_targets, routed_as, token_means
    from rankone.models import preprocess_for
    from rankone.training import unlabeled_sets

    workspace = every_stage_workspace
    stored = read_pool(workspace)
    model = routed_model(workspace.architecture, stored.static, stored.pool, stored.lam, tasks=stored.tasks, scale=0.7)
    unlabeled = unlabeled_sets(unlabeled_data, stored.tasks, preprocess_for(workspace.architecture))
    # Fewer images than the blocks' width: with a vanishing ridge the fit interpolates the kind's gate.
    fit = fit_routers(model, unlabeled, stored.tasks, kind, ridge=1e-9)
    assert fit.images == sum(len(dataset) for dataset in unlabeled.values()) and fit.agreement == [1.0] * len(rankone_mlps(model))
    for index, (task, dataset) in enumerate(unlabeled.items()):
        images = torch.stack([dataset[position] for position in range(len(dataset))])
        with routed_as(model, kind, index):
            means = token_means(model, images)
        for mlp, block_means in zip(rankone_mlps(model), means):
            alpha = mlp.router(block_means).double()
            expected = kind_targets(mlp, block_means, kind, index).repeat_interleave(mlp.router.out_features // mlp.tasks, dim=-1)
            torch.testing.assert_close(alpha, expected, rtol=0, atol=1e-4)


def test_the_fit_reports_its_agreement_on_the_images_it_did_not_read(every_stage_workspace, unlabeled_data):
    from rankone.methods.rankone.module import rankone_mlps, routed_model
    from rankone.methods.rankone.pool import read_pool
    from rankone.methods.rankone.routers import fit_routers, routed_as, token_means
    from rankone.models import preprocess_for
    from rankone.training import unlabeled_sets

    workspace = every_stage_workspace
    stored = read_pool(workspace)
    model = routed_model(workspace.architecture, stored.static, stored.pool, stored.lam, tasks=stored.tasks)
    unlabeled = unlabeled_sets(unlabeled_data, stored.tasks, preprocess_for(workspace.architecture))
    fit = fit_routers(model, unlabeled, stored.tasks, "task", images_per_task=1)
    assert fit.images == len(unlabeled)
    picked = [[] for _ in rankone_mlps(model)]
    for index, dataset in enumerate(unlabeled.values()):
        rest = torch.stack([dataset[position] for position in range(1, len(dataset))])
        with routed_as(model, "task", index):
            means = token_means(model, rest)
        for block, (mlp, block_means) in enumerate(zip(rankone_mlps(model), means)):
            scores = mlp.router(block_means).reshape(len(rest), mlp.tasks, -1).mean(dim=-1)
            picked[block] += (scores.argmax(dim=-1) == index).tolist()
    assert fit.held_out == pytest.approx([sum(block) / len(block) for block in picked])
    assert fit_routers(model, unlabeled, stored.tasks, "task").held_out == []  # every image was fitted


def test_init_starts_entropy_adaptation_and_is_recorded(every_stage_workspace, unlabeled_data, labeled_data, rankone_cli):
    workspace = every_stage_workspace
    code, out, err = rankone_cli("adapt", "-w", workspace.root, "--init", "task", "--data", unlabeled_data, "--steps", "2",
                                 "--batch-size", "2", "--classnames-from", labeled_data)
    assert code == 0, err
    assert "routers fitted to the task kind's routing" in out + err
    from rankone.methods import load

    model = load(workspace.root)
    assert model.config["init"] == "task" and model.config["router"] == "entropy"
    code, _, err = rankone_cli("adapt", "-w", workspace.root, "--init", "subspace", "--router", "task", "--data", unlabeled_data)
    assert code == 2 and "--init subspace: starts entropy routers" in err
