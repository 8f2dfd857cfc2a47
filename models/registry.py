"""Model registry: our embedded models by name, any timm model otherwise.

As in timm (``create_model``/``register_model``), a name maps to an entrypoint that merges its own
architecture arguments with the caller's keyword overrides; ``None`` overrides are dropped so CLI
defaults never clobber a model's own defaults.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from kernels.errors import UnknownNameError
from models.errors import CheckpointError, ModelError

log = logging.getLogger(__name__)

_ENTRYPOINTS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    _ENTRYPOINTS[fn.__name__] = fn
    return fn


def names() -> list[str]:
    """Our registered models (any timm model name is accepted by :func:`create` too)."""
    return sorted(_ENTRYPOINTS)


@register_model
def vit_digits(**kwargs: Any) -> nn.Module:
    """The embedded default: a small timm ViT for 32x32 digit images (4x4 patches -> 64 tokens + cls).

    Width 96, depth 4, 3 heads: a model for the small digits data set (:mod:`dse.training.data`).
    """
    from timm.models.vision_transformer import VisionTransformer

    args = dict(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3, mlp_ratio=4.0, num_classes=10)
    args.update(kwargs)
    return VisionTransformer(**args)


def check_name(name: str) -> None:
    """UnknownNameError unless ``name`` is registered here or in timm (checked without building anything)."""
    if name in _ENTRYPOINTS or timm.is_model(name):
        return
    raise UnknownNameError(
        f"unknown model '{name}'; use one of {', '.join(names())} or a timm model name "
        "(python -c 'import timm; print(timm.list_models())')"
    )


def create(name: str, **kwargs: Any) -> nn.Module:
    """Build a model by registered or timm name, never downloading weights."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    check_name(name)
    if name in _ENTRYPOINTS:
        return _ENTRYPOINTS[name](**kwargs)
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as exc:
        raise ModelError(f"model '{name}' rejected its arguments {kwargs}: {exc}") from None


def input_size(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) the model was built for: timm's ``patch_embed.img_size``, else its pretrained config."""
    pe = getattr(model, "patch_embed", None)
    size = getattr(pe, "img_size", None)
    proj = getattr(pe, "proj", None)
    chans = getattr(proj, "in_channels", None)
    if size is not None:
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (int(chans or 3), int(h), int(w))
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    if "input_size" in cfg:
        c, h, w = cfg["input_size"]
        return (int(chans or c), int(h), int(w))
    raise ModelError(f"cannot tell the input size of a {type(model).__name__}; pass input_size=(C, H, W)")


def read_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint file safely (``weights_only=True``); returns the raw object as a dict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; run `dse pretrain` or fix model.checkpoint")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated files raise a variety of errors from the zip/pickle layers
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"checkpoint {path} cannot be read ({first}); it may be truncated or not a "
                              "PyTorch file") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} does not hold a state dict")
    return obj


def state_dict_of(obj: dict) -> dict[str, torch.Tensor]:
    """Accept both a bare state dict and our ``{"model": state_dict, ...}`` training checkpoints."""
    state = obj.get("model", obj)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError("checkpoint holds no model state dict")
    return state


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load weights strictly; a checkpoint of another architecture is a one-line error."""
    state = state_dict_of(read_checkpoint(path))
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if mismatched:
            k = mismatched[0]
            parts.append(f"{len(mismatched)} with other shapes (e.g. {k}: {tuple(state[k].shape)} vs "
                         f"{tuple(own[k].shape)})")
        raise CheckpointError(f"checkpoint {path} does not fit this model: {'; '.join(parts)}; "
                              "was it made for another architecture or assignment?")
    model.load_state_dict(state)
    return model


def load_resized(model: nn.Module, source: nn.Module) -> nn.Module:
    """Copy ``source``'s weights into ``model``, the same architecture built for another image size: the
    absolute position embedding is resampled (bicubic, timm's ``resample_abs_pos_embed``) from the source's
    patch grid to the model's — how a ViT trained at one resolution is fine-tuned at another (Dosovitskiy et
    al., ICLR 2021, sec. 3.2)."""
    from timm.layers import resample_abs_pos_embed

    state = dict(source.state_dict())
    old_grid, new_grid = (getattr(getattr(m, "patch_embed", None), "grid_size", None) for m in (source, model))
    if "pos_embed" in state and old_grid is not None and new_grid is not None:
        prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 0))
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], list(new_grid), list(old_grid),
                                                    num_prefix_tokens=prefix)
    mismatched = [k for k, v in model.state_dict().items() if k in state and v.shape != state[k].shape]
    if mismatched or state.keys() != model.state_dict().keys():
        raise ModelError(f"cannot resize {type(source).__name__} weights into this model "
                         f"({mismatched[0] if mismatched else 'other parameter names'}): not the same architecture")
    model.load_state_dict(state)
    return model
