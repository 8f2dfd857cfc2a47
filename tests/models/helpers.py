"""Shared builders for tests/models."""

from __future__ import annotations

import torch


def vit_digits(**kwargs):
    """The embedded model's architecture, built directly from timm (independent of the registry)."""
    from timm.models.vision_transformer import VisionTransformer

    args = dict(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3, num_classes=10)
    args.update(kwargs)
    return VisionTransformer(**args)


def op_registered(name: str) -> bool:
    try:
        import kernels.torch_ops  # noqa: F401
    except ImportError:
        return False
    return hasattr(torch.ops.shiftadd, name)
