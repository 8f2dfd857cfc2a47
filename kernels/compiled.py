"""A compiled TVM function and how it is timed: 64-byte aligned NumPy buffers, :class:`Timing` statistics,
private-cache eviction for cold timings, and :class:`CompiledKernel` (one primitive compiled for one shape
and target). :func:`kernels.build.build` makes them; the tuner and the profiler time them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kernels import primitives, targets
from kernels.errors import KernelError, UsageError

if TYPE_CHECKING:
    import tvm

log = logging.getLogger(__name__)

# TVM assumes its buffers are 64-byte aligned (runtime kAllocAlignment) and emits aligned vector
# loads; NumPy only guarantees 16 bytes, so a misaligned argument would crash the kernel.
ALIGNMENT = 64


def aligned_empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on an ALIGNMENT-byte boundary."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + ALIGNMENT, dtype=np.uint8)
    offset = -raw.ctypes.data % ALIGNMENT
    return raw[offset : offset + nbytes].view(dtype).reshape(shape)


def aligned(a: np.ndarray) -> np.ndarray:
    """``a`` itself if C-contiguous and aligned, else an aligned copy."""
    if a.flags.c_contiguous and a.ctypes.data % ALIGNMENT == 0:
        return a
    out = aligned_empty(a.shape, a.dtype)
    out[...] = a
    return out


# Every function a TVM library exports gets an FFI wrapper symbol ``__tvm_ffi_<name>`` in its host code.
_FFI_SYMBOL = re.compile(r'define[^@\n]*@"?__tvm_ffi_([A-Za-z0-9_.$]+)"?\(')


def library_functions(module: Any) -> list[str]:
    """Names of the functions compiled into a built TVM library (an ``Executable`` or runtime module, and its
    imports), read from its host LLVM code: what the build really produced, not what the IR asked for.
    Empty when no module of the tree keeps its LLVM source (a library loaded from a ``.so``: use
    :func:`library_has`)."""
    root = getattr(module, "mod", module)
    found: set[str] = set()
    stack, seen = [root], set()
    while stack:
        mod = stack.pop()
        if id(mod) in seen:
            continue
        seen.add(id(mod))
        if mod.kind == "llvm":
            found.update(_FFI_SYMBOL.findall(mod.inspect_source("ll")))
        stack.extend(mod.imports)
    return sorted(found)


def library_has(module: Any, name: str) -> bool:
    """Whether a built or loaded TVM library (or one of its imports) defines function ``name``."""
    root = getattr(module, "mod", module)
    return bool(root.implements_function(name, True))


@dataclasses.dataclass(frozen=True)
class Timing:
    """Wall time of one kernel call from ``time_evaluator`` repeats (each the mean of ``number`` calls)."""

    median_ms: float
    p90_ms: float
    mean_ms: float
    repeats: int
    number: int
    results_ms: tuple[float, ...]

    @classmethod
    def from_seconds(cls, results_s: list[float], number: int) -> Timing:
        ms = np.asarray(results_s, dtype=np.float64) * 1e3
        return cls(
            median_ms=float(np.median(ms)),
            p90_ms=float(np.percentile(ms, 90)),
            mean_ms=float(ms.mean()),
            repeats=len(ms),
            number=number,
            results_ms=tuple(float(v) for v in ms),
        )


# ---- timing with the weights out of the private caches ------------------------------------------------

_EVICT_FUNC = "kernels.evict_private_caches"
_scratch: np.ndarray | None = None


def l2_total_bytes() -> int:
    """Sum of the L2 caches of this machine's cores (sysfs), 8 MiB where it cannot be read."""
    return sum(targets.host_l2_caches()) or 8 << 20


