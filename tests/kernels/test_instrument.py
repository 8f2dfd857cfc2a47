"""kernels.instrument: per-function times of a Relax VM, against a packed function of known duration."""

from __future__ import annotations

import time

import numpy as np
import pytest
import tvm
import tvm_ffi
from tvm import relax
from tvm.script import relax as R

from kernels.errors import UsageError
from kernels.instrument import floor_ms, time_calls

SLEEP_MS = 3.0
SLEEP_FUNC = "tests.instrument_sleep"  # spelled out in Module too: TVMScript takes a literal


def _sleep(x):  # the reference duration: the VM calls it once per forward
    time.sleep(SLEEP_MS / 1e3)
    return x


if tvm_ffi.get_global_func(SLEEP_FUNC, allow_missing=True) is None:
    tvm_ffi.register_global_func(SLEEP_FUNC, _sleep)


@tvm.script.ir_module
class Module:
    @R.function(pure=False)  # it calls an impure packed function
    def main(x: R.Tensor((4,), "float32")):
        y = R.add(x, x)
        z = R.multiply(y, x)
        w = R.call_packed("tests.instrument_sleep", z, sinfo_args=R.Tensor((4,), "float32"))
        return w


@pytest.fixture(scope="module")
def vm():
    exe = tvm.compile(Module, target="llvm")
    return relax.VirtualMachine(exe, tvm.cpu())


def test_calls_are_counted_and_timed(vm):
    x = tvm.runtime.tensor(np.ones(4, "float32"))
    times = time_calls(vm, lambda: vm["main"](x), runs=5, warmup=1)
    assert times["add"].calls_per_run == 1 and times["multiply"].calls_per_run == 1
    assert times["add"].runs == 5 and len(times["add"].samples_ms) == 5
    sleep = times[SLEEP_FUNC]
    assert sleep.calls_per_run == 1
    # sleep() waits at least its argument; the hook's own cost is microseconds, not milliseconds
    assert SLEEP_MS <= sleep.median_ms < SLEEP_MS + 2.0
    assert sleep.per_run_ms == pytest.approx(sleep.median_ms)
    assert floor_ms(times) < times["add"].median_ms + 1e-9 and floor_ms(times) < 0.5


class _Spy:
    """The VM with its hook settings recorded."""

    def __init__(self, vm):
        self.vm, self.hooks = vm, []

    def set_instrument(self, fn):
        self.hooks.append(fn)
        self.vm.set_instrument(fn)


def test_hook_removed_afterwards_also_on_error(vm):
    x = tvm.runtime.tensor(np.ones(4, "float32"))
    spy = _Spy(vm)
    time_calls(spy, lambda: vm["main"](x), runs=1)
    assert spy.hooks[0] is not None and spy.hooks[-1] is None

    def failing():
        vm["main"](x)
        raise RuntimeError("boom")

    spy.hooks.clear()
    with pytest.raises(RuntimeError, match="boom"):
        time_calls(spy, failing, runs=1, warmup=0)
    assert spy.hooks[-1] is None


def test_needs_a_run(vm):
    with pytest.raises(UsageError, match="runs >= 1"):
        time_calls(vm, lambda: None, runs=0)
