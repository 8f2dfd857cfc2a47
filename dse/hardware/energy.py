"""Energy per kernel call, from three sources behind one interface, every result labelled.

- ``nvml``  (:class:`NvmlMeter`): the GPU's cumulative energy counter, differenced over a window of
  repeated calls (Zeus' method: You, Chung & Chowdhury, NSDI 2023); power polling + trapezoid integration
  on GPUs without it.
- ``rapl``  (:class:`RaplMeter`): CPU package energy from the Linux powercap sysfs counters.
- ``model`` (:class:`AnalyticalEnergyModel`): operation and byte counts × 45 nm per-operation
  energies (an ASIC projection, not a measurement of this machine; always available).

:func:`select_source` picks the best source for a target; :func:`measure_energy` gives the profiler
one call that returns an :class:`EnergyReading` whichever source it got.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self

import kernels
from dse.hardware.nvml import Nvml, NvmlError
from kernels.errors import ConfigError, ShiftAddError, TargetUnavailableError, UnknownNameError, UsageError
from kernels.targets import target_kind_of

logger = logging.getLogger(__name__)

# The NVML energy counter updates about every 100 ms (as Zeus, NSDI 2023, reports): a window must span several
# updates or it reads 0 J / one quantum. 0.5 s = 5 updates, the error from one missed update <= 20%
# in the worst case and far less on average; raise it for publication-grade numbers (Zeus uses 1-10 s).
DEFAULT_MIN_WINDOW_S = 0.5
DEFAULT_IDLE_S = 0.5
DEFAULT_MAX_CALLS = 100_000
# Zeus' PowerMonitor never polls faster than 0.05 s; NVML power readings are not fresher than that.
DEFAULT_POWER_POLL_S = 0.05
# How often a counter is read during a window so that a wrap or a reset is seen step by step.
DEFAULT_COUNTER_POLL_S = 0.1
DEFAULT_RAPL_ROOT = "/sys/class/powercap"


class EnergyError(ShiftAddError):
    """An energy measurement started but could not produce a trustworthy number."""


def _no_sync() -> None:
    return None


# ---------------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EnergyReading:
    """Energy per call of one measured (or modelled) function.

    ``dynamic_energy_mj_per_call`` = (window energy − idle_power_w · window_s) / calls: what the work
    added on top of the device idling; None when idle power was not measured. It can come out slightly
    negative for tiny kernels because both terms are noisy; it is reported as measured.
    """

    source: str
    energy_mj_per_call: float
    calls: int
    window_s: float
    idle_power_w: float | None
    dynamic_energy_mj_per_call: float | None
    method: str = ""  # "counter", "power-polling", "analytical"

    @property
    def energy_mj(self) -> float:
        """Energy of the whole window (all calls)."""
        return self.energy_mj_per_call * self.calls

    @property
    def average_power_w(self) -> float | None:
        return self.energy_mj / self.window_s / 1000.0 if self.window_s > 0 else None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class EnergyEstimate:
    """Analytical energy of one call; ``breakdown`` and ``counts`` are keyed by unit-energy name."""

    energy_mj: float
    breakdown: dict[str, float]  # mJ per unit-energy key
    counts: dict[str, int] = field(default_factory=dict)  # operations (or bytes) per key

    def as_reading(self) -> EnergyReading:
        # A model has no idle term: all of its energy is dynamic.
        return EnergyReading(
            source=AnalyticalEnergyModel.name,
            energy_mj_per_call=self.energy_mj,
            calls=1,
            window_s=0.0,
            idle_power_w=None,
            dynamic_energy_mj_per_call=self.energy_mj,
            method="analytical",
        )


# ---------------------------------------------------------------------------------------------------
# measurement windows: read something at the start, keep reading while the work runs, stop
# ---------------------------------------------------------------------------------------------------
def integrate_power_mj(times_s: Sequence[float], powers_mw: Sequence[float]) -> float:
    """Trapezoid rule over (time, power) samples: mW × s = mJ."""
    if len(times_s) != len(powers_mw):
        raise ValueError("times_s and powers_mw must have the same length")
    return sum(
        (t1 - t0) * (p0 + p1) / 2.0
        for t0, t1, p0, p1 in zip(times_s[:-1], times_s[1:], powers_mw[:-1], powers_mw[1:])
    )


class _Window(ABC):
    """A measurement window with an optional background poller. Not reusable."""

    method: ClassVar[str]

    def __init__(self, poll_s: float | None) -> None:
        self._poll_s = poll_s
        self._stop_event = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None  # set by the poller; the caller may stop early
        self._t0 = 0.0

    def start(self) -> None:
        self._t0 = self._first_sample()
        if self._poll_s:
            self._thread = threading.Thread(target=self._poll, name=f"energy-{self.method}", daemon=True)
            self._thread.start()

    def stop(self) -> tuple[float, float]:
        """Stop polling, take the last sample; returns (energy_mj, window_s)."""
        self._join()
        if self.error is not None:
            raise self.error
        t1 = self._sample()
        return self._energy_mj(), t1 - self._t0

    def abort(self) -> None:
        self._join()

    def _join(self) -> None:
        self._stop_event.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _poll(self) -> None:
        assert self._poll_s
        while not self._stop_event.wait(self._poll_s):
            try:
                self._sample()
            except BaseException as exc:  # noqa: BLE001 - handed to the measuring thread
                self.error = exc
                return

    @staticmethod
    def _timed(read: Callable[[], Any]) -> tuple[float, Any]:
        # Time-stamp a sample at the middle of the read call.
        before = time.perf_counter()
        value = read()
        return (before + time.perf_counter()) / 2.0, value

    @abstractmethod
    def _first_sample(self) -> float: ...

    @abstractmethod
    def _sample(self) -> float: ...

    @abstractmethod
    def _energy_mj(self) -> float: ...


class _CounterWindow(_Window):
    """Differences cumulative energy counters, step by step so that each wrap or reset is seen.

    A counter that goes down wrapped if its range (``modulus``) is known (RAPL's
    ``max_energy_range_uj``): the step is ``new + modulus − old``. Without a range (NVML's 64-bit mJ
    counter never wraps in practice) going down means a reset (driver reload, GPU reset): the counter
    restarted from zero, so the step is ``new``; at most one poll interval of energy is lost and a
    warning says so.
    """

    method = "counter"

    def __init__(
        self,
        read: Callable[[], Sequence[int]],
        moduli: Sequence[int | None],
        to_mj: float,
        poll_s: float | None,
    ) -> None:
        super().__init__(poll_s)
        self._read = read
        self._moduli = list(moduli)
        self._to_mj = to_mj
        self._prev: list[int] = []
        self._total = 0
        self.resets = 0

    def _first_sample(self) -> float:
        t, values = self._timed(self._read)
        self._prev = [int(v) for v in values]
        return t

    def _sample(self) -> float:
        t, values = self._timed(self._read)
        for i, (old, new, modulus) in enumerate(zip(self._prev, values, self._moduli)):
            step = int(new) - old
            if step < 0:
                if modulus:
                    step += modulus
                else:
                    step = int(new)
                    self.resets += 1
                    logger.warning(
                        "energy counter %d went backwards (%d -> %d): treating it as a reset; "
                        "up to one poll interval of energy is missing from this window",
                        i,
                        old,
                        new,
                    )
            self._total += step
            self._prev[i] = int(new)
        return t

    def _energy_mj(self) -> float:
        return self._total * self._to_mj


class _PowerWindow(_Window):
    """Polls power (mW) in a background thread and integrates it with the trapezoid rule."""

    method = "power-polling"

    def __init__(self, read_mw: Callable[[], float], poll_s: float) -> None:
        super().__init__(poll_s)
        self._read_mw = read_mw
        self._times: list[float] = []
        self._powers: list[float] = []

    def _first_sample(self) -> float:
        return self._sample()

    def _sample(self) -> float:
        t, mw = self._timed(self._read_mw)
        self._times.append(t)
        self._powers.append(float(mw))
        return t

    def _energy_mj(self) -> float:
        return integrate_power_mj(self._times, self._powers)


# ---------------------------------------------------------------------------------------------------
# meters
# ---------------------------------------------------------------------------------------------------
class EnergyMeter(ABC):
    """A measured energy source. Subclasses say how to open a window; ``measure`` is shared."""

    name: ClassVar[str]
    _reason: str | None = None

    @abstractmethod
    def _probe(self) -> None:
        """Open what the meter reads; raise a ShiftAddError saying why (and set ``_reason``) when it cannot."""

    def available(self) -> bool:
        """Whether this meter can measure here. Cheap after the first call; never raises."""
        try:
            self._probe()
        except ShiftAddError:
            return False
        except Exception as exc:  # noqa: BLE001 - available() never raises
            self._reason = " ".join(f"{self.name.upper()} probe failed: {type(exc).__name__}: {exc}".split())
            return False
        return True

    @property
    def unavailable_reason(self) -> str | None:
        """One line saying why ``available()`` is False (None when it is True)."""
        return None if self.available() else self._reason

    @property
    def method(self) -> str:
        """How the energy is obtained ("counter" or "power-polling")."""
        return _CounterWindow.method

    @abstractmethod
    def _open_window(self) -> _Window:
        """A fresh window; raises ``TargetUnavailableError`` when the meter cannot measure here."""

    def close(self) -> None:  # noqa: B027 - optional hook: most meters hold nothing to release
        """Release the meter's resources (e.g. the NVML session)."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def idle_power_w(
        self, duration_s: float = DEFAULT_IDLE_S, *, sync: Callable[[], None] = _no_sync
    ) -> float:
        """Average power while the device does nothing for ``duration_s`` (after ``sync``)."""
        if duration_s <= 0:
            raise UsageError(f"idle window must be > 0 s, got {duration_s}")
        sync()
        window = self._open_window()
        energy_mj, elapsed_s = self._guarded(
            window, lambda: time.sleep(duration_s), "while measuring idle power"
        )
        return energy_mj / elapsed_s / 1000.0

    def measure(
        self,
        fn: Callable[[], object],
        *,
        sync: Callable[[], None] = _no_sync,
        min_window_s: float = DEFAULT_MIN_WINDOW_S,
        max_calls: int = DEFAULT_MAX_CALLS,
        idle_s: float = DEFAULT_IDLE_S,
        idle_w: float | None = None,
        warmup_calls: int = 1,
    ) -> EnergyReading:
        """Energy per call of ``fn``: repeat it until the window lasts ``min_window_s`` (or
        ``max_calls`` calls), with ``sync()`` (e.g. ``torch.cuda.synchronize`` or TVM ``dev.sync``)
        before the window opens and before it closes so the counter covers exactly the queued work.

        Idle power is measured first over ``idle_s`` seconds (0 skips it), unless ``idle_w`` gives a
        known value (e.g. from one longer :meth:`idle_power_w` per profiling session).
        """
        if min_window_s <= 0:
            raise UsageError(f"min_window_s must be > 0, got {min_window_s}")
        if max_calls < 1:
            raise UsageError(f"max_calls must be >= 1, got {max_calls}")
        if idle_s < 0 or warmup_calls < 0:
            raise UsageError(f"idle_s and warmup_calls must be >= 0, got {idle_s} and {warmup_calls}")

        if idle_w is None and idle_s > 0:
            idle_w = self.idle_power_w(idle_s, sync=sync)
        sync()
        began = time.perf_counter()
        for _ in range(warmup_calls):
            fn()
        sync()
        per_call_s = (time.perf_counter() - began) / warmup_calls if warmup_calls else None
        window = self._open_window()
        calls = 0

        def run() -> None:
            # GPU launches return before the work is done, so host time alone would queue far more
            # calls than the window needs (and the closing sync would wait for all of them). Run in
            # batches sized from the synchronised time per call, and sync after each batch.
            nonlocal calls
            start = time.perf_counter()
            deadline = start + min_window_s
            per_call = per_call_s
            while calls < max_calls and window.error is None and time.perf_counter() < deadline:
                remaining = deadline - time.perf_counter()
                batch = 1 if not per_call else max(1, math.ceil(remaining / per_call))
                for _ in range(min(batch, max_calls - calls)):
                    fn()
                    calls += 1
                    if window.error is not None or time.perf_counter() >= deadline:
                        break
                sync()
                per_call = (time.perf_counter() - start) / calls

        energy_mj, window_s = self._guarded(window, run, "during the measurement window")
        if window_s < min_window_s:
            logger.warning(
                "%s energy window lasted %.3f s < min_window_s=%.3f s because max_calls=%d was reached; "
                "the reading is coarse (raise max_calls)",
                self.name,
                window_s,
                min_window_s,
                max_calls,
            )
        if energy_mj <= 0:
            logger.warning(
                "%s read %.3f mJ over %.3f s: the counter may not have updated; lengthen min_window_s",
                self.name,
                energy_mj,
                window_s,
            )
        dynamic = None if idle_w is None else (energy_mj - idle_w * window_s * 1000.0) / calls
        return EnergyReading(
            source=self.name,
            energy_mj_per_call=energy_mj / calls,
            calls=calls,
            window_s=window_s,
            idle_power_w=idle_w,
            dynamic_energy_mj_per_call=dynamic,
            method=window.method,
        )

    def _guarded(self, window: _Window, work: Callable[[], None], phase: str) -> tuple[float, float]:
        """Run ``work`` inside ``window``; reading failures become one-line ``EnergyError``s, errors
        raised by the work itself pass through untouched."""
        try:
            window.start()
        except (ShiftAddError, OSError, ValueError) as exc:
            raise self._failure(exc, f"{phase} (opening the window)") from exc
        try:
            work()
        except BaseException:
            window.abort()
            raise
        try:
            return window.stop()
        except (ShiftAddError, OSError, ValueError) as exc:
            raise self._failure(exc, phase) from exc

    def _failure(self, exc: BaseException, phase: str) -> EnergyError:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        return EnergyError(
            f"{self.name} energy reading failed {phase}: {detail}; check the device and rerun, "
            "or use energy source 'model'"
        )


