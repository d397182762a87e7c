"""WUDI merging (Cheng et al., 2025, "Whoever Started the Interference Should End It"): data-free, by gradient steps.

A merged weight matrix τ_m interferes with task t on the inputs that task's fine-tuning
saw; the paper shows that those inputs lie close to the span of τ_t's own rows, so the
interference can be measured from the task vectors alone. Per weight matrix, starting
from the sum Στ, Adam minimises

    Σ_t ‖(τ_m − τ_t)·τ_tᵀ‖²_F / ‖τ_t‖²_F

for `steps` steps at `lr` (FusionBench's defaults: 400 steps, lr 1e-5), and θ0 + τ_m is
the merge: no λ. Other tensors are averaged (`matrices.merge_per_matrix`). No images, no
labels; the cost is `steps` small products per matrix, on --device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rankone import numerics
from rankone.methods.matrices import merge_per_matrix
from rankone.methods.merging import Progress, TaskVectors, Update, static_merge, summed
from rankone.options import Options, learning_rate_option, option


@dataclass(frozen=True)
class WUDIOptions(Options):
    steps: int = option(400, "WUDI: Adam steps per weight matrix (FusionBench's iter_num).", low=1)
    lr: float = learning_rate_option(1e-5)


def interference(merged: torch.Tensor, task_matrices: torch.Tensor, squared_norms: torch.Tensor) -> torch.Tensor:
    """Σ_t ‖(merged − τ_t)·τ_tᵀ‖² / ‖τ_t‖², the task matrices stacked along the first dimension."""
    products = torch.matmul(merged.unsqueeze(0) - task_matrices, task_matrices.transpose(1, 2))
    return torch.sum(torch.square(products) / squared_norms[:, None, None])


def least_interference(matrices: list[torch.Tensor], steps: int, lr: float) -> torch.Tensor:
    """τ_m after `steps` Adam steps on `interference`, from Στ.

    A task that left the matrix unchanged (τ_t = 0, such as a frozen layer) interferes with
    nothing, and its term would be 0/0; it is left out (the reference's formula gives NaN there).
    """
    changed = [matrix for matrix in matrices if bool(matrix.any())]
    if not changed:
        return torch.zeros_like(matrices[0])
    # The task matrices as they came (not stacked: a copy of all T of them), their squared norms, and Στ.
    squared_norms = [torch.square(torch.linalg.vector_norm(matrix)) for matrix in changed]
    merged = torch.nn.Parameter(summed(changed))
    optimizer = numerics.adam([merged], merged.device, lr=lr, weight_decay=0)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            # One task's term at a time, its gradient accumulated: the products (rows × rows per task) of all T
            # tasks at once would make the peak grow with T.
            for task_matrix, squared_norm in zip(changed, squared_norms):
                interference(merged, task_matrix[None], squared_norm[None]).backward()
            optimizer.step()
    return merged.detach()


def wudi(task_vectors: TaskVectors, options: Options, progress: Progress = None) -> Update:
    return merge_per_matrix(task_vectors, lambda matrices: least_interference(matrices, options.steps, options.lr), 1.0, progress)


METHOD = static_merge("wudi", "data-free: Adam on each matrix's interference with the task vectors; θ0 + τ_m", row=78,
                      options=WUDIOptions, merge=wudi)
