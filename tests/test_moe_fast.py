"""The fused routed forward against the plain one (the method's formula) on the tiny CLIP."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rankone.models import visual_state
from rankone.methods.rankone.module import RankOneMLP, merging_pays, rankone_mlps, router_parameters, routed_model, set_routing
from rankone.methods.rankone.pool import build_pool, static_part

TASKS = ["alpha", "beta", "gamma"]


def tiny_model(architecture, base_state, expert_states, select=0.75, routing="per-sample"):
    base_visual = visual_state(base_state)
    task_vectors = [{key: expert[key] - base_visual[key] for key in base_visual} for expert in expert_states.values()]
    pool, _ = build_pool(task_vectors, 4, tasks=TASKS)
    model = routed_model(architecture, static_part(base_visual, task_vectors, 0.3), pool, 0.3, select, routing, TASKS, seed=0)
    with torch.no_grad():
        for mlp in rankone_mlps(model):
            mlp.router.weight.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(7))  # α clearly differs per sample
    return model


def plain_copy(model: nn.Module) -> nn.Module:
    """The same model running the method's unfused formula in every block."""
    plain = copy.deepcopy(model)
    for mlp in rankone_mlps(plain):
        mlp.forward = mlp.plain_forward
    return plain


def images(count: int = 5) -> torch.Tensor:
    return torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("routing", ["per-sample", "per-batch"])
@pytest.mark.parametrize("select", [0.75, None])
def test_fused_forward_equals_plain_forward(tiny_architecture, base_state, expert_states, routing, select):
    model = tiny_model(tiny_architecture, base_state, expert_states, select, routing)
    plain = plain_copy(model)
    with torch.inference_mode():
        expected = plain(images())
        torch.testing.assert_close(model(images()), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(model(images()), expected, atol=1e-5, rtol=0)  # the cached fused weights
    with torch.no_grad():
        torch.testing.assert_close(model(images()), expected, atol=1e-5, rtol=0)


def test_fused_gradients_equal_plain_gradients(tiny_architecture, base_state, expert_states):
    model = tiny_model(tiny_architecture, base_state, expert_states)
    plain = plain_copy(model)
    for network in (model, plain):
        network(images()).square().sum().backward()
    for fused, reference in zip(router_parameters(model), router_parameters(plain)):
        assert fused.grad is not None and fused.grad.abs().sum() > 0
        torch.testing.assert_close(fused.grad, reference.grad, atol=1e-5, rtol=1e-4)


def test_router_averages_tokens_before_its_affine_map():
    torch.manual_seed(0)
    d, hidden, experts = 6, 24, 8
    mlp = RankOneMLP(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d), torch.randn(hidden, experts), torch.randn(d, experts),
                     torch.randn(d, experts), torch.randn(hidden, experts), lam=0.3, select=None, routing="per-sample", batch_first=True)
    x = torch.randn(3, 5, d)
    per_token = x @ mlp.router.weight.T + mlp.router.bias  # The method: route every token, then the mean over tokens
    torch.testing.assert_close(mlp.expert_weights(x), per_token.mean(dim=1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("batch_first", [True, False])
def test_fused_mlp_equals_plain_mlp_in_both_layouts(batch_first):
    torch.manual_seed(0)
    d, hidden, experts = 8, 32, 12
    mlp = RankOneMLP(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d), torch.randn(hidden, experts), torch.randn(d, experts) / d,
                     torch.randn(d, experts), torch.randn(hidden, experts) / hidden, lam=0.3, select=0.75, routing="per-sample",
                     batch_first=batch_first)
    for parameter in (mlp.c_fc.weight, mlp.c_fc.bias, mlp.c_proj.weight, mlp.c_proj.bias):
        parameter.requires_grad_(False)
    with torch.no_grad():
        mlp.router.weight.normal_(0.0, 0.5)
    x = torch.randn(4, 7, d) if batch_first else torch.randn(7, 4, d)
    with torch.inference_mode():
        torch.testing.assert_close(mlp(x), mlp.plain_forward(x), atol=1e-5, rtol=0)
    # The hand-written backward: gradients of the input and of the router, against autograd on the plain path.
    gradients = []
    for forward in (mlp.forward, mlp.plain_forward):
        inputs = x.clone().requires_grad_(True)
        mlp.router.zero_grad()
        forward(inputs).pow(3).sum().backward()
        gradients.append((inputs.grad, mlp.router.weight.grad.clone(), mlp.router.bias.grad.clone()))
    for fused, plain in zip(*gradients):
        torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)


