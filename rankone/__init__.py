"""rankone: merge fine-tuned CLIP image towers with RankOne-MoE."""

__version__ = "0.1.0"


def load(path, device="cpu", dtype=None):
    """An exported routed model (a folder, or `hf:ORG/NAME[@REVISION]`) or a workspace as a module with
    `encode_image` and `classify(images, task)`.

    `dtype`: "fp32", "fp16" or "bf16" for the image tower (default fp32); logits are fp32.
    """
    # Deferred on purpose: importing any rankone submodule runs this file first, so it imports nothing heavy.
    from rankone.methods import load as load_model

    return load_model(path, device, dtype)


__all__ = ["load", "__version__"]
