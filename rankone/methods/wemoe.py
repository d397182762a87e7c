"""WEMoE (Weight-Ensembling MoE), the dynamic method RankOne-MoE is compared against.

docs/method.md §10: everything outside the MLPs is the static merge θ0 + λ·Στ. Each block's
MLP computes, for sample b, with W_b = W0 + Σt w_bt·τt for the weights AND biases of c_fc
and c_proj (the full dense τt, pretrained W0):
    w_b = mean over tokens of router(x),  router = Linear(d, d) → ReLU → Linear(d, T)
where x is the MLP input (after ln_2), all tokens. The first layer starts at weight
N(0, 0.01²), bias 0, the second at weight N(0, 0.01²), bias λ, so the model starts near
task arithmetic. No softmax. The router is applied to every token and its outputs are
averaged, exactly as RankOne-MoE's router is (docs/method.md §6).

The per-sample weights are never built: x·W0ᵀ + Σt w_bt·(x·τtᵀ) is one matrix product over
the tasks stacked along the contracted (or the output) dimension, whichever is smaller.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rankone.errors import RankoneError
from rankone.methods.artifact import artifact_tensors, classifier_from_workspace, write_artifact
from rankone.methods.base import Method, MethodModel, load_router_state, pretrained_tower, register, router_state
from rankone.methods.rankone.pool import static_part
from rankone.models import FULL_PRECISION, VISUAL_PREFIX, build_visual, check_state_dict, load_visual, resolve_dtype
from rankone.options import DEFAULT_LAMBDA, Options, lambda_option, learning_rate_option
from rankone.task_vectors import load_task_vectors
from rankone.training import AdaptOptions, adapt_with_checkpoints, adaptation_inputs, classify_with, save_adapted, task_heads
from rankone.workspace import Workspace, read_tensors_metadata

ADAPTED_ROUTERS = "adapted/wemoe.safetensors"
ROUTER_INIT_STD = 0.01


@dataclass(frozen=True)
class WEMoEOptions(Options):
    lr: float = learning_rate_option()
    lam: float = lambda_option("λ of the static part outside the MLPs, and the routers' initial bias.")


MLP_KEY = re.compile(r"^visual\.transformer\.resblocks\.(\d+)\.mlp\.(c_fc|c_proj)\.(weight|bias)$")


def routed_linear(x: Tensor, weights: Tensor, w0: Tensor, b0: Tensor, tau_w: Tensor, tau_b: Tensor) -> Tensor:
    """y_b = x_b·(W0 + Σt w_bt τ_wt)ᵀ + b0 + Σt w_bt τ_bt for every sample b, batched.

    x: (batch, tokens, in); weights: (batch, T); w0: (out, in); b0: (out,);
    tau_w: (out, T, in), the task vectors stored so that both views below are free;
    tau_b: (T, out).
    """
    batch, tokens, width_in = x.shape
    width_out, tasks, _ = tau_w.shape
    base = nn.functional.linear(x, w0, b0)
    bias = (weights @ tau_b).unsqueeze(1)
    if width_in <= width_out:
        # Scale the input per task, then contract over (task, in) in a single product.
        scaled = (x.unsqueeze(2) * weights[:, None, :, None]).reshape(batch, tokens, tasks * width_in)
        delta = scaled @ tau_w.reshape(width_out, tasks * width_in).T
    else:
        # Per-task outputs are the smaller intermediate here; weight and sum them.
        per_task = (x @ tau_w.reshape(width_out * tasks, width_in).T).reshape(batch, tokens, width_out, tasks)
        delta = torch.einsum("bnot,bt->bno", per_task, weights)
    return base + delta + bias


class WEMoEMLP(nn.Module):
    """Drop-in for an open_clip block's `mlp`, with the dense task vectors routed per sample.

    `c_fc`/`c_proj` hold the PRETRAINED weights and biases; `router` is the only trainable
    part. Task vectors come in as (T, out, in) weights and (T, out) biases.
    """

    def __init__(
        self,
        c_fc: nn.Linear,
        act: nn.Module,
        c_proj: nn.Linear,
        fc_weight: Tensor,
        fc_bias: Tensor,
        proj_weight: Tensor,
        proj_bias: Tensor,
        *,
        lam: float,
        batch_first: bool,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        tasks = fc_weight.shape[0]
        shapes = {
            "c_fc.weight": (fc_weight, (tasks, *c_fc.weight.shape)),
            "c_fc.bias": (fc_bias, (tasks, c_fc.out_features)),
            "c_proj.weight": (proj_weight, (tasks, *c_proj.weight.shape)),
            "c_proj.bias": (proj_bias, (tasks, c_proj.out_features)),
        }
        for name, (tensor, shape) in shapes.items():
            if tuple(tensor.shape) != shape:
                raise RankoneError(f"task vectors of mlp.{name}: stacked shape {tuple(tensor.shape)}, expected {shape}")
        self.c_fc, self.gelu, self.c_proj = c_fc, act, c_proj
        frozen = dict(requires_grad=False)
        dtype = c_fc.weight.dtype
        # (out, T, in): reshaping to (out, T·in) or (out·T, in) is then a view, never a copy.
        self.fc_tau_weight = nn.Parameter(fc_weight.detach().to(dtype).permute(1, 0, 2).contiguous(), **frozen)
        self.fc_tau_bias = nn.Parameter(fc_bias.detach().to(dtype).clone(), **frozen)
        self.proj_tau_weight = nn.Parameter(proj_weight.detach().to(dtype).permute(1, 0, 2).contiguous(), **frozen)
        self.proj_tau_bias = nn.Parameter(proj_bias.detach().to(dtype).clone(), **frozen)
        width = c_fc.in_features
        factory = dict(device=c_fc.weight.device, dtype=dtype)
        self.router = nn.Sequential(OrderedDict(
            fc1=nn.Linear(width, width, **factory), relu=nn.ReLU(), fc2=nn.Linear(width, tasks, **factory),
        ))
        with torch.no_grad():
            self.router.fc1.weight.normal_(0.0, ROUTER_INIT_STD, generator=generator)
            self.router.fc1.bias.zero_()
            self.router.fc2.weight.normal_(0.0, ROUTER_INIT_STD, generator=generator)
            self.router.fc2.bias.fill_(lam)
        self.batch_first = batch_first

    def task_weights(self, x: Tensor) -> Tensor:
        """w per sample (batch × T) from batch-first hidden states."""
        return self.router(x).mean(dim=1)

    def forward(self, x: Tensor) -> Tensor:
        if not self.batch_first:
            x = x.transpose(0, 1)
        weights = self.task_weights(x)
        hidden = self.gelu(routed_linear(x, weights, self.c_fc.weight, self.c_fc.bias, self.fc_tau_weight, self.fc_tau_bias))
        out = routed_linear(hidden, weights, self.c_proj.weight, self.c_proj.bias, self.proj_tau_weight, self.proj_tau_bias)
        return out if self.batch_first else out.transpose(0, 1)


def is_mlp_key(key: str) -> bool:
    return MLP_KEY.match(key) is not None


def wemoe_model(
    architecture: dict[str, Any],
    base_visual: dict[str, Tensor],
    task_vectors: list[dict[str, Tensor]],
    lam: float = DEFAULT_LAMBDA,
    *,
    seed: int = 0,
) -> nn.Module:
    """open_clip's image tower (images → embeddings) with every block's MLP replaced by WEMoEMLP.

    Outside the MLPs the tower holds θ0 + λ·Στ; inside, the pretrained weights and biases
    plus the stacked task vectors. Router weights come from a generator seeded with `seed`,
    block by block. Meta tensors in, meta model out (for parameter counting).
    """
    if not task_vectors:
        raise RankoneError("wemoe: no task vectors given")
    meta = next(iter(base_visual.values())).is_meta
    # Meta tensors hold no values to merge (they only carry shapes for counting).
    static = {key: value for key, value in base_visual.items() if key.startswith("visual.")} if meta else static_part(base_visual, task_vectors, lam)
    # WEMoE routes the MLP biases too, so they stay pretrained here like the weights.
    static.update({key: base_visual[key] for key in static if is_mlp_key(key)})
    tower = load_visual(architecture, static)
    transformer = tower.transformer
    batch_first = getattr(transformer, "batch_first", True)
    generator = None if meta else torch.Generator().manual_seed(seed)
    for index, block in enumerate(transformer.resblocks):
        prefix = f"visual.transformer.resblocks.{index}.mlp"
        stacks = []
        for name in ("c_fc.weight", "c_fc.bias", "c_proj.weight", "c_proj.bias"):
            key = f"{prefix}.{name}"
            missing = [position for position, vector in enumerate(task_vectors) if key not in vector]
            if missing:
                raise RankoneError(f"task vector {missing[0]}: lacks tensor {key}")
            stacks.append(torch.stack([vector[key] for vector in task_vectors]))
        mlp = block.mlp
        block.mlp = WEMoEMLP(mlp.c_fc, mlp.gelu, mlp.c_proj, *stacks, lam=lam, batch_first=batch_first, generator=generator)
    for parameter in tower.parameters():
        parameter.requires_grad_(False)
    for parameter in router_parameters(tower):
        parameter.requires_grad_(True)
    tower.wemoe_config = {"lambda": lam, "tasks": len(task_vectors)}
    return tower.eval()


def wemoe_mlps(model: nn.Module) -> list[WEMoEMLP]:
    return [module for module in model.modules() if isinstance(module, WEMoEMLP)]


def router_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The routers' parameters, block by block: the only ones adaptation trains."""
    return [parameter for mlp in wemoe_mlps(model) for parameter in mlp.router.parameters()]


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Tensors the WEMoE tower needs at inference, by part, counted from the module itself."""
    task_vectors = routers = total = 0
    for name, parameter in model.named_parameters():
        total += parameter.numel()
        if ".mlp.router." in name:
            routers += parameter.numel()
        elif "_tau_" in name.rsplit(".", 1)[-1]:
            task_vectors += parameter.numel()
    total += sum(buffer.numel() for buffer in model.buffers())
    return {"tower": total - task_vectors - routers, "task_vectors": task_vectors, "routers": routers, "total": total}


def wemoe_from_workspace(
    workspace: Workspace, device: torch.device | str = "cpu", trained: bool = True, *, seed: int = 0, lam: float = DEFAULT_LAMBDA
) -> nn.Module:
    """The WEMoE tower over every workspace task; with `trained`, the routers (and λ) of adapted/wemoe.safetensors."""
    tasks = workspace.tasks
    if trained:
        routers, metadata = read_routers(workspace)
        tasks, lam = list(metadata["tasks"]), float(metadata["lambda"])
    model = wemoe_model(workspace.architecture, pretrained_tower(workspace), load_task_vectors(workspace, tasks), lam, seed=seed)
    if trained:
        load_router_state(model, routers, str(workspace.path(ADAPTED_ROUTERS)))
    return model.to(device)


def read_routers(workspace: Workspace) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The trained routers and the metadata saved with them."""
    routers = workspace.load_tensors(ADAPTED_ROUTERS)
    path = workspace.path(ADAPTED_ROUTERS)
    try:
        metadata = json.loads(read_tensors_metadata(path)["rankone"])
        metadata["tasks"], float(metadata["lambda"])
    except (KeyError, ValueError, TypeError):
        raise RankoneError(f"{path}: metadata lacks tasks or lambda; rerun `rankone adapt --method wemoe`") from None
    return routers, metadata


