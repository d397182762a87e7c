"""Key conversion from transformers' CLIP layout to open_clip's.

transformers keeps separate q/k/v projections, `fc1`/`fc2`, `layer_norm1/2` and stores the
projections as `nn.Linear` weights (out × in); open_clip packs q/k/v into one `in_proj`,
names the MLP `c_fc`/`c_proj` and multiplies by the projection matrices directly
(in × out), hence the transposes. Both use LayerNorm eps 1e-5, the same attention
scaling and, for text, the same causal mask; pooling agrees as long as the end-of-text
token is the largest id (open_clip pools at argmax, transformers at `eos_token_id`).

Everything here is pure: tensors and dicts in, tensors and dicts out.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from rankone.errors import RankoneError

OPEN_CLIP_LAYER_NORM_EPS = 1e-5
# transformers configs written before transformers#24773 say 2; those models pool at argmax.
LEGACY_EOS_TOKEN_ID = 2

# Per-layer renames; q/k/v are handled apart because three tensors become one.
_LAYER_RENAMES = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_LAYER_KEY = re.compile(r"^encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_QKV = re.compile(r"^self_attn\.(q|k|v)_proj$")

# Which prefixes mark the transformers layout of a state dict.
TRANSFORMERS_PREFIXES = ("vision_model.", "text_model.", "visual_projection.", "text_projection.", "embeddings.", "encoder.", "pre_layrnorm.")


def is_transformers_layout(state_dict: dict[str, torch.Tensor]) -> bool:
    """True when the keys look like transformers' CLIP (with or without `vision_model.`)."""
    return any(key.startswith(TRANSFORMERS_PREFIXES) for key in state_dict)


def _convert_tower(tensors: dict[str, torch.Tensor], tower: str, out_prefix: str) -> dict[str, torch.Tensor]:
    """One transformers tower (keys without `vision_model.`/`text_model.`) → open_clip keys."""
    converted: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _LAYER_KEY.match(key)
        if match:
            index, module, kind = match.groups()
            block = f"{out_prefix}transformer.resblocks.{index}."
            qkv_match = _QKV.match(module)
            if qkv_match:
                qkv.setdefault((index, kind), {})[qkv_match.group(1)] = tensor
                continue
            if module not in _LAYER_RENAMES:
                raise RankoneError(f"tensor {tower}.{key}: not part of a CLIP encoder layer")
            converted[f"{block}{_LAYER_RENAMES[module]}.{kind}"] = tensor
            continue
        converted_key = _tower_key(key, tower, out_prefix)
        if converted_key is None:
            raise RankoneError(f"tensor {tower}.{key}: not part of a CLIP {tower.split('_')[0]} tower")
        converted[converted_key] = tensor
    for (index, kind), parts in qkv.items():
        missing = [name for name in ("q", "k", "v") if name not in parts]
        if missing:
            raise RankoneError(f"tensor {tower}.encoder.layers.{index}.self_attn.{missing[0]}_proj.{kind}: missing")
        converted[f"{out_prefix}transformer.resblocks.{index}.attn.in_proj_{kind}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]], dim=0
        )
    return converted


def _tower_key(key: str, tower: str, out_prefix: str) -> str | None:
    if tower == "vision_model":
        names = {
            "embeddings.class_embedding": "class_embedding",
            "embeddings.patch_embedding.weight": "conv1.weight",
            "embeddings.position_embedding.weight": "positional_embedding",
            "pre_layrnorm.weight": "ln_pre.weight",
            "pre_layrnorm.bias": "ln_pre.bias",
            "post_layernorm.weight": "ln_post.weight",
            "post_layernorm.bias": "ln_post.bias",
        }
    else:
        names = {
            "embeddings.token_embedding.weight": "token_embedding.weight",
            "embeddings.position_embedding.weight": "positional_embedding",
            "final_layer_norm.weight": "ln_final.weight",
            "final_layer_norm.bias": "ln_final.bias",
        }
    return f"{out_prefix}{names[key]}" if key in names else None


