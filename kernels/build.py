"""Build a primitive for a shape and target, call it on NumPy arrays, time it, export it.

``build(name, b=, m=, k=, n=, target="cpu")`` compiles the default schedule (``kernels.schedules``)
or, when a tuning record exists for the kernel in the target's tuning database and it measured
faster, the tuned one (``kernels.tuning``). Results are cached in-process, so asking twice for the
same kernel costs nothing. CUDA kernels compile without a GPU; calling or timing one raises
``TargetUnavailableError``.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kernels import primitives, schedules, targets, tuning
from kernels.compiled import CompiledKernel, Timing, compile_primfunc, time_cold
from kernels.cpu_schedules import prepacked_gemm
from kernels.errors import UsageError

if TYPE_CHECKING:
    import tvm

log = logging.getLogger(__name__)

_CACHE: dict[tuple[Any, ...], CompiledKernel] = {}
_CACHE_LOCK = threading.Lock()


def build(
    name: str,
    b: int,
    m: int,
    k: int,
    n: int,
    target: Any = "cpu",
    dtype: str | None = None,
    trials: int = 0,
    tuning_dir: str | Path | None = None,
) -> CompiledKernel:
    """Compile primitive ``name`` for ``(b, m, k, n)`` on ``target`` (cached per process).

    ``trials > 0`` tunes with MetaSchedule when the target's database has no record for this
    kernel yet; an existing record is reused and never re-tuned (``trials=0`` also uses it).
    The tuned schedule is used only if it measured faster than the default.
    """
    prim = primitives.get(name)
    primitives.check_shape(b, m, k, n)
    dtype = prim.check_dtype(dtype)
    if trials < 0:
        raise UsageError(f"trials must be >= 0, got {trials}")
    tgt = targets.resolve_target(target)
    root = tuning.tuning_root(tuning_dir)
    key = (
        name,
        b,
        m,
        k,
        n,
        dtype,
        json.dumps(targets.target_to_dict(tgt), sort_keys=True),
        trials,
        str(root),
    )
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
    if hit is not None:
        return hit
    default_func = schedules.default_primfunc(name, b, m, k, n, dtype, tgt)
    default_exe = compile_primfunc(default_func, tgt)
    kernel = CompiledKernel(name, (b, m, k, n), dtype, tgt, default_exe, default_func, "default", 0)
    choice = tuning.select(kernel, trials=trials, tuning_dir=root)
    if choice is not None:
        kernel = choice
    with _CACHE_LOCK:
        _CACHE.setdefault(key, kernel)
    log.debug("built %r", kernel)
    return kernel


def scheduled_primfunc(
    name: str, b: int, m: int, k: int, n: int, target: Any = "cpu", dtype: str | None = None
) -> tvm.tirx.PrimFunc:
    """The PrimFunc that :func:`build` compiles (tuned if that won), for embedding in a Relax module.

    It carries no ``global_symbol``: ``BlockBuilder.add_func(func, name)`` names it, and
    ``relax.call_tir(gv, args, out_sinfo)`` calls it (the output is the last argument).
    """
    func = build(name, b=b, m=m, k=k, n=n, target=target, dtype=dtype).primfunc
    return func.without_attr("global_symbol") if func.attrs and "global_symbol" in func.attrs else func


def te_compute(name: str) -> Any:
    """The primitive's TE compute function on TE tensors (for ``BlockBuilder.emit_te``)."""
    return primitives.get(name).te_fn


def clear_cache() -> None:
    with _CACHE_LOCK:
        _CACHE.clear()


class PrepackedKernel:
    """A CPU ``matmul``/``matshift_decode`` as the exporter runs it (:class:`kernels.cpu_schedules.PrepackedGemm`):
    the weights are packed once by :meth:`load`, and a call is the GEMM on the packed weights."""

    def __init__(self, name: str, b: int, m: int, k: int, n: int, target: Any = "cpu"):
        import tvm

        self.target = targets.resolve_target(target)
        self.name, self.shape = name, (b, m, k, n)
        split = prepacked_gemm(name, b, m, k, n, self.target)
        self._pack = compile_primfunc(split.pack, self.target).mod["main"]
        self._gemm_exe = compile_primfunc(split.gemm, self.target)
        self._gemm = self._gemm_exe.mod["main"]
        self._dev = targets.device_for(self.target)
        self._wp = tvm.runtime.empty(split.packed_shape, "float32", self._dev)
        self._x: Any = None
        self._out = tvm.runtime.empty((b, m, n), "float32", self._dev)

    def load(self, x: np.ndarray, *weights: np.ndarray) -> None:
        """Pack ``weights`` (``w``, or ``shift`` and ``sign``) once and keep ``x`` as the call's input."""
        import tvm

        self._pack(*[tvm.runtime.tensor(np.ascontiguousarray(w), self._dev) for w in weights], self._wp)
        self._x = tvm.runtime.tensor(np.ascontiguousarray(x, dtype="float32"), self._dev)

    def call(self) -> None:
        self._gemm(self._x, self._wp, self._out)

    def run(self) -> np.ndarray:
        self.call()
        return self._out.numpy()

    def time(self, *, min_repeat_ms: float = 50.0, repeat: int = 10, cold_weights: bool = False) -> Timing:
        """Median/p90 of ``repeat`` timings of the GEMM alone (``time_evaluator``, after a warm-up call);
        ``cold_weights`` as in :meth:`CompiledKernel.time`."""
        self.call()
        if cold_weights:
            return time_cold(self._gemm_exe.mod, self._dev, [self._x, self._wp, self._out], repeat)
        evaluator = self._gemm_exe.mod.time_evaluator("main", self._dev, number=1, repeat=int(repeat),
                                                      min_repeat_ms=int(round(min_repeat_ms)))
        return Timing.from_seconds(list(evaluator(self._x, self._wp, self._out).results), 1)
