"""The rank-one pool: top-k SVD triplets of every MLP weight task vector, and the static part.

docs/method.md §5: for every block and each of `mlp.c_fc.weight` and
`mlp.c_proj.weight`, for every task t, τ = U S Vᵀ; keep the top k triplets as u_j and
v̂_j = s_j·v_j. Columns are concatenated task-major: column t·k + j belongs to task t.
Everything else (attention, norms, embeddings, both MLP biases) is the static merge
θ0 + λ·Στ.

`pool.safetensors` holds the pool (`<matrix key minus .weight>.pool_u` / `.pool_v`) and the
static part (`static.<visual key>`), so the routed model needs only the pretrained MLP
weights from the base besides this file.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import torch

from rankone.errors import RankoneError
from rankone.models import build_visual, visual_state
from rankone.workspace import Workspace, read_tensors_metadata

POOL_FILE = "pool.safetensors"
STATIC_PREFIX = "static."
MLP_WEIGHT = re.compile(r"^visual\.transformer\.resblocks\.(\d+)\.mlp\.(c_fc|c_proj)\.weight$")
SVD_METHODS = ("exact", "randomized")


def mlp_weight_keys(state: dict[str, torch.Tensor]) -> list[str]:
    """The MLP weight matrices that go into the pool, in block order (c_fc before c_proj)."""
    keys = [key for key in state if MLP_WEIGHT.match(key)]
    return sorted(keys, key=lambda key: (int(MLP_WEIGHT.match(key).group(1)), MLP_WEIGHT.match(key).group(2) != "c_fc"))


def pool_keys(matrix_key: str) -> tuple[str, str]:
    """Names of U_cat and V̂_cat for an MLP weight key."""
    stem = matrix_key.removesuffix(".weight")
    return f"{stem}.pool_u", f"{stem}.pool_v"


# Randomized SVD setting. Block Krylov (Musco & Musco, NeurIPS 2015) keeps every power
# iterate in the basis instead of only the last, so 3 iterations with a block of k columns
# kept more energy (gap to exact ≤ 0.04% on a spectrum falling like i^(-1/2)) than 6 plain
# power iterations with k + 10 columns (≤ 0.05%), for 60% of their multiplications.
KRYLOV_ITERATIONS = 3


def exact_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top `rank` triplets (U, S, V) of a full SVD.

    LAPACK's SVD of a wide matrix took about twice as long as that of its transpose here
    (768 × 3072, c_proj's shape), so a wide matrix is decomposed as its tall transpose.
    """
    if matrix.shape[0] < matrix.shape[1]:
        v, s, uh = torch.linalg.svd(matrix.T, full_matrices=False)
        return uh[:rank].T, s[:rank], v[:, :rank]
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank], s[:rank], vh[:rank].T