def convert_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIP keys (CLIPModel, CLIPVisionModel[WithProjection], bare vision
    transformer without `vision_model.`) → open_clip keys. `position_ids` buffers are dropped."""
    vision: dict[str, torch.Tensor] = {}
    text: dict[str, torch.Tensor] = {}
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if key.endswith("position_ids"):
            continue
        if key.startswith("vision_model."):
            vision[key[len("vision_model."):]] = tensor
        elif key.startswith("text_model."):
            text[key[len("text_model."):]] = tensor
        elif key == "visual_projection.weight":
            converted["visual.proj"] = tensor.t()
        elif key == "text_projection.weight":
            converted["text_projection"] = tensor.t()
        elif key == "logit_scale":
            converted["logit_scale"] = tensor.reshape(())
        elif key.startswith(("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.")):
            # A bare CLIPVisionTransformer saved on its own: the image tower without prefix.
            vision[key] = tensor
        else:
            raise RankoneError(f"tensor {key}: not part of a transformers CLIP model")
    converted.update(_convert_tower(vision, "vision_model", "visual."))
    converted.update(_convert_tower(text, "text_model", ""))
    return converted


def _vision_cfg(vision: dict[str, Any]) -> dict[str, Any]:
    width = int(vision["hidden_size"])
    heads = int(vision["num_attention_heads"])
    if width % heads:
        raise RankoneError(f"config.json: vision hidden_size {width} is not divisible by num_attention_heads {heads}")
    return {
        "image_size": int(vision["image_size"]),
        "patch_size": int(vision["patch_size"]),
        "width": width,
        "layers": int(vision["num_hidden_layers"]),
        "head_width": width // heads,
        "mlp_ratio": float(vision["intermediate_size"]) / width,
    }


def _text_cfg(text: dict[str, Any]) -> dict[str, Any]:
    vocab_size = int(text["vocab_size"])
    eos = text.get("eos_token_id", vocab_size - 1)
    if eos not in (LEGACY_EOS_TOKEN_ID, vocab_size - 1):
        # open_clip pools at the largest token id; another end-of-text id would pool elsewhere.
        raise RankoneError(f"config.json: text eos_token_id {eos} is not the last vocabulary id ({vocab_size - 1})")
    return {
        "context_length": int(text["max_position_embeddings"]),
        "vocab_size": vocab_size,
        "width": int(text["hidden_size"]),
        "heads": int(text["num_attention_heads"]),
        "layers": int(text["num_hidden_layers"]),
        "mlp_ratio": float(text["intermediate_size"]) / int(text["hidden_size"]),
    }


def _activation(sub_configs: list[dict[str, Any]]) -> bool:
    """quick_gelu for the whole model; open_clip has one switch, so the towers must agree."""
    acts = {config.get("hidden_act", "quick_gelu") for config in sub_configs}
    unsupported = acts - {"quick_gelu", "gelu"}
    if unsupported:
        raise RankoneError(f"config.json: hidden_act {sorted(unsupported)[0]!r} has no open_clip equivalent (quick_gelu or gelu)")
    if len(acts) > 1:
        raise RankoneError("config.json: the image and text towers use different hidden_act; open_clip needs one")
    for config in sub_configs:
        eps = float(config.get("layer_norm_eps", OPEN_CLIP_LAYER_NORM_EPS))
        if abs(eps - OPEN_CLIP_LAYER_NORM_EPS) > 1e-12:
            raise RankoneError(f"config.json: layer_norm_eps {eps} differs from open_clip's {OPEN_CLIP_LAYER_NORM_EPS}")
    return acts == {"quick_gelu"}


def architecture_from_config(config: dict[str, Any]) -> dict[str, Any]:
    """The open_clip architecture dict of a transformers CLIP `config.json`.

    A CLIPVisionModel config has no text tower; its `text_cfg` is None and only the image
    tower can be built from it (fine for experts, which are compared with the base).
    """
    model_type = config.get("model_type")
    if model_type == "clip":
        vision, text = config.get("vision_config") or {}, config.get("text_config") or {}
        try:
            architecture = {
                "embed_dim": int(config.get("projection_dim", 512)),
                "quick_gelu": _activation([vision, text]),
                "vision_cfg": _vision_cfg(vision),
                "text_cfg": _text_cfg(text),
            }
        except KeyError as error:
            raise RankoneError(f"config.json: missing field {error.args[0]!r}") from None
        return architecture
    if model_type == "clip_vision_model":
        try:
            return {
                "embed_dim": int(config.get("projection_dim", 512)),
                "quick_gelu": _activation([config]),
                "vision_cfg": _vision_cfg(config),
                "text_cfg": None,
            }
        except KeyError as error:
            raise RankoneError(f"config.json: missing field {error.args[0]!r}") from None
    raise RankoneError(f"config.json: model_type {model_type!r} is not a CLIP model (expected 'clip' or 'clip_vision_model')")


def transformers_to_open_clip(
    state_dict: dict[str, torch.Tensor], config: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(architecture, open_clip state dict) of a transformers CLIP state dict and its config."""
    return architecture_from_config(config), convert_state_dict(state_dict)


# ---- the reverse: open_clip → transformers (export) ----------------------------------------

# The open_clip settings a transformers CLIPModel can express; any other setting (layer scale,
# attentional pooling, a timm or HF text tower) changes the computation and is refused.
_PLAIN_VISION = {"image_size", "patch_size", "width", "layers", "head_width", "mlp_ratio"}
_PLAIN_TEXT = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}
_PLAIN_MODEL = {"embed_dim", "quick_gelu", "vision_cfg", "text_cfg", "name"}


