"""Cost sources: what prices a whole-model assignment for this model — a profile's cost model or a cost table.

The search (both stages), fine-tuning (the MoE balance loss's expert costs), export and bench all get their
cost source here: :func:`load_costs` turns a ``--profile`` (a profile CSV from any device, or a cost-table
JSON) into a :class:`CostSource` for one model, and :func:`model_cost` specialises a profile's cost model
to a layer inventory with the configured metric.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np
from torch import nn

from dse.config import Config
from dse.cost.model import CostModel, ModelCost, default_profile_path, read_profile
from dse.errors import ConfigError, ProfileError
from dse.fileio import atomic_write_text
from dse.profiling.inventory import build_inventory


def model_cost(profile: Any, cost_cfg: Any, inventory: Any, backend: str = "tvm", *,
               calibrated: bool | None = None) -> ModelCost:
    """The cost model of ``profile`` (a profile or :class:`dse.cost.model.CostTable`) on ``backend``, with the
    metric of ``cost_cfg`` (``cfg.cost``), specialised to a layer inventory; ``calibrated=False`` prices it as
    profiled alone whatever ``cost_cfg.calibrated`` says (what the calibration itself is fitted against)."""
    return CostModel.from_config(profile, cost_cfg, backend, calibrated).for_model(inventory)


class Cost(NamedTuple):
    latency_ms: float
    energy_mj: float


@runtime_checkable
class CostSource(Protocol):
    """What the search needs from a cost model (``dse.cost.model.ModelCost`` satisfies it)."""

    def predict(self, assignment: Any) -> Any:
        """Whole-model cost of a :class:`models.Assignment`: an object with ``latency_ms``, ``energy_mj``."""
        ...

    def moe_expert_costs(self, layer_name: str) -> dict[str, float]:
        """``{"mult": c, "shift": c}`` per token for a Linear (the balance loss's weights)."""
        ...


class CostTableFile:
    """An additive cost table read from JSON: a cost source that needs no profile (tests, or costs
    measured by another tool)::

        {"fixed": [latency_ms, energy_mj],
         "layers": {"blocks.0.attn": {"msa": [l, e], "hamming": [l, e]},
                    "blocks.0.attn.qkv": {"mult": [l, e], "shift": [l, e], "moe": [l, e]}, ...},
         "moe_expert_costs": {"blocks.0.attn.qkv": {"mult": c, "shift": c}, ...}}   # optional

    A layer's missing choice cannot be searched. Without ``moe_expert_costs`` an expert's cost is that
    layer's mult / shift latency (only the ratio matters to the balance loss).
    """
    def __init__(
        self,
        fixed: Sequence[float],
        layers: Mapping[str, Mapping[str, Sequence[float]]],
        moe_expert_costs: Mapping[str, Mapping[str, float]] | None = None,
    ):
        self.fixed = Cost(float(fixed[0]), float(fixed[1]))
        self.layers = {
            name: {c: Cost(float(v[0]), float(v[1])) for c, v in choices.items()}
            for name, choices in layers.items()
        }
        # A layer priced for msa or hamming is an attention module, any other a Linear.
        self.kinds = {
            name: "attention" if {"msa", "hamming"} & set(ch) else "linear"
            for name, ch in self.layers.items()
        }
        self._moe = {k: dict(v) for k, v in (moe_expert_costs or {}).items()}
        self.path: Path | None = None  # the JSON it was read from, if any

    @classmethod
    def from_json(cls, path: str | Path) -> CostTableFile:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            table = cls(data["fixed"], data["layers"], data.get("moe_expert_costs"))
            table.path = path
            return table
        except FileNotFoundError:
            raise ProfileError(f"cost table {path} does not exist; check --profile") from None
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise ProfileError(
                f"cost table {path} is malformed ({type(exc).__name__}: {exc}); expected "
                "{'fixed': [ms, mJ], 'layers': {layer: {choice: [ms, mJ]}}}"
            ) from None

    def to_json(self, path: str | Path) -> Path:
        data = {
            "fixed": list(self.fixed),
            "layers": {n: {c: list(v) for c, v in ch.items()} for n, ch in self.layers.items()},
        }
        if self._moe:
            data["moe_expert_costs"] = self._moe
        return atomic_write_text(path, json.dumps(data, indent=1))

    def predict(self, assignment: Any) -> Cost:
        for kind in ("attention", "linear"):
            unknown = [n for n in getattr(assignment, kind) if self.kinds.get(n) != kind]
            if unknown:
                raise ProfileError(f"the cost table has no {kind} layer '{unknown[0]}'")
        lat, en = self.fixed
        for name, choices in self.layers.items():
            kind = self.kinds[name]
            choice = getattr(assignment, kind).get(name, "msa" if kind == "attention" else "mult")
            cost = choices.get(choice)
            if cost is None:
                raise ProfileError(f"the cost table cannot price '{choice}' for {name}")
            lat += cost.latency_ms
            en += cost.energy_mj
        return Cost(lat, en)

    def moe_expert_provenance(self, layer_name: str) -> dict[str, Any]:
        """A table's figures come from outside the profile store: their provenance is the table's."""
        return {"source": "cost table", "path": str(self.path) if self.path else None}

    def moe_expert_costs(self, layer_name: str) -> dict[str, float]:
        if layer_name in self._moe:
            return dict(self._moe[layer_name])
        choices = self.layers.get(layer_name)
        if not choices or "mult" not in choices or "shift" not in choices:
            raise ProfileError(f"the cost table has no mult/shift costs for '{layer_name}'")
        return {"mult": choices["mult"].latency_ms, "shift": choices["shift"].latency_ms}


def energy_label(costs: CostSource) -> str:
    """Where a cost source's energy comes from: its profile's sources ("model" = analytical, "nvml"/"rapl"
    measured; several joined by "+"), or "cost table" for a JSON table, "unknown" for other sources."""
    if isinstance(costs, CostTableFile):
        return "cost table"
    sources = getattr(costs, "energy_sources", None)  # ModelCost has them; another cost source may not
    return "+".join(sources) if sources else "unknown"


def energy_text(mj: float | None, spec: str = ".4g") -> str:
    """An energy figure in mJ for people, or ``unknown`` where there is none (NaN: some part of it, such as eager
    PyTorch's interpreter time, has no energy measure or model — a sum with it is unknown, not smaller)."""
    if mj is None or not math.isfinite(float(mj)):
        return "unknown"
    return f"{float(mj):{spec}} mJ"


def load_costs(cfg: Config, model: nn.Module, profile: str | Path | None) -> CostSource:
    """A cost-table JSON, or the cost model of a profile CSV from any device (default: the store's profile
    for this device and ``profile.target``), specialised to ``model``'s layers."""
    if profile is not None and Path(profile).suffix == ".json":
        return CostTableFile.from_json(profile)
    path = Path(profile) if profile is not None else default_profile(cfg)
    return cost_model_for(cfg, model, path)


def profile_list(value: str | Sequence[str] | None) -> list[str | None]:
    """``search.profile`` as a list: one entry per device (``[None]``: this device's stored profile)."""
    if value is None or (not isinstance(value, str) and not value):
        return [None]
    return [value] if isinstance(value, str) else list(value)


def device_label(costs: CostSource, profile: str | Path | None, *, with_target: bool = False) -> str:
    """The device slug a cost source prices for (``device/target`` with ``with_target``; a cost table: its
    file name)."""
    identity = getattr(costs, "identity", None)  # dse.cost.model.ModelCost knows its profile's device
    if identity is not None:
        return "/".join(identity) if with_target else identity[0]
    return Path(profile).stem if profile is not None else "this-device"


def load_device_costs(cfg: Config, model: Any, profiles: str | Sequence[str] | None
                      ) -> list[tuple[str, CostSource]]:
    """``[(device label, cost source)]``, one per profile; labels are device slugs, made unique with the
    target slug where two profiles come from one device (e.g. two ISAs of one CPU)."""
    paths = profile_list(profiles)
    sources = [load_costs(cfg, model, p) for p in paths]
    labels = [device_label(c, p) for c, p in zip(sources, paths)]
    if len(set(labels)) < len(labels):
        labels = [device_label(c, p, with_target=True) for c, p in zip(sources, paths)]
    if len(set(labels)) < len(labels):
        raise ConfigError(f"search.profile names one device twice ({', '.join(map(str, paths))}); give each once")
    return list(zip(labels, sources))


def default_profile(cfg: Config) -> Path:
    """The stored profile for this device and ``profile.target``: ``<profile.dir>/<device>/<target>.csv``."""
    return default_profile_path(cfg.profile)


def cost_model_for(cfg: Config, model: nn.Module, profile: str | Path) -> CostSource:
    """The cost model of ``profile`` (metric ``cost.metric``) specialised to ``model``'s layers.

    The profile may come from another device than the one training runs on (fine-tune here, deploy there),
    so it is not checked against this machine.
    """
    path = Path(profile)
    if not path.is_file():
        raise ProfileError(f"profile {path} does not exist; run `dse profile` for the target device, "
                           "or pass --profile")
    inventory = build_inventory(model, batch=cfg.profile.batch, nbits=cfg.finetune.nbits, name=cfg.model.name)
    return model_cost(read_profile(path), cfg.cost, inventory)


def synthetic_costs(kinds: Mapping[str, str], seed: int = 0) -> CostTableFile:
    """A plausible additive cost table for ``kinds`` (for benchmarks and tests of the search machinery, not
    for decisions): shift ~0.6x and MoE ~0.8x of mult, Hamming ~0.7x of MSA, per-layer noise."""
    rng = np.random.default_rng(seed)
    layers = {}
    for name, kind in kinds.items():
        base = float(rng.uniform(0.5, 2.0))
        e = float(rng.uniform(0.8, 1.2))
        if kind == "attention":
            layers[name] = {
                "msa": [base, base * e],
                "hamming": [base * rng.uniform(0.5, 0.9), base * e * 0.6],
            }
        else:
            sh = rng.uniform(0.4, 0.9)
            layers[name] = {
                "mult": [base, base * e],
                "shift": [base * sh, base * e * 0.35],
                "moe": [base * (0.5 + 0.5 * sh) + 0.05, base * e * 0.7],
            }
    return CostTableFile([1.0, 1.0], layers)
