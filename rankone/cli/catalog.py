"""Every command: its one-line summary and the module that defines it, in the order `rankone --help` lists them.

This table is what `rankone --help` and `--version` read, so they answer without importing
torch (about 2 s on a laptop CPU); a command's module is imported only when that command
runs or shows its own help. The summary is the first line of the command's `--help`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Entry:
    module: str
    summary: str


STAGES = "rankone.cli.stages"
TOOLS = "rankone.cli.tools"

COMMANDS: dict[str, Entry] = {
    "fetch": Entry(STAGES, "Fetch the base CLIP and the fine-tuned experts into a workspace, in open_clip's layout."),
    "task-vectors": Entry(STAGES, "Compute task vectors τ = θt − θ0 and where fine-tuning moved the weights."),
    "build-pool": Entry(STAGES, "Split every MLP task vector into its top-k rank-one experts; merge the rest statically."),
    "merge": Entry(STAGES, "Merge the task vectors statically into one image tower: merged/<method>.safetensors."),
    "adapt": Entry(STAGES, "Train an adaptive method on unlabeled images (entropy minimisation), or merge from their statistics (regmean, fisher)."),
    "eval": Entry(STAGES, "Top-1 accuracy of a method on each task's labeled test images; writes eval/<method>.json."),
    "compare": Entry(STAGES, "Evaluate every method the workspace can run, like the paper's Table 1."),
    "export": Entry(STAGES, "Write a method's model as one self-contained folder."),
    "run": Entry(STAGES, "Run a whole pipeline described in one YAML file, skipping the stages already done."),
    "predict": Entry(TOOLS, "Print the top classes of --task with their probabilities for each image."),
    "push": Entry(TOOLS, "Upload an exported folder to the Hugging Face Hub, model card included."),
    "inspect": Entry(TOOLS, "Tensors by role (towers, experts, task vectors, pool, routers, heads…)."),
    "finetune": Entry(TOOLS, "Fine-tune the image tower on one task against its frozen zero-shot head."),
    "demo": Entry("rankone.cli.demo", "Run the whole pipeline on the built-in offline example suite and print the comparison."),
}