def _plain(settings: dict[str, Any], allowed: set[str], where: str) -> None:
    extra = sorted(set(settings) - allowed)
    if extra:
        raise RankoneError(f"architecture {where}{extra[0]}: transformers' CLIPModel has no equivalent; export with --format open_clip")


def config_from_architecture(architecture: dict[str, Any]) -> dict[str, Any]:
    """The transformers `config.json` of a CLIPModel with `architecture` (the inverse of `architecture_from_config`)."""
    _plain(architecture, _PLAIN_MODEL, "")
    vision, text = architecture["vision_cfg"], architecture.get("text_cfg")
    if not text:
        raise RankoneError("architecture has no text tower; a transformers CLIPModel needs one")
    _plain(vision, _PLAIN_VISION, "vision_cfg.")
    _plain(text, _PLAIN_TEXT, "text_cfg.")
    activation = "quick_gelu" if architecture.get("quick_gelu", False) else "gelu"
    vision_width, text_width = int(vision["width"]), int(text["width"])
    vocab_size = int(text.get("vocab_size", 49408))
    vision_config = {
        "hidden_size": vision_width, "intermediate_size": int(vision_width * float(vision.get("mlp_ratio", 4.0))),
        "num_hidden_layers": int(vision["layers"]), "num_attention_heads": vision_width // int(vision.get("head_width", 64)),
        "image_size": int(vision["image_size"]), "patch_size": int(vision["patch_size"]), "num_channels": 3,
        "hidden_act": activation, "layer_norm_eps": OPEN_CLIP_LAYER_NORM_EPS, "projection_dim": int(architecture["embed_dim"]),
        "model_type": "clip_vision_model",
    }
    text_config = {
        "hidden_size": text_width, "intermediate_size": int(text_width * float(text.get("mlp_ratio", 4.0))),
        "num_hidden_layers": int(text["layers"]), "num_attention_heads": int(text.get("heads", 8)),
        "max_position_embeddings": int(text.get("context_length", 77)), "vocab_size": vocab_size,
        "hidden_act": activation, "layer_norm_eps": OPEN_CLIP_LAYER_NORM_EPS, "projection_dim": int(architecture["embed_dim"]),
        # open_clip pools at the largest token id, which is CLIP's end-of-text token.
        "bos_token_id": vocab_size - 2, "eos_token_id": vocab_size - 1, "pad_token_id": 1, "model_type": "clip_text_model",
    }
    return {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": int(architecture["embed_dim"]),
            "logit_scale_init_value": 2.6592, "vision_config": vision_config, "text_config": text_config}


_OPEN_CLIP_LAYER = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$")
_OPEN_CLIP_QKV = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$")
_REVERSE_RENAMES = {value: key for key, value in _LAYER_RENAMES.items()}
_TOWER_KEYS = {
    "vision_model": ("embeddings.class_embedding", "embeddings.patch_embedding.weight", "embeddings.position_embedding.weight",
                     "pre_layrnorm.weight", "pre_layrnorm.bias", "post_layernorm.weight", "post_layernorm.bias"),
    "text_model": ("embeddings.token_embedding.weight", "embeddings.position_embedding.weight",
                   "final_layer_norm.weight", "final_layer_norm.bias"),
}
# open_clip key → transformers key for the tensors outside the encoder layers, from the forward table.
_REVERSE_TOWER_KEYS = {_tower_key(key, tower, "visual." if tower == "vision_model" else ""): f"{tower}.{key}"
                       for tower, keys in _TOWER_KEYS.items() for key in keys}


def open_clip_to_transformers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip CLIP keys → transformers CLIPModel keys (the inverse of `convert_state_dict` on a whole CLIP)."""
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        tower = "vision_model" if key.startswith("visual.") else "text_model"
        packed, layer = _OPEN_CLIP_QKV.match(key), _OPEN_CLIP_LAYER.match(key)
        if packed:
            _, index, kind = packed.groups()
            for name, part in zip(("q", "k", "v"), tensor.chunk(3, dim=0)):
                converted[f"{tower}.encoder.layers.{index}.self_attn.{name}_proj.{kind}"] = part.contiguous()
        elif layer and layer.group(3) in _REVERSE_RENAMES:
            _, index, module, kind = layer.groups()
            converted[f"{tower}.encoder.layers.{index}.{_REVERSE_RENAMES[module]}.{kind}"] = tensor
        elif key == "visual.proj":
            converted["visual_projection.weight"] = tensor.t().contiguous()
        elif key == "text_projection":
            converted["text_projection.weight"] = tensor.t().contiguous()
        elif key == "logit_scale":
            converted["logit_scale"] = tensor.reshape(())
        elif key in _REVERSE_TOWER_KEYS:
            converted[_REVERSE_TOWER_KEYS[key]] = tensor
        else:
            raise RankoneError(f"tensor {key}: not part of a plain CLIP model; export with --format open_clip")
    return converted
