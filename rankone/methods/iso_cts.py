"""Iso-CTS (Marczak et al., 2025): Iso-C's common subspace, plus a subspace of each task's own.

For each r-rank-bounded weight matrix (r = its smaller side): the top directions of the sum
Στ span the common subspace, about `common_fraction`·r of them; the rest of the r
directions are shared out equally among the T tasks, each taking the top directions of
its own τ once the common subspace is projected out, τ − U_c·U_cᵀ·τ. The columns
gathered this way are made orthonormal again (U·Vᵀ of their SVD, left and right alike),
and every direction gets the same weight, the mean of the singular values gathered:
θ0 + λ·mean(s)·U·Vᵀ. How many directions are common is rounded as FusionBench rounds it,
so that the task-specific ones divide evenly among the tasks. Other tensors are averaged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rankone.methods.iso_c import ISO_LAMBDA
from rankone.methods.matrices import merge_per_matrix, orthonormal_factor, thin_svd
from rankone.methods.merging import Progress, TaskVectors, Update, static_merge, summed
from rankone.options import Options, lambda_option, option


@dataclass(frozen=True)
class IsoCTSOptions(Options):
    lam: float = lambda_option(default=ISO_LAMBDA)
    common_fraction: float = option(0.8, "Iso-CTS: share of each matrix's directions kept for the common subspace "
                                    "(the rest are split among the tasks).", low=0.0, high=1.0)


def subspace_sizes(rank: int, tasks: int, common_fraction: float) -> tuple[int, int]:
    """(common directions, directions per task): the task-specific total is rounded to a multiple of T."""
    common = int(rank * common_fraction)
    per_task = round((rank - common) / tasks)
    common = rank - per_task * tasks
    return common, per_task


def common_and_task_subspaces(matrices: list[torch.Tensor], common_fraction: float) -> torch.Tensor:
    """mean(s)·U·Vᵀ over the common subspace of Στ and each task's own top directions outside it."""
    rank, tasks = min(matrices[0].shape), len(matrices)
    common, per_task = subspace_sizes(rank, tasks, common_fraction)
    left, singular_values, right = thin_svd(summed(matrices))
    common_left = left[:, :common]
    lefts, values, rights = [], [], []
    for matrix in matrices:
        task_left, task_values, task_right = thin_svd(matrix - common_left @ (common_left.T @ matrix))
        # Copies: a slice would keep each task's whole factors alive until the end (T of them at once).
        lefts.append(task_left[:, :per_task].clone())
        values.append(task_values[:per_task].clone())
        rights.append(task_right[:per_task].clone())
    # Task directions first, then the common ones, as the reference orders them (the result does not depend on it).
    gathered_left = torch.cat([*lefts, common_left], dim=1)
    gathered_right = torch.cat([*rights, right[:common]], dim=0)
    gathered_values = torch.cat([*values, singular_values[:common]])
    return gathered_values.mean() * (orthonormal_factor(gathered_left) @ orthonormal_factor(gathered_right))


def iso_cts(task_vectors: TaskVectors, options: Options, progress: Progress = None) -> Update:
    return merge_per_matrix(task_vectors, lambda matrices: common_and_task_subspaces(matrices, options.common_fraction),
                            options.lam, progress)


METHOD = static_merge("iso-cts", "Iso-C's common subspace plus each task's own directions, flat spectrum", row=76,
                      options=IsoCTSOptions, merge=iso_cts)
