"""WEMoE: the batched MLP against dense per-sample weights, its start at task arithmetic, accounting."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from rankone.methods import merged_state
from rankone.models import build_visual, load_visual, named_architecture, visual_state
from rankone.methods.wemoe import WEMoEMLP, parameter_counts, router_parameters, wemoe_model
from conftest import task_vectors_of


def random_wemoe_mlp(d: int, hidden: int, tasks: int, batch_first: bool, seed: int = 0) -> WEMoEMLP:
    torch.manual_seed(seed)
    c_fc, c_proj = nn.Linear(d, hidden).double(), nn.Linear(hidden, d).double()
    stacks = [torch.randn(tasks, hidden, d), torch.randn(tasks, hidden), torch.randn(tasks, d, hidden) / hidden, torch.randn(tasks, d)]
    mlp = WEMoEMLP(c_fc, nn.GELU(), c_proj, *(tensor.double() for tensor in stacks), lam=0.3, batch_first=batch_first)
    with torch.no_grad():
        # Large router weights: w differs clearly from sample to sample (and is sometimes negative).
        mlp.router.fc1.weight.normal_(0, 1.0)
        mlp.router.fc2.weight.normal_(0, 1.0)
    return mlp


def dense_reference(mlp: WEMoEMLP, x: np.ndarray) -> np.ndarray:
    """Per sample b: w_b = mean_tokens(router(x_b)), W_b = W0 + Σt w_bt τt (weights and biases), then the MLP."""
    numpy = lambda tensor: tensor.detach().double().numpy()  # noqa: E731
    fc1_w, fc1_b = numpy(mlp.router.fc1.weight), numpy(mlp.router.fc1.bias)
    fc2_w, fc2_b = numpy(mlp.router.fc2.weight), numpy(mlp.router.fc2.bias)
    weights = (np.maximum(x @ fc1_w.T + fc1_b, 0) @ fc2_w.T + fc2_b).mean(axis=1)
    # Stored as (out, T, in); back to (T, out, in) for the textbook formula.
    fc_tau, proj_tau = numpy(mlp.fc_tau_weight).transpose(1, 0, 2), numpy(mlp.proj_tau_weight).transpose(1, 0, 2)
    fc_tau_b, proj_tau_b = numpy(mlp.fc_tau_bias), numpy(mlp.proj_tau_bias)
    outputs = []
    for b in range(len(x)):
        w = weights[b]
        w_fc = numpy(mlp.c_fc.weight) + np.tensordot(w, fc_tau, axes=1)
        b_fc = numpy(mlp.c_fc.bias) + w @ fc_tau_b
        w_proj = numpy(mlp.c_proj.weight) + np.tensordot(w, proj_tau, axes=1)
        b_proj = numpy(mlp.c_proj.bias) + w @ proj_tau_b
        hidden = numpy(nn.functional.gelu(torch.from_numpy(x[b] @ w_fc.T + b_fc)))
        outputs.append(hidden @ w_proj.T + b_proj)
    return np.stack(outputs), weights


def test_wemoe_mlp_equals_dense_per_sample_weights_in_both_layouts():
    d, hidden, tasks = 8, 32, 3
    x = torch.randn(5, 7, d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected, weights = dense_reference(random_wemoe_mlp(d, hidden, tasks, True), x.numpy())
    assert weights.std(axis=0).min() > 0.05  # the check is meaningless if every sample had the same w
    batch_first = random_wemoe_mlp(d, hidden, tasks, True)(x)
    np.testing.assert_allclose(batch_first.detach().numpy(), expected, rtol=1e-9, atol=1e-9)
    sequence_first = random_wemoe_mlp(d, hidden, tasks, False)(x.transpose(0, 1).contiguous())
    np.testing.assert_allclose(sequence_first.transpose(0, 1).detach().numpy(), expected, rtol=1e-9, atol=1e-9)


def test_router_initialisation_follows_spec():
    mlp = random_wemoe_mlp(8, 32, 3, True)
    fresh = WEMoEMLP(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64), torch.zeros(4, 256, 64), torch.zeros(4, 256),
                     torch.zeros(4, 64, 256), torch.zeros(4, 64), lam=0.3, batch_first=True, generator=torch.Generator().manual_seed(0))
    assert mlp.router.fc2.out_features == 3
    assert fresh.router.fc1.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert fresh.router.fc2.weight.std().item() == pytest.approx(0.01, rel=0.15)
    assert torch.equal(fresh.router.fc1.bias, torch.zeros(64))
    assert torch.allclose(fresh.router.fc2.bias, torch.full((4,), 0.3))


def test_constant_router_is_task_arithmetic(tiny_architecture, base_state, expert_states):
    """With the router's weights at zero every w is λ: the tower must be θ0 + λΣτ everywhere."""
    task_vectors = task_vectors_of(base_state, expert_states)
    model = wemoe_model(tiny_architecture, visual_state(base_state), task_vectors, 0.3, seed=0)
    with torch.no_grad():
        for parameter in router_parameters(model):
            if parameter.dim() == 2:
                parameter.zero_()
    reference = load_visual(tiny_architecture, merged_state(visual_state(base_state), task_vectors, "task-arithmetic", lam=0.3))
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images), rtol=1e-5, atol=1e-5)


