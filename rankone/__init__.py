"""rankone: merge fine-tuned CLIP image towers with RankOne-MoE."""

__version__ = "0.1.0"


def load(path, device="cpu", dtype=None):
    """Load an exported artifact or a workspace as a module with `encode_image` and `classify`.

    `dtype`: "fp32", "fp16" or "bf16" for the image tower (default: as exported); logits are fp32.
    """
    # Deferred on purpose: importing any rankone submodule runs this file first, so it imports nothing heavy.
    from rankone.methods.rankone.artifact import load as load_artifact

    return load_artifact(path, device, dtype)


__all__ = ["load", "__version__"]
