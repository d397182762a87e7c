"""FusionBench's own merges on tiny CLIP towers, saved for the tests to compare rankone against.

    python3 tests/reference/make_references.py

The first run makes a virtualenv of its own (tests/reference/.venv, ignored by git) with
fusion-bench from PyPI, which pins its own transformers and lightning, so it never enters
rankone's environment; the script then runs itself inside it. It builds a tiny transformers
CLIPModel (the base) and three CLIPVisionModel experts (the base's tower plus a low-rank
change and noise, as fine-tuning leaves one), runs FusionBench's algorithm classes on them
through a BaseModelPool, and writes tests/reference/data/data_free_merges.safetensors: the
base's image tower (`base/<key>`), each expert (`expert/<task>/<key>`), each merged
tower (`<method>/<key>`, CLIPVisionModel layout), with the config and the versions used in
its metadata. tests/test_data_free_merges.py reads it; `make test` never needs fusion-bench.
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


def main() -> None:
    if Path(sys.prefix).resolve() != VENV.resolve():
        python = ensure_venv()
        os.execv(str(python), [str(python), __file__, *sys.argv[1:]])
    build_and_merge()


if __name__ == "__main__":
    main()
