"""Iso-C (Marczak et al., 2025, "No Task Left Behind"): task arithmetic with a flat spectrum.

For each weight matrix the task vectors are summed, Στ = U·S·Vᵀ, and every singular value
is replaced by their mean: θ0 + λ·mean(S)·U·Vᵀ. Summing lets a few directions that many
tasks share dominate; a flat spectrum gives every direction of the sum the same weight,
so the tasks that own the smaller ones are not drowned. Other tensors are averaged
(`matrices.merge_per_matrix`). λ defaults to 1.0, FusionBench's setting.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rankone.methods.matrices import merge_per_matrix, thin_svd
from rankone.methods.merging import Progress, TaskVectors, Update, static_merge, summed
from rankone.options import Options, lambda_option

ISO_LAMBDA = 1.0


@dataclass(frozen=True)
class IsoCOptions(Options):
    lam: float = lambda_option(default=ISO_LAMBDA)


def flat_spectrum(matrix: torch.Tensor) -> torch.Tensor:
    """mean(S)·U·Vᵀ of matrix = U·S·Vᵀ."""
    left, singular_values, right = thin_svd(matrix)
    return singular_values.mean() * (left @ right)


def iso_c(task_vectors: TaskVectors, options: Options, progress: Progress = None) -> Update:
    return merge_per_matrix(task_vectors, lambda matrices: flat_spectrum(summed(matrices)), options.lam, progress)


METHOD = static_merge("iso-c", "flat spectrum of each summed weight matrix; θ0 + λ·mean(S)·U·Vᵀ", row=74, options=IsoCOptions,
                      merge=iso_c)