class NvmlMeter(EnergyMeter):
    """GPU energy through NVML for CUDA device ``device_index`` (torch/TVM numbering).

    Volta and newer: the total-energy counter (mJ since driver load), differenced over the window.
    Older GPUs, or drivers answering NotSupported: ``nvmlDeviceGetPowerUsage`` polled every
    ``power_poll_s`` in a thread and integrated (Zeus found <= 1% difference between the two, issue #12).
    The NVML session opens on first use and stays open until :meth:`close` (``nvmlInit`` is slow).
    """

    name = "nvml"

    def __init__(
        self,
        device_index: int = 0,
        *,
        power_poll_s: float = DEFAULT_POWER_POLL_S,
        counter_poll_s: float = DEFAULT_COUNTER_POLL_S,
        force_polling: bool = False,
    ) -> None:
        self.device_index = device_index
        self.power_poll_s = power_poll_s
        self.counter_poll_s = counter_poll_s
        self.force_polling = force_polling
        self._nvml: Nvml | None = None
        self._nvml_index: int | None = None
        self._has_counter = False
        self._reason: str | None = None
        self._probed = False

    def _ensure(self) -> tuple[Nvml, int]:
        if self._nvml is not None and self._nvml_index is not None:
            return self._nvml, self._nvml_index
        if self._probed and self._reason is not None:
            raise TargetUnavailableError(self._reason)
        self._probed = True
        nv = Nvml()
        try:
            nv.open()
            index = nv.index_for_cuda_device(self.device_index)
            self._has_counter = not self.force_polling and nv.has_energy_counter(index)
            if not self._has_counter:
                nv.power_mw(index)  # the fallback must work, or the meter is unavailable
        except Exception as exc:
            nv.close()
            if not isinstance(exc, NvmlError):
                raise
            self._reason = f"{exc}; use energy source 'model' instead"
            raise TargetUnavailableError(self._reason) from exc
        self._nvml, self._nvml_index = nv, index
        if not self._has_counter:
            logger.info("GPU %d has no NVML energy counter: integrating polled power instead", index)
        return nv, index

    def __repr__(self) -> str:
        return f"NvmlMeter(device_index={self.device_index})"

    def _probe(self) -> None:
        self._ensure()

    @property
    def method(self) -> str:
        self._ensure()
        return _CounterWindow.method if self._has_counter else _PowerWindow.method

    def _open_window(self) -> _Window:
        nv, index = self._ensure()
        if self._has_counter:
            return _CounterWindow(lambda: (nv.total_energy_mj(index),), [None], 1.0, self.counter_poll_s)
        return _PowerWindow(lambda: nv.power_mw(index), self.power_poll_s)

    def close(self) -> None:
        if self._nvml is not None:
            self._nvml.close()
        self._nvml, self._nvml_index, self._probed = None, None, False


