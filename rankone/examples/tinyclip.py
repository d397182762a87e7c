"""A tiny CLIP for the example suite, pretrained contrastively on its image–caption pairs.

The architecture is an ordinary open_clip model config (a ViT image tower and a text
transformer with open_clip's 49408-token vocabulary, since `SimpleTokenizer` is used), so
every stage treats it exactly like a real CLIP: zero-shot heads come from its text tower.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image

from rankone import numerics
from rankone.examples.recipes import TINY_CLIP
from rankone.models import build_clip, preprocess_for, tokenizer_for



def tiny_clip_architecture(**vision_overrides: Any) -> dict[str, Any]:
    architecture = copy.deepcopy(TINY_CLIP)
    architecture["vision_cfg"].update(vision_overrides)
    return architecture


def images_to_tensor(images: np.ndarray, architecture: dict[str, Any]) -> torch.Tensor:
    """uint8 (n, H, W, 3) → the model's input, through the same transform `rankone eval` applies to PNGs."""
    transform = preprocess_for(architecture)
    return torch.stack([transform(Image.fromarray(image)) for image in images])


def soft_clip_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor, caption_ids: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE whose target spreads evenly over every pair with the same caption."""
    logits = logit_scale * image_features @ text_features.T
    same = (caption_ids[:, None] == caption_ids[None, :]).float()
    targets = same / same.sum(dim=1, keepdim=True)
    image_loss = -(targets * logits.log_softmax(dim=1)).sum(dim=1).mean()
    text_loss = -(targets * logits.T.log_softmax(dim=1)).sum(dim=1).mean()
    return (image_loss + text_loss) / 2


def pretrain_clip(
    architecture: dict[str, Any],
    images: torch.Tensor,
    captions: list[str],
    steps: int,
    batch_size: int = 256,
    lr: float = 2e-3,
    seed: int = 0,
    device: torch.device | str = "cpu",
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Contrastive pretraining (open_clip.ClipLoss) from a seeded random init.

    Returns the full CLIP state dict (both towers) and the loss per step.
    """
    torch.manual_seed(seed)
    model = build_clip(architecture).to(device).train()
    tokens = tokenizer_for(architecture)(captions)
    # Captions repeat (a template and a class name), so pairs that share a caption are all
    # positives: a soft InfoNCE target instead of open_clip.ClipLoss's identity.
    _, caption_ids = np.unique(np.asarray(captions), return_inverse=True)
    caption_ids = torch.as_tensor(caption_ids)
    optimizer = numerics.adam(model.parameters(), device, decoupled=True, lr=lr, weight_decay=0.1, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))
    )
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        batch = torch.randint(len(images), (batch_size,), generator=generator)
        # The model's own forward takes the scale's exp with torch.exp, which differs by CPU vendor.
        image_features = model.encode_image(images[batch].to(device), normalize=True)
        text_features = model.encode_text(tokens[batch].to(device), normalize=True)
        loss = soft_clip_loss(image_features, text_features, numerics.exp(model.logit_scale), caption_ids[batch].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
    model.eval()
    return {key: value.detach().cpu().clone() for key, value in model.state_dict().items()}, losses
