"""The rank-one pool and the static part against independent numpy computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rankone.errors import RankoneError
from rankone.models import visual_state
from rankone.methods.rankone.pool import build_pool, mlp_weight_keys, pool_keys, randomized_svd, static_part
from conftest import task_vectors_of


def rank_k(matrix: torch.Tensor, k: int) -> np.ndarray:
    u, s, vh = np.linalg.svd(matrix.double().numpy(), full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def test_pool_columns_are_task_major_rank_k_truncations(base_state, expert_states):
    task_vectors = task_vectors_of(base_state, expert_states)
    k = 5
    pool, kept = build_pool(task_vectors, k)
    keys = mlp_weight_keys(task_vectors[0])
    assert len(keys) == 4 and keys[0].endswith("0.mlp.c_fc.weight") and keys[1].endswith("0.mlp.c_proj.weight")
    for key in keys:
        name_u, name_v = pool_keys(key)
        out_dim, in_dim = task_vectors[0][key].shape
        assert pool[name_u].shape == (out_dim, 3 * k) and pool[name_v].shape == (in_dim, 3 * k)
        for task, vector in enumerate(task_vectors):
            columns = slice(task * k, task * k + k)
            rebuilt = (pool[name_u][:, columns] @ pool[name_v][:, columns].T).double().numpy()
            np.testing.assert_allclose(rebuilt, rank_k(vector[key], k), atol=1e-5)
            singular = np.linalg.svd(vector[key].double().numpy(), compute_uv=False)
            assert kept[key][task] == pytest.approx((singular[:k] ** 2).sum() / (singular**2).sum(), rel=1e-5)


def test_randomized_svd_keeps_nearly_the_exact_energy(base_state, expert_states):
    # A decaying spectrum, as real task vectors have, on top of the random experts.
    task_vectors = task_vectors_of(base_state, expert_states)
    generator = torch.Generator().manual_seed(3)
    for vector in task_vectors:
        for key in mlp_weight_keys(vector):
            out_dim, in_dim = vector[key].shape
            left, right = torch.randn(out_dim, 8, generator=generator), torch.randn(8, in_dim, generator=generator)
            vector[key] = vector[key] + 0.05 * (left * torch.logspace(0, -1, 8)) @ right
    # k 4: the Krylov basis (4 × 4 columns) stays narrower than the 32-wide matrices, so the
    # randomized path runs rather than its exact fallback.
    _, exact = build_pool(task_vectors, 4, "exact")
    pool, randomized = build_pool(task_vectors, 4, "randomized")
    for key in exact:
        for exact_fraction, randomized_fraction in zip(exact[key], randomized[key]):
            print(f"{key}: exact {exact_fraction:.5f} randomized {randomized_fraction:.5f}")
            assert randomized_fraction <= exact_fraction + 1e-6
            assert randomized_fraction >= 0.99 * exact_fraction
    again, _ = build_pool(task_vectors, 4, "randomized")
    assert all(torch.equal(pool[name], again[name]) for name in pool)


def test_randomized_svd_returns_orthonormal_triplets_near_the_exact_ones():
    generator = torch.Generator().manual_seed(0)
    # Singular values falling like i^(-1/2), the shape bench/run.py uses for ViT-B/32.
    matrix = (torch.randn(300, 120, generator=generator) * torch.arange(1, 121).rsqrt()) @ torch.randn(120, 120, generator=generator)
    u, s, v = randomized_svd(matrix, 10)
    assert u.shape == (300, 10) and s.shape == (10,) and v.shape == (120, 10)
    torch.testing.assert_close(u.T @ u, torch.eye(10), atol=1e-5, rtol=0)
    torch.testing.assert_close(v.T @ v, torch.eye(10), atol=1e-5, rtol=0)
    # U·diag(S)·Vᵀ is the projection of the matrix on the found directions.
    torch.testing.assert_close(u.T @ matrix @ v, torch.diag(s), atol=1e-3, rtol=0)
    exact = np.linalg.svd(matrix.double().numpy(), compute_uv=False)
    kept, best = float(s.double().pow(2).sum()), float((exact[:10] ** 2).sum())
    assert best * 0.999 <= kept <= best * (1 + 1e-6)


def test_randomized_svd_is_exact_when_the_basis_would_fill_the_matrix():
    matrix = torch.randn(40, 24, generator=torch.Generator().manual_seed(1))
    u, s, v = randomized_svd(matrix, 6)  # 6 × (3 + 1) = 24 columns: as wide as the matrix
    np.testing.assert_allclose(s.numpy(), np.linalg.svd(matrix.numpy(), compute_uv=False)[:6], rtol=1e-5)


def test_k_above_the_rank_is_an_error_naming_the_limit(base_state, expert_states):
    with pytest.raises(RankoneError, match=r"--k 33: larger than the rank limit 32"):
        build_pool(task_vectors_of(base_state, expert_states), 33)
    with pytest.raises(RankoneError, match="--svd"):
        build_pool(task_vectors_of(base_state, expert_states), 2, svd="approximate")


def test_all_zero_task_vector_names_the_task(base_state, expert_states):
    task_vectors = task_vectors_of(base_state, expert_states)
    task_vectors[1] = {key: torch.zeros_like(value) for key, value in task_vectors[1].items()}
    with pytest.raises(RankoneError, match="task vector of beta: all zeros"):
        build_pool(task_vectors, 2, tasks=["alpha", "beta", "gamma"])


def test_static_part_merges_everything_but_the_mlp_weights(base_state, expert_states):
    task_vectors = task_vectors_of(base_state, expert_states)
    base_visual = visual_state(base_state)
    static = static_part(base_visual, task_vectors, 0.3)
    assert set(static) == set(base_visual)
    for key, value in static.items():
        if key.endswith(("mlp.c_fc.weight", "mlp.c_proj.weight")):
            assert torch.equal(value, base_visual[key])
        else:
            expected = base_visual[key].double() + 0.3 * sum(vector[key].double() for vector in task_vectors)
            torch.testing.assert_close(value.double(), expected, atol=1e-6, rtol=0)
