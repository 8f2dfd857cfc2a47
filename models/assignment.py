"""Per-layer assignment: which attention is Hamming and which Linear multiplies, shifts or mixes both.

Layers are named by their module path, as the layer inventory names them:

* timm ViT / DeiT: attention ``blocks.{i}.attn`` in {msa, hamming}; Linears ``blocks.{i}.attn.qkv``,
  ``blocks.{i}.attn.proj``, ``blocks.{i}.mlp.fc1``, ``blocks.{i}.mlp.fc2`` in {mult, shift, moe};
* timm PVTv2: attention ``stages.{s}.blocks.{i}.attn``; Linears ``stages.{s}.blocks.{i}.attn.q``,
  ``.attn.kv``, ``.attn.proj``, ``.mlp.fc1``, ``.mlp.fc2``. Hamming attention keeps PVT's spatial reduction
  (see :class:`models.hamming.PvtHammingAttention`), so it is valid in every stage.

A layer the assignment does not name keeps its dense form (msa / mult). ``capacity`` optionally fixes the
Mult share of MoE layers for static-capacity inference (export); see :mod:`models.moe`.

YAML layout (``to_yaml``/``from_yaml``)::

    attention: {blocks.0.attn: hamming, ...}
    linear: {blocks.0.attn.qkv: moe, blocks.0.mlp.fc1: shift, ...}
    capacity: {blocks.0.attn.qkv: 0.25, ...}
"""

from __future__ import annotations

import math
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from models.errors import AssignmentError, ModelError

ATTENTION_CHOICES = ("msa", "hamming")
LINEAR_CHOICES = ("mult", "shift", "moe")
DENSE = {"attention": "msa", "linear": "mult"}
_SECTIONS = ("attention", "linear", "capacity")

_VIT_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
_PVT_LINEARS = ("attn.q", "attn.kv", "attn.proj", "mlp.fc1", "mlp.fc2")


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def layer_kinds(model: nn.Module) -> dict[str, str]:
    """{layer name: "attention" | "linear"} in model order, for timm ViT/DeiT and PVTv2 (also after
    reparameterisation: names do not change)."""
    out: dict[str, str] = {}
    if isinstance(getattr(model, "stages", None), nn.Module) and _has(model, "stages.0.blocks.0.attn.kv"):
        for s, stage in enumerate(model.stages):
            for i, _ in enumerate(stage.blocks):
                prefix = f"stages.{s}.blocks.{i}"
                out[f"{prefix}.attn"] = "attention"
                out.update({f"{prefix}.{p}": "linear" for p in _PVT_LINEARS if _has(model, f"{prefix}.{p}")})
        return out
    if isinstance(getattr(model, "blocks", None), nn.Module) and _has(model, "blocks.0.attn.qkv"):
        for i, _ in enumerate(model.blocks):
            out[f"blocks.{i}.attn"] = "attention"
            out.update({f"blocks.{i}.{p}": "linear" for p in _VIT_LINEARS if _has(model, f"blocks.{i}.{p}")})
        return out
    raise ModelError(f"cannot reparameterise a {type(model).__name__}: supported are timm VisionTransformer "
                     "(ViT/DeiT, blocks.i.attn.qkv) and PyramidVisionTransformerV2 (stages.s.blocks.i.attn.q/kv)")


def _choices(kind: str) -> tuple[str, ...]:
    return ATTENTION_CHOICES if kind == "attention" else LINEAR_CHOICES


