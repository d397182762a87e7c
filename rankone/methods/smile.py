"""SMILE (Tang et al., 2024, "SMILE: Zero-Shot Sparse Mixture of Low-Rank Experts Construction
From Pre-Trained Foundation Models"): every linear layer becomes a mixture of low-rank experts, routed per token.

For a linear layer with pretrained weight W0 and task vectors τ_t = U_t·S_t·V_tᵀ, expert t is
τ_t cut to its top k singular triplets, (U_t,k)·(S_t,k·V_t,kᵀ), plus the task's bias change.
Its router needs no training: a token x scores expert t by ‖V_t,gᵀ·x‖, the length of its
projection onto the top g right singular vectors of τ_t (the input directions task t's
fine-tuning changed most). The scores go through a softmax, the top_k experts are kept and
their weights renormalised to sum to 1, and the layer computes W0·x + b0 + Σ w_t·expert_t(x).

Which layers: every nn.Linear of FusionBench's CLIP image tower (transformers' layout), that
is attention's query, key, value and output maps and the MLP's two layers in every block.
open_clip packs query, key and value into one `in_proj_weight` used inside
nn.MultiheadAttention's functional code, so its attention is replaced by `SmileAttention`,
the same computation with its four maps as modules. A layer no task changed (every entry of
every τ within 1e-8 of 0, FusionBench's test) stays a plain linear layer. Every other tensor,
the output projection included, stays pretrained: FusionBench's default (average_experts false).

k and g are capped at the layer's rank min(out, in): FusionBench fails to build a non-square
layer's experts for k at least that rank, and its default k = 128 exceeds the rank of small
towers; `--expert-rank 0` keeps each τ_t whole (FusionBench's k ≤ 0). Routing on the task
vectors is FusionBench's default (routing_use_diff true); its other choice, routing on the
fine-tuned weights, needs θ0, which a static merge's function is not given.

merged/smile.safetensors holds θ0 as the tower (`visual.*`) and, per upscaled layer, named by
its module in the routed tower (`transformer.resblocks.N.attn.q_proj`, ..., `mlp.c_proj`):
`smile/<layer>/up` (T × out × k), `/down` (T × k × in; absent for whole task vectors),
`/bias` (T × out) and `/gate` (T × g × in). Parameters, everything the model holds: the
tower N plus, per upscaled layer of out × in, T·(k·(out + in) + out + g·in), or
T·(out·in + out + g·in) for whole task vectors. Needs no data and no task at inference;
there is no single tower to export.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rankone.errors import RankoneError
from rankone.methods.base import Method, MethodModel, register
from rankone.methods.matrices import unpacked
from rankone.methods.merging import Progress, check_vectors, merged_path, merged_tower
from rankone.methods.rankone.pool import exact_svd
from rankone.models import count_parameters, load_visual
from rankone.options import Options, option
from rankone.workspace import Workspace

NAME = "smile"
PREFIX = "smile/"
BLOCK_PREFIX = "visual.transformer.resblocks."
# FusionBench skips a layer whose weight differences are all zero by torch.allclose's default tolerance.
UNCHANGED = 1e-8
# open_clip's linear maps in a block: weight, bias, and the transformers Linear modules the weight holds (query, key and
# value are packed in one tensor), by their names in the routed tower.
BLOCK_LINEARS = {
    "attn.in_proj_weight": ("attn.in_proj_bias", ("attn.q_proj", "attn.k_proj", "attn.v_proj")),
    "attn.out_proj.weight": ("attn.out_proj.bias", ("attn.out_proj",)),
    "mlp.c_fc.weight": ("mlp.c_fc.bias", ("mlp.c_fc",)),
    "mlp.c_proj.weight": ("mlp.c_proj.bias", ("mlp.c_proj",)),
}
ATTENTION_MAPS = ("q_proj", "k_proj", "v_proj", "out_proj")


@dataclass(frozen=True)
class SmileOptions(Options):
    # FusionBench's k.
    expert_rank: int = option(128, "Rank k of each task's expert in every linear layer (FusionBench's k), capped at the "
                              "layer's rank; 0 keeps each task vector whole.", low=0)
    # FusionBench's gate_k.
    gate_rank: int = option(1, "Top right singular vectors g of each task vector a token is projected onto to score "
                            "that task's expert (FusionBench's gate_k), capped at the layer's rank.", low=1)
    # FusionBench's top_k.
    top_k: int = option(1, "Experts each token is sent to (FusionBench's top_k); at most the number of tasks.", low=1)


def unchanged(matrices: list[Tensor]) -> bool:
    """FusionBench's test for a layer no task trained: every entry of every difference within 1e-8 of zero."""
    return all(bool((matrix.abs() <= UNCHANGED).all()) for matrix in matrices)


