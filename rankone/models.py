"""Architectures as data, and the open_clip modules built from them.

An architecture is an open_clip model config (`embed_dim`, `vision_cfg`, `text_cfg`,
`quick_gelu`), the same JSON open_clip keeps in `model_configs/`. Every state dict in a
workspace uses open_clip's key layout (`visual.transformer.resblocks.0.mlp.c_fc.weight`).
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from rankone.errors import RankoneError


class LazyModule:
    """A module imported when one of its attributes is first used.

    open_clip's package import (and the transformers and torchvision it pulls in) is most of
    the CLI's start-up; `rankone --help` and the commands that never build a model skip it.
    Unlike importlib's LazyLoader this stays out of `sys.modules`: code that walks every loaded
    module (inspect.getmodule, run by torch's own imports) would otherwise trigger the import
    halfway through another package's import and break it.
    """

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attribute: str) -> Any:
        return getattr(importlib.import_module(self._name), attribute)


def lazy_module(name: str) -> Any:
    """`name` itself when already imported, else a `LazyModule` for it."""
    return sys.modules[name] if name in sys.modules else LazyModule(name)


open_clip = lazy_module("open_clip")

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
    if device.type not in ("cpu", "cuda", "mps"):
        raise RankoneError(f"--device {name}: not a device rankone computes on (use auto, cpu, cuda, cuda:N or mps)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RankoneError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise RankoneError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise RankoneError(f"--device {name}: MPS (Apple's GPU backend) is not available on this machine")
    return device


# Names the CLI takes for floating-point precisions.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FULL_PRECISION = "fp32"


def resolve_dtype(dtype: str | torch.dtype, option: str = "--dtype") -> torch.dtype:
    """`fp32`, `fp16`, `bf16` (or the torch dtype itself) → torch dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise RankoneError(f"{option} {dtype}: expected one of {', '.join(DTYPES)}")
        return dtype
    if dtype not in DTYPES:
        raise RankoneError(f"{option} {dtype!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in DTYPES.items() if value == dtype)


@contextlib.contextmanager
def dtype_support(dtype: torch.dtype, device: torch.device | str):
    """Turns torch's "not implemented for 'Half'" (an op this device lacks in `dtype`) into a RankoneError."""
    try:
        yield
    except (RuntimeError, NotImplementedError) as error:
        if "not implemented for" not in str(error) and "not supported" not in str(error):
            raise
        first_line = str(error).splitlines()[0]
        raise RankoneError(f"--dtype {dtype_name(dtype)}: not supported on {device} by this torch ({first_line}); use bf16 or fp32") from None


class PrecisionEncoder(nn.Module):
    """An image encoder run in `dtype` whose embeddings come back in fp32.

    Only the encoder runs in half precision. Heads and logits stay fp32: logits are up to 100·cos,
    so bf16's 8-bit mantissa in the head product alone would move them by up to ~0.4, enough
    to swap near-tied classes, and that product costs nothing next to the encoder.
    """

    def __init__(self, encoder: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.encoder = encoder.to(dtype)
        self.compute_dtype = dtype

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with dtype_support(self.compute_dtype, images.device):
            return self.encoder(images.to(self.compute_dtype)).float()


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


def check_state_dict(
    state_dict: dict[str, torch.Tensor],
    expected: dict[str, torch.Tensor],
    *,
    prefix: str = "",
    may_lack: Callable[[str], bool] = lambda key: False,
) -> None:
    """Every expected tensor is there (except those `may_lack` excuses), none is unexpected, every shape fits.

    `prefix` is put before names in messages so they read as the file's keys.
    """
    missing = [key for key in expected if key not in state_dict]
    if missing and not all(may_lack(key) for key in missing):
        raise RankoneError(f"state dict lacks tensor {prefix}{missing[0]} (and {len(missing) - 1} more)")
    for key, tensor in state_dict.items():
        if key not in expected:
            raise RankoneError(f"state dict has unexpected tensor {prefix}{key}")
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise RankoneError(f"tensor {prefix}{key}: shape {tuple(tensor.shape)} does not fit the architecture's {tuple(expected[key].shape)}")


def load_clip(architecture: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> open_clip.CLIP:
    """An open_clip CLIP with `state_dict` loaded strictly (image tower only is allowed)."""
    model = build_clip(architecture)
    check_state_dict(state_dict, model.state_dict(), may_lack=lambda key: not key.startswith(VISUAL_PREFIX))
    model.load_state_dict(state_dict, strict=False)
    return model


def build_visual(architecture: dict[str, Any]) -> nn.Module:
    """open_clip's image tower alone (no text tower) for an architecture dict."""
    try:
        return open_clip.model._build_vision_tower(architecture["embed_dim"], copy.deepcopy(architecture["vision_cfg"]), architecture.get("quick_gelu", False)).eval()
    except (TypeError, KeyError) as error:
        raise RankoneError(f"architecture not understood by open_clip: {error}") from None


def load_visual(architecture: dict[str, Any], visual: dict[str, torch.Tensor]) -> nn.Module:
    """The image tower alone with the `visual.*` tensors of `visual` loaded strictly (other keys are ignored).

    A tower built on the meta device (for counting) takes the tensors themselves instead of copies.
    """
    tower = build_visual(architecture)
    state = {key.removeprefix(VISUAL_PREFIX): value for key, value in visual.items() if key.startswith(VISUAL_PREFIX)}
    expected = tower.state_dict()
    check_state_dict(state, expected, prefix=VISUAL_PREFIX)
    tower.load_state_dict(state, strict=True, assign=next(iter(expected.values())).is_meta)
    return tower


def visual_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The image tower's tensors (keys keep their `visual.` prefix)."""
    return {key: value for key, value in state_dict.items() if key.startswith(VISUAL_PREFIX)}


def tokenizer_for(architecture: dict[str, Any]) -> open_clip.SimpleTokenizer:
    return open_clip.SimpleTokenizer(context_length=architecture["text_cfg"].get("context_length", 77))


def preprocess_for(architecture: dict[str, Any]):
    """open_clip's evaluation transform for the architecture's image size (CLIP's mean/std)."""
    image_size = architecture["vision_cfg"].get("image_size", 224)
    return open_clip.image_transform(image_size, is_train=False)


def open_clip_config(architecture: dict[str, Any]) -> dict[str, Any]:
    """open_clip's `open_clip_config.json` for `architecture`: the model config, its evaluation
    preprocessing (CLIP's normalization, as `preprocess_for` uses) and its name."""
    config = {
        "model_cfg": {key: value for key, value in architecture.items() if key != "name"},
        "preprocess_cfg": {"image_size": architecture["vision_cfg"].get("image_size", 224),
                           "mean": list(open_clip.constants.OPENAI_DATASET_MEAN), "std": list(open_clip.constants.OPENAI_DATASET_STD),
                           "interpolation": "bicubic", "resize_mode": "shortest"},
    }
    if "name" in architecture:
        config["model_name"] = architecture["name"]
    return config


def count_parameters(tensors: dict[str, torch.Tensor] | nn.Module) -> int:
    if isinstance(tensors, nn.Module):
        return sum(parameter.numel() for parameter in tensors.parameters())
    return sum(tensor.numel() for tensor in tensors.values())
