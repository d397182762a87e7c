"""RegMean (Jin et al., 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models").

Each linear map W of the merged tower solves the regression that keeps every expert's
outputs on that expert's own inputs: with X_t the inputs task t's images send through
expert t's copy of the map and G_t = X_tᵀX_t / rows (its Gram matrix),
W = (Σ G'_t)⁻¹ Σ G'_t W_tᵀ, where G' keeps G's diagonal and scales the rest by α
(`--off-diagonal`, FusionBench's reduce_non_diagonal_ratio: α = 1 is plain least squares,
smaller α pulls the merge toward the simple average). Every other tensor (biases, norms,
embeddings) is the experts' mean. No class names are needed: only inputs are read.

The linear maps of open_clip's tower: attention's packed query-key-value input (the three
maps share one input, so one Gram matrix serves them all), attention's output, the MLP's
two layers and the output projection. open_clip calls attention's output map inside
nn.MultiheadAttention's functional code, where no hook sees its input, so that input is
recomputed from the block's attention input (the heads' softmax(QKᵀ/√d)·V).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rankone.methods.statistics import Batches, examples_option, expert_towers, statistics_merge, tower_module
from rankone.options import Options, option
from rankone.workspace import Workspace

PROJECTION = "visual.proj"  # open_clip stores it as (in, out) and applies x @ proj


@dataclass(frozen=True)
class RegMeanOptions(Options):
    examples: int = examples_option()
    off_diagonal: float = option(0.95, "Scale α of the Gram matrices' off-diagonal entries (FusionBench's "
                                 "reduce_non_diagonal_ratio); 1 is plain least squares.", low=0.0, high=1.0)


def attention_values(attention: nn.MultiheadAttention, query: Tensor) -> Tensor:
    """What attention's output map receives: the heads' softmax(QKᵀ/√d)·V, heads side by side, batch first."""
    if not attention.batch_first:
        query = query.transpose(0, 1)
    batch, length, width = query.shape
    heads = attention.num_heads

    def split(tensor: Tensor) -> Tensor:
        return tensor.reshape(batch, length, heads, width // heads).transpose(1, 2)

    q, k, v = F.linear(query, attention.in_proj_weight, attention.in_proj_bias).chunk(3, dim=-1)
    return F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(batch, length, width)


def gram_matrices(visual: nn.Module, batches: Iterable[Tensor]) -> dict[str, Tensor]:
    """XᵀX / rows of the inputs X of every linear map of an open_clip image tower, over `batches`, keyed by the
    weight each map multiplies (`visual.transformer.resblocks.N.attn.in_proj_weight`, ..., `visual.proj`)."""
    sums: dict[str, Tensor] = {}
    rows: dict[str, int] = {}

    def add(key: str, inputs: Tensor) -> None:
        flat = inputs.detach().reshape(-1, inputs.shape[-1]).float()
        sums[key] = sums[key] + flat.T @ flat if key in sums else flat.T @ flat
        rows[key] = rows.get(key, 0) + flat.shape[0]

    def attention_hook(prefix: str):
        def hook(module: nn.MultiheadAttention, arguments: tuple) -> None:
            add(prefix + "attn.in_proj_weight", arguments[0])
            add(prefix + "attn.out_proj.weight", attention_values(module, arguments[0]))
        return hook

    def input_hook(key: str):
        return lambda module, arguments, output: add(key, arguments[0])

    handles = []
    for index, block in enumerate(visual.transformer.resblocks):
        prefix = f"visual.transformer.resblocks.{index}."
        handles.append(block.attn.register_forward_pre_hook(attention_hook(prefix)))
        handles.append(block.mlp.c_fc.register_forward_hook(input_hook(prefix + "mlp.c_fc.weight")))
        handles.append(block.mlp.c_proj.register_forward_hook(input_hook(prefix + "mlp.c_proj.weight")))
    if getattr(visual, "proj", None) is not None:
        # The projection is a bare matrix: its input is the pooled, normalised tokens the transformer's output gives.
        handles.append(visual.transformer.register_forward_hook(lambda module, arguments, output: add(PROJECTION, visual._pool(output)[0])))
    try:
        with torch.no_grad():
            for batch in batches:
                visual(batch)
    finally:
        for handle in handles:
            handle.remove()
    return {key: total / rows[key] for key, total in sums.items()}


def reduce_off_diagonal(gram: Tensor, scale: float) -> Tensor:
    return scale * gram + (1.0 - scale) * torch.diag_embed(gram.diagonal())


def as_map(key: str, weight: Tensor) -> Tensor:
    """The (in, out) matrix a linear map applies: Wᵀ for a Linear weight, the projection as it is stored."""
    return weight if key == PROJECTION else weight.T


def solve(gram: Tensor, product: Tensor) -> Tensor:
    """gram⁻¹·product in float64: a Gram matrix is nearly singular when its map sees fewer distinct inputs than it
    has dimensions (the projection sees one pooled token per image) or a LayerNorm's output (LayerNorm centres it,
    leaving one direction almost without variance), and float32 would lose digits to that condition number."""
    return torch.linalg.solve(gram, product).float()


def regmean_merge(experts: Iterable[tuple[dict[str, Tensor], dict[str, Tensor]]], off_diagonal: float) -> dict[str, Tensor]:
    """(tower, its Gram matrices) per expert → the merged tower: (Σ G'_t)⁻¹ Σ G'_t W_tᵀ for the maps with a Gram
    matrix, the mean for every other tensor. The experts are consumed one at a time."""
    grams_summed: dict[str, Tensor] = {}
    products: dict[str, Tensor] = {}
    means: dict[str, Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    count = 0
    for tower, grams in experts:
        count += 1
        for key, tensor in tower.items():
            dtypes[key] = tensor.dtype
            if key in grams:
                # Summed in float64: the systems can be ill-conditioned (see `solve`).
                gram = reduce_off_diagonal(grams[key].double(), off_diagonal)
                product = gram @ as_map(key, tensor.to(gram.device).double())
                grams_summed[key] = grams_summed[key] + gram if key in grams_summed else gram
                products[key] = products[key] + product if key in products else product
            else:
                means[key] = means[key] + tensor.float() if key in means else tensor.float()
    merged = {}
    for key, dtype in dtypes.items():
        value = as_map(key, solve(grams_summed[key], products[key])) if key in grams_summed else means[key] / count
        merged[key] = value.to(dtype)
    return merged


def expert_grams(workspace: Workspace, batches: Batches, device: torch.device) -> Iterator[tuple[dict[str, Tensor], dict[str, Tensor]]]:
    for task, tower in expert_towers(workspace):
        yield tower, gram_matrices(tower_module(workspace, tower, device), batches(task))


def regmean(workspace: Workspace, options: RegMeanOptions, batches: Batches, heads, device: torch.device) -> dict[str, Tensor]:
    return regmean_merge(expert_grams(workspace, batches, device), options.off_diagonal)


METHOD = statistics_merge("regmean", "each linear map solved to keep every expert's outputs on its own unlabeled images",
                          row=82, options=RegMeanOptions, merge=regmean)
