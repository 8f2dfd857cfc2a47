"""Apply an :class:`~models.assignment.Assignment` to a timm ViT/DeiT or PVTv2: the ShiftAddViT model.

``reparameterize`` deep-copies the model and swaps modules in the copy:

* Linear ``shift`` -> :class:`ShiftLinear` from the dense weights; ``moe`` -> :class:`MoELinear` whose
  two experts start from the dense weights, with expert costs and their provenance from ``costs`` (see
  :mod:`models.costs`;
  ``costs=None`` is for inference or loading only — the balance loss then refuses to run);
* attention ``hamming`` -> :class:`HammingAttention` (ViT) or :class:`PvtHammingAttention` (PVTv2), which
  reuse the (possibly already converted) projection modules, so names and state-dict keys of the
  projections are unchanged.

The hash of each Hamming layer starts as a random orthogonal projection seeded from ``seed`` and the layer
name (reproducible); call :func:`models.hamming.fit_hamming` on a batch before fine-tuning to fit it.
"""

from __future__ import annotations

import copy
import logging
import zlib

from torch import nn

from models.assignment import Assignment, layer_kinds
from models.costs import ExpertCosts, expert_costs, expert_provenance
from models.errors import ModelError
from models.hamming import HammingAttention, PvtHammingAttention
from models.moe import DEFAULT_GATE, MoELinear, moe_layers
from models.shift import ShiftLinear

log = logging.getLogger(__name__)


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def _is_dense_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear)  # ShiftLinear / MoELinear are not nn.Linear subclasses


def _convert_linear(module: nn.Module, name: str, choice: str, *, weight_bits: int, frac_bits: int,
                    gate: str) -> nn.Module:
    target = {"mult": nn.Linear, "shift": ShiftLinear, "moe": MoELinear}[choice]
    if isinstance(module, target):
        return module  # already in the requested form: idempotent
    if not _is_dense_linear(module):
        raise ModelError(f"layer '{name}' is a {type(module).__name__} and cannot become '{choice}'; "
                         "reparameterize the dense model instead")
    if choice == "shift":
        return ShiftLinear.from_linear(module, weight_bits=weight_bits, frac_bits=frac_bits)
    return MoELinear.from_linear(module, layer_name=name, weight_bits=weight_bits, frac_bits=frac_bits,
                                 gate=gate)


def _convert_attention(module: nn.Module, name: str, choice: str, *, nbits: int, seed: int) -> nn.Module:
    if isinstance(module, HammingAttention):
        if choice == "hamming":
            return module
        raise ModelError(f"layer '{name}' is already Hamming attention and cannot become 'msa'; "
                         "reparameterize the dense model instead")
    if choice == "msa":
        return module
    layer_seed = zlib.crc32(f"{seed}:{name}".encode()) & 0x7FFFFFFF
    if hasattr(module, "qkv"):
        return HammingAttention.from_timm(module, nbits=nbits, seed=layer_seed)
    if hasattr(module, "q") and hasattr(module, "kv"):
        return PvtHammingAttention.from_timm(module, nbits=nbits, seed=layer_seed)
    raise ModelError(f"layer '{name}' ({type(module).__name__}) is not a timm ViT or PVTv2 attention")


def apply_costs(model: nn.Module, costs: ExpertCosts) -> int:
    """Give every MoE layer its expert costs (e.g. after loading a checkpoint); returns the layer count."""
    count = 0
    for name, layer in moe_layers(model):
        layer.set_expert_costs(**expert_costs(costs, name), provenance=expert_provenance(costs, name))
        count += 1
    return count


def reparameterize(model: nn.Module, assignment: Assignment, costs: ExpertCosts | None = None, *,
                   nbits: int = 16, weight_bits: int = 5, frac_bits: int = 16, gate: str = DEFAULT_GATE,
                   seed: int = 0) -> nn.Module:
    """A reparameterised deep copy of ``model`` (``model`` itself is not modified)."""
    if not isinstance(assignment, Assignment):
        raise ModelError(f"assignment must be a models.Assignment, got {type(assignment).__name__}")
    assignment.validate(model)
    kinds = layer_kinds(model)
    new = copy.deepcopy(model)
    # Linears first: the Hamming attention then wraps the converted projections.
    for name, kind in kinds.items():
        if kind != "linear":
            continue
        choice = assignment.choice(name, "linear")
        old = new.get_submodule(name)
        module = _convert_linear(old, name, choice, weight_bits=weight_bits, frac_bits=frac_bits, gate=gate)
        if isinstance(module, MoELinear):
            module.layer_name = name
            if costs is not None:
                module.set_expert_costs(**expert_costs(costs, name), provenance=expert_provenance(costs, name))
            module.set_capacity(assignment.capacity.get(name))
        if module is not old:
            _set_submodule(new, name, module)
    for name, kind in kinds.items():
        if kind != "attention":
            continue
        old = new.get_submodule(name)
        module = _convert_attention(old, name, assignment.choice(name, "attention"), nbits=nbits, seed=seed)
        if module is not old:
            _set_submodule(new, name, module)
    log.info("reparameterised %s: %s", type(model).__name__, assignment.counts())
    return new