_RAPL_PACKAGE = re.compile(r"intel-rapl:\d+$")


@dataclass(frozen=True)
class RaplZone:
    path: Path
    name: str
    max_energy_uj: int | None  # the counter wraps to 0 after this many µJ


class RaplMeter(EnergyMeter):
    """CPU package energy: the sum of the top-level ``intel-rapl:N`` zones named ``package-*``.

    Reading ``energy_uj`` needs root on most kernels since CVE-2020-8694; the counter
    wraps at ``max_energy_range_uj`` (a few minutes at full load, or less), so it is read every
    ``poll_s`` during a window and each wrap is added back. DRAM and ``psys`` zones are left out
    (psys would count the package twice).
    """

    name = "rapl"

    def __init__(
        self, root: str | Path = DEFAULT_RAPL_ROOT, *, poll_s: float = DEFAULT_COUNTER_POLL_S
    ) -> None:
        self.root = Path(root)
        self.poll_s = poll_s
        self._zones: list[RaplZone] | None = None
        self._reason: str | None = None

    def __repr__(self) -> str:
        return f"RaplMeter(root={str(self.root)!r})"

    def zones(self) -> list[RaplZone]:
        """The package zones, each checked readable; raises ``TargetUnavailableError`` otherwise."""
        if self._zones is not None:
            return self._zones
        if self._reason is not None:
            raise TargetUnavailableError(self._reason)
        try:
            self._zones = self._discover()
        except TargetUnavailableError as exc:
            self._reason = str(exc)
            raise
        return self._zones

    def _discover(self) -> list[RaplZone]:
        advice = ("the kernel (or, in a VM, the hypervisor) does not expose it to root either; use energy source "
                  "'model'" if os.geteuid() == 0 else
                  "run as root (or grant read access to energy_uj), or use energy source 'model'")
        if not self.root.is_dir():
            raise TargetUnavailableError(f"RAPL is not exposed here: {self.root} does not exist; {advice}")
        zones = []
        for path in sorted(self.root.iterdir()):
            if not _RAPL_PACKAGE.match(path.name):
                continue
            try:
                name_file = path / "name"
                name = name_file.read_text().strip() if name_file.exists() else path.name
                if not name.startswith("package") and name_file.exists():
                    continue
                int((path / "energy_uj").read_text())
                range_file = path / "max_energy_range_uj"
                max_uj = int(range_file.read_text()) if range_file.exists() else None
            except (OSError, ValueError) as exc:
                raise TargetUnavailableError(
                    f"RAPL counter {path / 'energy_uj'} is not readable ({type(exc).__name__}); {advice}"
                ) from exc
            zones.append(RaplZone(path, name, max_uj if max_uj and max_uj > 0 else None))
        if not zones:
            raise TargetUnavailableError(f"no RAPL package zones (intel-rapl:N) under {self.root}; {advice}")
        return zones

    def _probe(self) -> None:
        self.zones()

    def _open_window(self) -> _Window:
        zones = self.zones()
        files = [z.path / "energy_uj" for z in zones]
        return _CounterWindow(
            lambda: [int(f.read_text()) for f in files], [z.max_energy_uj for z in zones], 1e-3, self.poll_s
        )


