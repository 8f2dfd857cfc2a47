"""Per-function wall time inside a compiled Relax model, from the VM's own instrument hook.

A whole-model latency says nothing about where it goes; the profile prices each kernel alone. TVM 0.27's
``relax.VirtualMachine.set_instrument(fn)`` calls ``fn(func, func_symbol, before_run, ret_value, *args)``
before and after every packed call of the VM's bytecode (``src/runtime/vm/vm.cc``, ``RunInstrCall``), so the
time between the two calls of one function is that call's wall time as it runs inside the forward: caches,
thread-pool state and memory layout as the other kernels leave them. The hook's own cost (two Python calls
through the FFI) is included in every sample; ``floor_ms`` (the cheapest function's median, a VM builtin
that does almost nothing) bounds it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from kernels.errors import UsageError


@dataclasses.dataclass(frozen=True)
class FunctionTimes:
    """One function's calls over ``runs`` forwards: every call's wall time, in call order."""

    name: str
    runs: int
    samples_ms: tuple[float, ...]

    @property
    def calls_per_run(self) -> float:
        return len(self.samples_ms) / self.runs

    @property
    def median_ms(self) -> float:
        """Median of one call."""
        return float(np.median(self.samples_ms))

    @property
    def per_run_ms(self) -> float:
        """Median call time times calls per forward: this function's share of one forward."""
        return self.median_ms * self.calls_per_run


def time_calls(vm: Any, run: Callable[[], Any], runs: int, *, warmup: int = 2) -> dict[str, FunctionTimes]:
    """``{function name: FunctionTimes}`` of ``runs`` calls of ``run()`` (which must call into ``vm``, a
    ``tvm.relax.VirtualMachine``), after ``warmup`` untimed ones. The hook is removed afterwards, also on
    error, so the VM times as before."""
    if runs < 1:
        raise UsageError(f"time_calls needs at least one run, got {runs}; pass runs >= 1")
    for _ in range(warmup):
        run()
    samples: dict[str, list[float]] = {}
    started: list[tuple[str, int]] = []  # a stack: a packed function may call back into the VM

    def hook(_func: Any, name: Any, before_run: bool, _ret: Any, *_args: Any) -> int:
        now = time.perf_counter_ns()
        if before_run:
            started.append((str(name), now))
        elif started:
            label, t0 = started.pop()
            samples.setdefault(label, []).append((now - t0) / 1e6)
        return 0  # VMInstrumentReturnKind.NO_OP: run the call

    vm.set_instrument(hook)
    try:
        for _ in range(runs):
            run()
    finally:
        vm.set_instrument(None)
    return {name: FunctionTimes(name, runs, tuple(values)) for name, values in samples.items()}


def floor_ms(times: dict[str, FunctionTimes]) -> float:
    """The cheapest function's median call: an upper bound of what the hook adds to every sample."""
    return min((t.median_ms for t in times.values()), default=0.0)


__all__ = ["FunctionTimes", "floor_ms", "time_calls"]
