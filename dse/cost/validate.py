"""Calibration and validation of the cost model against fresh measurements (``dse cost --calibrate N``,
``dse cost --validate``).

Calibration adds random shapes around the model's range to the profile (the regression's sample;
the model's own layers give only a handful of shapes per primitive). Validation, as nn-Meter (Zhang
et al., MobiSys 2021) reports its predictors:

1. Held-out shapes. For every kernel primitive of each backend, ``count`` random Linear-like shapes
   around the model's shapes (each of m, k, n log-uniform in [0.75·min, 1.25·max], ``b`` one of the
   model's batch values) that are NOT in the profile are built and timed exactly as the profiler
   times its rows (:class:`dse.profiling.profiler.Measurer`) and compared with the regression's prediction.
   Figures: fraction within ±10% and ±15%, RMSPE; plus the same after correcting for the machine's
   drift since profiling, side by side (the primitive's rows re-measured and the law refitted just
   before its held-out shapes), and the noise floor (one shape measured twice). Next to the law, the
   learned regressor (:mod:`dse.cost.learned`: gradient-boosted trees on the law's features, fitted on
   the same profile rows) predicts every held-out shape too, and the summary says which of the two is
   closer per primitive; the cost model prices with the law either way.
2. The dense PyTorch model. Its whole latency predicted from the per-layer ``torch`` rows plus the
   non-primitive work and eager PyTorch's own time (:mod:`dse.profiling.eager`) is compared with its measured
   eager latency: same batch, the profile's PyTorch thread count, ``torch.inference_mode``, median of
   many runs in bursts spread over the check; and side by side with freshly re-measured rows, which
   isolates the method's own error from drift.

Both are noisy on a shared machine: rows and checks are measured at different times, so the report
carries the load average, the drift and the noise floor.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

import kernels
from dse.cost.learned import LearnedLaw, fit_learned
from dse.cost.model import Call, CostModel, CostTable
from dse.cost.regression import error_summary
from dse.hardware import energy
from dse.hardware.device import describe_device, versions
from dse.hardware.energy import AnalyticalEnergyModel
from dse.hardware.threads import torch_threads
from dse.profiling.inventory import TORCH_BASELINE
from dse.profiling.profiler import Measurer, RowSpec, check_target_runnable, load_1m, plan
from dse.profiling.store import Profile, ProfileStore, row_key
from models.assignment import Assignment

log = logging.getLogger(__name__)

KERNEL_PRIMITIVES = {"tvm": ("matmul", "matshift", "matshift_decode", "bmm", "matadd"),
                     "torch": ("matmul", "bmm", "matadd")}


@dataclasses.dataclass(frozen=True)
class HoldoutResult:
    primitive: str
    backend: str
    b: int
    m: int
    k: int
    n: int
    measured_ms: float
    predicted_ms: float
    law_loo_rmspe: float | None
    extrapolated: bool
    load_1m: float | None
    drift: float = 1.0  # now / at profiling, for this primitive's profiled shapes re-measured now
    repeatability: float | None = None  # RMS relative difference of those shapes measured twice now
    side_by_side_ms: float | None = None  # predicted from this primitive's rows re-measured just before
    learned_ms: float | None = None  # the learned regressor's prediction from the same rows as the law
    learned_loo_rmspe: float | None = None  # its leave-one-out error on those rows

    @property
    def rel_error(self) -> float:
        return (self.predicted_ms - self.measured_ms) / self.measured_ms

    @property
    def drift_corrected_error(self) -> float:
        return (self.predicted_ms * self.drift - self.measured_ms) / self.measured_ms

    @property
    def side_by_side_error(self) -> float | None:
        if self.side_by_side_ms is None:
            return None
        return (self.side_by_side_ms - self.measured_ms) / self.measured_ms

    @property
    def learned_error(self) -> float | None:
        if self.learned_ms is None:
            return None
        return (self.learned_ms - self.measured_ms) / self.measured_ms

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "rel_error": self.rel_error,
                "drift_corrected_error": self.drift_corrected_error, "side_by_side_error": self.side_by_side_error,
                "learned_error": self.learned_error}


def reference_shapes(table: CostTable, backend: str, primitive: str,
                     inventory: Any = None) -> list[tuple[int, int, int, int]]:
    """The shapes that define "around the model's range": the inventory's calls of ``primitive`` (on the
    torch backend, of the kernels whose PyTorch baseline it is), else every measured row of it."""
    if inventory is not None:
        shapes = [it.shape for it in inventory.items if it.kind in ("linear", "product")
                  and any((TORCH_BASELINE[p] if backend == "torch" else p) == primitive for p in it.primitives)]
        if shapes:
            return shapes
    return [r[0] for r in table.measured(backend, primitive)]


def holdout_shapes(reference: list[tuple[int, int, int, int]], exclude: set[tuple[int, int, int, int]],
                   count: int, rng: np.random.Generator) -> list[tuple[int, int, int, int]]:
    """``count`` new shapes around ``reference``: b one of its batch values, each of m, k, n log-uniform
    in [0.75·min, 1.25·max] of its values; none in ``exclude`` (the profile's rows) or repeated."""
    if not reference:
        return []
    shapes = np.array(reference, dtype=np.float64)  # [rows, 4]
    batches = sorted({int(b) for b in shapes[:, 0]})
    lo = np.maximum(1.0, 0.75 * shapes[:, 1:].min(axis=0))
    hi = np.maximum(lo + 1.0, 1.25 * shapes[:, 1:].max(axis=0))
    seen = set(exclude)
    out: list[tuple[int, int, int, int]] = []
    for _ in range(100 * count):
        if len(out) == count:
            break
        mkn = np.exp(rng.uniform(np.log(lo), np.log(hi))).round().astype(int)
        shape = (int(rng.choice(batches)), *(int(v) for v in mkn))
        if shape not in seen:
            seen.add(shape)
            out.append(shape)
    return out


def _measurer(settings: Any, eager_probe: Any = None) -> Any:
    """A :class:`dse.profiling.profiler.Measurer` for the settings' target, timing as the profiler does."""
    tgt = kernels.resolve_target(settings.target)
    # latency is what is validated; the analytical energy source needs no measurement window
    return Measurer(settings, tgt, AnalyticalEnergyModel(), kernels.target_slug(tgt), eager_probe=eager_probe)


def validate_shapes(profile: Any, settings: Any, inventory: Any = None, *, count: int = 12, seed: int = 0,
                    backends: Iterable[str] = ("tvm", "torch"), anchors: int = 3,
                    side_by_side: bool = False) -> list[HoldoutResult]:
    """Measure ``count`` held-out shapes per kernel primitive and backend (:func:`holdout_shapes` around
    the inventory's shapes) and compare each with the cost model's prediction from ``profile``.

    Up to ``anchors`` of the primitive's profiled shapes are re-measured first, twice: their median
    ratio now / at profiling (``drift``) tells how much the machine's speed moved since the profile was
    taken (load, clocks), which a shared machine makes large, and the two back-to-back measurements
    give the noise floor (``repeatability``) no predictor can beat; results carry both so that the
    report can give the drift-corrected error next to the raw one.

    With ``side_by_side`` every profiled row of the primitive is measured again just before its held-out
    shapes, the law is fitted again on those rows, and each held-out shape is also predicted from it
    (``side_by_side_ms``): the cost model's own error, without the machine's drift since profiling, as the
    dense check's side-by-side rounds give it for the whole model.

    Every result also carries ``learned_ms``, the learned regressor's prediction (:func:`_learned`; None
    where the primitive has too few rows to fit it).
    """
    table = CostTable(profile)
    measurer = _measurer(settings)
    rng = np.random.default_rng(seed)
    results = []

    def measure_row(prim: str, backend: str, shape: tuple[int, int, int, int], dtype: str) -> dict | None:
        try:
            return measurer.measure(RowSpec(prim, backend, *shape, dtype, "kernel"))
        except Exception as exc:  # one shape failing to build must not void the others
            log.warning("%s/%s %s failed: %s", prim, backend, shape, exc)
            return None

    def measure(prim: str, backend: str, shape: tuple[int, int, int, int], dtype: str) -> float | None:
        row = measure_row(prim, backend, shape, dtype)
        return None if row is None else float(row["latency_ms"])

    for backend in backends:
        for prim in KERNEL_PRIMITIVES[backend]:
            if not table.has(backend, prim):
                log.info("no %s rows for %s: skipped", backend, prim)
                continue
            law = table.law(backend, prim)
            learned = _learned(table, backend, prim)
            dtype = kernels.get(prim).default_dtype if backend == "tvm" else "float32"
            profiled = {r[0]: r[1] for r in table.measured(backend, prim)}
            reference = reference_shapes(table, backend, prim, inventory)
            ratios, repeat = [], []
            remeasured: dict[tuple[int, int, int, int], dict] = {}  # profiled shapes measured again now
            for shape in [s for s in dict.fromkeys(reference) if s in profiled][:anchors]:
                first, again = measure_row(prim, backend, shape, dtype), measure(prim, backend, shape, dtype)
                if first is not None and again is not None:
                    remeasured[shape] = first
                    ratios.append(first["latency_ms"] / profiled[shape])
                    repeat.append(2 * (again - first["latency_ms"]) / (again + first["latency_ms"]))
            drift = float(np.median(ratios)) if ratios else 1.0
            repeatability = float(np.sqrt(np.mean(np.square(repeat)))) if repeat else None
            fresh = None
            if side_by_side:  # the anchors' first measurements are already rows of this moment
                for shape in profiled:
                    if shape not in remeasured and (row := measure_row(prim, backend, shape, dtype)) is not None:
                        remeasured[shape] = row
                fresh = CostTable(Profile.from_rows(list(remeasured.values()), profile.meta))
            for shape in holdout_shapes(reference, set(profiled), count, rng):
                now = measure(prim, backend, shape, dtype)
                if now is None:
                    continue
                est = table.estimate(backend, Call(prim, *shape))
                again = None if fresh is None else fresh.estimate(backend, Call(prim, *shape)).latency_ms
                gbt = None if learned is None else learned.predict(*shape)
                results.append(HoldoutResult(prim, backend, *shape, now, est.latency_ms,
                                             law.loo_rmspe if law else None, est.extrapolated, load_1m(), drift,
                                             repeatability, again, learned_ms=gbt,
                                             learned_loo_rmspe=learned.loo_rmspe if learned else None))
                log.info("%s/%s %s: measured %.4f ms, predicted %.4f ms (learned %s, drift %.2f)", prim, backend,
                         shape, now, est.latency_ms, "-" if gbt is None else f"{gbt:.4f} ms", drift)
    return results


def _learned(table: CostTable, backend: str, prim: str) -> LearnedLaw | None:
    """The learned regressor on the rows the table's latency law for (backend, prim) is fitted on, with the
    law's dtype and padding (the same features); None without a law or with too few rows."""
    law = table.law(backend, prim)
    rows = table.measured(backend, prim)
    if law is None or not rows:
        return None
    return fit_learned(prim, np.array([r[0] for r in rows], dtype=np.float64),
                       np.array([r[1] for r in rows], dtype=np.float64), law.dtype, law.pad)


def calibrate(inventory: Any, settings: Any, root: str | Path, *, count: int = 12, seed: int = 1,
              backends: Iterable[str] = ("tvm", "torch"), progress: bool = True) -> dict[str, Any]:
    """Add ``count`` random shapes per kernel primitive and backend around the model's range to the
    profile under ``root`` (device and target of ``settings``), measured as ``dse profile`` measures.

    A profile holds only the model's own shapes (a handful per primitive), too few for the regression
    to be trusted away from them; these extra rows are its training sample (nn-Meter samples its
    kernel configurations the same way). Rows already present are not measured again.
    """
    check_target_runnable(settings.target)
    tgt = kernels.resolve_target(settings.target)
    target_json = kernels.targets.target_to_dict(tgt)
    slug = kernels.target_slug(tgt)
    device = describe_device(kernels.targets.target_dict(settings.target))
    store = ProfileStore(root, device.as_dict(), target_json, slug, versions(), settings.header())
    store.open(model=f"calibration around {inventory.model} (batch {inventory.batch})")
    existing = {row_key(r) for r in store.rows()}
    source = energy.select_source(target_json, list(settings.energy))
    measurer = Measurer(settings, tgt, source, slug)
    rng = np.random.default_rng(seed)
    added, failed = 0, []
    try:
        for backend in backends:
            for prim in KERNEL_PRIMITIVES[backend]:
                dtype = kernels.get(prim).default_dtype if backend == "tvm" else "float32"
                present = {k[2:6] for k in existing if k[0] == prim and k[1] == backend}
                reference = [it.shape for it in inventory.items if it.kind in ("linear", "product") and any(
                    (TORCH_BASELINE[p] if backend == "torch" else p) == prim for p in it.primitives)]
                for shape in holdout_shapes(reference, present, count, rng):
                    try:
                        store.add(measurer.measure(RowSpec(prim, backend, *shape, dtype, "kernel")), replace=True)
                        added += 1
                    except Exception as exc:  # keep the others
                        failed.append(f"{prim}/{backend} {shape}: {' '.join(str(exc).split())}")
                if progress:
                    log.info("calibrated %s/%s", prim, backend)
    finally:
        source.close()
        if added:
            store.touch()
    return {"profile": str(store.path), "added": added, "failed": failed}


def summarize_shapes(results: list[HoldoutResult]) -> dict[str, Any]:
    """Overall and per (backend, primitive) error figures: raw, drift-corrected, side by side and the learned
    regressor's (``learned_*``, over the shapes it predicted), with ``learned_law_rmspe``, the law's RMSPE on
    those same shapes, and ``better``: whichever of ``law`` and ``gbt`` has the lower RMSPE there (a tie goes
    to the law, the simpler of the two)."""

    def figures(rs: list[HoldoutResult]) -> dict[str, Any]:
        out = error_summary([r.predicted_ms for r in rs], [r.measured_ms for r in rs])
        corrected = error_summary([r.predicted_ms * r.drift for r in rs], [r.measured_ms for r in rs])
        out.update({f"drift_corrected_{k}": v for k, v in corrected.items() if k != "count"})
        paired = [r for r in rs if r.side_by_side_ms is not None]
        if paired:
            sbs = error_summary([r.side_by_side_ms for r in paired], [r.measured_ms for r in paired])
            out.update({f"side_by_side_{k}": v for k, v in sbs.items()})
        fitted = [r for r in rs if r.learned_ms is not None]
        if fitted:
            measured = [r.measured_ms for r in fitted]
            out.update({f"learned_{k}": v for k, v in error_summary([r.learned_ms for r in fitted], measured).items()})
            # compared on the same shapes: overall, a primitive without a learned fit must not count for the law
            law = error_summary([r.predicted_ms for r in fitted], measured)["rmspe"]
            out["learned_law_rmspe"] = law
            out["better"] = "gbt" if out["learned_rmspe"] < law else "law"
        return out

    summary: dict[str, Any] = {"all": figures(results)}
    groups: dict[str, list[HoldoutResult]] = {}
    for r in results:
        groups.setdefault(f"{r.backend}/{r.primitive}", []).append(r)
    for key, rs in groups.items():
        summary[key] = figures(rs)
        summary[key]["law_loo_rmspe"] = rs[0].law_loo_rmspe
        summary[key]["drift"] = rs[0].drift
        summary[key]["repeatability"] = rs[0].repeatability
        summary[key]["learned_loo_rmspe"] = rs[0].learned_loo_rmspe
    return summary


# ----------------------------------------------------------------------------------------------------
# the dense PyTorch model


def time_model(model: Any, batch: int, input_size: tuple[int, int, int], *, threads: int = 2,
               min_runs: int = 30, min_seconds: float = 3.0, warmup: int = 5) -> list[float]:
    """Latencies (ms) of ``model`` on a random batch in eager PyTorch under inference mode: at least
    ``min_runs`` runs and ``min_seconds``, at most ten times ``min_runs`` once ``min_seconds`` have passed."""
    import torch

    with torch_threads(threads):
        model.eval()
        x = torch.randn(batch, *input_size)
        times: list[float] = []
        with torch.inference_mode():
            for _ in range(warmup):
                model(x)
            start = time.perf_counter()
            while len(times) < min_runs or time.perf_counter() - start < min_seconds:
                t0 = time.perf_counter()
                model(x)
                times.append((time.perf_counter() - t0) * 1e3)
                if len(times) >= 10 * min_runs and time.perf_counter() - start >= min_seconds:
                    break
    return times


def dense_torch_specs(inventory: Any) -> list[Any]:
    """The profile rows (backend torch) that price the dense model: its Linears as matmul, the msa
    products, every non-primitive op that runs under the dense choices, and the eager framework row."""
    used = set()
    for it in inventory.items:
        if it.kind == "linear":
            used.add(("matmul", *it.shape))
        elif it.choice in (None, "msa"):
            used.add((it.primitives[0], *it.shape))
    return [s for s in plan(inventory) if s.backend == "torch" and (s.primitive, *s.shape) in used]


def validate_dense_model(profile: Any, model: Any, inventory: Any, *, threads: int = 2, min_runs: int = 30,
                         min_seconds: float = 3.0, settings: Any = None, rounds: int = 0) -> dict[str, Any]:
    """Predicted (torch rows of ``profile``) vs measured eager latency of the dense model.

    The model is timed in ``rounds + 1`` bursts of equal length (``min_runs`` runs and ``min_seconds``
    between them), spread over the check, and ``measured_ms`` is the median of all their runs. One burst of
    a few seconds catches one phase of a shared host's speed: on the 2-vCPU VM of the README the embedded
    model's 3-s median moved between 3.39 and 3.74 ms within minutes while its profile rows, measured one
    after another over minutes, reproduced within 1%.

    With ``settings`` and ``rounds > 0`` the check is also made side by side: before each burst after the
    first, the dense model's torch rows are re-measured (as the profiler does), so both see the same machine
    load; ``side_by_side_error`` is the median over rounds. It separates the method's own error (sum of
    isolated ops vs the whole forward) from drift between profiling time and now.
    """
    dense = Assignment.uniform(model)
    mc = CostModel(profile, backend="torch").for_model(inventory)
    rows = mc.per_layer(dense)
    predicted = mc.predict(dense).latency_ms
    measured_rows = sum(1 for r in rows if r.estimate.source == "measured")
    side_by_side = settings is not None and rounds > 0
    bursts = rounds + 1 if side_by_side else 1
    per_burst = {"threads": threads, "min_runs": max(1, min_runs // bursts), "min_seconds": min_seconds / bursts}
    loads = [load_1m()]
    times = time_model(model, inventory.batch, inventory.input_size, **per_burst)
    loads.append(load_1m())
    preds, meas = [], []
    if side_by_side:
        measurer = _measurer(dataclasses.replace(settings, torch_threads=threads), inventory.eager_probe)
        specs = dense_torch_specs(inventory)
        for _ in range(rounds):
            fresh = Profile.from_rows([measurer.measure(s) for s in specs], {})
            preds.append(CostModel(fresh, backend="torch").for_model(inventory).predict(dense).latency_ms)
            burst = time_model(model, inventory.batch, inventory.input_size, **per_burst)
            loads.append(load_1m())
            meas.append(float(np.median(burst)))
            times += burst
    arr = np.asarray(times)
    measured = float(np.median(arr))
    out = {
        "model": inventory.model,
        "batch": inventory.batch,
        "threads": threads,
        "predicted_ms": predicted,
        "measured_ms": measured,
        "measured_p90_ms": float(np.percentile(arr, 90)),
        "measured_min_ms": float(arr.min()),
        "runs": len(times),
        "bursts": bursts,
        "rel_error": (predicted - measured) / measured,
        "rows_measured": measured_rows,
        "rows_predicted": len(rows) - measured_rows,
    }
    if side_by_side:
        errors = [(p - m) / m for p, m in zip(preds, meas)]
        out.update(side_by_side_rounds=rounds, side_by_side_predicted_ms=float(np.median(preds)),
                   side_by_side_measured_ms=float(np.median(meas)), side_by_side_error=float(np.median(errors)))
    out["load_1m"] = max((v for v in loads if v is not None), default=None)
    return out


def format_figure(summary: dict[str, Any], prefix: str = "") -> str:
    # a prefix with its own count (side by side, learned) may cover fewer shapes than the whole
    count = summary.get(prefix + "count", summary.get("count"))
    if not count:
        return "no shapes"
    return (f"{count} shapes: {100 * summary[prefix + 'within_10']:.0f}% within ±10%, "
            f"{100 * summary[prefix + 'within_15']:.0f}% within ±15%, RMSPE {100 * summary[prefix + 'rmspe']:.1f}%")