@dataclass
class Assignment:
    """Choices per layer name; see the module docstring. Choices are checked on construction, layer
    names against a model by :meth:`validate` (``reparameterize`` calls it)."""

    attention: dict[str, str] = field(default_factory=dict)
    linear: dict[str, str] = field(default_factory=dict)
    capacity: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for kind in ("attention", "linear"):
            section = getattr(self, kind)
            if not isinstance(section, dict):
                raise AssignmentError(f"assignment '{kind}' must be a mapping of layer name to choice")
            for name, choice in section.items():
                if choice not in _choices(kind):
                    raise AssignmentError(f"invalid {kind} choice '{choice}' for layer '{name}'; valid choices: "
                                          f"{', '.join(_choices(kind))}")
        if not isinstance(self.capacity, dict):
            raise AssignmentError("assignment 'capacity' must be a mapping of MoE layer name to a Mult share")
        for name, value in self.capacity.items():
            if self.linear.get(name) != "moe":
                raise AssignmentError(f"capacity given for layer '{name}', which is not assigned 'moe'")
            if isinstance(value, bool) or not isinstance(value, int | float) or not (
                    math.isfinite(value) and 0 <= value <= 1):
                raise AssignmentError(f"capacity {value!r} for layer '{name}' must be a number in [0, 1]")

    # ---- model-dependent ------------------------------------------------------------------------------
    @staticmethod
    def layers(model: nn.Module) -> dict[str, tuple[str, ...]]:
        """{valid layer name: valid choices} for ``model``."""
        return {name: _choices(kind) for name, kind in layer_kinds(model).items()}

    @classmethod
    def uniform(cls, model: nn.Module, attention: str = "msa", linear: str = "mult") -> Assignment:
        """The same choice for every attention and every Linear of ``model``."""
        kinds = layer_kinds(model)
        return cls(attention={n: attention for n, k in kinds.items() if k == "attention"},
                   linear={n: linear for n, k in kinds.items() if k == "linear"})

    def validate(self, model: nn.Module) -> None:
        """Raise :class:`AssignmentError` naming the valid layers if a layer is unknown for ``model``."""
        kinds = layer_kinds(model)
        for kind in ("attention", "linear"):
            valid = [n for n, k in kinds.items() if k == kind]
            unknown = [n for n in getattr(self, kind) if n not in valid]
            if unknown:
                raise AssignmentError(f"unknown {kind} layer(s) {', '.join(unknown)} for {type(model).__name__}; "
                                      f"valid {kind} layers: {', '.join(valid)}")

    def choice(self, name: str, kind: str) -> str:
        """The choice for ``name`` (the dense default when unnamed)."""
        return getattr(self, kind).get(name, DENSE[kind])

    def is_dense(self) -> bool:
        """True when every listed layer keeps its dense choice: the model as it is, nothing to fine-tune."""
        return all(self.choice(n, k) == DENSE[k] for k in ("attention", "linear") for n in getattr(self, k))

    def counts(self) -> dict[str, int]:
        """How many named layers take each choice."""
        return dict(Counter(self.attention.values()) + Counter(self.linear.values()))

    # ---- serialisation --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {"attention": dict(self.attention), "linear": dict(self.linear), "capacity": dict(self.capacity)}

    @classmethod
    def from_dict(cls, data: Any) -> Assignment:
        if not isinstance(data, dict):
            raise AssignmentError(f"an assignment is a mapping with keys {', '.join(_SECTIONS)}; got "
                                  f"{type(data).__name__}")
        unknown = sorted(set(data) - set(_SECTIONS))
        if unknown:
            raise AssignmentError(f"unknown assignment key(s) {', '.join(map(str, unknown))}; valid keys: "
                                  f"{', '.join(_SECTIONS)}")
        sections = {}
        for key in _SECTIONS:
            value = data.get(key) or {}
            if not isinstance(value, dict):
                raise AssignmentError(f"assignment '{key}' must be a mapping of layer name to value")
            sections[key] = {str(k): v for k, v in value.items()}
        return cls(**sections)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Assignment:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise AssignmentError(f"cannot read assignment file {path} ({exc.strerror}); check the path") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            first = str(exc).splitlines()[0] if str(exc) else "syntax error"
            raise AssignmentError(f"assignment file {path} is not valid YAML ({first})") from None
        return cls.from_dict(data)

    def to_yaml(self, path: str | Path) -> Path:
        """Write atomically (temporary file in the same folder, then ``os.replace``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as fh:
                yaml.safe_dump(self.to_dict(), fh, sort_keys=False)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path