def evict_private_caches(*keep_warm: Any) -> None:
    """Stream a buffer twice the size of all L2 caches (pushing everything else out of L1/L2, into the
    shared L3), then read ``keep_warm`` (DLPack/NumPy arrays) back in. In a model's forward a layer's input
    was just written by the layer before, while its weights were last used a whole forward ago: when a
    model's weights outgrow L2 they arrive from L3 (measured +6-14% per GEMM for the embedded model's
    layers against back-to-back calls on the same arrays)."""
    global _scratch
    if _scratch is None:
        _scratch = np.ones(2 * l2_total_bytes() // 4, dtype=np.float32)
    _scratch.sum()
    for a in keep_warm:
        np.asarray(np.from_dlpack(a) if hasattr(a, "__dlpack__") else a).sum()


def _register_evict() -> str:
    import tvm_ffi

    if tvm_ffi.get_global_func(_EVICT_FUNC, allow_missing=True) is None:
        # time_evaluator's f_preproc runs it before each repeat with the call's arguments: keep the input warm
        tvm_ffi.register_global_func(_EVICT_FUNC, lambda *args: evict_private_caches(args[0]))
    return _EVICT_FUNC


def time_cold(module: Any, dev: Any, args: list[Any], samples: int) -> Timing:
    """``samples`` single calls, each after :func:`evict_private_caches` (the input kept warm)."""
    evaluator = module.time_evaluator("main", dev, number=1, repeat=int(samples), min_repeat_ms=0,
                                      f_preproc=_register_evict())
    return Timing.from_seconds(list(evaluator(*args).results), 1)


class CompiledKernel:
    """A compiled primitive for one ``(b, m, k, n, dtype, target)``; call it with NumPy arrays.

    Attributes: ``name``, ``shape`` (b, m, k, n), ``dtype``, ``target`` (``tvm.target.Target``),
    ``schedule`` ("default" | "tuned"), ``tuned_trials`` (the MetaSchedule budget behind the
    tuning record, 0 if the kernel was never tuned), ``primfunc`` (the scheduled PrimFunc).
    """

    def __init__(
        self,
        name: str,
        shape: tuple[int, int, int, int],
        dtype: str,
        target: tvm.target.Target,
        executable: Any,
        primfunc: tvm.tirx.PrimFunc,
        schedule: str,
        tuned_trials: int,
    ) -> None:
        self.name = name
        self.shape = shape
        self.dtype = dtype
        self.target = target
        self.executable = executable
        self.primfunc = primfunc
        self.schedule = schedule
        self.tuned_trials = tuned_trials
        self._prim = primitives.get(name)
        b, m, k, n = shape
        self.arg_shapes = self._prim.arg_shapes(b, m, k, n)
        self.arg_dtypes = self._prim.arg_dtypes(dtype)
        self.out_shape = self._prim.out_shape(b, m, k, n)
        self.out_dtype = self._prim.out_dtype(dtype)
        self._func: Any = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        b, m, k, n = self.shape
        return (
            f"CompiledKernel({self.name}, b={b}, m={m}, k={k}, n={n}, dtype={self.dtype}, "
            f"target={targets.target_slug(self.target)}, schedule={self.schedule})"
        )

    @property
    def is_cuda(self) -> bool:
        return targets.is_cuda(self.target)

    def _function(self) -> Any:
        targets.require_runnable(self.target)
        if self._func is None:
            with self._lock:
                if self._func is None:
                    self._func = self.executable.mod["main"]
        return self._func

    def check_args(self, arrays: tuple[Any, ...]) -> list[np.ndarray]:
        """Arrays as C-contiguous NumPy of the kernel's dtypes, validated (UsageError otherwise)."""
        if len(arrays) != len(self.arg_shapes):
            raise UsageError(
                f"{self.name} takes {len(self.arg_shapes)} arrays ({', '.join(self._prim.arg_names)}), got {len(arrays)}"
            )
        out = []
        for label, a, shape, dtype in zip(self._prim.arg_names, arrays, self.arg_shapes, self.arg_dtypes):
            a = np.asarray(a)
            if tuple(a.shape) != tuple(shape):
                raise UsageError(
                    f"{self.name}: {label} has shape {tuple(a.shape)}, the kernel was built for {shape}"
                )
            if a.dtype != np.dtype(dtype):
                if not np.can_cast(a.dtype, dtype, casting="same_kind"):
                    raise UsageError(f"{self.name}: {label} is {a.dtype}, expected {dtype}")
                a = a.astype(dtype)
            out.append(aligned(a))
        if self._prim.name in ("matshift", "matshift_decode"):
            primitives.check_shift_sign(out[1], out[2])
        return out

    def _device_args(self, arrays: list[np.ndarray]) -> tuple[list[Any], Any]:
        import tvm

        dev = targets.device_for(self.target)
        if dev.dlpack_device_type() == tvm.cpu(0).dlpack_device_type():
            # NumPy buffers pass through DLPack without a copy.
            return list(arrays), aligned_empty(self.out_shape, self.out_dtype)
        args = [tvm.runtime.tensor(a, dev) for a in arrays]
        return args, tvm.runtime.empty(self.out_shape, self.out_dtype, dev)

    def __call__(self, *arrays: Any) -> np.ndarray:
        fn = self._function()
        args, out = self._device_args(self.check_args(arrays))
        fn(*args, out)
        return out if isinstance(out, np.ndarray) else out.numpy()

    def run_into(self, *args: Any) -> None:
        """Call with DLPack-capable buffers, the output last; no checks.

        The buffers must be C-contiguous, of the kernel's shapes and dtypes and 64-byte aligned
        (fresh torch CPU tensors are; views with an offset may not be).
        """
        self._function()(*args)

    def time(self, *arrays: Any, min_repeat_ms: float = 50.0, repeat: int = 10, number: int = 1,
             cold_weights: bool = False) -> Timing:
        """Median/p90 of ``repeat`` timings (TVM ``time_evaluator``, after a warm-up call). ``cold_weights``:
        ``repeat`` single calls instead, each with everything but the first argument (the input) evicted
        to L3 first (:func:`evict_private_caches`), as a layer's weights arrive inside a model's forward."""
        fn = self._function()
        if not arrays:
            b, m, k, n = self.shape
            arrays = primitives.random_inputs(self.name, b, m, k, n, self.dtype)
        args, out = self._device_args(self.check_args(arrays))
        fn(*args, out)  # warm-up: page in buffers, JIT-free but first-touch costs
        if cold_weights:
            return time_cold(self.executable.mod, targets.device_for(self.target), [*args, out], repeat)
        evaluator = self.executable.mod.time_evaluator(
            "main",
            targets.device_for(self.target),
            number=int(number),
            repeat=int(repeat),
            min_repeat_ms=int(round(min_repeat_ms)),
        )
        res = evaluator(*args, out)
        return Timing.from_seconds(list(res.results), number)

    def export_library(self, path: str | Path) -> Path:
        """Write the compiled kernel as a shared library (``.so``; ``.tar`` keeps the objects)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.executable.export_library(str(path))
        return path

    def describe(self) -> dict[str, Any]:
        b, m, k, n = self.shape
        return {
            "primitive": self.name,
            "batch": b,
            "m": m,
            "k": k,
            "n": n,
            "dtype": self.dtype,
            "target": json.dumps(targets.target_to_dict(self.target), sort_keys=True),
            "schedule": self.schedule,
            "tuned_trials": self.tuned_trials,
        }


def compile_primfunc(func: tvm.tirx.PrimFunc, target: tvm.target.Target) -> Any:
    import tvm

    try:
        return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
    except Exception as exc:
        first = str(exc).strip().splitlines()
        raise KernelError(
            f"TVM failed to compile for {targets.target_slug(target)}: {first[-1] if first else exc}"
        ) from exc
