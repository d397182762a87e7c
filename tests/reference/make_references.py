"""FusionBench's own merges on tiny CLIP towers, saved for the tests to compare rankone against.

    python3 tests/reference/make_references.py          # every file
    python3 tests/reference/make_references.py smile    # smile.safetensors only

The first run makes a virtualenv of its own (tests/reference/.venv, ignored by git) with
fusion-bench from PyPI, which pins its own transformers and lightning, so it never enters
rankone's environment; the script then runs itself inside it. It builds a tiny transformers
CLIPModel (the base) and three CLIPVisionModel experts (the base's tower plus a low-rank
change and noise, as fine-tuning leaves one), runs FusionBench's algorithm classes on them
through a BaseModelPool, and writes tests/reference/data/data_free_merges.safetensors: the
base's image tower (`base/<key>`), each expert (`expert/<task>/<key>`), each merged
tower (`<method>/<key>`, CLIPVisionModel layout), with the config and the versions used in
its metadata. tests/test_data_free_merges.py reads it; `make test` never needs fusion-bench.

It also writes data_merges.safetensors, for the merges that read unlabeled images: a few
images per task (`images/<task>`) and a zero-shot head per task (`head/<task>`, logit scale
included), FusionBench's RegMean (`RegMeanAlgorithmForCLIP`) run on them with its Gram
matrices (`regmean/gram/<task>/<module>`) and merged tower (`regmean/<key>`), and Fisher
merging: the per-example Fisher of the paper (E over the model's own predicted classes of
the squared gradient of log p, one backward pass per image and class, computed here by
hand because FusionBench's estimator squares a whole batch's summed gradient instead),
`fisher/statistics/<task>/<key>`, merged by FusionBench's `merging_with_fisher_weights`
without its norm rescaling (the paper has none), `fisher/<key>`. tests/test_data_merges.py reads it.

And smile.safetensors: FusionBench's SMILE upscaling (`SmileUpscalingAlgorithm`) of the same
base and experts, once per setting of SMILE (`<setting>/<key>`, the upscaled CLIPVisionModel's
state dict), a few fixed random images (`images/pixels`), the base's visual projection
(`projection/weight`) and each upscaled model's image embeddings of them (`embeddings/<setting>`,
the pooled output through that projection). `make_references.py smile` writes only this
file, reading the base and experts back from data_free_merges.safetensors (the others stay as
they are). tests/test_smile.py reads it.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# RANKONE_REFERENCE_VENV: an existing virtualenv with the REQUIREMENTS installed, instead of making one.
VENV = Path(os.environ.get("RANKONE_REFERENCE_VENV") or HERE / ".venv")
OUTPUT = HERE / "data" / "data_free_merges.safetensors"
DATA_OUTPUT = HERE / "data" / "data_merges.safetensors"
REQUIREMENTS = ["torch==2.14.1", "fusion-bench==0.2.33"]
TASKS = ("alpha", "beta", "gamma")
# The vision tower's sizes are chosen so that T = 3 does not divide the matrix ranks (32, 17):
# TSV-Merge's and Iso-CTS's index arithmetic is exercised, not just the even case.
CONFIG = {
    "text_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                    "max_position_embeddings": 16, "vocab_size": 49408},
    "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                      "image_size": 32, "patch_size": 8},
    "projection_dim": 16,
}
# FusionBench's method configs (fusion_bench_config/method/...), the defaults rankone takes.
METHODS = {
    "iso-c": ("ISO_C_Merge", {"scaling_factor": 1.0}),
    "iso-cts": ("ISO_CTS_Merge", {"scaling_factor": 1.0, "common_space_fraction": 0.8}),
    "tsv-merge": ("TaskSingularVectorMerging", {"alpha": 1.0}),
    "wudi": ("WUDIMerging", {"iter_num": 400}),
}
# And EMRMerging (no options), saved per task as `emr/<task>/<key>`.
# The merges that read images: FusionBench's clip_regmean.yaml and clip_fisher_merging.yaml, with as many
# images as the reference has (so every image is used, whatever order FusionBench's shuffled loader takes).
IMAGES_PER_TASK = 8
CLASSES = 5
REGMEAN = {"reduce_non_diagonal_ratio": 0.95, "exclude_param_names_regex": [], "weight_transpose": True,
           "num_regmean_examples": IMAGES_PER_TASK, "dataloader_kwargs": {"batch_size": 4, "num_workers": 0}}
FISHER = {"minimal_fisher_weight": 1e-6, "normalize_fisher_weight": False}
SMILE_OUTPUT = HERE / "data" / "smile.safetensors"
# FusionBench's smile_upscaling.yaml (device cpu and the SVDs on the CPU, since its `upscaling_accelerator: cuda`
# needs a GPU), with ranks below the tiny tower's 32: FusionBench's experts fail to build for k at least the rank of a
# non-square layer (fc1, fc2), as its default k = 128 would here. `top-1` is the default routing, `top-2` mixes two
# experts by their softmax weights, `dense` (k = 0) keeps each task's whole weight difference as its expert. All keep
# the rest of the tower pretrained (average_experts false, the default; true fails on CLIP in 0.2.33, where averaging
# the parameterless activation modules raises "State dict at index 0 is empty").
SMILE_BASE = {"device": "cpu", "upscaling_accelerator": None, "full_matrices": True, "routing_use_diff": True,
              "average_experts": False, "model_path": None}
SMILE = {
    "top-1": {**SMILE_BASE, "gate_k": 1, "k": 8, "top_k": 1},
    "top-2": {**SMILE_BASE, "gate_k": 3, "k": 5, "top_k": 2},
    "dense": {**SMILE_BASE, "gate_k": 2, "k": 0, "top_k": 1},
}
SMILE_IMAGES = 4


def ensure_venv() -> Path:
    python = VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *REQUIREMENTS], check=True)
    return python


def expert_state(base_vision: dict, generator, rank: int = 3, scale: float = 0.05) -> dict:
    """The base tower plus, per matrix, a rank-`rank` change and small noise; other tensors get noise."""
    import torch

    state = {}
    for key, value in base_vision.items():
        noise = 0.005 * torch.randn(value.shape, generator=generator)
        if value.dim() == 2:
            left = torch.randn(value.shape[0], rank, generator=generator)
            right = torch.randn(rank, value.shape[1], generator=generator)
            state[key] = value + scale * (left @ right) / rank + noise
        else:
            state[key] = value + noise
    return state


def build_and_merge() -> None:
    import fusion_bench
    import torch
    import transformers
    from fusion_bench import BaseModelPool
    from fusion_bench import method as fusion_methods
    from fusion_bench.method.emr_merging.emr_merging import EMRMerging
    from safetensors.torch import save_file
    from transformers import CLIPConfig, CLIPModel, CLIPVisionModel

    torch.manual_seed(0)
    config = CLIPConfig(**CONFIG)
    base = CLIPModel(config).eval()
    base_vision = CLIPVisionModel(config.vision_config).eval()
    # transformers 5 flattens CLIPVisionModel (no `vision_model` attribute); 4 keeps the wrapper.
    getattr(base_vision, "vision_model", base_vision).load_state_dict(base.vision_model.state_dict())
    generator = torch.Generator().manual_seed(1)
    experts = {}
    for task in TASKS:
        expert = copy.deepcopy(base_vision)
        expert.load_state_dict(expert_state(base_vision.state_dict(), generator))
        experts[task] = expert

    # The base's image tower only: merges never read the text tower, and its token embedding alone would be 1.6 M numbers.
    tensors = {f"base/{key}": value.contiguous() for key, value in base_vision.state_dict().items()}
    for task, expert in experts.items():
        tensors.update({f"expert/{task}/{key}": value.contiguous() for key, value in expert.state_dict().items()})
    for name, (class_name, options) in METHODS.items():
        # Each algorithm writes into the pool's pretrained model: every run gets fresh copies.
        pool = BaseModelPool({"_pretrained_": copy.deepcopy(base_vision), **{task: copy.deepcopy(model) for task, model in experts.items()}})
        # Not under no_grad: WUDI takes gradient steps (the others compute without gradients anyway).
        merged = getattr(fusion_methods, class_name)(**options).run(pool)
        tensors.update({f"{name}/{key}": value.detach().contiguous() for key, value in merged.state_dict().items()})
    # EMR is one model per task: the pretrained tower modulated by each task's mask and rescaler.
    pool = BaseModelPool({"_pretrained_": copy.deepcopy(base_vision), **{task: copy.deepcopy(model) for task, model in experts.items()}})
    emr = EMRMerging().run(pool)
    for task in TASKS:
        emr.set_task(task)
        tensors.update({f"emr/{task}/{key}": value.detach().clone().contiguous() for key, value in emr.backbone.state_dict().items()})
    OUTPUT.parent.mkdir(exist_ok=True)
    metadata = {"config": json.dumps(CONFIG), "tasks": json.dumps(TASKS), "methods": json.dumps(METHODS),
                "fusion_bench": fusion_bench.__version__ if hasattr(fusion_bench, "__version__") else "0.2.33",
                "transformers": transformers.__version__, "torch": torch.__version__}
    save_file(tensors, str(OUTPUT), metadata=metadata)
    print(f"wrote {OUTPUT} ({sum(value.numel() for value in tensors.values()):,} numbers, {OUTPUT.stat().st_size:,} bytes)")
    data_merges(base, base_vision, experts, metadata)


def data_merges(base, base_vision, experts: dict, metadata: dict) -> None:
    """RegMean by FusionBench's class, Fisher by the paper's definition (by hand) and FusionBench's merge."""
    import torch
    from fusion_bench import BaseModelPool
    from fusion_bench.method.fisher_merging.fisher_merging import merging_with_fisher_weights
    from fusion_bench.method.regmean.clip_regmean import RegMeanAlgorithmForCLIP
    from safetensors.torch import save_file
    from torch.utils.data import TensorDataset

    generator = torch.Generator().manual_seed(2)
    size = CONFIG["vision_config"]["image_size"]
    scale = float(base.logit_scale.exp())
    images = {task: torch.randn(IMAGES_PER_TASK, 3, size, size, generator=generator) for task in TASKS}
    directions = {task: torch.randn(CLASSES, CONFIG["projection_dim"], generator=generator) for task in TASKS}
    # A head as rankone keeps it: unit class embeddings times the logit scale.
    heads = {task: scale * rows / rows.norm(dim=-1, keepdim=True) for task, rows in directions.items()}
    projection = base.visual_projection.requires_grad_(False)

    class ReferenceRegMean(RegMeanAlgorithmForCLIP):
        """FusionBench's RegMean for CLIP, given the reference's heads instead of heads from a text tower and class names."""

        grams: dict = {}

        @property
        def clip_processor(self):
            return None  # the datasets hold pixel tensors already

        def on_regmean_start(self):
            self.zeroshot_weights = {task: head / scale for task, head in heads.items()}
            self.visual_projection, self.logit_scale_exp = projection, scale

        def get_regmean_weights(self, model_name, *arguments, **keywords):
            self.grams[model_name] = super().get_regmean_weights(model_name, *arguments, **keywords)
            return self.grams[model_name]

    datasets = {task: TensorDataset(images[task], torch.zeros(IMAGES_PER_TASK, dtype=torch.long)) for task in TASKS}
    pool = BaseModelPool({"_pretrained_": copy.deepcopy(base_vision), **{task: copy.deepcopy(model) for task, model in experts.items()}})
    # The pool instantiates datasets from configs; the reference's are tensors already.
    pool.load_train_dataset = lambda name, *arguments, **keywords: datasets[name]
    algorithm = ReferenceRegMean(**REGMEAN)
    merged = algorithm.run(pool)
    tensors = {f"images/{task}": images[task] for task in TASKS}
    tensors.update({f"head/{task}": heads[task] for task in TASKS})
    tensors.update({f"regmean/{key}": value.detach().contiguous() for key, value in merged.state_dict().items()})
    for task, grams in algorithm.grams.items():
        tensors.update({f"regmean/gram/{task}/{module}": gram.contiguous() for module, gram in grams.items()})

    statistics = {task: paper_fisher(experts[task], projection, heads[task], images[task]) for task in TASKS}
    names = list(statistics[TASKS[0]])
    parameters = {name: [dict(experts[task].named_parameters())[name].detach() for task in TASKS] for name in names}
    fisher = merging_with_fisher_weights(parameters, [statistics[task] for task in TASKS], torch.ones(len(TASKS)) / len(TASKS),
                                         normalize_fisher_weight=FISHER["normalize_fisher_weight"],
                                         minimal_fisher_weight=FISHER["minimal_fisher_weight"])
    tensors.update({f"fisher/{key}": value.detach().contiguous() for key, value in fisher.items()})
    for task, values in statistics.items():
        tensors.update({f"fisher/statistics/{task}/{key}": value.contiguous() for key, value in values.items()})
    save_file(tensors, str(DATA_OUTPUT), metadata={**metadata, "regmean": json.dumps(REGMEAN), "fisher": json.dumps(FISHER),
                                                   "logit_scale": json.dumps(scale)})
    print(f"wrote {DATA_OUTPUT} ({sum(value.numel() for value in tensors.values()):,} numbers, {DATA_OUTPUT.stat().st_size:,} bytes)")


