"""TSV-Merge (Gargiulo et al., 2025, "Task Singular Vectors"): each task keeps its top 1/T of directions, decorrelated.

For each weight matrix with r = its smaller side: every task's τ = U·S·Vᵀ is cut to its top
⌊r/T⌋ singular triplets; the T truncated bases are concatenated side by side, and the
interference between them is removed by replacing each concatenation with its orthonormal
factor (U·Vᵀ of its SVD, the whitening of the paper): θ0 + λ·orth(U_cat)·diag(S_cat)·orth(V_catᵀ).
Other tensors are averaged. λ defaults to 1.0, FusionBench's setting.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rankone.methods.matrices import merge_per_matrix, orthonormal_factor, thin_svd
from rankone.methods.merging import Progress, TaskVectors, Update, static_merge
from rankone.options import Options, lambda_option

TSV_LAMBDA = 1.0


@dataclass(frozen=True)
class TSVMergeOptions(Options):
    lam: float = lambda_option(default=TSV_LAMBDA)


def decorrelated_singular_vectors(matrices: list[torch.Tensor]) -> torch.Tensor:
    """orth(U_cat)·diag(S_cat)·orth(V_catᵀ) from each task's top ⌊r/T⌋ singular triplets."""
    rank, tasks = min(matrices[0].shape), len(matrices)
    kept = rank // tasks
    lefts, values, rights = [], [], []
    for matrix in matrices:
        left, singular_values, right = thin_svd(matrix)
        # Copies: a slice would keep each task's whole factors alive until the end (T of them at once).
        lefts.append(left[:, :kept].clone())
        values.append(singular_values[:kept].clone())
        rights.append(right[:kept].clone())
    # The reference pads the concatenation to r columns with zeros; padding changes neither orthonormal factor's product
    # with the kept values, so it is left out.
    return orthonormal_factor(torch.cat(lefts, dim=1)) @ torch.diag(torch.cat(values)) @ orthonormal_factor(torch.cat(rights, dim=0))


def tsv_merge(task_vectors: TaskVectors, options: Options, progress: Progress = None) -> Update:
    return merge_per_matrix(task_vectors, decorrelated_singular_vectors, options.lam, progress)


METHOD = static_merge("tsv-merge", "each task's top 1/T singular vectors, decorrelated; θ0 + λ·merged", row=72,
                      options=TSVMergeOptions, merge=tsv_merge)
