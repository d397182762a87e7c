"""RankOne-MoE as a registered method: the pool stage, router adaptation, the eval loader and export.

The pieces live beside this file: `pool.py` (SVD into rank-one experts, the static part,
pool.safetensors), `module.py` (the routed MLP and its routers), `artifact.py` (the model
from a workspace, and in rankone's exported artifact).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import torch

from rankone import distributed
from rankone.errors import RankoneError
from rankone.methods.base import Method, MethodModel, pretrained_tower, register, router_state
from rankone.methods.rankone.artifact import ADAPTED_ROUTERS, export, from_export, routed_from_workspace
from rankone.methods.rankone.module import RoutingOptions, parameter_counts, routed_model, router_parameters
from rankone.methods.rankone.pool import (
    POOL_FILE, SVD_METHODS, build_pool, check_pool_options, pool_file_tensors, read_pool, static_part,
)
from rankone.models import count_parameters
from rankone.options import ADAPTATION_LR, Options, lambda_option, option
from rankone.task_vectors import load_task_vectors, task_vector_path
from rankone.methods.rankone.routers import (
    HELD_OUT_PER_TASK, INITS, ROUTERS, TASK_GATES, TASK_ROUTER_LR, fit_routers, gate_of, scorer_of, task_objective,
)
from rankone.models import preprocess_for
from rankone.training import (
    AdaptOptions, HeadRequests, TrainingLog, adapt_with_checkpoints, adaptation_inputs, classify_with, head_requests,
    resume_state, save_adapted, selected_tasks, task_heads, unlabeled_sets,
)
from rankone.workspace import Workspace


@dataclass(frozen=True)
class PoolOptions(Options):
    """`rankone build-pool`: how many experts each task keeps and the static part's λ."""

    k: int = option(32, "Rank-one experts kept per task and MLP matrix.", low=1)
    lam: float = lambda_option("λ of the static part θ0 + λΣτ (and the routers' initial bias).", auto=True)
    svd: str = option(SVD_METHODS[0], "exact (torch.linalg.svd) or randomized (block Krylov, 3 iterations; within 0.1% of the "
                      "exact kept energy on decaying spectra).", choices=SVD_METHODS)


@dataclass(frozen=True)
class RankOneOptions(RoutingOptions):
    """`rankone adapt --method rankone`: the router kind, the routing it is trained with, and Adam's rate."""

    router: str = option("entropy", "entropy (SPEC's: trained by entropy minimisation), subspace (training-free, from the "
                         "pool; needs no --data) or task (trained to tell the folders' tasks apart).", choices=ROUTERS)
    gate: str = option("hard", "subspace and task routers: the best task's experts (hard) or a softmax over tasks (soft).",
                       choices=TASK_GATES)
    temperature: float = option(1.0, "subspace and task routers, soft gate: softmax temperature.", low=0.0, low_open=True)
    gate_scale: float = option(1.0, "subspace and task routers: the gate's total weight (1: the routed task's own rank-k update).",
                               low=0.0)
    init: str = option("random", "entropy routers: start from SPEC's random weights, or from a least-squares fit of the "
                       "subspace or task kind's hard routing on the unlabeled images.", choices=INITS)
    lr: float | None = option(None, "Adam learning rate.", low=0.0, low_open=True,
                              shown_default=f"{ADAPTATION_LR:g}, SPEC's; with --router task {TASK_ROUTER_LR:g}")

    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return TASK_ROUTER_LR if self.router == "task" else ADAPTATION_LR

    def routing_settings(self) -> dict:
        """What the adapted file records of the router kind: nothing for SPEC's entropy routers (so their record, and
        checkpoints made before kinds existed, stay as they were; `artifact.router_kind` reads the absence as entropy),
        else the kind and its gate."""
        if self.router == "entropy":
            return {} if self.init == "random" else {"init": self.init}
        return {"router": self.router, "gate": self.gate, "temperature": self.temperature, "gate_scale": self.gate_scale}


@dataclass
class PoolReport:
    """What `rankone build-pool` wrote and measured."""

    kept_energy: dict[str, dict[str, float]]  # matrix key → task → fraction of ‖τ‖_F² kept
    tower_parameters: int  # the pretrained image tower, counted from its tensors
    counts: dict[str, int]  # the routed model by part (`module.parameter_counts`)


def build_pool_stage(
    workspace: Workspace, options: PoolOptions = PoolOptions(), progress=None, device: torch.device | str = "cpu",
) -> PoolReport:
    """Read task_vectors/, write pool.safetensors (pool + static part + metadata), count parameters.

    `progress(key)` is called after each MLP weight matrix (2 per block).
    """
    tasks = workspace.tasks
    if not tasks:
        raise RankoneError(f"{workspace.manifest_path}: the workspace has no tasks; run `rankone fetch` with experts first")
    k, lam, svd = options.k, options.lam, options.svd
    check_pool_options(workspace.architecture, k, svd)
    hashes = {task: workspace.manifest()["files"].get(task_vector_path(task), {}).get("sha256") for task in tasks}
    task_vectors = load_task_vectors(workspace, tasks)
    base_visual = pretrained_tower(workspace)
    pool, kept = build_pool(task_vectors, k, svd, tasks=tasks, progress=progress, device=device)
    static = static_part(base_visual, task_vectors, lam)
    del task_vectors
    # Counted from the real module built on `meta`: the shapes alone, no copy of the tower's weights.
    with torch.device("meta"):
        model = routed_model(workspace.architecture, {key: tensor.to("meta") for key, tensor in static.items()},
                             {key: tensor.to("meta") for key, tensor in pool.items()}, lam, tasks=tasks)
    report = PoolReport(
        kept_energy={key: dict(zip(tasks, fractions)) for key, fractions in kept.items()},
        tower_parameters=count_parameters(base_visual),
        counts=parameter_counts(model),
    )
    metadata = {"k": k, "lambda": lam, "tasks": tasks, "svd": svd, "task_vector_sha256": hashes,
                "kept_energy": report.kept_energy, "parameters": report.counts}
    with workspace.transaction() as staging:
        staging.save_tensors(POOL_FILE, pool_file_tensors(static, pool), {"rankone": json.dumps(metadata)})
    return report


