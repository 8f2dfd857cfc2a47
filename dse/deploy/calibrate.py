"""Calibrating a profile on its device: a handful of whole compiled models against their uncalibrated prediction.

The last step of profiling a model (``dse profile``, the profile stage of ``dse run``): the models of
:func:`dse.deploy.holdout.calibration_plans` — the corner designs, then seeded random assignments — are compiled as
``dse export`` compiles them, timed interleaved between two timings of the host-speed reference kernel, brought to
the host speed of the profile's rows, and the in-context factors of :mod:`dse.cost.calibration` are fitted on them
and stored in the profile's metadata under ``calibration.<model>@<batch>``. Every cost model built from the
profile for that model and batch uses them from then on (``cost.calibrated``).

The validation's held-out assignments (``dse cost --validate``) are drawn with another seed and never include a
calibration model.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, NamedTuple

from torch import nn

from dse.checkpoints import build_dense
from dse.config import Config
from dse.cost import calibration
from dse.cost.calibration import Calibration
from dse.cost.model import CostTable
from dse.cost.sources import model_cost
from dse.deploy.holdout import calibration_plans, calibration_seed, choice_counts, time_compiled
from dse.errors import ProfileError
from dse.hardware.threads import use_all_cores
from dse.profiling import reference, store

log = logging.getLogger(__name__)


def calibrate_profile(cfg: Config, profile_csv: str | Path, dense: nn.Module, inventory: Any, *,
                      count: int | None = None, rounds: int = 2, per_round: int = 20) -> tuple[Calibration, list[dict]]:
    """Fit and store the in-context factors of ``inventory``'s model on the profile ``profile_csv`` (module
    docstring); returns them and one row per calibration model (choice counts, uncalibrated and calibrated
    prediction, measured ms at the profile's host speed)."""
    started = time.perf_counter()
    use_all_cores()
    count = cfg.profile.calibration_models if count is None else count
    profile = store.load_profile(profile_csv)
    table = CostTable(profile)
    raw = model_cost(table, cfg.cost, inventory, "tvm", calibrated=False)
    plans = calibration_plans(raw, count, calibration_seed(cfg))
    timed = time_compiled(cfg, dense, plans, inventory, table, seed=calibration_seed(cfg), rounds=rounds,
                          per_round=per_round, what="calibration model")
    ratio = reference.speed_ratio(profile.meta, timed.reference_ms)
    if ratio is not None and not 0.8 <= ratio <= 1.25:
        log.warning("the host ran the reference kernel %.2fx as long as when the profile's rows were measured: the "
                    "calibration divides that out, but a busy host hits kernels unevenly; rerun `dse profile` on a "
                    "quiet host", ratio)
    # measured now, brought block by block to the speed the rows were measured at (a slow minute is not a factor)
    then = reference.stored(profile.meta)
    measured = timed.at_speed_ms(float(then["latency_ms"])) if then else timed.measured_ms()
    components = [raw.components(p) for p in plans]
    fitted = calibration.fit(components, measured, model=inventory.model, batch=inventory.batch, speed_ratio=ratio)
    store.merge_meta_entry(profile_csv, calibration.META_KEY, calibration.key(inventory.model, inventory.batch),
                           fitted.as_meta())
    rows = []
    for plan, comp, m in zip(plans, components, measured):
        uncal = sum(comp.values())
        cal = fitted.predict(comp)
        rows.append({**choice_counts(plan), "uncalibrated_ms": uncal, "calibrated_ms": cal, "measured_ms": m,
                     "uncalibrated_error": (uncal - m) / m, "calibrated_error": (cal - m) / m})
    log.info("%s (%.1f s, host speed ratio %s)", fitted.describe(), time.perf_counter() - started,
             "unknown" if ratio is None else f"{ratio:.2f}")
    return fitted, rows


class CalibrationRun(NamedTuple):
    fitted: Calibration | None
    models: list[dict]  # one row per calibration model when fitted now
    fresh: bool  # fitted now (else stored, or none)
    skipped: str | None  # why there is none


def ensure_calibration(cfg: Config, profile_csv: str | Path, inventory: Any, *, refit: bool) -> CalibrationRun:
    """The calibration for the profile stage: fitted when ``refit`` (rows were just measured) or when the profile
    has none for this model and batch; none when ``profile.calibration_models`` is 0 or the profile cannot price the
    compiled model (e.g. profiled without its non-primitive ops). The weights do not matter to latency: the
    config's model as built."""
    if cfg.profile.calibration_models <= 0:
        return CalibrationRun(None, [], False, "profile.calibration_models is 0")
    found = calibration.stored(store.read_meta(Path(profile_csv)), inventory.model, inventory.batch)
    if found is not None and not refit:
        return CalibrationRun(found, [], False, None)
    try:
        fitted, rows = calibrate_profile(cfg, profile_csv, build_dense(cfg), inventory)
    except ProfileError as exc:
        log.warning("in-context calibration skipped: %s", exc)
        return CalibrationRun(None, [], False, str(exc))
    return CalibrationRun(fitted, rows, True, None)


__all__ = ["CalibrationRun", "calibrate_profile", "ensure_calibration"]
