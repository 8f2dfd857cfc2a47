"""Model checkpoints: build a dense model from the config or from a checkpoint's architecture record, and
load the dense and fine-tuned ``weights.pt`` files the training stages write.

A checkpoint is ``{"model": state_dict, "meta": {...}}``. ``meta["architecture"]`` (:func:`architecture`)
names the dense model and its constructor arguments; a fine-tuned checkpoint's meta also holds
:data:`META_KEYS` (assignment, expert costs, reparameterisation options), which is all
:func:`load_finetuned` needs to rebuild it. Profiling, search, export and bench build models through here,
so none of them depends on the training stages.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

import models
from dse.config import Config
from dse.errors import CheckpointError, ConfigError
from models.assignment import Assignment
from models.reparam import reparameterize

META_KEYS = ("architecture", "assignment", "costs", "reparam")  # what a fine-tuned checkpoint's meta holds


def dense_kwargs(name: str, kwargs: Mapping[str, Any], num_classes: int, img_size: Callable[[], int]
                 ) -> dict[str, Any]:
    """Constructor arguments of the dense model ``name``: ``kwargs``, defaulting ``num_classes`` and, for
    ``vit_digits`` (built at the data's image size), ``img_size()``. ``img_size`` is called only for
    ``vit_digits`` or when ``kwargs`` name an image size (where theirs wins)."""
    out = dict(kwargs)
    out.setdefault("num_classes", num_classes)
    if name == "vit_digits" or "img_size" in out:
        out.setdefault("img_size", img_size())
    return out


def build_dense(cfg: Config) -> nn.Module:
    """The dense model named by the config, with the data's class count and image size; a model built for
    another input size than the data's is a :class:`ConfigError` (it would be profiled, compiled and
    benchmarked at a size it was not made for)."""
    model = models.create(cfg.model.name, **dense_kwargs(cfg.model.name, cfg.model.kwargs, cfg.model.num_classes,
                                                         lambda: cfg.data.img_size))
    return _check_input_size(model, cfg.model.name, cfg.data.img_size)


def _check_input_size(model: nn.Module, name: str, img_size: int) -> nn.Module:
    _, h, w = models.input_size(model)
    if (h, w) != (img_size, img_size):
        raise ConfigError(f"{name} is built for {h}x{w} images but data.img_size is {img_size}; set "
                          f"data.img_size={h} (or model.kwargs.img_size={img_size} for a model that can be built "
                          "at that size)")
    return model


def architecture(cfg: Config) -> dict[str, Any]:
    """What identifies the dense architecture inside a checkpoint."""
    return {"name": cfg.model.name, "kwargs": dict(cfg.model.kwargs), "num_classes": cfg.model.num_classes,
            "img_size": cfg.data.img_size}


def build_from_architecture(arch: Mapping[str, Any]) -> nn.Module:
    """The dense model an ``architecture`` record describes (as :func:`architecture` writes)."""
    try:
        kwargs = dense_kwargs(arch["name"], arch.get("kwargs") or {}, arch["num_classes"], lambda: arch["img_size"])
        model = models.create(arch["name"], **kwargs)
        size = int(arch["img_size"])
    except (KeyError, TypeError, AttributeError, ValueError):
        raise CheckpointError(f"checkpoint architecture record {dict(arch)!r} is incomplete; it needs name, "
                              "kwargs, num_classes and img_size") from None
    return _check_input_size(model, arch["name"], size)


def load_dense(cfg: Config, checkpoint: str | Path, model_name: str | None = None
               ) -> tuple[nn.Module, dict[str, Any]]:
    """(dense model with the checkpoint's weights, its architecture record)."""
    obj = models.read_checkpoint(checkpoint)
    arch = (obj.get("meta") or {}).get("architecture") or architecture(cfg)
    name = model_name or cfg.model.name
    if arch.get("name") != name:
        raise CheckpointError(f"checkpoint {checkpoint} holds a '{arch.get('name')}' but the model is '{name}'; "
                              "pass the matching --model or --checkpoint")
    if (obj.get("meta") or {}).get("assignment"):
        raise CheckpointError(f"checkpoint {checkpoint} is a fine-tuned ShiftAddViT; fine-tune from the dense "
                              "weights (dense/weights.pt)")
    model = build_from_architecture(arch)
    models.load_weights(model, checkpoint)
    return model, dict(arch)


def load_finetuned(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the fine-tuned ShiftAddViT from a ``weights.pt`` written by :func:`dse.training.finetune.finetune`: (model in eval
    mode, meta). MoE layers get their recorded expert costs, so the model can also train further."""
    obj = models.read_checkpoint(path)
    meta = obj.get("meta")
    if not isinstance(meta, dict) or any(k not in meta for k in META_KEYS):
        raise CheckpointError(f"{path} is not a fine-tuned ShiftAddViT (its meta lacks "
                              f"{', '.join(k for k in META_KEYS if not isinstance(meta, dict) or k not in meta)}); "
                              "use the weights.pt that `dse finetune` writes")
    state = models.state_dict_of(obj)
    with torch.random.fork_rng(devices=[]):  # building draws initial weights; keep the caller's RNG stream
        dense = build_from_architecture(meta["architecture"])
        provenance = meta.get("cost_provenance") or {}  # older checkpoints did not record it
        costs = {name: {**c, "provenance": provenance[name]} if name in provenance else c
                 for name, c in (meta["costs"] or {}).items()}
        model = reparameterize(dense, Assignment.from_dict(meta["assignment"]), costs=costs or None,
                               **meta["reparam"])
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise CheckpointError(f"{path} does not fit the model its meta describes ({len(missing)} missing, "
                              f"{len(unexpected)} unexpected keys, e.g. {example}); the file is inconsistent")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: {str(exc).splitlines()[0]}") from None
    return model.eval(), meta
