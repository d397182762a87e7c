"""The routed MLP against dense per-sample weights, initialisation, top-p, gradients, accounting."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from conftest import numpy, reference_gates, task_vectors_of
from rankone.models import build_visual, load_visual, named_architecture, visual_state
from rankone.errors import RankoneError
from rankone.methods.rankone.module import (
    RankOneMLP, expert_shares, parameter_counts, recording_gates, routed_model, routed_tasks,
    router_parameters, top_p_gate,
)
from rankone.methods.rankone.pool import build_pool, mlp_weight_keys, pool_keys, static_part

TASKS = ["alpha", "beta", "gamma"]


def random_mlp(d: int, hidden: int, experts: int, select, routing: str, batch_first: bool, seed: int = 0) -> RankOneMLP:
    torch.manual_seed(seed)
    c_fc, c_proj = nn.Linear(d, hidden).double(), nn.Linear(hidden, d).double()
    pool = [torch.randn(hidden, experts), torch.randn(d, experts) / d, torch.randn(d, experts), torch.randn(hidden, experts) / hidden]
    mlp = RankOneMLP(c_fc, nn.GELU(), c_proj, *(tensor.double() for tensor in pool),
                     lam=0.3, select=select, routing=routing, batch_first=batch_first)
    with torch.no_grad():
        mlp.router.weight.normal_(0, 0.5)  # α clearly different per sample
    return mlp


def dense_reference(mlp: RankOneMLP, x: np.ndarray, select: float, routing: str) -> np.ndarray:
    """Per sample: α', W_b = W0 + Σ α'_j u_j v̂_jᵀ, then the MLP."""
    gated = reference_gates(mlp, x, select, routing)
    outputs = []
    for b in range(len(x)):
        w_fc = numpy(mlp.c_fc.weight) + (numpy(mlp.fc_u) * gated[b]) @ numpy(mlp.fc_v).T
        w_proj = numpy(mlp.c_proj.weight) + (numpy(mlp.proj_u) * gated[b]) @ numpy(mlp.proj_v).T
        pre = x[b] @ w_fc.T + numpy(mlp.c_fc.bias)
        hidden = numpy(torch.nn.functional.gelu(torch.from_numpy(pre)))
        outputs.append(hidden @ w_proj.T + numpy(mlp.c_proj.bias))
    return np.stack(outputs)


@pytest.mark.parametrize("routing", ["per-sample", "per-batch"])
@pytest.mark.parametrize("select", [1.0, 0.75])
def test_routed_mlp_equals_dense_per_sample_weights(routing, select):
    d, hidden, experts = 8, 32, 3 * 8  # k = 8 = full rank of both matrices
    x = torch.randn(5, 7, d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected = dense_reference(random_mlp(d, hidden, experts, select, routing, True), x.numpy(), select, routing)
    for batch_first in (True, False):
        mlp = random_mlp(d, hidden, experts, select, routing, batch_first)
        inputs = x if batch_first else x.transpose(0, 1)
        output = mlp(inputs) if batch_first else mlp(inputs).transpose(0, 1)
        np.testing.assert_allclose(output.detach().numpy(), expected, atol=1e-5, rtol=0)
    if routing == "per-sample":
        # Per-sample routing: a sample's output does not depend on the rest of its batch.
        np.testing.assert_allclose(mlp(x.transpose(0, 1)[:, 2:3]).detach().numpy()[:, 0], expected[2], atol=1e-5)


@pytest.mark.parametrize("routing", ["per-sample", "per-batch"])
def test_recorded_gates_and_expert_shares_against_numpy(routing):
    d, hidden, k = 8, 32, 4
    mlp = random_mlp(d, hidden, 3 * k, 0.75, routing, True)
    holder = nn.Sequential(mlp)
    batches = [torch.randn(n, 7, d, dtype=torch.float64, generator=torch.Generator().manual_seed(n)) for n in (5, 3)]
    with recording_gates(holder) as blocks:
        for x in batches:
            holder(x)
    assert mlp.gate_log is None  # recording stops with the context
    holder(batches[0])
    assert len(blocks) == 1 and len(blocks[0]) == 2
    expected = np.concatenate([reference_gates(mlp, x.numpy(), 0.75, routing) for x in batches])
    recorded = torch.cat(blocks[0])
    np.testing.assert_allclose(recorded.numpy(), expected, rtol=1e-5, atol=1e-6)
    by_task = [expected[:, task * k : (task + 1) * k].mean() for task in range(3)]
    np.testing.assert_allclose(expert_shares(recorded, 3).numpy(), by_task, rtol=1e-5)
    with pytest.raises(RankoneError, match=r"shape \(8, 12\) does not split into 5 tasks"):
        expert_shares(recorded, 5)
    with pytest.raises(RankoneError, match="no RankOne-MoE routers"):
        with recording_gates(nn.Linear(2, 2)):
            pass


def test_routed_tasks_come_from_the_routed_model(tiny_architecture, base_state, expert_states):
    model, _, _ = tiny_routed(tiny_architecture, base_state, expert_states, 2, 0.75)
    assert routed_tasks(model) == TASKS
    with pytest.raises(RankoneError, match="no RankOne-MoE routers"):
        routed_tasks(nn.Linear(2, 2))


def test_top_p_gate_against_a_hand_computation():
    alpha = torch.tensor([[0.5, 0.1, 0.3, 0.2], [0.0, 0.4, -0.1, 0.4]])
    sigmoid = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    # select 0.5 of 4 → m = 2; thresholds 0.3 and 0.4.
    expected = [[0.5 * sigmoid(20), 0.1 * sigmoid(-20), 0.3 * 0.5, 0.2 * sigmoid(-10)],
                [0.0, 0.4 * 0.5, -0.1 * sigmoid(-50), 0.4 * 0.5]]
    np.testing.assert_allclose(top_p_gate(alpha, 0.5).numpy(), expected, atol=1e-7)
    # 0.625·4 = 2.5 rounds up to 3 experts: threshold 0.2 in the first row.
    assert top_p_gate(alpha, 0.625)[0, 3].item() == pytest.approx(0.1)
    assert torch.equal(top_p_gate(alpha, None), alpha)


def tiny_routed(architecture, base_state, expert_states, k, select, lam=0.3):
    task_vectors = task_vectors_of(base_state, expert_states)
    pool, _ = build_pool(task_vectors, k)
    static = static_part(visual_state(base_state), task_vectors, lam)
    return routed_model(architecture, static, pool, lam, select, "per-sample", TASKS), task_vectors, static


def truncated_merge(static, task_vectors, k, scale):
    weights = dict(static)
    for key in mlp_weight_keys(static):
        total = np.zeros(tuple(static[key].shape))
        for vector in task_vectors:
            u, s, vh = np.linalg.svd(vector[key].double().numpy(), full_matrices=False)
            total += (u[:, :k] * s[:k]) @ vh[:k]
        weights[key] = static[key] + torch.from_numpy(scale * total).float()
    return weights


@pytest.mark.parametrize("select,scale", [(None, 0.3), (1.0, 0.15)])
def test_router_init_without_noise_is_task_arithmetic_on_rank_k(tiny_architecture, base_state, expert_states, select, scale):
    """With zero router weights every α is λ. Gate off: exactly θ0 + λΣ rank-k(τ) on the MLPs.
    Gate on (any p): thr = λ and sigmoid(0) = ½, so the model is θ0 + (λ/2)Σ rank-k(τ)."""
    k = 4
    model, task_vectors, static = tiny_routed(tiny_architecture, base_state, expert_states, k, select)
    with torch.no_grad():
        for mlp in model.transformer.resblocks:
            mlp.mlp.router.weight.zero_()
    reference = load_visual(tiny_architecture, truncated_merge(static, task_vectors, k, scale))
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images), atol=1e-5, rtol=1e-4)


def test_default_init_is_not_task_arithmetic(tiny_architecture, base_state, expert_states):
    model, task_vectors, static = tiny_routed(tiny_architecture, base_state, expert_states, 4, 0.75)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    reference = load_visual(tiny_architecture, truncated_merge(static, task_vectors, 4, 0.3))
    with torch.no_grad():
        assert not torch.allclose(model(images), reference(images), atol=1e-5)


def test_gradients_reach_only_router_parameters(tiny_architecture, base_state, expert_states):
    model, _, _ = tiny_routed(tiny_architecture, base_state, expert_states, 4, 0.75)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model(images).square().sum().backward()
    routers = {id(parameter) for parameter in router_parameters(model)}
    assert len(routers) == 2 * len(model.transformer.resblocks)
    for name, parameter in model.named_parameters():
        if id(parameter) in routers:
            assert parameter.requires_grad and parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert not parameter.requires_grad and parameter.grad is None, name


def test_parameter_count_of_vit_b_32_with_8_tasks_and_k_32():
    """The method's accounting, counted from real modules (on the meta device: no memory, no SVD)."""
    architecture = named_architecture("ViT-B-32")
    with torch.device("meta"):
        tower_state = {f"visual.{name}": tensor for name, tensor in build_visual(architecture).state_dict().items()}
        pool = {}
        for key in mlp_weight_keys(tower_state):
            out_dim, in_dim = tower_state[key].shape
            name_u, name_v = pool_keys(key)
            pool[name_u], pool[name_v] = torch.empty(out_dim, 8 * 32), torch.empty(in_dim, 8 * 32)
        model = routed_model(architecture, tower_state, pool, 0.3, 0.75, "per-sample", [f"t{i}" for i in range(8)])
    assert parameter_counts(model) == {"tower": 87_849_216, "pool": 23_592_960, "routers": 2_362_368, "total": 113_804_544}