# ---------------------------------------------------------------------------------------------------
# analytical model
# ---------------------------------------------------------------------------------------------------
# Energy per operation in pJ, 45 nm / 0.9 V.
# - Arithmetic: M. Horowitz, "Computing's energy problem (and what we can do about it)", ISSCC 2014.
# - Shifts: ShiftAddNet (You et al., NeurIPS 2020) and ShiftAddViT (NeurIPS 2023) `pvt/hw_utils.py`.
# - Memory: one clear model, every operand byte read once from DRAM and every output byte written once
#   (perfect on-chip reuse, i.e. the traffic lower bound): 640 pJ per 32-bit DRAM access = 160 pJ/byte,
#   from Han et al., "Deep Compression" (ICLR 2016) / "EIE" (ISCA 2016), derived from Horowitz. To model
#   SRAM-resident data instead, override dram_byte with 5 pJ/word / 4 = 1.25 pJ/byte (same source).
UNIT_ENERGY_PJ: Mapping[str, float] = {
    "fp32_mult": 3.7,
    "fp32_add": 0.9,
    "fp16_mult": 1.1,
    "fp16_add": 0.4,
    "int32_mult": 3.1,
    "int32_add": 0.1,
    "int8_mult": 0.2,
    "int8_add": 0.03,
    "shift32": 0.13,
    "shift8": 0.024,
    "dram_byte": 160.0,
}


