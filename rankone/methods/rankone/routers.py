"""RankOne-MoE's router kinds (`rankone adapt --router entropy|subspace|task`).

- entropy (SPEC's, the default): Linear(d → T·k) routers on the token-mean MLP input, soft
  top-p gate, trained by entropy minimisation on unlabeled images (rankone.training).
- subspace: training-free. Each block scores task t by ‖V_tᵀ x̄‖ / ‖x̄‖, the share of the
  token-mean input x̄ in the span of task t's c_fc right singular vectors (the pool's own),
  and gates per task: the best task's k experts (hard), or softmax(scores / temperature)
  (soft), times the gate scale. No data, no tensors of its own.
- task: SPEC's Linear routers, trained by cross-entropy to tell which task's folder an
  unlabeled image came from (task t's score: the mean of its k outputs), gating per task as
  subspace does. The folders are sorted by task already; no class labels are read.

Defaults, chosen without test labels: a hard gate at scale 1, which gives the routed task
exactly its own rank-k MLP update (the form of the pool oracle, whose ceiling the routing is
measured against), and temperature 1 for a soft gate.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rankone.methods.rankone.module import GATES, rankone_mlps

ROUTERS = ("entropy", "subspace", "task")
TASK_GATES = tuple(gate for gate in GATES if gate != "top-p")
# Cross-entropy on a linear score of the token mean is a logistic regression: it takes a larger step than SPEC's
# entropy rate (1e-4) to converge in the same number of steps.
TASK_ROUTER_LR = 1e-2


def scorer_of(router: str) -> str:
    return "subspace" if router == "subspace" else "linear"


def gate_of(router: str, gate: str) -> str:
    return "top-p" if router == "entropy" else gate


def token_means(model: nn.Module, images: Tensor) -> list[Tensor]:
    """Every routed block's token-mean MLP input for `images`, routed as the model routes now (no gradients)."""
    means: list[Tensor] = []
    handles = [mlp.register_forward_pre_hook(lambda module, arguments: means.append(arguments[0].mean(dim=module.token_dim).detach()))
               for mlp in rankone_mlps(model)]
    try:
        with torch.no_grad():
            model(images)
    finally:
        for handle in handles:
            handle.remove()
    return means


def task_objective(model: nn.Module, tasks: list[str]) -> Callable[[Tensor, str], Tensor]:
    """(images of one task's folder, task) → the mean over blocks of the cross-entropy of the routers' task scores
    against that task: what `--router task` minimises. Only the routers get gradients."""
    mlps = rankone_mlps(model)

    def objective(images: Tensor, task: str) -> Tensor:
        target = torch.full((images.shape[0],), tasks.index(task), device=images.device)
        means = token_means(model, images)
        return sum(F.cross_entropy(mlp.task_scores(mean).float(), target) for mlp, mean in zip(mlps, means)) / len(mlps)

    return objective