def load_wemoe(workspace: Workspace, method: str, device: torch.device) -> MethodModel:
    """The eval loader: the routed tower for every task."""
    model = wemoe_from_workspace(workspace, device)
    return MethodModel(encoder_for_task=lambda task: model, parameters=parameter_counts(model)["total"], name=method)


def export_wemoe(workspace: Workspace, folder: Path, dtype: str = FULL_PRECISION, device: torch.device | str = "cpu",
                 max_shard_bytes: int | None = None) -> dict[str, Any]:
    """rankone's artifact of the adapted WEMoE: its whole routed tower (dense task vectors included) and heads.

    `dtype` is the storage precision of what WEMoE adds to the tower, the task vectors and
    the routers; the tower and heads stay fp32.
    """
    resolve_dtype(dtype)
    model = wemoe_from_workspace(workspace, device).eval()
    _, metadata = read_routers(workspace)
    settings = {"method": "wemoe", "lambda": float(metadata["lambda"]), "tasks": list(metadata["tasks"])}
    classifier = classifier_from_workspace(workspace, model, metadata.get("heads", {}), settings, device)
    config = {**classifier.config, "dtype": dtype,
              "storage": {"task vectors": dtype, "routers": dtype, "tower": "fp32", "heads": "fp32"},
              "parameters": {**parameter_counts(model), "heads": sum(classifier.head(task).numel() for task in classifier.tasks)}}
    added = lambda name: ".mlp.router." in name or "_tau_" in name.rsplit(".", 1)[-1]  # noqa: E731
    return write_artifact(folder, artifact_tensors(classifier, dtype, added=added), config, max_shard_bytes)


