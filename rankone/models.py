"""Architectures as data, and the open_clip modules built from them.

An architecture is an open_clip model config (`embed_dim`, `vision_cfg`, `text_cfg`,
`quick_gelu`), the same JSON open_clip keeps in `model_configs/`. Every state dict in a
workspace uses open_clip's key layout (`visual.transformer.resblocks.0.mlp.c_fc.weight`).
"""

from __future__ import annotations

import copy
from typing import Any

import open_clip
import torch
from torch import nn

from rankone.errors import RankoneError

VISUAL_PREFIX = "visual."


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks cuda, then mps, then cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RankoneError(f"--device {name!r}: not a device (use auto, cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RankoneError(f"--device {name}: CUDA is not available on this machine")
    return device


def named_architecture(name: str) -> dict[str, Any]:
    """open_clip's config for a model name such as `ViT-B-32`, with the name recorded."""
    config = open_clip.get_model_config(name)
    if config is None:
        raise RankoneError(f"unknown open_clip architecture {name!r}; see `open_clip.list_models()`")
    config = copy.deepcopy(config)
    config.setdefault("quick_gelu", False)
    config["name"] = name
    return config


def build_clip(architecture: dict[str, Any]) -> open_clip.CLIP:
    """An open_clip CLIP with random weights for `architecture`."""
    config = {key: value for key, value in architecture.items() if key not in ("name", "custom_text")}
    try:
        model = open_clip.CLIP(**config)
    except TypeError as error:
        raise RankoneError(f"architecture not understood by open_clip: {error}") from None
    return model.eval()


def load_clip(architecture: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> open_clip.CLIP:
    """An open_clip CLIP with `state_dict` loaded strictly (image tower only is allowed)."""
    model = build_clip(architecture)
    expected = model.state_dict()
    missing = [key for key in expected if key not in state_dict]
    only_visual = all(not key.startswith(VISUAL_PREFIX) for key in missing)
    if missing and not only_visual:
        raise RankoneError(f"state dict lacks tensor {missing[0]} (and {len(missing) - 1} more)")
    unexpected = [key for key in state_dict if key not in expected]
    if unexpected:
        raise RankoneError(f"state dict has unexpected tensor {unexpected[0]}")
    for key, tensor in state_dict.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise RankoneError(f"tensor {key}: shape {tuple(tensor.shape)} does not fit the architecture's {tuple(expected[key].shape)}")
    model.load_state_dict(state_dict, strict=False)
    return model


def visual_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The image tower's tensors (keys keep their `visual.` prefix)."""
    return {key: value for key, value in state_dict.items() if key.startswith(VISUAL_PREFIX)}


def tokenizer_for(architecture: dict[str, Any]) -> open_clip.SimpleTokenizer:
    return open_clip.SimpleTokenizer(context_length=architecture["text_cfg"].get("context_length", 77))


def preprocess_for(architecture: dict[str, Any]):
    """open_clip's evaluation transform for the architecture's image size (CLIP's mean/std)."""
    image_size = architecture["vision_cfg"].get("image_size", 224)
    return open_clip.image_transform(image_size, is_train=False)


def count_parameters(tensors: dict[str, torch.Tensor] | nn.Module) -> int:
    if isinstance(tensors, nn.Module):
        return sum(parameter.numel() for parameter in tensors.parameters())
    return sum(tensor.numel() for tensor in tensors.values())
