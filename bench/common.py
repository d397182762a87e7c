"""Random experts in real architectures, built with the library's own functions, and timing helpers.

Nothing here is a copy of library code: the models are what `routed_model` and
`merged_state` return; only the reference-style per-sample loop (what rankone avoids) is
written out here, as a baseline.
"""

from __future__ import annotations

import copy
import os
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from rankone.methods import merged_state
from rankone.models import build_visual, load_visual, named_architecture
from rankone.methods.rankone.module import RankOneMLP, rankone_mlps, routed_model, top_p_gate
from rankone.methods.rankone.pool import build_pool, static_part

# RANKONE_BENCH_THREADS=1 measures one thread (small matrix products parallelise worse than large ones).
THREADS = int(os.environ.get("RANKONE_BENCH_THREADS", "2"))
LAMBDA = 0.3
SELECT = 0.75
K = 32
TASK_COUNT = 8
TASKS = [f"task{index}" for index in range(TASK_COUNT)]


def setup_threads() -> None:
    torch.set_num_threads(THREADS)


def load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def random_base(name: str, seed: int = 0) -> tuple[dict, dict[str, torch.Tensor]]:
    """(architecture, θ0 image tower with open_clip's own random init, `visual.*` keys)."""
    architecture = named_architecture(name)
    torch.manual_seed(seed)
    tower = build_visual(architecture)
    return architecture, {f"visual.{key}": value.detach().clone() for key, value in tower.state_dict().items()}


def random_task_vectors(base: dict[str, torch.Tensor], distinct: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """`distinct` task vectors τ_t = 1e-3·(noise shared by the tasks + a rank-8 part of task t), for every tensor of θ0.

    Real task vectors are neither exactly low-rank nor identical across tasks; this keeps
    both properties. Latency depends on shapes only, so benchmarks tile a few distinct
    tasks up to eight (`tile_tasks`) to keep set-up time and memory small.
    """
    generator = torch.Generator().manual_seed(seed)
    vectors: list[dict[str, torch.Tensor]] = [{} for _ in range(distinct)]
    for key, tensor in base.items():
        noise = torch.randn(tensor.shape, generator=generator)
        for vector in vectors:
            if tensor.dim() == 2:
                left = torch.randn(tensor.shape[0], 8, generator=generator)
                right = torch.randn(8, tensor.shape[1], generator=generator)
                vector[key] = torch.addmm(noise, left, right, alpha=2.0 / 8**0.5).mul_(1e-3)
            else:
                vector[key] = (noise + torch.randn(tensor.shape, generator=generator)).mul_(1e-3)
    return vectors


def tile_tasks(items: list, count: int = TASK_COUNT) -> list:
    return [items[index % len(items)] for index in range(count)]


def tile_pool(pool: dict[str, torch.Tensor], times: int) -> dict[str, torch.Tensor]:
    """A pool of `times`× the experts (columns repeated task-major), same shapes as a pool of that many tasks."""
    return {key: tensor.repeat(1, times).contiguous() for key, tensor in pool.items()}


def random_models(name: str, *, distinct: int = 2) -> dict:
    """Static task-arithmetic tower and routed tower (per-sample, p = 0.75, k = 32, eight tasks) for `name`."""
    architecture, base = random_base(name)
    distinct_vectors = random_task_vectors(base, distinct)
    task_vectors = tile_tasks(distinct_vectors)
    static_tower = load_visual(architecture, merged_state(base, task_vectors, "task-arithmetic", lam=LAMBDA)).eval()
    # Randomized SVD only to keep set-up short; latency depends on shapes, not on which triplets were kept.
    pool, _ = build_pool(distinct_vectors, K, "randomized")
    pool = tile_pool(pool, TASK_COUNT // distinct)
    routed = routed_model(architecture, static_part(base, task_vectors, LAMBDA), pool, LAMBDA, SELECT, "per-sample", TASKS)
    return {"architecture": architecture, "static": static_tower, "routed": routed}


def reference_loop_forward(mlp: RankOneMLP, x: torch.Tensor) -> torch.Tensor:
    """The reference implementation's per-sample loop: build W_b = W0 + U·diag(α'_b)·V̂ᵀ for every image."""
    alpha = top_p_gate(mlp.router(x).mean(dim=mlp.token_dim), mlp.select)
    outputs = []
    for index in range(alpha.shape[0]):
        sample = x.select(mlp.token_dim ^ 1, index)
        weight_fc = mlp.c_fc.weight + (mlp.fc_u * alpha[index]) @ mlp.fc_v.T
        weight_proj = mlp.c_proj.weight + (mlp.proj_u * alpha[index]) @ mlp.proj_v.T
        hidden = mlp.gelu(nn.functional.linear(sample, weight_fc, mlp.c_fc.bias))
        outputs.append(nn.functional.linear(hidden, weight_proj, mlp.c_proj.bias))
    return torch.stack(outputs, dim=mlp.token_dim ^ 1)


def with_mlp_forward(model: nn.Module, forward: str) -> nn.Module:
    """A copy of a routed model whose MLPs run `fused` (the library's forward), `plain` (the method's unfused formula),
    the `reference` loop, or a hard gate (training-free subspace routing) `hard` (the library's: only the routed task's
    experts) or `hard dense` (every expert computed, the others at gate 0)."""
    variant = copy.deepcopy(model)
    if forward == "fused":
        return variant
    for mlp in rankone_mlps(variant):
        if forward.startswith("hard"):
            mlp.scorer, mlp.gate = "subspace", "hard"
            if forward == "hard dense":
                mlp.forward = mlp.dense_forward
        else:
            mlp.forward = mlp.plain_forward if forward == "plain" else (lambda x, mlp=mlp: reference_loop_forward(mlp, x))
    return variant


def interleaved_medians(runs: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, dict]:
    """Median wall time of each callable; repeats interleave the callables so drift hits all alike."""
    for _ in range(warmup):
        for run in runs.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            began = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - began)
    return {name: {"median_s": statistics.median(values), "min_s": min(values), "repeats": len(values)} for name, values in times.items()}
