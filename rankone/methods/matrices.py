"""Merges that work on each weight matrix's spectrum (TSV-Merge, Iso-C, Iso-CTS) see the tower as those methods do.

A *weight matrix* is a 2-D tensor of the tower, with attention's packed `in_proj_weight`
read as its three d×d matrices (query, key, value): transformers' CLIP, on which these
methods were published and which FusionBench runs them on, stores them apart, and an SVD
of the packed 3d×d tensor is a different computation. The positional embedding and the
output projection are 2-D, so they are matrices too. Every other tensor (biases, norms,
the patch convolution, the class token) is merged as the mean of its task vectors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from rankone.methods.merging import Progress, TaskVectors, check_vectors

# open_clip packs attention's query, key and value projections (weight and bias) into one tensor each.
PACKED_ATTENTION = ("attn.in_proj_weight", "attn.in_proj_bias")


def unpacked(key: str, tensor: torch.Tensor) -> list[torch.Tensor]:
    """The tensors transformers' layout has for `tensor`: three for a packed attention input, else itself."""
    if key.endswith(PACKED_ATTENTION):
        return list(tensor.chunk(3, dim=0))
    return [tensor]


def weight_matrices(key: str, tensor: torch.Tensor) -> list[torch.Tensor] | None:
    """The weight matrices `tensor` holds (three for a packed attention input), or None when it holds none."""
    return unpacked(key, tensor) if tensor.dim() == 2 else None


def merge_per_matrix(task_vectors: TaskVectors, merge_matrix: Callable[[list[torch.Tensor]], torch.Tensor],
                     scale: float, progress: Progress = None) -> Iterator[tuple[str, torch.Tensor]]:
    """The update scale·merged, key by key: `merge_matrix([τ_1, …, τ_T])` for each weight matrix, the mean τ for every
    other tensor; only the current key's T tensors are in memory."""
    for key in check_vectors(task_vectors):
        vectors = [vector[key].float() for vector in task_vectors]
        if weight_matrices(key, vectors[0]) is None:
            merged = torch.stack(vectors).mean(dim=0)
        else:
            per_task = [weight_matrices(key, vector) for vector in vectors]
            merged = torch.cat([merge_matrix([blocks[index] for blocks in per_task]) for index in range(len(per_task[0]))], dim=0)
        del vectors
        yield key, scale * merged
        if progress is not None:
            progress(key)


def thin_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch.linalg.svd(matrix, full_matrices=False), in float64 when LAPACK's float32 divide-and-conquer does not
    converge (it gave up on one of Iso-CTS's residuals, whose rank is a fifth of its size, for random ViT-B/32
    task vectors at T = 8), cast back to the matrix's dtype."""
    try:
        return torch.linalg.svd(matrix, full_matrices=False)
    except torch.linalg.LinAlgError:
        if matrix.dtype == torch.float64:
            raise
        return tuple(part.to(matrix.dtype) for part in torch.linalg.svd(matrix.double(), full_matrices=False))


def orthonormal_factor(matrix: torch.Tensor) -> torch.Tensor:
    """U·Vᵀ of matrix = U·S·Vᵀ: the nearest matrix with orthonormal columns (or rows), which these methods
    use to make the concatenated singular vectors of several tasks orthogonal again."""
    left, _, right = thin_svd(matrix)
    return left @ right