def paper_fisher(model, projection, head, images) -> dict:
    """Matena & Raffel's diagonal Fisher: mean over images of Σ_y p(y|x)·(∂ log p(y|x)/∂θ)², by one backward per class."""
    import torch

    parameters = dict(model.named_parameters())
    fisher = {name: torch.zeros_like(value) for name, value in parameters.items()}
    for image in images:
        embedding = projection(model(pixel_values=image[None]).pooler_output)
        log_probabilities = torch.log_softmax(embedding / embedding.norm(dim=-1, keepdim=True) @ head.T, dim=-1)[0]
        probabilities = log_probabilities.exp().detach()
        for label in range(len(probabilities)):
            gradients = torch.autograd.grad(log_probabilities[label], list(parameters.values()), retain_graph=True, allow_unused=True)
            for name, gradient in zip(parameters, gradients):
                if gradient is not None:
                    fisher[name] += probabilities[label] * gradient.detach() ** 2
    return {name: value / len(images) for name, value in fisher.items()}


def stored_models() -> tuple:
    """(base CLIPModel, its CLIPVisionModel, {task: expert}) as build_and_merge made them, read back from
    data_free_merges.safetensors; the base is rebuilt from the same seed for its projection (checked against the file)."""
    import torch
    from safetensors.torch import load_file
    from transformers import CLIPConfig, CLIPModel, CLIPVisionModel

    stored = load_file(str(OUTPUT))

    def group(prefix: str) -> dict:
        return {key.removeprefix(prefix): value for key, value in stored.items() if key.startswith(prefix)}

    torch.manual_seed(0)
    config = CLIPConfig(**CONFIG)
    base = CLIPModel(config).eval()
    models = {}
    for name in ("base", *(f"expert/{task}" for task in TASKS)):
        model = CLIPVisionModel(config.vision_config).eval()
        model.load_state_dict(group(name + "/"))
        models[name] = model
    rebuilt = base.vision_model.state_dict()
    vision = getattr(models["base"], "vision_model", models["base"]).state_dict()
    if any(not torch.equal(rebuilt[key], value) for key, value in vision.items()):
        raise SystemExit(f"{OUTPUT}: its base is not the seed-0 CLIPModel this script builds; rerun it without arguments")
    return base, models.pop("base"), {task: models[f"expert/{task}"] for task in TASKS}