def test_fused_path_follows_weight_changes_and_keeps_state_dict(tiny_architecture, base_state, expert_states, tmp_path):
    model = tiny_model(tiny_architecture, base_state, expert_states)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with torch.inference_mode():
        model(images())
    after = model.state_dict()
    assert list(after) == list(before)
    for name, tensor in before.items():
        assert after[name].shape == tensor.shape and torch.equal(after[name], tensor), name
    save_file({name: tensor.contiguous() for name, tensor in after.items()}, tmp_path / "model.safetensors")
    reloaded = load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(reloaded[name], tensor) for name, tensor in before.items())

    # A new base MLP loaded in place, and a pool changed in place, must both reach the fused path.
    first = rankone_mlps(model)[0]
    changed = {name: tensor + 0.05 for name, tensor in before.items() if ".mlp.c_fc." in name or ".mlp.c_proj.weight" in name}
    model.load_state_dict(changed, strict=False)
    with torch.no_grad():
        first.fc_v.mul_(2.0)
    with torch.inference_mode():
        torch.testing.assert_close(model(images()), plain_copy(model)(images()), atol=1e-5, rtol=0)

    # Moved to another dtype: the fused buffers are rebuilt for it.
    model = model.double()
    with torch.inference_mode():
        result = model(images().double())
        assert result.dtype == torch.float64
        torch.testing.assert_close(result, plain_copy(model)(images().double()), atol=1e-10, rtol=0)


def test_set_routing_applies_to_the_fused_path(tiny_architecture, base_state, expert_states):
    model = tiny_model(tiny_architecture, base_state, expert_states)
    with torch.inference_mode():
        model(images())
    set_routing(model, None, "per-batch")
    with torch.inference_mode():
        torch.testing.assert_close(model(images()), plain_copy(model)(images()), atol=1e-5, rtol=0)


@pytest.mark.parametrize("batch", [1, 40])
def test_per_batch_routing_with_merged_weights_equals_plain(batch):
    """Past in·out/(in+out) tokens per-batch routing merges the experts into W0 once; below it stays low-rank."""
    torch.manual_seed(1)
    d, hidden, experts = 8, 32, 12
    mlp = RankOneMLP(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d), torch.randn(hidden, experts), torch.randn(d, experts) / d,
                     torch.randn(d, experts), torch.randn(hidden, experts) / hidden, lam=0.3, select=0.75, routing="per-batch",
                     batch_first=True).double()
    for parameter in (mlp.c_fc.weight, mlp.c_fc.bias, mlp.c_proj.weight, mlp.c_proj.bias):
        parameter.requires_grad_(False)
    with torch.no_grad():
        mlp.router.weight.normal_(0.0, 0.5)
    x = torch.randn(batch, 3, d, dtype=torch.float64)
    assert merging_pays(x, mlp.c_fc) == (batch * 3 * (d + hidden) > d * hidden)
    with torch.inference_mode():
        torch.testing.assert_close(mlp(x), mlp.plain_forward(x), atol=1e-10, rtol=0)
    # With autograd on the router the low-rank path runs, and gives the same gradients.
    mlp(x).sum().backward()
    fused_grad = mlp.router.weight.grad.clone()
    mlp.router.weight.grad = None
    mlp.plain_forward(x).sum().backward()
    torch.testing.assert_close(fused_grad, mlp.router.weight.grad, atol=1e-10, rtol=0)


def test_fused_buffers_share_the_base_weights_storage(tiny_architecture, base_state, expert_states):
    model = tiny_model(tiny_architecture, base_state, expert_states)
    with torch.inference_mode():
        model(images())
    for mlp in rankone_mlps(model):
        for linear, pool_v in ((mlp.c_fc, mlp.fc_v), (mlp.c_proj, mlp.proj_v)):
            # W0 lives in the first rows of [W0; V̂ᵀ]: the fusion adds one copy of V̂, not of W0.
            assert linear.weight.untyped_storage().nbytes() == (linear.weight.numel() + pool_v.numel()) * linear.weight.element_size()
