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

Any kind can also start SPEC's entropy adaptation (`--init subspace|task`): each block's
Linear router is fitted by ridge least squares so that its outputs α reproduce that kind's
hard gate (the routed task's k experts at the gate scale, 0 elsewhere) on the token-mean MLP
inputs of unlabeled images, which the top-p gate then passes almost unchanged. The kind's
scores themselves cannot be copied: a subspace score is a norm, not linear in x̄, and a task
router's outputs are logits, on another scale than α.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from rankone.methods.rankone.module import GATES, RankOneMLP, rankone_mlps, subspace_scores
from rankone.training import images_only

ROUTERS = ("entropy", "subspace", "task")
TASK_GATES = tuple(gate for gate in GATES if gate != "top-p")
# Cross-entropy on a linear score of the token mean is a logistic regression: it takes a larger step than SPEC's
# entropy rate (1e-4) to converge in the same number of steps.
TASK_ROUTER_LR = 1e-2
# What entropy routers start from: SPEC's N(0, 0.01²) weights, or a fit of another kind's routing.
INITS = ("random", "subspace", "task")
# The first images of each task's folder that the fit reads (in folder order, so the fit needs no seed).
INIT_IMAGES_PER_TASK = 128
# The next images of each folder, which the fit does not read: how often the fitted routers pick the kind's task on
# them (`RouterFit.held_out`) is how the ridge is chosen without test labels.
HELD_OUT_PER_TASK = 32
# Ridge of the fit, relative to the mean variance of the token means: the fit sees fewer images than a block has
# dimensions (8 tasks × 128 images against 768 at ViT-B/32), so it needs one. Checked by held-out agreement on the
# example: 1e-4 to 1e-1 are under one held-out image apart on average over the kinds, 1 falls behind
# (docs/example-results.md).
INIT_RIDGE = 1e-2


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


@contextmanager
def routed_as(model: nn.Module, kind: str, task: int) -> Iterator[None]:
    """While open, every routed block gates as `kind` would with a hard gate: the folder's `task` (task) or the
    best subspace score (subspace)."""
    mlps = rankone_mlps(model)
    saved = [(mlp.scorer, mlp.gate, mlp.fixed_task) for mlp in mlps]
    for mlp in mlps:
        if kind == "task":
            mlp.fixed_task = task
        else:
            mlp.scorer, mlp.gate = "subspace", "hard"
    try:
        yield
    finally:
        for mlp, (scorer, gate, fixed_task) in zip(mlps, saved):
            mlp.scorer, mlp.gate, mlp.fixed_task = scorer, gate, fixed_task


def kind_targets(mlp: RankOneMLP, means: Tensor, kind: str, task: int) -> Tensor:
    """The per-task gate (samples × T) that `kind` gives these token means, hard, at the block's gate scale."""
    if kind == "task":
        chosen = torch.full(means.shape[:1], task, device=means.device)
    else:
        chosen = subspace_scores(means, mlp.fc_v, mlp.tasks).argmax(dim=-1)
    return mlp.scale * F.one_hot(chosen, mlp.tasks).to(torch.float64)


def ridge_fit(means: Tensor, targets: Tensor, ridge: float) -> tuple[Tensor, Tensor]:
    """(weight T × d, bias T) minimising ‖means·Wᵀ + b − targets‖² + ρ‖W‖², ρ = ridge × the mean variance of the
    means' coordinates × the number of samples; in float64."""
    means, targets = means.double(), targets.double()
    mean_input, mean_target = means.mean(dim=0), targets.mean(dim=0)
    centred = means - mean_input
    gram = centred.T @ centred
    penalty = ridge * float(gram.diagonal().mean())
    weight = torch.linalg.solve(gram + penalty * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device),
                                centred.T @ (targets - mean_target)).T
    return weight, mean_target - weight @ mean_input


@dataclass
class RouterFit:
    """What `fit_routers` did: images read, and per block how often the fitted router picks the kind's task."""

    kind: str
    images: int
    agreement: list[float]
    # The same on the held-out images (HELD_OUT_PER_TASK per folder after the fitted ones); empty when there are none.
    held_out: list[float]


def fit_routers(model: nn.Module, unlabeled: dict[str, Dataset], tasks: list[str], kind: str, *,
                images_per_task: int = INIT_IMAGES_PER_TASK, ridge: float = INIT_RIDGE, batch_size: int = 16,
                device: torch.device | str = "cpu") -> RouterFit:
    """Set every block's Linear router so that α reproduces `kind`'s hard gate (see the module docstring).

    Each block's token means are read with the kind's routing in the blocks before it, which is the routing the
    fitted routers are meant to reproduce. The k outputs of a task share one fitted row.
    """
    mlps = rankone_mlps(model)
    fitted_images = {task: range(min(images_per_task, len(dataset))) for task, dataset in unlabeled.items()}
    means, targets = _kind_means(model, unlabeled, fitted_images, tasks, kind, batch_size, device)
    held_images = {task: range(len(fitted_images[task]), min(len(fitted_images[task]) + HELD_OUT_PER_TASK, len(dataset)))
                   for task, dataset in unlabeled.items()}
    held_means, held_targets = _kind_means(model, unlabeled, held_images, tasks, kind, batch_size, device)
    agreement, held_out = [], []
    with torch.no_grad():
        for block, mlp in enumerate(mlps):
            weight, bias = ridge_fit(means[block], targets[block], ridge)
            k = mlp.router.out_features // mlp.tasks
            mlp.router.weight.copy_(weight.repeat_interleave(k, dim=0).to(mlp.router.weight.dtype))
            mlp.router.bias.copy_(bias.repeat_interleave(k).to(mlp.router.bias.dtype))
            agreement.append(_picks_alike(means[block] @ weight.T + bias, targets[block]))
            if len(held_means[block]):
                held_out.append(_picks_alike(held_means[block] @ weight.T + bias, held_targets[block]))
    return RouterFit(kind=kind, images=sum(len(images) for images in fitted_images.values()), agreement=agreement, held_out=held_out)


def _kind_means(model: nn.Module, unlabeled: dict[str, Dataset], chosen: dict[str, range], tasks: list[str], kind: str,
                batch_size: int, device: torch.device | str) -> tuple[list[Tensor], list[Tensor]]:
    """Per block, the token means of the `chosen` images of each folder read with the kind's routing in the blocks
    before it (float64), and the kind's gate for them."""
    mlps = rankone_mlps(model)
    means: list[list[Tensor]] = [[] for _ in mlps]
    targets: list[list[Tensor]] = [[] for _ in mlps]
    for task, dataset in unlabeled.items():
        index = tasks.index(task)
        for batch in DataLoader(Subset(dataset, chosen[task]), batch_size=batch_size, collate_fn=images_only):
            with routed_as(model, kind, index):
                per_block = token_means(model, batch.to(device))
            for block, (mlp, block_means) in enumerate(zip(mlps, per_block)):
                means[block].append(block_means.double())
                targets[block].append(kind_targets(mlp, block_means, kind, index))
    empty = torch.zeros(0, dtype=torch.float64)
    return [torch.cat(block) if block else empty for block in means], [torch.cat(block) if block else empty for block in targets]


def _picks_alike(fitted: Tensor, targets: Tensor) -> float:
    return float((fitted.argmax(dim=-1) == targets.argmax(dim=-1)).double().mean())
