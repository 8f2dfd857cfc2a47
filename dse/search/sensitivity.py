"""The accuracy-risk proxy of search stage A: per-layer sensitivity of the dense model, measured once.

Definition. For each decision layer ``l`` and each non-dense choice ``c`` (``shift`` for a Linear,
``hamming`` for an attention), the sensitivity is the increase of the validation cross-entropy when only
that layer is reparameterised, without fine-tuning::

    s(l, c) = L_val(dense with l -> c) - L_val(dense)          (clamped at 0 when scoring)

Hamming attention is fitted on one training batch first (:func:`models.hamming.fit_hamming`, as
fine-tuning does before its first step), so ``s`` measures the hash, not a random projection. A MoE
Linear routes a fraction of its tokens through the Shift expert; at the balance loss's equilibrium that
fraction is ``c_mult / (c_mult + c_shift)`` (tokens in inverse proportion to expert cost, see
:mod:`models.moe`), so ``s(l, moe) = shift_share(l) * s(l, shift)``. The proxy of an assignment is

    risk(a) = sum_l max(0, s(l, a_l))

Why this proxy: it is the first-order (additive, interaction-free) estimate of the loss increase used by
layer-wise mixed-precision searches (e.g. HAWQ, Dong et al., ICCV 2019, ranks layers by a per-layer
sensitivity and sums it; "one-shot" per-layer quantisation sensitivity in the same spirit). It costs one
validation pass per layer and choice — a few seconds per layer for the embedded model — and is then free
for thousands of trials. It ranks designs, it does not predict accuracy after fine-tuning: stage B
measures that for the candidates the proxy leaves on the front. Clamping at 0 keeps noise (a layer whose
reparameterisation happens to lower the loss) from rewarding a design.

The measurement is cached in the output folder (``sensitivity.json``), keyed by the checkpoint's SHA-256,
the data and reparameterisation settings and the layer list; a changed input remeasures.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dse.errors import StageError
from dse.fileio import atomic_write_text
from dse.training.train import evaluate
from models.assignment import Assignment
from models.hamming import fit_hamming
from models.ops import kernel_ops
from models.reparam import reparameterize

log = logging.getLogger(__name__)

PROBE = {"linear": "shift", "attention": "hamming"}  # the choice each kind is probed with
VERSION = 1


@dataclass
class Sensitivity:
    """Measured ``s(layer, choice)`` plus the dense reference it is relative to."""

    base_loss: float
    base_acc: float
    delta: dict[str, dict[str, float]]  # {layer: {"shift" | "hamming": loss increase}}
    samples: int = 0
    seconds: float = 0.0
    key: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"version": VERSION, **asdict(self)}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Sensitivity:
        data = json.loads(text)
        if data.pop("version", None) != VERSION:
            raise ValueError("sensitivity cache of another version")
        return cls(**data)


def risk_table(
    sens: Sensitivity, kinds: Mapping[str, str], shift_share: Callable[[str], float | None]
) -> dict[str, dict[str, float]]:
    """{layer: {choice: risk}} for every decision layer; ``shift_share(layer)`` is the MoE equilibrium
    Shift share (None when MoE cannot be priced for that layer — its risk is then the full shift risk)."""
    table: dict[str, dict[str, float]] = {}
    for layer, kind in kinds.items():
        if layer not in sens.delta:
            raise StageError(
                f"no sensitivity measured for layer '{layer}'; delete sensitivity.json to remeasure"
            )
        probe = max(0.0, float(sens.delta[layer][PROBE[kind]]))
        if kind == "attention":
            table[layer] = {"msa": 0.0, "hamming": probe}
        else:
            share = shift_share(layer)
            share = 1.0 if share is None else share
            table[layer] = {"mult": 0.0, "shift": probe, "moe": share * probe}
    return table


def risk(table: Mapping[str, Mapping[str, float]], layer_choice: Mapping[str, str]) -> float:
    return math.fsum(table[layer][choice] for layer, choice in layer_choice.items())


def measure(
    dense,
    kinds: Mapping[str, str],
    val,
    fit_images,
    *,
    batch_size: int,
    reparam: Mapping[str, Any],
    progress: Callable[[str], None] | None = None,
) -> Sensitivity:
    """Probe every layer of ``dense`` (one reparameterisation + one validation pass each)."""
    import torch


    t0 = time.perf_counter()
    dense = dense.eval()
    delta: dict[str, dict[str, float]] = {}
    with kernel_ops("off"), torch.random.fork_rng(devices=[]):
        base = evaluate(dense, val, batch_size)
        for i, (layer, kind) in enumerate(kinds.items()):
            choice = PROBE[kind]
            plan = (
                Assignment(attention={layer: choice})
                if kind == "attention"
                else Assignment(linear={layer: choice})
            )
            torch.manual_seed(0)
            probe = reparameterize(dense, plan, costs=None, **reparam).eval()
            if kind == "attention":
                fit_hamming(probe, fit_images)
            got = evaluate(probe, val, batch_size)
            delta[layer] = {choice: got["loss"] - base["loss"]}
            if progress is not None:
                progress(
                    f"sensitivity {i + 1}/{len(kinds)} {layer}:{choice} dloss={delta[layer][choice]:+.4f} "
                    f"acc={got['acc']:.1f}%"
                )
            log.debug(
                "sensitivity %s:%s = %+.4f (acc %.2f%%)", layer, choice, delta[layer][choice], got["acc"]
            )
    return Sensitivity(
        base_loss=base["loss"],
        base_acc=base["acc"],
        delta=delta,
        samples=len(val),
        seconds=time.perf_counter() - t0,
    )


def load_or_measure(path: Path, key: str, measure_fn: Callable[[], Sensitivity]) -> tuple[Sensitivity, bool]:
    """The cached sensitivity at ``path`` if its key matches, else ``measure_fn()`` (then cached).
    Returns (sensitivity, reused)."""
    if path.exists():
        try:
            cached = Sensitivity.from_json(path.read_text())
            if cached.key == key:
                return cached, True
            log.info("sensitivity cache %s is for other inputs; remeasuring", path)
        except (ValueError, TypeError, KeyError, OSError):
            log.warning("sensitivity cache %s is unreadable; remeasuring", path)
    sens = measure_fn()
    sens.key = key
    atomic_write_text(path, sens.to_json())
    return sens, False
