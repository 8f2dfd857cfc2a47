"""Where a cost figure comes from, in words: measured (device, target, profile date), regression (the law and
its leave-one-out error), partial (some work unpriced) or a cost table.

The records are made by :meth:`dse.cost.model.ModelCost.moe_expert_provenance` (and
``CostTableFile.moe_expert_provenance``) and travel with the MoE expert costs into the model
(:mod:`models.costs`), the fine-tune's ``costs.json``, the checkpoint's meta and the report. This module only
reads them: one-line descriptions, counts, and the ``cost.strict`` rule.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dse.errors import UnmeasuredCostError

MEASURED = "measured"
UNSTATED = {"source": "unstated"}  # costs handed over as plain numbers, with nothing said about them


def design_source(costs: Any, assignment: Any) -> str:
    """Provenance of one design's predicted figures: the cost model's (``ModelCost.source``), ``cost table`` for
    a JSON table, ``unstated`` for a cost source that cannot say."""
    source = getattr(costs, "source", None)
    if callable(source):
        return str(source(assignment))
    return "cost table" if hasattr(costs, "to_json") else "unstated"


def source_of(record: Mapping[str, Any] | None) -> str:
    return str((record or UNSTATED).get("source") or "unstated")


def describe(record: Mapping[str, Any] | None) -> str:
    """One line: ``measured on DEVICE/TARGET (profile DATE)``, ``regression: matmul law … (LOO RMSPE 12%) on …``."""
    record = record or UNSTATED
    source = source_of(record)
    where = "/".join(str(x) for x in (record.get("device"), record.get("target")) if x)
    date = record.get("profile_date")
    on = f" on {where}" + (f" (profile {date})" if date else "") if where else ""
    if source == MEASURED:
        return f"measured{on}"
    experts = record.get("experts") or {}
    if source == "mixed" and experts:
        source += " (" + ", ".join(f"{e} {v.get('source')}" for e, v in experts.items()) + ")"
    parts = []
    for law in record.get("laws") or ():
        err = law.get("loo_rmspe")
        parts.append(f"{law['primitive']} {law['metric']} = {law['law']} over {law['rows']} rows"
                     + (f", leave-one-out RMSPE {100 * err:.0f}%" if err is not None else ", no held-out error"))
    text = source + (": " + "; ".join(parts) if parts else "") + on
    if record.get("extrapolated"):
        text += ", extrapolated"
    for note in record.get("notes") or ():
        text += f"; {note}"
    if source == "cost table" and record.get("path"):
        text += f" {record['path']}"
    return text


def counts(records: Mapping[str, Mapping[str, Any] | None]) -> dict[str, int]:
    """``{source: layers}`` over the MoE layers."""
    out: dict[str, int] = {}
    for record in records.values():
        out[source_of(record)] = out.get(source_of(record), 0) + 1
    return dict(sorted(out.items()))


def not_measured(records: Mapping[str, Mapping[str, Any] | None]) -> dict[str, Mapping[str, Any] | None]:
    return {name: r for name, r in records.items() if source_of(r) != MEASURED}


def check_strict(records: Mapping[str, Mapping[str, Any] | None]) -> None:
    """``cost.strict``: UnmeasuredCostError naming the first MoE layer whose expert costs are not measured."""
    bad = not_measured(records)
    if not bad:
        return
    name, record = next(iter(bad.items()))
    more = f" (and {len(bad) - 1} more layer(s))" if len(bad) > 1 else ""
    raise UnmeasuredCostError(f"cost.strict: the MoE expert costs of {name}{more} are {describe(record)}, not "
                              "measured; run `dse profile` for this model on the target device so every shape "
                              "has its row, or drop --strict-costs (cost.strict=false) to accept them")