def _unit_key_counts(counts: Any, dtype: str) -> dict[str, int]:
    """Map the kernels' algorithmic ``OpCounts`` of one call onto unit-energy keys.

    Integer primitives (matshift) shift and add in int32. Float primitives accumulate in fp32 (the
    kernels cast fp16 inputs up before the product, like fp32-accumulate tensor-core GEMMs), so adds
    are fp32 adds; a product of two fp16 values is exact in fp32, so an fp16 multiplier suffices and
    fp16 inputs are charged fp16 multiplies. Every byte read or written is one DRAM byte.
    """
    if dtype.startswith("int"):
        mult_key, add_key = "int32_mult", "int32_add"
    else:
        mult_key, add_key = ("fp16_mult" if dtype == "float16" else "fp32_mult"), "fp32_add"
    keyed = {
        mult_key: counts.mults,
        add_key: counts.adds,
        "shift32": counts.shifts,
        "dram_byte": counts.bytes_read + counts.bytes_written,
    }
    return {key: int(value) for key, value in keyed.items() if value}


class AnalyticalEnergyModel:
    """Energy = Σ count(op) · pJ(op); an ASIC projection (45 nm energies, Horowitz, ISSCC 2014), labelled
    source "model".

    Operation and byte counts come from ``kernels.op_counts`` (one definition of what each
    primitive computes: matmul/bmm b·m·n·k multiplies and adds, matshift b·m·n·k shifts and int32
    adds, matshift_decode n·k decoding shifts plus a float GEMM, matadd b·m·n·k adds, bytes = inputs
    read once + output written once); the per-operation energies live here.
    ``unit_energy_pj`` overrides entries of :data:`UNIT_ENERGY_PJ` by key.
    """

    name: ClassVar[str] = "model"
    method: ClassVar[str] = "analytical"
    unavailable_reason: ClassVar[str | None] = None

    def __init__(self, unit_energy_pj: Mapping[str, float] | None = None) -> None:
        overrides = dict(unit_energy_pj or {})
        unknown = sorted(set(overrides) - set(UNIT_ENERGY_PJ))
        if unknown:
            raise ConfigError(
                f"unknown unit-energy key(s) {', '.join(unknown)}; valid keys: {', '.join(UNIT_ENERGY_PJ)}"
            )
        bad = [
            key
            for key, value in overrides.items()
            if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0
        ]
        if bad:
            raise ConfigError(f"unit energies must be numbers >= 0 pJ; check {', '.join(bad)}")
        self.unit_energy_pj: dict[str, float] = {
            **UNIT_ENERGY_PJ,
            **{k: float(v) for k, v in overrides.items()},
        }

    def __repr__(self) -> str:
        changed = {k: v for k, v in self.unit_energy_pj.items() if UNIT_ENERGY_PJ[k] != v}
        return f"AnalyticalEnergyModel({changed or ''})"

    def available(self) -> bool:
        return True

    def close(self) -> None:
        """Nothing to release (uniform with the meters)."""

    def op_counts(
        self, primitive: str, b: int, m: int, k: int, n: int, dtype: str | None = None
    ) -> dict[str, int]:
        """Operations (and DRAM bytes, key ``dram_byte``) of one call, keyed like the unit energies."""
        prim = kernels.get(primitive)  # UnknownNameError lists the primitives
        dtype = prim.check_dtype(dtype)  # None -> the primitive's default dtype
        return _unit_key_counts(kernels.op_counts(primitive, b, m, k, n, dtype), dtype)

    def estimate(
        self, primitive: str, b: int, m: int, k: int, n: int, dtype: str | None = None
    ) -> EnergyEstimate:
        counts = self.op_counts(primitive, b, m, k, n, dtype)
        breakdown = {
            key: count * self.unit_energy_pj[key] * 1e-9 for key, count in counts.items()
        }  # pJ -> mJ
        return EnergyEstimate(energy_mj=math.fsum(breakdown.values()), breakdown=breakdown, counts=counts)


