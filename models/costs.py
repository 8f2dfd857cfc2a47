"""How MoE layers receive their expert costs.

``reparameterize(model, assignment, costs=X)`` accepts either

* a mapping ``{layer_name: {"mult": c, "shift": c}}``, or
* any object implementing :class:`ExpertCostModel` — the dse cost model does, predicting each expert's
  latency (or energy) for that layer's shape on the target.

Costs are per token and per layer, in any unit (the balance loss uses only their ratio). There is no
default: a missing layer is an error.

Provenance travels with the costs: a cost model may also implement ``moe_expert_provenance(layer_name)``
(a JSON-able mapping saying whether the figures were measured, regressed or partly unpriced, and from which
device), and a mapping entry may carry a ``provenance`` key beside ``mult`` and ``shift``. Each
:class:`~models.moe.MoELinear` keeps what it was given (``cost_provenance``), so the costs a model was
trained with can always say where they came from; this package only carries the record, it never judges it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Protocol, runtime_checkable

from models.errors import ModelError

EXPERT_NAMES = ("mult", "shift")
PROVENANCE = "provenance"


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
    if not isinstance(entry, Mapping) or set(entry) - {PROVENANCE} != set(EXPERT_NAMES):
        raise ModelError(f"costs for MoE layer '{layer_name}' must have exactly the keys mult and shift "
                         f"(and optionally {PROVENANCE}); got {entry!r}")
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


def expert_provenance(costs: ExpertCosts, layer_name: str) -> dict | None:
    """Where the expert costs of ``layer_name`` came from, as the cost source states it (None: it does not)."""
    describe = getattr(costs, "moe_expert_provenance", None)
    if callable(describe):
        return dict(describe(layer_name))
    if isinstance(costs, Mapping) and isinstance(costs.get(layer_name), Mapping):
        record = costs[layer_name].get(PROVENANCE)
        return dict(record) if isinstance(record, Mapping) else None
    return None