def layer_experts(weights: list[Tensor], biases: list[Tensor] | None, expert_rank: int, gate_rank: int) -> dict[str, Tensor] | None:
    """One linear layer's experts and router from its T weight (and bias) task vectors; None when no task changed it.

    up·down is τ_t's top-k truncation U_k·(S_k·V_kᵀ); the gate holds the top g rows of V_tᵀ.
    """
    if unchanged(weights):
        return None
    limit = min(weights[0].shape)
    kept, routed = (min(expert_rank, limit) if expert_rank else 0), min(gate_rank, limit)
    ups, downs, gates = [], [], []
    for weight in weights:
        left, values, right = exact_svd(weight, max(kept, routed))
        gates.append(right[:, :routed].T)
        if kept:
            ups.append(left[:, :kept])
            downs.append(values[:kept, None] * right[:, :kept].T)
        else:
            ups.append(weight)
    found = {"up": torch.stack(ups), "gate": torch.stack(gates)}
    if kept:
        found["down"] = torch.stack(downs)
    if biases is not None:
        found["bias"] = torch.stack(biases)
    return found


def smile(task_vectors: list[dict[str, Tensor]], options: SmileOptions, progress: Progress = None) -> dict[str, Tensor]:
    """What merged/smile.safetensors holds: a zero update (the tower stays θ0) and every upscaled layer's experts and
    router as `smile/<layer>/<part>` (see the module's docstring)."""
    keys = check_vectors(task_vectors)
    if options.top_k > len(task_vectors):
        raise RankoneError(f"--top-k {options.top_k}: more than the {len(task_vectors)} experts (one per task)")
    found = {key: torch.zeros_like(task_vectors[0][key], dtype=torch.float32) for key in keys}
    for key in keys:
        found.update(block_experts(task_vectors, key, keys, options))
        if progress is not None:
            progress(key)
    return found


def block_experts(task_vectors: list[dict[str, Tensor]], key: str, keys: list[str], options: SmileOptions) -> dict[str, Tensor]:
    """`smile/<layer>/<part>` for the layers weight `key` holds (three for attention's packed input); {} for any other tensor."""
    block, _, suffix = key.removeprefix(BLOCK_PREFIX).partition(".")
    if not key.startswith(BLOCK_PREFIX) or suffix not in BLOCK_LINEARS:
        return {}
    bias_suffix, layers = BLOCK_LINEARS[suffix]
    bias_key = f"{BLOCK_PREFIX}{block}.{bias_suffix}"
    weights = [unpacked(key, vector[key].float()) for vector in task_vectors]
    biases = [unpacked(bias_key, vector[bias_key].float()) for vector in task_vectors] if bias_key in keys else None
    found = {}
    for index, layer in enumerate(layers):
        experts = layer_experts([pieces[index] for pieces in weights], [pieces[index] for pieces in biases] if biases else None,
                                options.expert_rank, options.gate_rank)
        found.update({f"{PREFIX}transformer.resblocks.{block}.{layer}/{part}": tensor for part, tensor in (experts or {}).items()})
    return found