# ---------------------------------------------------------------------------------------------------
# registry and selection
# ---------------------------------------------------------------------------------------------------
EnergySource = EnergyMeter | AnalyticalEnergyModel

ENERGY_SOURCES: dict[str, Callable[..., EnergySource]] = {
    NvmlMeter.name: NvmlMeter,
    RaplMeter.name: RaplMeter,
    AnalyticalEnergyModel.name: AnalyticalEnergyModel,
}
# Which measured source belongs to which target kind; the model suits every kind.
_MEASURED_FOR_KIND = {"cuda": NvmlMeter.name, "cpu": RaplMeter.name}
_KIND_OF_MEASURED = {v: k for k, v in _MEASURED_FOR_KIND.items()}
def energy_source_names() -> list[str]:
    return list(ENERGY_SOURCES)


def create_source(
    name: str,
    *,
    device_index: int = 0,
    rapl_root: str | Path = DEFAULT_RAPL_ROOT,
    unit_energy_pj: Mapping[str, float] | None = None,
) -> EnergySource:
    """Construct the named source (not checked for availability)."""
    if name == NvmlMeter.name:
        return NvmlMeter(device_index)
    if name == RaplMeter.name:
        return RaplMeter(rapl_root)
    if name == AnalyticalEnergyModel.name:
        return AnalyticalEnergyModel(unit_energy_pj)
    raise UnknownNameError(f"unknown energy source {name!r}; known: {', '.join(ENERGY_SOURCES)}")


