"""Model Stock (Jang et al., 2024): move from θ0 toward the experts' average by how much the experts agree.

Per tensor, the experts' task vectors meet at an angle; with θ̄ the mean of the T experts'
angles taken pairwise and c = cos θ̄, the merge is θ0 + t·mean(τ) with t = T·c / ((T − 1)·c + 1).
Experts that agree (c → 1) give t → 1, the plain average; orthogonal ones (c → 0) stay at θ0.
As FusionBench does, the pairwise angles (not their cosines) are averaged, and a tensor that
no expert changed stays at θ0. No options: the ratio is read from the weights.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from itertools import combinations

import torch

from rankone.errors import RankoneError
from rankone.methods.merging import Progress, TaskVectors, Update, static_merge
from rankone.options import NoOptions, Options

# Keeps 0/0 (a tensor no expert changed) at a zero cosine, hence t = 0.
EPSILON = 1e-8


def interpolation_ratio(vectors: list[torch.Tensor]) -> float:
    """t = T·cos θ̄ / ((T − 1)·cos θ̄ + 1), θ̄ the mean pairwise angle between the task vectors of one tensor."""
    flat = [vector.reshape(-1).float() for vector in vectors]
    angles = []
    for first, second in combinations(flat, 2):
        cosine = float(first @ second) / (math.sqrt(float(first @ first) * float(second @ second)) + EPSILON)
        angles.append(math.acos(min(1.0, max(-1.0, cosine))))
    cosine = math.cos(sum(angles) / len(angles))
    count = len(vectors)
    return count * cosine / ((count - 1) * cosine + 1 + EPSILON)


def model_stock(task_vectors: TaskVectors, options: Options, progress: Progress = None) -> Update:
    """The update θ_merge − θ0 = t·mean(τ), with t per tensor from `interpolation_ratio`, key by key."""
    if len(task_vectors) < 2:
        raise RankoneError(f"--method model-stock: needs at least 2 experts, the workspace has {len(task_vectors)}")
    return _model_stock_items(task_vectors, progress)


def _model_stock_items(task_vectors: TaskVectors, progress: Progress) -> Iterator[tuple[str, torch.Tensor]]:
    for key in task_vectors[0]:
        vectors = [vector[key].float() for vector in task_vectors]
        yield key, interpolation_ratio(vectors) * torch.stack(vectors).mean(dim=0)
        if progress is not None:
            progress(key)


METHOD = static_merge("model-stock", "θ0 + t·mean(τ), t from the angle between the experts", row=70, options=NoOptions,
                      merge=model_stock)