def smile_references() -> None:
    """FusionBench's SMILE upscaling of the stored base and experts, per setting, and its embeddings of fixed images."""
    import fusion_bench
    import torch
    import transformers
    from fusion_bench import BaseModelPool
    from fusion_bench.method.smile_upscaling.smile_upscaling import SmileUpscalingAlgorithm
    from safetensors.torch import save_file

    base, base_vision, experts = stored_models()
    size = CONFIG["vision_config"]["image_size"]
    images = torch.randn(SMILE_IMAGES, 3, size, size, generator=torch.Generator().manual_seed(3))
    projection = base.visual_projection
    tensors = {"images/pixels": images, "projection/weight": projection.weight.detach().contiguous()}
    for setting, options in SMILE.items():
        # SMILE writes into the pool's pretrained model and empties the experts it reads: fresh copies for every run.
        pool = BaseModelPool({"_pretrained_": copy.deepcopy(base_vision), **{task: copy.deepcopy(model) for task, model in experts.items()}})
        upscaled = SmileUpscalingAlgorithm(**options).run(pool).eval()
        with torch.no_grad():
            tensors[f"embeddings/{setting}"] = projection(upscaled(pixel_values=images).pooler_output)
        tensors.update({f"{setting}/{key}": value.detach().contiguous() for key, value in upscaled.state_dict().items()})
    metadata = {"config": json.dumps(CONFIG), "tasks": json.dumps(TASKS), "smile": json.dumps(SMILE),
                "fusion_bench": getattr(fusion_bench, "__version__", "0.2.33"), "transformers": transformers.__version__,
                "torch": torch.__version__}
    save_file(tensors, str(SMILE_OUTPUT), metadata=metadata)
    print(f"wrote {SMILE_OUTPUT} ({sum(value.numel() for value in tensors.values()):,} numbers, {SMILE_OUTPUT.stat().st_size:,} bytes)")


def every_reference() -> None:
    build_and_merge()
    smile_references()


# What `make_references.py [PART]` writes: every reference file (the default), or smile.safetensors alone.
PARTS = {"all": every_reference, "smile": smile_references}


def main() -> None:
    part = sys.argv[1] if len(sys.argv) > 1 else "all"
    if part not in PARTS or len(sys.argv) > 2:
        raise SystemExit(f"usage: make_references.py [{'|'.join(PARTS)}]")
    if Path(sys.prefix).resolve() != VENV.resolve():
        python = ensure_venv()
        os.execv(str(python), [str(python), __file__, *sys.argv[1:]])
    PARTS[part]()


if __name__ == "__main__":
    main()