def select_source(
    target_kind: str | Mapping[str, Any],
    preferred: str | Sequence[str] | None = None,
    *,
    device_index: int = 0,
    rapl_root: str | Path = DEFAULT_RAPL_ROOT,
    unit_energy_pj: Mapping[str, float] | None = None,
) -> EnergySource:
    """The energy source for a target.

    - ``preferred=None`` (or ``"auto"``): NVML for CUDA targets when it works, RAPL for CPU targets
      when readable, else the analytical model.
    - one name: that source, or an error saying why it cannot work here (never a silent substitute).
    - a list (the config's ``profile.energy``, e.g. ``["nvml", "rapl", "model"]``): the first that
      suits the target kind and works here; an error listing the reasons if none does.
    """
    kind = target_kind_of(target_kind)
    kwargs: dict[str, Any] = {
        "device_index": device_index,
        "rapl_root": rapl_root,
        "unit_energy_pj": unit_energy_pj,
    }
    if preferred in (None, "", "auto"):
        preferred, strict = [_MEASURED_FOR_KIND[kind], AnalyticalEnergyModel.name], False
    elif isinstance(preferred, str):
        preferred, strict = [preferred], True
    else:
        preferred, strict = list(preferred), False
    for name in preferred:
        if name not in ENERGY_SOURCES:
            raise UnknownNameError(f"unknown energy source {name!r}; known: {', '.join(ENERGY_SOURCES)}")
    reasons = []
    for name in preferred:
        measured_kind = _KIND_OF_MEASURED.get(name)
        if measured_kind is not None and measured_kind != kind:
            if strict:
                raise UsageError(
                    f"energy source {name!r} measures {measured_kind} energy but the target is {kind}; "
                    f"use {_MEASURED_FOR_KIND[kind]!r} or 'model'"
                )
            continue  # e.g. "nvml" in the list while profiling a CPU target
        source = create_source(name, **kwargs)
        if source.available():
            return source
        reasons.append(f"{name}: {source.unavailable_reason}")
        logger.info("energy source %s unavailable (%s)", name, source.unavailable_reason)
    if strict:
        raise TargetUnavailableError(
            f"energy source {preferred[0]!r} is unavailable: {reasons[0].split(': ', 1)[1]}"
        )
    if not reasons:
        raise UsageError(
            f"none of the energy sources {', '.join(preferred)} suits a {kind} target; "
            f"add {_MEASURED_FOR_KIND[kind]!r} or 'model'"
        )
    raise TargetUnavailableError(f"no usable energy source for the {kind} target ({'; '.join(reasons)})")


