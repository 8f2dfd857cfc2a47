"""The host-speed reference: one fixed kernel timed when a profile is measured and again when it is checked.

A shared host runs 10-20% slower or faster for minutes at a time (README, "The host's speed moves"), so a
prediction from rows measured an hour ago is off by that much before the cost model is wrong at all. The
profiler times :data:`KERNEL` (the project's own ``matmul`` at one fixed shape, compiled for the profile's
target, so it runs in the thread pool and code the rows ran in) before and after its rows and stores the
median in the profile's metadata (``reference_kernel``); a check times it again and divides: the ratio
now / then is how much slower the host is now, and a prediction times that ratio is the drift-corrected one.
One kernel is a thermometer, not a model: it catches a host-wide slowdown, not a slowdown of one kernel.
Profiles written before the field existed load as before; their ratio is unknown (None).
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping, Sequence
from typing import Any

import kernels

META_KEY = "reference_kernel"
KERNEL = ("matmul", 1, 256, 256, 256)  # (primitive, b, m, k, n): ~0.3 ms on 2 cores, long enough to time well


def time_reference(target: Any, *, repeat: int = 7, min_repeat_ms: float = 20.0) -> float:
    """Median ms of :data:`KERNEL` compiled for ``target``, timed as the profile's TVM rows are (warm)."""
    prim, b, m, k, n = KERNEL
    return float(kernels.build(prim, b, m, k, n, target=target).time(min_repeat_ms=min_repeat_ms,
                                                                    repeat=repeat).median_ms)


def probe(target: Any) -> float:
    """A quick reading of :data:`KERNEL` (3 repeats of >= 5 ms, ~20 ms) to take between the blocks of an
    interleaved measurement; the same median in expectation as :func:`time_reference`, noisier."""
    return time_reference(target, repeat=3, min_repeat_ms=5.0)


def record(samples_ms: Sequence[float], load_1m: float | None = None) -> dict[str, Any]:
    """The metadata entry for reference timings taken while a profile was measured: the fastest of them, since a
    timing is only ever made slower by the host (another tenant, a preempted repeat), never faster."""
    prim, b, m, k, n = KERNEL
    return {"primitive": prim, "shape": [b, m, k, n], "latency_ms": float(min(samples_ms)),
            "samples_ms": [float(v) for v in samples_ms], "load_1m": load_1m,
            "measured_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")}


def stored(meta: Mapping[str, Any]) -> dict[str, Any] | None:
    """The profile's reference entry, or None (a profile from before the field, or of another kernel)."""
    entry = meta.get(META_KEY)
    if not isinstance(entry, Mapping) or entry.get("latency_ms") is None:
        return None
    prim, *shape = KERNEL
    if entry.get("primitive") != prim or list(entry.get("shape") or []) != shape:
        return None
    return dict(entry)


def speed_ratio(meta: Mapping[str, Any], now_ms: float) -> float | None:
    """now / at profiling for the reference kernel (above 1: the host is slower now), None when unknown."""
    then = stored(meta)
    if then is None or not float(then["latency_ms"]) > 0:
        return None
    return float(now_ms) / float(then["latency_ms"])


__all__ = ["KERNEL", "META_KEY", "probe", "record", "speed_ratio", "stored", "time_reference"]
