"""In-context factors: what pricing kernels and ops one at a time misses inside a compiled model.

The profile times every kernel and op alone, warm, each in its own loop. Inside the compiled model the same
calls run back to back: TVM fuses elementwise work into its neighbours, one call's output is the next one's
input (in cache, or evicted by a big GEMM), and the VM adds its own dispatch between calls. nn-Meter (Zhang et
al., MobiSys 2021) answers this by predicting the fused units the runtime executes; LitePred (Feng et al.,
NSDI 2024) by adapting its predictors with a few measurements on the new device. Here the profile's units stay
and a small, stated model learns the difference from a handful of whole compiled models measured on the
device (:mod:`dse.deploy.calibrate`):

    measured(assignment) ≈ Σ_g f_g · P_g(assignment)

``P_g`` is the uncalibrated prediction of the work in group ``g`` — the choice-independent work (``fixed``) and
the layers under each choice (``mult``, ``shift``, ``moe``, ``msa``, ``hamming``) — and ``f_g`` that group's
in-context factor. The factors are fitted on relative residuals (each model's error counts as a fraction of its
time, the error the cost model reports), with a ridge penalty ``λ·Σ(f_g - 1)²`` pulling a factor the models do
not pin down (two groups that always move together) back to "as profiled" (Hoerl & Kennard, "Ridge
regression", Technometrics 12, 1970). A group no calibration model exercises keeps factor 1.

Measured times are first brought to the host speed of the profile (times the reference kernel's then/now ratio,
:mod:`dse.profiling.reference`), so a slow minute during calibration is not learned as a factor. The fit's own
figures — mean |error| before and after, and each model predicted by a fit without it (leave-one-out) — travel
with the factors. Latency only: energy is not rescaled.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

META_KEY = "calibration"  # the profile metadata entry: {"<model>@<batch>": Calibration.as_meta()}
GROUPS = ("fixed", "mult", "shift", "moe", "msa", "hamming")
RIDGE = 0.02  # λ: a factor 10% away from 1 costs as much as a 1.4% error on one model
FACTOR_RANGE = (0.25, 4.0)  # a factor outside this says the profile is wrong, not the context: clipped


def key(model: str, batch: int) -> str:
    return f"{model}@{int(batch)}"


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Fitted in-context factors for one model at one batch size on one profile."""

    model: str
    batch: int
    factors: dict[str, float]
    models: int  # compiled models the factors were fitted on
    error_before: float  # mean |relative error| of those models, uncalibrated
    error_after: float  # ... with the factors
    loo_error: float | None  # ... each predicted by factors fitted without it
    speed_ratio: float | None = None  # host speed during calibration / at profiling (reference kernel)
    measured_at: str = ""

    def factor(self, group: str) -> float:
        return float(self.factors.get(group, 1.0))

    def predict(self, components: Mapping[str, float]) -> float:
        """``Σ_g f_g · P_g``: the calibrated latency of uncalibrated per-group ``components``."""
        return sum(self.factor(g) * v for g, v in components.items())

    def as_meta(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "factors": {g: round(float(f), 4) for g, f in self.factors.items()},
                "ridge": RIDGE}

    @classmethod
    def from_meta(cls, entry: Mapping[str, Any]) -> Calibration:
        fields = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in entry.items() if k in fields}
        data["factors"] = {str(g): float(f) for g, f in (entry.get("factors") or {}).items()}
        return cls(**data)

    def describe(self) -> str:
        factors = ", ".join(f"{g} {self.factors[g]:.2f}" for g in GROUPS if g in self.factors)
        loo = "" if self.loo_error is None else f", leave-one-out {100 * self.loo_error:.1f}%"
        return (f"calibrated on {self.models} compiled models ({self.measured_at[:10]}): {factors}; mean |error| "
                f"{100 * self.error_before:.1f}% -> {100 * self.error_after:.1f}%{loo}")


def stored(meta: Mapping[str, Any] | None, model: str, batch: int) -> Calibration | None:
    """The profile's calibration for ``model`` at ``batch``, or None."""
    entry = ((meta or {}).get(META_KEY) or {}).get(key(model, batch))
    return Calibration.from_meta(entry) if isinstance(entry, Mapping) and entry.get("factors") else None


def _solve(p: np.ndarray, m: np.ndarray, ridge: float) -> np.ndarray:
    """Factors [groups] minimising Σ_j ((p_j·f - m_j)/m_j)² + ridge·Σ_g (f_g - 1)² over the groups present."""
    used = np.flatnonzero(p.sum(axis=0) > 0)
    f = np.ones(p.shape[1])
    if len(used) == 0:
        return f
    a = p[:, used] / m[:, None]  # [models, used]: relative residual rows
    b = np.ones(len(m))
    a = np.vstack([a, np.sqrt(ridge) * np.eye(len(used))])
    b = np.concatenate([b, np.sqrt(ridge) * np.ones(len(used))])
    f[used] = np.clip(np.linalg.lstsq(a, b, rcond=None)[0], *FACTOR_RANGE)
    return f


def _mean_abs(p: np.ndarray, m: np.ndarray, f: np.ndarray) -> float:
    return float(np.mean(np.abs(p @ f - m) / m))


def fit(components: Sequence[Mapping[str, float]], measured_ms: Sequence[float], *, model: str, batch: int,
        speed_ratio: float | None = None, ridge: float = RIDGE) -> Calibration:
    """Fit the factors (module docstring) on ``components`` (per compiled model, uncalibrated predicted ms per
    group) and ``measured_ms`` (the same models measured, already at the profile's host speed)."""
    if len(components) != len(measured_ms) or not components:
        raise ValueError(f"calibration needs one measured time per model, got {len(components)} models and "
                         f"{len(measured_ms)} times")
    unknown = sorted({g for c in components for g in c} - set(GROUPS))
    if unknown:
        raise ValueError(f"unknown calibration group(s) {', '.join(unknown)}; groups are {', '.join(GROUPS)}")
    p = np.array([[float(c.get(g, 0.0)) for g in GROUPS] for c in components])  # [models, groups]
    m = np.asarray(measured_ms, dtype=np.float64)  # [models]
    f = _solve(p, m, ridge)
    loo = None
    if len(m) > 2:
        errs = [abs(p[j] @ _solve(np.delete(p, j, 0), np.delete(m, j), ridge) - m[j]) / m[j] for j in range(len(m))]
        loo = float(np.mean(errs))
    used = p.sum(axis=0) > 0
    return Calibration(model, int(batch), {g: float(v) for g, v, u in zip(GROUPS, f, used) if u}, len(m),
                       _mean_abs(p, m, np.ones(len(GROUPS))), _mean_abs(p, m, f), loo, speed_ratio,
                       _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))


__all__ = ["FACTOR_RANGE", "GROUPS", "META_KEY", "RIDGE", "Calibration", "fit", "key", "stored"]