def adapt_rankone(workspace: Workspace, options: AdaptOptions, method_options: RankOneOptions) -> str:
    """Train (or, for subspace routers, just record) the routers of the routed model built from pool.safetensors;
    write adapted/rankone.safetensors."""
    stored = read_pool(workspace)
    router, lr = method_options.router, method_options.learning_rate()
    if distributed.world().distributed and method_options.routing == "per-batch":
        raise RankoneError("--routing per-batch: the gate mixes the images of a batch, which several processes split; "
                           "run it in one process or use per-sample")
    if method_options.init != "random" and router != "entropy":
        raise RankoneError(f"--init {method_options.init}: starts entropy routers; --router {router} has its own training")
    routing = method_options.routing_settings()
    # Router initial noise comes from the seed too, so runs (and resumed runs) start from the same routers.
    model = routed_model(workspace.architecture, stored.static, stored.pool, stored.lam, method_options.select,
                         method_options.routing, stored.tasks, seed=options.seed, scorer=scorer_of(router),
                         gate=gate_of(router, method_options.gate), temperature=method_options.temperature,
                         scale=method_options.gate_scale).to(options.device)
    if router == "subspace":
        # Nothing to train: the heads are recorded when class names can be found, for `rankone.load` and predict.
        config = {"method": "rankone", "tasks": selected_tasks(stored.tasks, options.tasks), "k": stored.k, "lambda": stored.lam,
                  "select": method_options.select, "routing": method_options.routing, **routing}
        requests = optional_head_requests(workspace, options, config["tasks"])
        return save_adapted(workspace, ADAPTED_ROUTERS, {}, config, dataclasses.replace(options, steps=0), requests,
                            TrainingLog([], {}, objective="none (training-free)"))
    config = {"method": "rankone", "seed": options.seed, "lr": lr, "batch_size": options.batch_size,
              "select": method_options.select, "routing": method_options.routing, "k": stored.k,
              "lambda": stored.lam, **routing}
    if router == "task":
        tasks = selected_tasks(stored.tasks, options.tasks)
        config["tasks"] = tasks
        resume = resume_state(workspace, "rankone", options, config)
        unlabeled = unlabeled_sets(options.data, tasks, preprocess_for(workspace.architecture), known=stored.tasks, note=options.note)
        requests = optional_head_requests(workspace, options, tasks)
        log = adapt_with_checkpoints(workspace, "rankone", None, router_parameters(model), unlabeled, options, config, lr, resume,
                                     objective=task_objective(model, stored.tasks))
        log.objective = "cross-entropy of the folder's task, mean over blocks"
        return save_adapted(workspace, ADAPTED_ROUTERS, router_state(model), config, options, requests, log)
    inputs = adaptation_inputs(workspace, options, stored.tasks)
    config["tasks"] = inputs.tasks
    resume = resume_state(workspace, "rankone", options, config)
    heads = task_heads(workspace, inputs.requests, options.device)
    if method_options.init != "random" and resume is None:
        fit = fit_routers(model, inputs.unlabeled, stored.tasks, method_options.init, batch_size=options.batch_size,
                          device=options.device)
        options.note(f"routers fitted to the {fit.kind} kind's routing on {fit.images} unlabeled images: "
                     f"the fit picks that kind's task for {100 * sum(fit.agreement) / len(fit.agreement):.0f}% of them "
                     f"(mean over {len(fit.agreement)} blocks)"
                     + (f", {100 * sum(fit.held_out) / len(fit.held_out):.0f}% of the next {HELD_OUT_PER_TASK} per task"
                        if fit.held_out else ""))
    log = adapt_with_checkpoints(workspace, "rankone", classify_with(model, heads), router_parameters(model),
                                 inputs.unlabeled, options, config, lr, resume)
    return save_adapted(workspace, ADAPTED_ROUTERS, router_state(model), config, options, inputs.requests, log)


def optional_head_requests(workspace: Workspace, options: AdaptOptions, tasks: list[str]) -> HeadRequests:
    """The heads a router kind that needs none records when class names can be found (else none)."""
    try:
        return head_requests(workspace, tasks, options.heads_source, options.classnames_from, options.classnames, options.templates)
    except RankoneError:
        options.note("note: no class names for the heads; `rankone eval` and `compare` take them as usual, "
                     "`rankone.load` and `predict` need them recorded (pass --classnames-from DIR)")
        return {}


def load_rankone(workspace: Workspace, method: str, device: torch.device) -> MethodModel:
    """The eval loader: the adapted routed tower for every task."""
    visual, _ = routed_from_workspace(workspace, device)
    return MethodModel(encoder_for_task=lambda task: visual, parameters=parameter_counts(visual)["total"], name=method)


METHOD = register(Method(
    name="rankone", kind="adaptive", summary="RankOne-MoE: rank-one experts from every MLP task vector, routed per sample",
    row=100, load=load_rankone, options=RankOneOptions, inputs=("base", "pool"), eval_inputs=("base", "pool"),
    output=ADAPTED_ROUTERS, adapt=adapt_rankone, export=export, from_export=from_export, routed=True,
    across_processes=True,
))
