"""How MoE layers receive their expert costs.

``reparameterize(model, assignment, costs=X)`` accepts either

* a mapping ``{layer_name: {"mult": c, "shift": c}}``, or
* any object implementing :class:`ExpertCostModel` — the dse cost model does, predicting each expert's
  latency (or energy) for that layer's shape on the target.

Costs are per token and per layer, in any unit (the balance loss uses only their ratio). There is no
default: a missing layer is an error.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Protocol, runtime_checkable

from models.errors import ModelError

EXPERT_NAMES = ("mult", "shift")


@runtime_checkable
class ExpertCostModel(Protocol):
    """Anything that can price the experts of one MoE layer."""

    def moe_expert_costs(self, layer_name: str) -> dict[str, float]:
        """``{"mult": cost, "shift": cost}`` for the Linear at ``layer_name`` (e.g. ``blocks.0.mlp.fc1``);
        positive, finite, same unit for both experts."""
        ...


ExpertCosts = Mapping[str, Mapping[str, float]] | ExpertCostModel


def expert_costs(costs: ExpertCosts, layer_name: str) -> dict[str, float]:
    """Validated ``{"mult": c, "shift": c}`` for one layer from either kind of cost source."""
    if isinstance(costs, ExpertCostModel):
        entry = costs.moe_expert_costs(layer_name)
    elif isinstance(costs, Mapping):
        if layer_name not in costs:
            raise ModelError(f"costs has no entry for MoE layer '{layer_name}'; give {{'mult': c, 'shift': c}} "
                             "for every layer assigned 'moe'")
        entry = costs[layer_name]
    else:
        raise ModelError(f"costs must be a mapping {{layer: {{'mult': c, 'shift': c}}}} or an object with "
                         f"moe_expert_costs(layer_name); got {type(costs).__name__}")
    if not isinstance(entry, Mapping) or set(entry) != set(EXPERT_NAMES):
        raise ModelError(f"costs for MoE layer '{layer_name}' must have exactly the keys mult and shift; "
                         f"got {entry!r}")
    out = {}
    for name in EXPERT_NAMES:
        value = entry[name]
        try:
            value = float(value)
        except (TypeError, ValueError):
            value = float("nan")
        if not (math.isfinite(value) and value > 0):
            raise ModelError(f"cost {name}={entry[name]!r} for MoE layer '{layer_name}' must be a positive "
                             "finite number")
        out[name] = value
    return out