class SmileLinear(nn.Module):
    """A pretrained linear layer plus T experts; each token goes to the top_k experts its projections score highest."""

    def __init__(self, shared: nn.Linear, experts: dict[str, Tensor], top_k: int) -> None:
        """`experts` as `layer_experts` gives them (shapes checked by `check_experts`)."""
        super().__init__()
        tasks, routed, width = experts["gate"].shape
        self.shared, self.top_k, self.tasks = shared, top_k, tasks
        frozen = dict(requires_grad=False)
        self.up = nn.Parameter(experts["up"].clone(), **frozen)
        self.down = nn.Parameter(experts["down"].clone(), **frozen) if "down" in experts else None
        self.expert_bias = nn.Parameter(experts["bias"].clone(), **frozen) if "bias" in experts else None
        # (T·g, in): one product scores every expert.
        self.gate = nn.Parameter(experts["gate"].reshape(tasks * routed, width).clone(), **frozen)

    @property
    def weight(self) -> Tensor:
        """The pretrained weight: open_clip reads a block's `mlp.c_fc.weight.dtype` for its cast dtype."""
        return self.shared.weight

    def routing(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """(weights, experts), both tokens × top_k: softmax over ‖V_t,gᵀ·x‖, top_k kept, renormalised to sum to 1."""
        if self.tasks == 1:
            scores = torch.ones(tokens.shape[0], 1, device=tokens.device, dtype=tokens.dtype)
        else:
            scores = F.linear(tokens, self.gate).view(tokens.shape[0], self.tasks, -1).norm(dim=2)
        weights, chosen = torch.topk(F.softmax(scores, dim=1), self.top_k, dim=1)
        return weights / weights.sum(dim=1, keepdim=True), chosen

    def expert(self, task: int, tokens: Tensor) -> Tensor:
        hidden = tokens if self.down is None else F.linear(tokens, self.down[task])
        return F.linear(hidden, self.up[task], None if self.expert_bias is None else self.expert_bias[task])

    def forward(self, x: Tensor) -> Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        weights, chosen = self.routing(tokens)
        mixed = torch.zeros(tokens.shape[0], self.shared.out_features, device=x.device, dtype=x.dtype)
        # Each expert runs only on the tokens routed to it.
        for task in range(self.tasks):
            rows, slot = torch.where(chosen == task)
            if rows.numel():
                mixed.index_add_(0, rows, self.expert(task, tokens[rows]) * weights[rows, slot, None])
        return self.shared(x) + mixed.reshape(*x.shape[:-1], -1)


class SmileAttention(nn.Module):
    """nn.MultiheadAttention's self-attention with query, key, value and output maps as modules, each plain or SMILE."""

    def __init__(self, attention: nn.MultiheadAttention, maps: dict[str, nn.Module]) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (maps[name] for name in ATTENTION_MAPS)
        self.num_heads, self.batch_first = attention.num_heads, attention.batch_first

    def forward(self, query: Tensor, key: Tensor, value: Tensor, need_weights: bool = False,
                attn_mask: Tensor | None = None) -> tuple[Tensor, None]:
        """open_clip's call: (output, no weights). `attn_mask` is additive and broadcast over batch and heads (open_clip
        passes none to its image tower)."""
        if not self.batch_first:
            query, key, value = (tensor.transpose(0, 1) for tensor in (query, key, value))
        batch, length, width = query.shape

        def heads(tensor: Tensor) -> Tensor:
            return tensor.reshape(batch, -1, self.num_heads, width // self.num_heads).transpose(1, 2)

        attended = F.scaled_dot_product_attention(heads(self.q_proj(query)), heads(self.k_proj(key)), heads(self.v_proj(value)),
                                                  attn_mask=attn_mask)
        output = self.out_proj(attended.transpose(1, 2).reshape(batch, length, width))
        return (output if self.batch_first else output.transpose(0, 1)), None


def linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    """An nn.Linear holding `weight` and `bias` (a slice of attention's packed input, here)."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def attention_maps(attention: nn.MultiheadAttention) -> dict[str, nn.Linear]:
    """Attention's query, key, value and output maps as nn.Linear modules (open_clip packs the first three)."""
    biases = attention.in_proj_bias.chunk(3) if attention.in_proj_bias is not None else (None,) * 3
    return dict(zip(ATTENTION_MAPS, [*map(linear, attention.in_proj_weight.chunk(3), biases), attention.out_proj]))


def layer_parts(stored: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """The stored experts and routers by layer: {`transformer.resblocks.N.mlp.c_fc`: {part: tensor}}."""
    layers: dict[str, dict[str, Tensor]] = {}
    for key, tensor in stored.items():
        if key.startswith(PREFIX):
            layer, _, part = key.removeprefix(PREFIX).rpartition("/")
            layers.setdefault(layer, {})[part] = tensor
    return layers


def expected_shapes(shared: nn.Linear, tasks: int, routed: int, rank: int | None) -> dict[str, tuple[int, ...]]:
    """The shape of every part a layer's T experts of rank k (None: whole task vectors) and routers of g vectors have."""
    out, width = shared.out_features, shared.in_features
    shapes = {"gate": (tasks, routed, width)}
    if rank is None:
        shapes["up"] = (tasks, out, width)
    else:
        shapes.update(up=(tasks, out, rank), down=(tasks, rank, width))
    if shared.bias is not None:
        shapes["bias"] = (tasks, out)
    return shapes


def check_experts(layer: str, experts: dict[str, Tensor], shared: nn.Linear, top_k: int, source: str) -> None:
    """A stored layer's parts fit the layer and each other, and there are at least top_k experts; else name the tensor."""
    again = f"run `rankone merge --method {NAME}` again"
    gate, down = experts.get("gate"), experts.get("down")
    if gate is None or gate.dim() != 3:
        raise RankoneError(f"{source}: {PREFIX}{layer}/gate is missing or not T × g × in; {again}")
    rank = None if down is None else (down.shape[1] if down.dim() == 3 else -1)
    shapes = expected_shapes(shared, gate.shape[0], gate.shape[1], rank)
    for part in sorted(set(shapes) | set(experts)):
        if part not in shapes or part not in experts or tuple(experts[part].shape) != shapes[part]:
            found = tuple(experts[part].shape) if part in experts else "missing"
            raise RankoneError(f"{source}: {PREFIX}{layer}/{part} is {found}, the layer needs {shapes.get(part, 'none')}; {again}")
    if top_k > gate.shape[0]:
        raise RankoneError(f"{source}: top_k {top_k} is more than the {gate.shape[0]} experts of {layer}; {again}")


def smile_tower(architecture: dict, stored: dict[str, Tensor], top_k: int, source: str) -> nn.Module:
    """open_clip's image tower (θ0 from `stored`) with every layer that has experts in `stored` routed by SMILE;
    `source` names the file in errors."""
    tower = load_visual(architecture, stored)
    layers = layer_parts(stored)

    def routed(layer: str, shared: nn.Linear) -> nn.Module:
        experts = layers.pop(layer, None)
        if experts is None:
            return shared
        check_experts(layer, experts, shared, top_k, source)
        return SmileLinear(shared, experts, top_k)

    for index, block in enumerate(tower.transformer.resblocks):
        prefix = f"transformer.resblocks.{index}."
        if any(f"{prefix}attn.{name}" in layers for name in ATTENTION_MAPS):
            maps = attention_maps(block.attn)
            block.attn = SmileAttention(block.attn, {name: routed(f"{prefix}attn.{name}", layer) for name, layer in maps.items()})
        block.mlp.c_fc = routed(prefix + "mlp.c_fc", block.mlp.c_fc)
        block.mlp.c_proj = routed(prefix + "mlp.c_proj", block.mlp.c_proj)
    if layers:
        raise RankoneError(f"{source}: tensors for {next(iter(layers))}, which is not a linear layer of the tower")
    return tower.eval()


def load_smile(workspace: Workspace, method: str, device: torch.device) -> MethodModel:
    """The eval loader: one routed tower for every task (routing needs no task)."""
    stored = merged_tower(workspace, NAME)
    source = str(workspace.path(merged_path(NAME)))
    top_k = METHOD.settings(workspace).get("top_k")
    if not isinstance(top_k, int) or top_k < 1:
        raise RankoneError(f"{source}: metadata lacks top_k; run `rankone merge --method {NAME}` again")
    encoder = smile_tower(workspace.architecture, stored, top_k, source).to(device)
    return MethodModel(encoder_for_task=lambda task: encoder, parameters=count_parameters(encoder), name=method)


METHOD = register(Method(
    name=NAME, kind="static", summary="a low-rank expert per task in every linear layer, routed per token by its singular vectors",
    row=86, load=load_smile, options=SmileOptions, inputs=("base", "task-vectors"), eval_inputs=(),
    output=merged_path(NAME), merge=smile,
))