def test_same_seed_same_routers_and_only_routers_train(tiny_architecture, base_state, expert_states):
    task_vectors = task_vectors_of(base_state, expert_states)
    first = wemoe_model(tiny_architecture, visual_state(base_state), task_vectors, seed=3)
    second = wemoe_model(tiny_architecture, visual_state(base_state), task_vectors, seed=3)
    for a, b in zip(router_parameters(first), router_parameters(second)):
        assert torch.equal(a, b)
    first(torch.randn(2, 3, 32, 32)).square().sum().backward()
    trained = {id(parameter) for parameter in router_parameters(first)}
    for name, parameter in first.named_parameters():
        if id(parameter) in trained:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert not parameter.requires_grad and parameter.grad is None, name


def test_parameter_count_of_vit_b_32_with_8_tasks():
    """The method's accounting: tower + dense MLP task vectors + routers, counted from the module on the meta device."""
    architecture = named_architecture("ViT-B-32")
    with torch.device("meta"):
        base = {f"visual.{name}": tensor for name, tensor in build_visual(architecture).state_dict().items()}
        task_vectors = [{key: torch.empty_like(tensor) for key, tensor in base.items()} for _ in range(8)]
        model = wemoe_model(architecture, base, task_vectors, 0.3)
    assert parameter_counts(model) == {"tower": 87_849_216, "task_vectors": 453_353_472, "routers": 7_160_928, "total": 548_363_616}


def test_adaptation_lowers_entropy_and_saves_routers(tiny_workspace, unlabeled_data, labeled_data, unlabeled_entropy):
    from rankone.methods import adapt_workspace
    from rankone.training import AdaptOptions
    from rankone.task_vectors import compute_task_vectors
    from rankone.methods.wemoe import ADAPTED_ROUTERS, router_state, wemoe_from_workspace

    compute_task_vectors(tiny_workspace)
    before = unlabeled_entropy(tiny_workspace, wemoe_from_workspace(tiny_workspace, trained=False), unlabeled_data, labeled_data)
    options = AdaptOptions(data=unlabeled_data, steps=6, batch_size=2, classnames_from=labeled_data, progress=False)
    assert adapt_workspace(tiny_workspace, "wemoe", options, lr=1e-2) == ADAPTED_ROUTERS
    trained = wemoe_from_workspace(tiny_workspace)
    after = unlabeled_entropy(tiny_workspace, trained, unlabeled_data, labeled_data)
    assert after < before - 1e-3
    stored = tiny_workspace.load_tensors(ADAPTED_ROUTERS)
    assert set(stored) == set(router_state(trained)) and len(stored) == 2 * 4  # two blocks, two Linear layers each
    for name, tensor in router_state(trained).items():
        assert torch.equal(stored[name], tensor)