def wemoe_from_export(config: dict[str, Any], tower: dict[str, Tensor], source: str) -> nn.Module:
    """The WEMoE tower of an export: built on the meta device from the architecture, then given the exported tensors."""
    architecture = config["architecture"]
    with torch.device("meta"):
        meta = {VISUAL_PREFIX + name: tensor for name, tensor in build_visual(architecture).state_dict().items()}
        model = wemoe_model(architecture, meta, [meta] * len(config["tasks"]), float(config["lambda"]))
    state = {name.removeprefix(VISUAL_PREFIX): tensor for name, tensor in tower.items()}
    check_state_dict(state, model.state_dict(), prefix=VISUAL_PREFIX)
    model.load_state_dict({name: tensor.float() for name, tensor in state.items()}, strict=True, assign=True)
    for name, buffer in model.named_buffers():
        if buffer.is_meta:
            raise RankoneError(f"{source}: the WEMoE tower's buffer {name} was not restored")
    return model.eval()


def adapt_wemoe(workspace: Workspace, options: AdaptOptions, method_options: WEMoEOptions) -> str:
    """Train the routers on unlabeled images; write adapted/wemoe.safetensors.

    The model merges every workspace task; `options.tasks` only picks the tasks whose images it adapts on.
    """
    known = workspace.tasks
    inputs = adaptation_inputs(workspace, options, known)
    # Router initial noise comes from the seed, so runs (and resumed runs) start from the same routers.
    model = wemoe_from_workspace(workspace, options.device, trained=False, seed=options.seed, lam=method_options.lam)
    heads = task_heads(workspace, inputs.requests, options.device)
    config = {"method": "wemoe", "seed": options.seed, "lr": method_options.lr, "batch_size": options.batch_size,
              "tasks": known, "adapted_on": inputs.tasks, "lambda": method_options.lam}
    log = adapt_with_checkpoints(workspace, "wemoe", classify_with(model, heads), router_parameters(model),
                                    inputs.unlabeled, options, config, method_options.lr)
    return save_adapted(workspace, ADAPTED_ROUTERS, router_state(model), config, options, inputs.requests, log)


METHOD = register(Method(
    name="wemoe", kind="adaptive", summary="dense MLP task vectors mixed per sample by trained routers",
    row=90, load=load_wemoe, options=WEMoEOptions, inputs=("base", "task-vectors"),
    eval_inputs=("base", "task-vectors"), output=ADAPTED_ROUTERS, adapt=adapt_wemoe, routed=False,
    export=export_wemoe, from_export=wemoe_from_export, across_processes=True,
))
