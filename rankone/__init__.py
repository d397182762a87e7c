"""rankone: merge fine-tuned CLIP image towers with RankOne-MoE."""

__version__ = "0.1.0"


def load(path):
    """Load an exported artifact or a workspace as a module with `encode_image` and `classify`."""
    from rankone.artifact import load as load_artifact

    return load_artifact(path)


__all__ = ["load", "__version__"]
