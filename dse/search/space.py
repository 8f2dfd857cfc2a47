"""The search space of ``dse search``: one categorical Optuna parameter per decision (a layer or a
tied role).

Decision layers come from :func:`models.assignment.layer_kinds`: every attention module (``msa`` |
``hamming``) and every Linear (``mult`` | ``shift`` | ``moe``). Two config keys shape the space:

* ``search.freeze``: ``fnmatch`` globs of layer names kept dense (``msa``/``mult``), e.g. ``blocks.0.*``
  for the first block. A glob that matches no layer is an error (a typo would silently widen the space).
* ``search.tie``: roles that take one choice across all blocks. A role matches a layer whose name is the
  role or ends with ``.<role>`` (``fc1`` matches ``blocks.3.mlp.fc1``; ``attn`` matches every attention
  module). Its parameter is named ``tie:<role>``. Frozen layers stay out of ties.

Untied layers use the layer name as the parameter name, so the Optuna dashboard shows
``blocks.2.mlp.fc1 = moe``. Choices the cost model cannot price for a layer are dropped from its
parameter (``available``); a parameter left with one choice is pinned, not searched.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from optuna.distributions import CategoricalDistribution

from dse.errors import ConfigError
from models.assignment import ATTENTION_CHOICES, DENSE, LINEAR_CHOICES, Assignment

CHOICES = {"attention": ATTENTION_CHOICES, "linear": LINEAR_CHOICES}
TIE_PREFIX = "tie:"

# The three reference designs enqueued first: (attention choice, linear choice).
BASELINES = {
    "all-mult": ("msa", "mult"),  # the dense model
    "all-shift": ("msa", "shift"),  # every Linear as power-of-two shifts, softmax attention kept
    "recipe": ("hamming", "moe"),  # ShiftAddViT: Hamming attention + Mult/Shift MoE in every Linear
}


@dataclass(frozen=True)
class Param:
    """One categorical decision: ``choices`` for every layer in ``layers`` (all of one ``kind``)."""

    name: str
    kind: str
    choices: tuple[str, ...]
    layers: tuple[str, ...]


def _role_matches(role: str, layer: str) -> bool:
    return layer == role or layer.endswith("." + role)


class SearchSpace:
    """Parameters <-> per-layer choices <-> :class:`models.Assignment`."""

    def __init__(self, kinds: Mapping[str, str], params: Sequence[Param], pinned: Mapping[str, str]):
        self.kinds = dict(kinds)  # every decision layer, model order
        self.params = list(params)
        self.pinned = dict(pinned)  # layer -> fixed choice (frozen or single-choice)
        self._by_name = {p.name: p for p in self.params}
        self._dists = {p.name: CategoricalDistribution(p.choices) for p in self.params}

    @classmethod
    def build(
        cls,
        kinds: Mapping[str, str],
        freeze: Sequence[str] = (),
        tie: Sequence[str] = (),
        available: Mapping[str, Sequence[str]] | None = None,
    ) -> SearchSpace:
        """``kinds``: {layer: "attention" | "linear"}; ``available``: {layer: choices the cost model can
        price} (default: all)."""
        if not kinds:
            raise ConfigError("the model has no decision layers (attention modules or Linears) to search")
        for kind in kinds.values():
            if kind not in CHOICES:
                raise ConfigError(f"unknown layer kind '{kind}'; expected attention or linear")
        frozen: set[str] = set()
        for glob in freeze:
            hits = [name for name in kinds if fnmatch.fnmatchcase(name, glob)]
            if not hits:
                raise ConfigError(
                    f"search.freeze pattern '{glob}' matches no layer; layers look like "
                    f"{', '.join(list(kinds)[:3])}"
                )
            frozen.update(hits)
        avail = {
            name: tuple(c for c in CHOICES[k] if available is None or c in available.get(name, ()))
            for name, k in kinds.items()
        }
        pinned = {name: DENSE[kinds[name]] for name in frozen}
        for name, choices in avail.items():
            if name not in frozen and DENSE[kinds[name]] not in choices:
                raise ConfigError(
                    f"the cost model cannot price the dense form of '{name}'; re-profile the model"
                )
        tied: dict[str, str] = {}
        params: list[Param] = []
        for role in tie:
            if role.startswith(TIE_PREFIX) or not role:
                raise ConfigError(f"search.tie entry '{role}' must be a layer role such as fc1 or attn.qkv")
            members = [n for n in kinds if n not in frozen and _role_matches(role, n)]
            if not members:
                raise ConfigError(
                    f"search.tie role '{role}' matches no searchable layer; roles look like "
                    "attn, attn.qkv, attn.proj, mlp.fc1, fc2"
                )
            member_kinds = {kinds[n] for n in members}
            if len(member_kinds) > 1:
                raise ConfigError(
                    f"search.tie role '{role}' matches both attention modules and Linears; "
                    "use a more specific role (e.g. attn.qkv)"
                )
            for n in members:
                if n in tied:
                    raise ConfigError(f"layer '{n}' matches two search.tie roles ('{tied[n]}' and '{role}')")
                tied[n] = role
            choices = tuple(c for c in CHOICES[member_kinds.pop()] if all(c in avail[n] for n in members))
            params.append(Param(TIE_PREFIX + role, kinds[members[0]], choices, tuple(members)))
        for name, kind in kinds.items():
            if name in frozen or name in tied:
                continue
            params.append(Param(name, kind, avail[name], (name,)))
        searched = []
        for p in params:
            if len(p.choices) == 1:
                pinned.update(dict.fromkeys(p.layers, p.choices[0]))
            else:
                searched.append(p)
        if not searched:
            raise ConfigError(
                "nothing to search: search.freeze (or the cost model) leaves every layer with one choice"
            )
        order = {name: i for i, name in enumerate(kinds)}
        searched.sort(key=lambda p: order[p.layers[0]])
        return cls(kinds, searched, pinned)

    # ---- Optuna side ------------------------------------------------------------------------------
    def distributions(self) -> dict[str, CategoricalDistribution]:
        return dict(self._dists)

    def suggest(self, trial: Any) -> dict[str, str]:
        """Ask ``trial`` (an Optuna Trial) for every parameter."""
        return {p.name: trial.suggest_categorical(p.name, p.choices) for p in self.params}

    # ---- conversions ------------------------------------------------------------------------------
    def choices(self, params: Mapping[str, str]) -> dict[str, str]:
        """{layer: choice} for every decision layer (pinned layers included)."""
        out = dict(self.pinned)
        for p in self.params:
            value = params[p.name]
            for layer in p.layers:
                out[layer] = value
        return {name: out[name] for name in self.kinds}

    def assignment(self, params: Mapping[str, str]) -> Assignment:
        layer_choice = self.choices(params)
        return Assignment(
            attention={n: c for n, c in layer_choice.items() if self.kinds[n] == "attention"},
            linear={n: c for n, c in layer_choice.items() if self.kinds[n] == "linear"},
        )

    def params_for(self, attention: str, linear: str) -> dict[str, str]:
        """Every parameter set to ``attention``/``linear`` where allowed, else to the dense choice."""
        want = {"attention": attention, "linear": linear}
        return {p.name: want[p.kind] if want[p.kind] in p.choices else DENSE[p.kind] for p in self.params}

    def baselines(self) -> dict[str, dict[str, str]]:
        return {name: self.params_for(a, lin) for name, (a, lin) in BASELINES.items()}

    @staticmethod
    def counts(layer_choice: Mapping[str, str]) -> dict[str, int]:
        out = dict.fromkeys((*ATTENTION_CHOICES, *LINEAR_CHOICES), 0)
        for c in layer_choice.values():
            out[c] += 1
        return out

    def describe(self) -> dict[str, Any]:
        """JSON-able description (stored in the study; a rerun with another space is refused)."""
        return {
            "params": {p.name: {"choices": list(p.choices), "layers": list(p.layers)} for p in self.params},
            "pinned": dict(self.pinned),
        }

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.describe(), sort_keys=True).encode()).hexdigest()[:16]

    def key(self, params: Mapping[str, str]) -> tuple[str, ...]:
        """A hashable identity of a parameter set (for de-duplication)."""
        return tuple(params[p.name] for p in self.params)

    def __len__(self) -> int:
        return len(self.params)

    def size(self) -> int:
        """How many distinct designs the space holds."""
        return math.prod(len(p.choices) for p in self.params)