def describe_sources(
    *, device_index: int = 0, rapl_root: str | Path = DEFAULT_RAPL_ROOT
) -> dict[str, str | None]:
    """For ``dse env``: each source name → None if usable here, else the one-line reason."""
    report: dict[str, str | None] = {}
    for name in ENERGY_SOURCES:
        source = create_source(name, device_index=device_index, rapl_root=rapl_root)
        try:
            report[name] = None if source.available() else source.unavailable_reason
        finally:
            source.close()
    return report


def measure_energy(
    source: EnergySource,
    fn: Callable[[], object],
    *,
    primitive: str,
    b: int,
    m: int,
    k: int,
    n: int,
    dtype: str | None = None,
    sync: Callable[[], None] = _no_sync,
    min_window_s: float = DEFAULT_MIN_WINDOW_S,
    max_calls: int = DEFAULT_MAX_CALLS,
    idle_s: float = DEFAULT_IDLE_S,
    idle_w: float | None = None,
) -> EnergyReading:
    """One call for the profiler: a meter measures ``fn``; the model estimates the primitive's shape."""
    if isinstance(source, AnalyticalEnergyModel):
        return source.estimate(primitive, b, m, k, n, dtype).as_reading()
    return source.measure(
        fn, sync=sync, min_window_s=min_window_s, max_calls=max_calls, idle_s=idle_s, idle_w=idle_w
    )
