"""The RankOne-MoE MLP: pretrained MLP + routed rank-one experts, and its injection into open_clip.

docs/method.md §6, §7: one router per block, shared by c_fc and
c_proj: α = mean over tokens of Linear(d → T·k)(x), weight N(0, 0.01²), bias λ, no
softmax. Top-p keeps m = round(p·T·k) experts softly: α' = α ⊙ sigmoid(100·(α − thr)),
thr the m-th largest α of the sample. Experts run on the low-rank path
((x·V̂) ⊙ α')·Uᵀ, so no per-sample weight matrix is ever built.

Note on initialisation (tested in tests/test_moe.py): with every α equal to λ, thr = λ and
sigmoid(0) = ½, so the gated model starts at θ0 + (λ/2)·Σ rank-k(τ), not at task
arithmetic; with the router's N(0, 0.01²) weights the α differ per token and the gate
zeroes about a quarter of the experts at random. Only with the gate off (`select=None`)
and a zero router weight is the routed model exactly θ0 + λ·Σ rank-k(τ) on the MLPs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rankone.errors import RankoneError
from rankone.methods.rankone.pool import pool_keys
from rankone.models import load_visual
from rankone.options import Options, option

ROUTING_MODES = ("per-sample", "per-batch")
GATE_SHARPNESS = 100.0
ROUTER_INIT_STD = 0.01
# How a block's router scores: a trained Linear(d → T·k) (SPEC's), or, training-free, by how much of the
# sample's token-mean input lies in the span of each task's c_fc experts (their right singular vectors).
SCORERS = ("linear", "subspace")
# How scores become gates: SPEC's soft top-p over the T·k experts, or one weight per task spread over its
# k experts: the best task's alone (hard), or softmax(scores / temperature) (soft); times the gate scale.
GATES = ("top-p", "hard", "soft")


def parse_select(value: str) -> float | None:
    """`--select 0.75` or `--select off` (no top-p gate)."""
    if value.strip().lower() in ("off", "none"):
        return None
    try:
        return float(value)
    except ValueError:
        raise RankoneError(f"--select {value!r}: expected a number in (0, 1] or `off`") from None


@dataclass(frozen=True)
class RoutingOptions(Options):
    """How the routed MLPs gate their experts; they hold no weights, so a built model can change them."""

    select: float | None = option(0.75, "Top-p ratio p of experts kept per sample, or `off`.", low=0.0, high=1.0,
                                  low_open=True, parse=parse_select, note=" (or off)", metavar="P|off")
    routing: str = option("per-sample", "per-sample, or per-batch (α averaged over the batch).", choices=ROUTING_MODES)


def selected_count(select: float, experts: int) -> int:
    """m = round(p·T·k), halves rounded up, at least one expert."""
    return max(1, min(experts, int(math.floor(select * experts + 0.5))))


def top_p_gate(alpha: torch.Tensor, select: float | None) -> torch.Tensor:
    """α' = α ⊙ sigmoid(100·(α − thr)) per row; `select=None` turns the gate off (α' = α)."""
    if select is None:
        return alpha
    count = selected_count(select, alpha.shape[-1])
    threshold = torch.topk(alpha, count, dim=-1).values[..., -1:]
    return alpha * torch.sigmoid(GATE_SHARPNESS * (alpha - threshold))


def subspace_scores(mean: torch.Tensor, pool_v: torch.Tensor, tasks: int) -> torch.Tensor:
    """‖V_tᵀ x̄‖ / ‖x̄‖ per task (batch × T): the share of each sample's token-mean input in the span of task t's
    right singular vectors V_t (the unit columns of its block of V̂ = S·V, task-major)."""
    unit = pool_v / pool_v.norm(dim=0, keepdim=True).clamp_min(torch.finfo(pool_v.dtype).tiny)
    projected = (mean @ unit).reshape(mean.shape[0], tasks, -1)
    return torch.linalg.vector_norm(projected, dim=-1) / mean.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(mean.dtype).tiny)


def task_gate(scores: torch.Tensor, gate: str, experts_per_task: int, temperature: float, scale: float) -> torch.Tensor:
    """One weight per task (hard: the best task's, soft: softmax(scores / temperature)), times `scale`, repeated
    over the task's k experts: batch × T·k."""
    if gate == "hard":
        weights = torch.nn.functional.one_hot(scores.argmax(dim=-1), scores.shape[-1]).to(scores.dtype)
    else:
        weights = torch.softmax(scores / temperature, dim=-1)
    return (scale * weights).repeat_interleave(experts_per_task, dim=-1)


def check_select(select: float | None) -> None:
    RoutingOptions(select=select)


def check_routing(routing: str) -> None:
    RoutingOptions(routing=routing)


class RankOneMLP(nn.Module):
    """Drop-in for an open_clip block's `mlp`: same input and output, experts routed per sample.

    `c_fc`/`c_proj` hold the pretrained weights and the static biases; `pool_*` hold U_cat
    and V̂_cat (frozen); `router` is the only trainable part.
    """

    def __init__(
        self,
        c_fc: nn.Linear,
        act: nn.Module,
        c_proj: nn.Linear,
        fc_u: torch.Tensor,
        fc_v: torch.Tensor,
        proj_u: torch.Tensor,
        proj_v: torch.Tensor,
        *,
        lam: float,
        select: float | None,
        routing: str,
        batch_first: bool,
        generator: torch.Generator | None = None,
        tasks: int = 1,
        scorer: str = "linear",
        gate: str = "top-p",
        temperature: float = 1.0,
        scale: float = 1.0,
    ) -> None:
        super().__init__()
        check_select(select)
        check_routing(routing)
        experts = fc_u.shape[1]
        if not fc_v.shape[1] == proj_u.shape[1] == proj_v.shape[1] == experts:
            raise RankoneError("pool: c_fc and c_proj hold different numbers of experts")
        if scorer not in SCORERS or gate not in GATES or (scorer == "subspace" and gate == "top-p"):
            raise RankoneError(f"router: scorer {scorer!r} with gate {gate!r}: a subspace router gates per task (hard or soft)")
        self.c_fc, self.gelu, self.c_proj = c_fc, act, c_proj
        frozen = dict(requires_grad=False)
        self.fc_u = nn.Parameter(fc_u.detach().clone(), **frozen)
        self.fc_v = nn.Parameter(fc_v.detach().clone(), **frozen)
        self.proj_u = nn.Parameter(proj_u.detach().clone(), **frozen)
        self.proj_v = nn.Parameter(proj_v.detach().clone(), **frozen)
        # A subspace router reads the pool itself: it has no tensors of its own.
        self.router = nn.Linear(c_fc.in_features, experts, device=fc_u.device, dtype=c_fc.weight.dtype) if scorer == "linear" else None
        if self.router is not None:
            with torch.no_grad():
                self.router.weight.normal_(0.0, ROUTER_INIT_STD, generator=generator)
                self.router.bias.fill_(lam)
        self.tasks, self.scorer, self.gate, self.temperature, self.scale = tasks, scorer, gate, temperature, scale
        # Set by the pool oracle (told the task): every sample's gate is that task's experts at `scale`.
        self.fixed_task: int | None = None
        self.select = select
        self.routing = routing
        self.batch_first = batch_first
        # Set by `recording_gates`: the α' of every forward pass is appended here.
        self.gate_log: list[torch.Tensor] | None = None

    @property
    def token_dim(self) -> int:
        return 1 if self.batch_first else 0

    def task_scores(self, mean: torch.Tensor) -> torch.Tensor:
        """Each task's score for each sample (batch × T) from the token-mean input: the subspace share, or the
        mean of the router's outputs for the task's k experts."""
        if self.fixed_task is not None:
            return torch.nn.functional.one_hot(torch.full(mean.shape[:1], self.fixed_task, device=mean.device), self.tasks).to(mean.dtype)
        if self.scorer == "subspace":
            return subspace_scores(mean, self.fc_v, self.tasks)
        return self.router(mean).reshape(mean.shape[0], self.tasks, -1).mean(dim=-1)

    def expert_weights(self, x: torch.Tensor) -> torch.Tensor:
        """α' per sample (batch × T·k), after routing mode and the gate."""
        mean = x.mean(dim=self.token_dim)
        if self.gate == "top-p" and self.fixed_task is None:
            # The router is affine, so mean-then-route equals route-then-mean and costs one row per sample, not per token.
            alpha = self.router(mean)
            if self.routing == "per-batch":
                alpha = alpha.mean(dim=0, keepdim=True).expand_as(alpha)
            gate = top_p_gate(alpha, self.select)
        else:
            scores = self.task_scores(mean)
            if self.routing == "per-batch":
                scores = scores.mean(dim=0, keepdim=True).expand_as(scores)
            gate = task_gate(scores, "hard" if self.fixed_task is not None else self.gate, self.fc_u.shape[1] // self.tasks,
                             self.temperature, self.scale)
        if self.gate_log is not None:
            self.gate_log.append(gate.detach().float().cpu())
        return gate

    @property
    def hard(self) -> bool:
        """Whether each sample's gate is one task's k experts (so only those need computing)."""
        return self.gate == "hard" or self.fixed_task is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The fused path (`fused_expert_linear`), or merged weights for large per-batch batches; else the plain path.
        A hard gate computes only each sample's own task's experts (`grouped_hard_forward`)."""
        if self.hard and not torch.is_grad_enabled():
            return grouped_hard_forward(self, x)
        return self.dense_forward(x)

    def dense_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert computed, whatever the gate: the fused path, merged weights or the plain path."""
        fused = self._fused_weights()
        if fused is None:
            return self.plain_forward(x)
        gate = self.expert_weights(x).unsqueeze(self.token_dim)
        if self.routing == "per-batch" and not (torch.is_grad_enabled() and gate.requires_grad) and merging_pays(x, self.c_fc):
            return batch_merged_forward(self, x, gate.reshape(-1, gate.shape[-1])[0])
        hidden = self.gelu(fused_expert_linear(x, fused[0], fused[1], self.fc_u, gate))
        return fused_expert_linear(hidden, fused[2], fused[3], self.proj_u, gate)

    def plain_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The method's formula written out, the reference the fused path is tested against."""
        gate = self.expert_weights(x).unsqueeze(self.token_dim)
        hidden = self.gelu(self.c_fc(x) + ((x @ self.fc_v) * gate) @ self.fc_u.T)
        return self.c_proj(hidden) + ((hidden @ self.proj_v) * gate) @ self.proj_u.T

    def _fused_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """[W_fc0; V̂_fcᵀ], [b_fc; 0], [W_proj0; V̂_projᵀ], [b_proj; 0], built once and reused.

        W0 and b stay in their Linear under their own names but are re-pointed into the
        first rows of the fused buffers, so the fusion costs only one extra copy of V̂.
        The buffers are rebuilt when a Linear was moved or replaced (`.to`, deepcopy) or V̂
        changed in place; the plain path runs when W0 or V̂ would need gradients.
        """
        linears, pools = (self.c_fc, self.c_proj), (self.fc_v, self.proj_v)
        if any(tensor.requires_grad for linear in linears for tensor in (linear.weight, linear.bias)) or any(v.requires_grad for v in pools):
            return None
        try:
            key = tuple((v.data_ptr(), v._version, v.device, v.dtype) for v in pools)
        except RuntimeError:  # inference tensors carry no version counter: nothing to validate a cache with
            return None
        cached = getattr(self, "_fused_cache", None)
        if cached is not None and cached[0] == key and all(
            linear.weight.data_ptr() == weight.data_ptr() and linear.bias.data_ptr() == bias.data_ptr()
            for linear, weight, bias in zip(linears, cached[1][0::2], cached[1][1::2])
        ):
            return cached[1]
        fused: list[torch.Tensor] = []
        with torch.inference_mode(False), torch.no_grad():
            for linear, pool_v in zip(linears, pools):
                weight, bias = fuse_base_and_pool(linear.weight, linear.bias, pool_v)
                linear.weight.data = weight[: linear.out_features]
                linear.bias.data = bias[: linear.out_features]
                fused += [weight, bias]
        self._fused_cache = (key, tuple(fused))
        return self._fused_cache[1]


def fuse_base_and_pool(weight: torch.Tensor, bias: torch.Tensor, pool_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[W0; V̂ᵀ] ((out + T·k) × in) and [b; 0]: one GEMM reads x once for the base and the expert projections."""
    fused_weight = torch.cat([weight.detach(), pool_v.detach().T.to(weight.dtype)]).contiguous()
    fused_bias = torch.cat([bias.detach(), bias.new_zeros(pool_v.shape[1])])
    return fused_weight, fused_bias


class _FusedExpertLinear(torch.autograd.Function):
    """Forward: one GEMM for [W0; V̂ᵀ], the expert product accumulated in place into the base rows.

    Backward by hand, because autograd's slice backward would zero-fill and copy a full
    (tokens × (out + T·k)) gradient twice per call. Only x and the gate get gradients: W0,
    V̂ and U are frozen (`RankOneMLP._fused_weights` falls back to the plain path otherwise).
    """

    @staticmethod
    def forward(ctx, x, fused_weight, fused_bias, pool_u, gate):
        out_features, experts = pool_u.shape
        flat = torch.nn.functional.linear(x, fused_weight, fused_bias)
        projected = flat[..., out_features:]
        rows = flat.view(-1, flat.shape[-1])[:, :out_features]
        rows.addmm_((projected * gate).reshape(-1, experts), pool_u.T)
        ctx.save_for_backward(projected, gate, fused_weight, pool_u)
        return rows.view(*x.shape[:-1], out_features)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        projected, gate, fused_weight, pool_u = ctx.saved_tensors
        out_features, experts = pool_u.shape
        grad_rows = grad_output.reshape(-1, out_features)
        grad_gated = (grad_rows @ pool_u).view(projected.shape)
        grad_x = grad_gate = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(grad_rows, fused_weight[:out_features])
            grad_x.addmm_((grad_gated * gate).reshape(-1, experts), fused_weight[out_features:])
            grad_x = grad_x.view(*projected.shape[:-1], -1)
        if ctx.needs_input_grad[4]:
            grad_gate = (grad_gated * projected).sum_to_size(gate.shape)
        return grad_x, None, None, None, grad_gate


def fused_expert_linear(
    x: torch.Tensor, fused_weight: torch.Tensor, fused_bias: torch.Tensor, pool_u: torch.Tensor, gate: torch.Tensor
) -> torch.Tensor:
    """x·W0ᵀ + b + ((x·V̂) ⊙ gate)·Uᵀ from `fuse_base_and_pool`'s [W0; V̂ᵀ] and [b; 0].

    `gate` broadcasts against x's shape with width T·k (a size-1 token dimension). W0, V̂
    and U receive no gradients.
    """
    return _FusedExpertLinear.apply(x, fused_weight, fused_bias, pool_u, gate)


def grouped_hard_forward(mlp: "RankOneMLP", x: torch.Tensor) -> torch.Tensor:
    """A hard-gated MLP computing only what the gate keeps: the base GEMM for every token, then each routed task's
    k experts for its own samples (k·(in + out) per token instead of T·k·(in + out)). Equal to `plain_forward` with
    the same gate (tests/test_router_kinds.py).

    The samples are sorted by task once, so each task's tokens are one contiguous block of rows and its experts are
    added in place by one matmul-accumulate, with no per-task copy of the wide output; the order is undone at the end.
    """
    gate = mlp.expert_weights(x)
    k = mlp.fc_u.shape[1] // mlp.tasks
    chosen = gate.reshape(gate.shape[0], mlp.tasks, k)[..., 0]  # one nonzero weight per sample
    task_of_sample = chosen.argmax(dim=-1)
    weight_of_sample = chosen.gather(1, task_of_sample[:, None])[:, 0]
    samples = x if mlp.batch_first else x.transpose(0, 1)
    order = torch.argsort(task_of_sample, stable=True)
    counts = torch.bincount(task_of_sample, minlength=mlp.tasks).tolist()
    sorted_samples = samples.index_select(0, order)
    weights = weight_of_sample.index_select(0, order).to(x.dtype)
    tokens = samples.shape[1]

    def add_experts(output: torch.Tensor, inputs: torch.Tensor, pool_u: torch.Tensor, pool_v: torch.Tensor) -> torch.Tensor:
        rows_out, rows_in = output.view(-1, output.shape[-1]), inputs.reshape(-1, inputs.shape[-1])
        first = 0
        for task, count in enumerate(counts):
            if count:
                rows, columns = slice(first * tokens, (first + count) * tokens), slice(task * k, (task + 1) * k)
                low_rank = (rows_in[rows] @ pool_v[:, columns]).view(count, tokens, k).mul_(weights[first:first + count, None, None])
                rows_out[rows].addmm_(low_rank.view(-1, k), pool_u[:, columns].T)
                first += count
        return output

    hidden = mlp.gelu(add_experts(mlp.c_fc(sorted_samples), sorted_samples, mlp.fc_u, mlp.fc_v))
    output = add_experts(mlp.c_proj(hidden), hidden, mlp.proj_u, mlp.proj_v)
    output = output.index_select(0, torch.argsort(order))
    return output if mlp.batch_first else output.transpose(0, 1)


def merging_pays(x: torch.Tensor, linear: nn.Linear) -> bool:
    """One gate for the whole batch: building W = W0 + U·diag(α')·V̂ᵀ costs T·k·in·out per matrix,
    the low-rank path T·k·(in + out) per token, so merging is cheaper past in·out/(in + out) tokens."""
    tokens = x.numel() // x.shape[-1]
    return tokens * (linear.in_features + linear.out_features) > linear.in_features * linear.out_features


def batch_merged_forward(mlp: "RankOneMLP", x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Per-batch routing without autograd: merge the gated experts into W0 once, then a static MLP."""
    weight_fc = torch.addmm(mlp.c_fc.weight, mlp.fc_u * gate, mlp.fc_v.T)
    weight_proj = torch.addmm(mlp.c_proj.weight, mlp.proj_u * gate, mlp.proj_v.T)
    hidden = mlp.gelu(torch.nn.functional.linear(x, weight_fc, mlp.c_fc.bias))
    return torch.nn.functional.linear(hidden, weight_proj, mlp.c_proj.bias)


def routed_model(
    architecture: dict[str, Any],
    base_state: dict[str, torch.Tensor],
    pool: dict[str, torch.Tensor],
    lam: float,
    select: float | None = RoutingOptions.select,
    routing: str = RoutingOptions.routing,
    tasks: list[str] | None = None,
    *,
    seed: int = 0,
    scorer: str = "linear",
    gate: str = "top-p",
    temperature: float = 1.0,
    scale: float = 1.0,
) -> nn.Module:
    """open_clip's image tower (images → embeddings) with every block's MLP replaced by RankOneMLP.

    `base_state` is the static part (`pool.static_part`: θ0 + λΣτ everywhere except the MLP
    weight matrices, which are θ0); `pool` holds `pool_u`/`pool_v` per MLP weight. Router
    weights are drawn from their own generator seeded with `seed`, block by block.
    """
    check_select(select)
    check_routing(routing)
    tower = load_visual(architecture, base_state)
    transformer = tower.transformer
    batch_first = getattr(transformer, "batch_first", True)
    experts = None
    generator = None if base_state[next(iter(base_state))].is_meta else torch.Generator().manual_seed(seed)
    for index, block in enumerate(transformer.resblocks):
        prefix = f"visual.transformer.resblocks.{index}.mlp"
        names = [*pool_keys(f"{prefix}.c_fc.weight"), *pool_keys(f"{prefix}.c_proj.weight")]
        missing = [name for name in names if name not in pool]
        if missing:
            raise RankoneError(f"pool lacks tensor {missing[0]}; rerun `rankone build-pool`")
        fc_u, fc_v, proj_u, proj_v = (pool[name] for name in names)
        mlp = block.mlp
        rows = (mlp.c_fc.out_features, mlp.c_fc.in_features, mlp.c_proj.out_features, mlp.c_proj.in_features)
        for name, tensor, row_count in zip(names, (fc_u, fc_v, proj_u, proj_v), rows):
            if tensor.dim() != 2 or tensor.shape[0] != row_count or tensor.shape[1] != fc_u.shape[1]:
                raise RankoneError(f"pool tensor {name}: shape {tuple(tensor.shape)} does not fit the architecture")
        if experts is not None and fc_u.shape[1] != experts:
            raise RankoneError(f"pool tensor {names[0]}: {fc_u.shape[1]} experts, earlier blocks have {experts}")
        experts = fc_u.shape[1]
        if tasks is not None and experts % len(tasks):
            raise RankoneError(f"pool: {experts} experts per block is not a multiple of {len(tasks)} tasks")
        dtype = mlp.c_fc.weight.dtype
        block.mlp = RankOneMLP(
            mlp.c_fc, mlp.gelu, mlp.c_proj,
            fc_u.to(dtype), fc_v.to(dtype), proj_u.to(dtype), proj_v.to(dtype),
            lam=lam, select=select, routing=routing, batch_first=batch_first, generator=generator,
            tasks=len(tasks) if tasks else 1, scorer=scorer, gate=gate, temperature=temperature, scale=scale,
        )
    for parameter in tower.parameters():
        parameter.requires_grad_(False)
    for parameter in router_parameters(tower):
        parameter.requires_grad_(True)
    tower.rankone_config = {
        "lambda": lam, "select": select, "routing": routing, "tasks": list(tasks) if tasks else None,
        "experts_per_block": experts, "k": experts // len(tasks) if tasks else None,
        "scorer": scorer, "gate": gate, "temperature": temperature, "scale": scale,
    }
    return tower.eval()


def rankone_mlps(model: nn.Module) -> list[RankOneMLP]:
    return [module for module in model.modules() if isinstance(module, RankOneMLP)]


def routed_tasks(model: nn.Module) -> list[str]:
    """The tasks whose experts a routed model's pool holds, in the pool's (task-major) order."""
    for module in model.modules():
        config = getattr(module, "rankone_config", None)
        if config and config.get("tasks"):
            return list(config["tasks"])
    raise RankoneError("model: has no RankOne-MoE routers with known tasks")


@contextmanager
def recording_gates(model: nn.Module) -> Iterator[list[list[torch.Tensor]]]:
    """While open, each routed block appends the α' it computes (samples × T·k, fp32, CPU) to its own list."""
    mlps = rankone_mlps(model)
    if not mlps:
        raise RankoneError("model: has no RankOne-MoE routers")
    logs: list[list[torch.Tensor]] = [[] for _ in mlps]
    for mlp, log in zip(mlps, logs):
        mlp.gate_log = log
    try:
        yield logs
    finally:
        for mlp in mlps:
            mlp.gate_log = None


def expert_shares(gates: torch.Tensor, tasks: int) -> torch.Tensor:
    """Mean α' each task's experts get over `gates` (samples × T·k, task-major columns): a vector of T.

    Read per task's images, it shows whether the routers tell tasks apart: a router that
    does gives each task's images a larger share of that task's own experts.
    """
    if gates.dim() != 2 or gates.shape[1] % tasks:
        raise RankoneError(f"gates: shape {tuple(gates.shape)} does not split into {tasks} tasks' experts")
    return gates.reshape(gates.shape[0], tasks, -1).mean(dim=(0, 2))


def own_task_rate(gates: torch.Tensor, tasks: int, own: int) -> float:
    """The fraction of samples (rows of `gates`, samples × T·k, task-major) whose largest per-task gate total is
    task `own`'s: how often a block picks an image's own task."""
    if gates.dim() != 2 or gates.shape[1] % tasks:
        raise RankoneError(f"gates: shape {tuple(gates.shape)} does not split into {tasks} tasks' experts")
    totals = gates.reshape(gates.shape[0], tasks, -1).sum(dim=-1)
    return float((totals.argmax(dim=-1) == own).float().mean())


def router_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The routers' weights and biases, block by block: the only parameters adaptation trains."""
    return [parameter for mlp in rankone_mlps(model) if mlp.router is not None for parameter in mlp.router.parameters()]


def set_routing(model: nn.Module, select: float | None, routing: str) -> None:
    """Change top-p and routing mode of a built model (they hold no weights)."""
    check_select(select)
    check_routing(routing)
    for mlp in rankone_mlps(model):
        mlp.select, mlp.routing = select, routing
    if hasattr(model, "rankone_config"):
        model.rankone_config.update(select=select, routing=routing)


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Tensors the routed tower needs at inference, by part, counted from the module itself."""
    pool = routers = total = 0
    for name, parameter in model.named_parameters():
        total += parameter.numel()
        if ".mlp.router." in name:
            routers += parameter.numel()
        elif name.rsplit(".", 1)[-1] in ("fc_u", "fc_v", "proj_u", "proj_v"):
            pool += parameter.numel()
    return {"tower": total - pool - routers, "pool": pool, "routers": routers, "total": total}