def randomized_svd(
    matrix: torch.Tensor, rank: int, iterations: int = KRYLOV_ITERATIONS, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top `rank` triplets (U, S, V) by randomized block Krylov iteration.

    The basis spans A·Ω, (A·Aᵀ)·A·Ω, …, (A·Aᵀ)^iterations·A·Ω for a Gaussian Ω of `rank`
    columns; U·diag(S)·Vᵀ is the best rank-`rank` approximation of `matrix` within that
    basis, so Σ S² is exactly the energy the factorisation keeps. When the basis would be
    as wide as the matrix, the exact SVD is cheaper. Seeded with its own generator, so the
    pool does not depend on global RNG state.
    """
    rows, cols = matrix.shape
    if rank * (iterations + 1) >= min(rows, cols):
        return exact_svd(matrix, rank)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    probe = torch.randn(cols, rank, generator=generator, dtype=matrix.dtype).to(matrix.device)
    block, _ = torch.linalg.qr(matrix @ probe)
    blocks = [block]
    for _ in range(iterations):
        # Orthonormalise between multiplications: otherwise small singular directions vanish in float32.
        left, _ = torch.linalg.qr(matrix.T @ block)
        block, _ = torch.linalg.qr(matrix @ left)
        blocks.append(block)
    basis, _ = torch.linalg.qr(torch.cat(blocks, dim=1))
    small_u, values, v = exact_svd(basis.T @ matrix, rank)
    return basis @ small_u, values, v


def build_pool(
    task_vectors: list[dict[str, torch.Tensor]],
    k: int,
    svd: str = SVD_METHODS[0],
    *,
    tasks: list[str] | None = None,
    iterations: int = KRYLOV_ITERATIONS,
    seed: int = 0,
    progress=None,
    device: torch.device | str = "cpu",
) -> tuple[dict[str, torch.Tensor], dict[str, list[float]]]:
    """(pool, kept energy) from the task vectors, one dict per task in task order.

    pool: for each MLP weight key, `pool_u` (out × T·k) and `pool_v` (in × T·k), task-major.
    kept energy: for each MLP weight key, per task, Σ_{j<k} s_j² / ‖τ‖_F².
    `progress(key)`, if given, is called after each matrix (for a progress bar). The SVDs run
    on `device`; the pool comes back on the CPU.
    """
    if svd not in SVD_METHODS:
        raise RankoneError(f"--svd {svd!r}: expected one of {', '.join(SVD_METHODS)}")
    if not task_vectors:
        raise RankoneError("build-pool: no task vectors given")
    if k < 1:
        raise RankoneError(f"--k {k}: must be at least 1")
    names = list(tasks) if tasks is not None else [f"task {index}" for index in range(len(task_vectors))]
    keys = mlp_weight_keys(task_vectors[0])
    if not keys:
        raise RankoneError("task vectors hold no visual.transformer.resblocks.*.mlp weights")
    for name, vector in zip(names, task_vectors):
        missing = [key for key in keys if key not in vector]
        if missing:
            raise RankoneError(f"task vector of {name}: lacks tensor {missing[0]}")
        if all(not bool(tensor.any()) for tensor in vector.values()):
            raise RankoneError(f"task vector of {name}: all zeros (the expert equals the pretrained model)")
    pool: dict[str, torch.Tensor] = {}
    kept: dict[str, list[float]] = {}
    for key in keys:
        out_dim, in_dim = task_vectors[0][key].shape
        if k > min(out_dim, in_dim):
            raise RankoneError(f"--k {k}: larger than the rank limit {min(out_dim, in_dim)} of {key} ({out_dim}×{in_dim})")
        columns_u, columns_v, fractions = [], [], []
        for index, vector in enumerate(task_vectors):
            tau = vector[key].to(device, torch.float32)
            if svd == "exact":
                u, s, v = exact_svd(tau, k)
            else:
                u, s, v = randomized_svd(tau, k, iterations, seed=seed + index)
            # vector_norm accumulates in float64 without a float64 copy of τ (that copy cost 2 s of 8 for ViT-B/32).
            total = float(torch.linalg.vector_norm(tau, dtype=torch.float64)) ** 2
            fractions.append(float(s.double().pow(2).sum()) / total if total > 0 else 0.0)
            columns_u.append(u)
            columns_v.append(v * s)
        name_u, name_v = pool_keys(key)
        pool[name_u] = torch.cat(columns_u, dim=1).cpu().contiguous()
        pool[name_v] = torch.cat(columns_v, dim=1).cpu().contiguous()
        kept[key] = fractions
        if progress is not None:
            progress(key)
    return pool, kept


def static_part(
    base_visual: dict[str, torch.Tensor], task_vectors: list[dict[str, torch.Tensor]], lam: float
) -> dict[str, torch.Tensor]:
    """θ0 + λ·Στ for every image-tower tensor except the MLP weight matrices, which stay θ0.

    The MLP weights stay pretrained because the experts add their low-rank τ on top at run
    time (docs/method.md §7); the MLP biases are merged like everything else.
    """
    static: dict[str, torch.Tensor] = {}
    for key, tensor in base_visual.items():
        if not key.startswith("visual."):
            continue
        if MLP_WEIGHT.match(key):
            static[key] = tensor.clone()
            continue
        merged = tensor.float().clone()
        for vector in task_vectors:
            if key not in vector:
                raise RankoneError(f"task vector lacks tensor {key}")
            merged += lam * vector[key].float()
        static[key] = merged.to(tensor.dtype)
    return static


@dataclass
class StoredPool:
    """What `pool.safetensors` holds, split into its parts."""

    static: dict[str, torch.Tensor]
    pool: dict[str, torch.Tensor]
    k: int
    lam: float
    tasks: list[str]
    metadata: dict[str, Any]


def pool_file_tensors(static: dict[str, torch.Tensor], pool: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Static part and pool in the single-file layout of `pool.safetensors`."""
    tensors = {STATIC_PREFIX + key: tensor for key, tensor in static.items() if not MLP_WEIGHT.match(key)}
    tensors.update(pool)
    return tensors


def read_pool(workspace: Workspace, base_visual: dict[str, torch.Tensor] | None = None) -> StoredPool:
    """Load `pool.safetensors` (checked against the manifest) back into its parts.

    The static part's MLP weights are the pretrained ones from `base_visual`, or from the
    workspace base when not given.
    """
    tensors = workspace.load_tensors(POOL_FILE)
    raw = read_tensors_metadata(workspace.path(POOL_FILE))
    try:
        metadata = json.loads(raw["rankone"])
        k, lam, tasks = int(metadata["k"]), float(metadata["lambda"]), list(metadata["tasks"])
    except (KeyError, ValueError, TypeError):
        raise RankoneError(f"{workspace.path(POOL_FILE)}: metadata lacks k, lambda or tasks; rerun `rankone build-pool`") from None
    if base_visual is None:
        base_visual = visual_state(workspace.load_tensors("base.safetensors"))
    static = {key[len(STATIC_PREFIX):]: value for key, value in tensors.items() if key.startswith(STATIC_PREFIX)}
    for key in mlp_weight_keys(base_visual):
        static[key] = base_visual[key]
    pool = {key: value for key, value in tensors.items() if not key.startswith(STATIC_PREFIX)}
    return StoredPool(static=static, pool=pool, k=k, lam=lam, tasks=tasks, metadata=metadata)


def check_pool_options(architecture: dict, k: int, svd: str) -> None:
    """--k and --svd against the architecture's MLP shapes, before any file is read."""
    if svd not in SVD_METHODS:
        raise RankoneError(f"--svd {svd!r}: expected one of {', '.join(SVD_METHODS)}")
    if k < 1:
        raise RankoneError(f"--k {k}: must be at least 1")
    with torch.device("meta"):
        shapes = {f"visual.{name}": tensor.shape for name, tensor in build_visual(architecture).state_dict().items()}
    for key in mlp_weight_keys(shapes):
        if k > min(shapes[key]):
            raise RankoneError(f"--k {k}: larger than the rank limit {min(shapes[key])} of {key} ({shapes[key][0]}×{shapes[key][1]})")
