"""Fisher merging (Matena & Raffel, 2022, "Merging Models with Fisher-Weighted Averaging").

Each entry of the merged tower is the experts' average weighted by how much each expert's
predictions depend on it: θ = Σ F_t ⊙ θ_t / Σ F_t, with F_t the diagonal of expert t's
Fisher information on its own unlabeled images, under its own predictions (its zero-shot
head's softmax; no labels):

    F_t = mean over images x of Σ_y p(y|x)·(∂ log p(y|x)/∂θ)²

This is the paper's per-image Fisher with the expectation over classes taken exactly.
FusionBench estimates it differently, squaring the gradient of a whole batch's summed
√p·log p, which mixes images and classes; rankone follows the paper (docs/methods.md).

Computing it takes no backward pass per class. With logits z = u·Hᵀ (u the normalised
embedding, H the head with its logit scale), ∂ log p_y/∂θ = (H_y − h̄)ᵀ ∂u/∂θ with
h̄ = Σ p_y H_y, so the sum over classes is Σ_k λ_k (∂(u·q_k)/∂θ)² for the eigenpairs
(λ_k, q_k) of the predictive covariance C = Σ_y p_y (H_y − h̄)(H_y − h̄)ᵀ: one backward
pass per eigenvalue that is not zero, at most min(classes − 1, embedding width) per image.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rankone.methods.statistics import Batches, examples_option, expert_towers, statistics_merge, tower_module
from rankone.models import VISUAL_PREFIX
from rankone.options import Options, option
from rankone.workspace import Workspace

# Eigenvalues of the predictive covariance below this fraction of the largest carry nothing but rounding.
NEGLIGIBLE = 1e-10


@dataclass(frozen=True)
class FisherOptions(Options):
    examples: int = examples_option()
    minimum: float = option(1e-6, "Added to every Fisher value, so an entry no expert's predictions depend on gets "
                            "the plain average (FusionBench's minimal_fisher_weight).", low=0.0)


def predictive_covariance(probabilities: Tensor, head: Tensor) -> Tensor:
    """C = Σ_y p_y (H_y − h̄)(H_y − h̄)ᵀ, h̄ = Σ_y p_y H_y, in float64."""
    probabilities, head = probabilities.double(), head.double()
    mean = probabilities @ head
    return head.T @ (probabilities[:, None] * head) - torch.outer(mean, mean)


def diagonal_fisher(visual: nn.Module, head: Tensor, batches: Iterable[Tensor]) -> dict[str, Tensor]:
    """The mean over images of Σ_y p(y|x)·(∂ log p(y|x)/∂θ)² for every parameter of an open_clip image tower,
    keyed `visual.<name>`; `head` (classes × embedding width) carries the logit scale."""
    parameters = {VISUAL_PREFIX + name: parameter for name, parameter in visual.named_parameters()}
    fisher = {name: torch.zeros_like(parameter) for name, parameter in parameters.items()}
    head = head.to(next(iter(parameters.values())).device).float()
    images = 0
    for batch in batches:
        for image in batch:
            unit = F.normalize(visual(image[None]).float(), dim=-1)[0]
            probabilities = torch.softmax(unit @ head.T, dim=-1).detach()
            eigenvalues, directions = torch.linalg.eigh(predictive_covariance(probabilities, head))
            for value, direction in zip(eigenvalues.tolist(), directions.T):
                if value <= NEGLIGIBLE * float(eigenvalues[-1]):
                    continue
                gradients = torch.autograd.grad(unit @ direction.to(unit.dtype), list(parameters.values()),
                                                retain_graph=True, allow_unused=True)
                for name, gradient in zip(parameters, gradients):
                    if gradient is not None:
                        fisher[name] += value * gradient.detach() ** 2
            images += 1
    return {name: total / max(images, 1) for name, total in fisher.items()}


def fisher_merge(experts: Iterable[tuple[dict[str, Tensor], dict[str, Tensor]]], minimum: float) -> dict[str, Tensor]:
    """(tower, its Fisher) per expert → Σ (F_t + minimum)·θ_t / Σ (F_t + minimum) per entry; a tensor without a
    Fisher (none in open_clip's towers) is the experts' mean. The experts are consumed one at a time."""
    numerators: dict[str, Tensor] = {}
    denominators: dict[str, Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for tower, fisher in experts:
        for key, tensor in tower.items():
            dtypes[key] = tensor.dtype
            weight = fisher[key].float() + minimum if key in fisher else torch.ones_like(tensor, dtype=torch.float32)
            weighted = weight * tensor.to(weight.device).float()
            numerators[key] = numerators[key] + weighted if key in numerators else weighted
            denominators[key] = denominators[key] + weight if key in denominators else weight
    return {key: (numerators[key] / denominators[key]).to(dtype) for key, dtype in dtypes.items()}


def expert_fishers(workspace: Workspace, batches: Batches, heads: dict[str, Tensor],
                   device: torch.device) -> Iterator[tuple[dict[str, Tensor], dict[str, Tensor]]]:
    for task, tower in expert_towers(workspace):
        yield tower, diagonal_fisher(tower_module(workspace, tower, device), heads[task], batches(task))


def fisher(workspace: Workspace, options: FisherOptions, batches: Batches, heads: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return fisher_merge(expert_fishers(workspace, batches, heads, device), options.minimum)


METHOD = statistics_merge("fisher", "the experts averaged entry by entry, weighted by each one's Fisher on its unlabeled images",
                          row=84, options=FisherOptions, merge=fisher, needs_heads=True)
