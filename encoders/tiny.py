"""Tiny image checkpoints with random weights, for tests and the demo (no model hub here).

Each is saved as a Hugging Face folder (``config.json``, safetensors, processor config), so it
loads through ``ImageEncoder.from_pretrained`` exactly as a real checkpoint does, and
``fusion/pretrain.py`` fine-tunes it from there.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import ResNetConfig, ResNetModel, ViTConfig, ViTModel


def build_tiny_cnn(
    path: Path,
    *,
    seed: int = 0,
    image_size: int = 224,
    hidden_sizes: Sequence[int] = (16, 32, 64),
) -> Path:
    """A 3-stage ResNet (about 100k weights), random weights, with a plain-resize processor (to
    image_size square, ImageNet mean/std).

    Three stages, not the usual four: the last feature map is 14x14 at 224, not 7x7, so Grad-CAM
    can tell a lateral pneumothorax rim or a basal effusion from the chest wall next to it; it
    also trained to a lower validation loss than 8-16-24-32 or 16-32-64-128 on the synthetic
    cohort (``docs/results/explain.md``).

    No centre crop, unlike ResNet's own processor (crop_pct 0.875): on a chest film the crop
    removes the costophrenic angles and the apices, exactly where effusions and pneumothoraces
    sit, so the model could neither learn nor show them there."""
    from transformers.models.vit import ViTImageProcessorPil

    torch.manual_seed(seed)
    config = ResNetConfig(
        embedding_size=int(hidden_sizes[0]),
        hidden_sizes=[int(h) for h in hidden_sizes],
        depths=[1] * len(hidden_sizes),
        layer_type="basic",
    )
    ResNetModel(config).save_pretrained(path)
    ViTImageProcessorPil(
        size={"height": image_size, "width": image_size},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(path)
    return path


def build_tiny_vit(path: Path, *, seed: int = 0, image_size: int = 224) -> Path:
    """A 2-layer ViT (hidden 32, patch 16), random weights, with ViT's processor (resize to
    image_size square, mean/std 0.5)."""
    from transformers.models.vit import ViTImageProcessorPil

    torch.manual_seed(seed)
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=image_size,
        patch_size=16,
    )
    ViTModel(config).save_pretrained(path)
    ViTImageProcessorPil(size={"height": image_size, "width": image_size}).save_pretrained(path)
    return path
