"""``dse profile``: latency and energy of every primitive able to implement each unique layer shape of a
model, plus the PyTorch dense baseline and the non-primitive work, written row by row to the store.

What is measured for an inventory (:mod:`dse.profiling.inventory`):

* every Linear shape with ``matmul``, ``matshift`` and ``matshift_decode``, every attention product
  with its primitive (``bmm`` for msa, ``matadd`` for hamming), built by ``kernels.build`` (default
  schedule, or the tuned one where a tuning record exists and measured faster; ``trials > 0`` tunes
  missing records first) — backend ``tvm``;
* the same shapes in PyTorch eager as the dense model runs them — ``torch.matmul`` for Linears,
  ``torch.bmm`` for attention products, and for matadd the float ``bmm`` of the mask that the
  PyTorch Hamming attention computes — backend ``torch``, same primitive name;
* each non-primitive op (:mod:`dse.profiling.nonprim`) in PyTorch and compiled with TVM Relax for the target.

An item the inventory gives to one backend (``WorkItem.backend``) is measured on that backend alone: a fused
attention's ``sdpa`` in PyTorch only (the compiled model never runs it, and its TVM form costs seconds to time
at long sequences), the msa products and softmax it stands for in TVM only.

Latency is the median (and p90) of ``repeat`` repeats, each the mean of back-to-back calls lasting at
least ``min_repeat_ms`` (TVM's ``time_evaluator``; :func:`time_callable` does the same for PyTorch,
with ``torch_threads`` intra-op threads). Energy per call comes from the first usable source of
``cfg.profile.energy`` for the target (NVML on CUDA, RAPL on CPU where readable, else the analytical
model), and every row says which.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import kernels
from dse.errors import ProfileError, TargetUnavailableError
from dse.fileio import atomic_write_text, file_lock
from dse.hardware import energy
from dse.hardware.device import describe_device, versions
from dse.hardware.energy import AnalyticalEnergyModel
from dse.profiling import eager, nonprim, reference
from dse.profiling.inventory import TORCH_BASELINE, Inventory, compact_names
from dse.profiling.store import Key, ProfileStore, format_rows, load_profile, passes_of, row_key
from kernels import Timing
from kernels.compiled import evict_private_caches
from kernels.cpu_schedules import PREPACKABLE
from kernels.targets import target_kind_of

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RowSpec:
    """One row to measure: a primitive (or non-primitive op) at one shape on one backend."""

    primitive: str
    backend: str  # tvm | torch
    b: int
    m: int
    k: int
    n: int
    dtype: str
    kind: str  # kernel | nonprim | framework
    names: tuple[str, ...] = ()  # the work items that run at this shape (for display)

    @property
    def key(self) -> Key:
        return (self.primitive, self.backend, self.b, self.m, self.k, self.n, self.dtype)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.b, self.m, self.k, self.n)


def plan(inventory: Inventory, *, include_nonprim: bool = True) -> list[RowSpec]:
    """Every row ``dse profile`` measures for ``inventory`` (unique by key, in model order)."""
    specs: dict[Key, RowSpec] = {}

    def add(spec: RowSpec) -> None:
        old = specs.get(spec.key)
        names = tuple(dict.fromkeys((*old.names, *spec.names))) if old else spec.names
        specs[spec.key] = dataclasses.replace(spec, names=names)

    for g in inventory.shape_groups(("linear", "product")):
        if "tvm" in g.backends:
            add(RowSpec(g.primitive, "tvm", *g.shape, kernels.get(g.primitive).default_dtype, "kernel", g.names))
        if "torch" in g.backends:
            add(RowSpec(TORCH_BASELINE[g.primitive], "torch", *g.shape, "float32", "kernel", g.names))
    if include_nonprim:
        for g in inventory.shape_groups(("nonprim",)):
            for backend in g.backends:
                add(RowSpec(g.primitive, backend, *g.shape, "float32", "nonprim", g.names))
        for g in inventory.shape_groups(("framework",)):  # eager PyTorch only (dse.profiling.eager)
            add(RowSpec(g.primitive, "torch", *g.shape, "float32", "framework", g.names))
    return list(specs.values())


def write_model_rows(profile_csv: str | Path, inventory: Inventory, path: str | Path) -> Path:
    """Write the rows of the profile at ``profile_csv`` that price ``inventory`` (its :func:`plan`) to ``path``.

    A device's profile also holds other models' rows and calibration shapes; a report on one model shows
    only the rows its cost depends on.
    """
    frame = load_profile(profile_csv).frame
    keys = {spec.key for spec in plan(inventory)}
    mine = [r for r in frame.to_dict("records") if row_key(r) in keys]
    return atomic_write_text(path, format_rows(mine, list(frame.columns)))


@dataclasses.dataclass
class Settings:
    """How to measure (``cfg.profile``)."""

    target: Any = "cpu"
    repeat: int = 7
    min_repeat_ms: float = 40.0
    trials: int = 0
    energy: tuple[str, ...] = ("nvml", "rapl", "model")
    energy_window_s: float = 0.5
    torch_threads: int = 2
    nonprim: bool = True
    passes: int = 1  # times each row is measured, a whole run apart (store.merge_passes)
    tuning_dir: str | None = None  # MetaSchedule records (None: kernels.tuning's default root)
    busy_load_per_core: float = 1.25  # stored rows measured above this 1-min load per core are measured again

    @classmethod
    def from_config(cls, p: Any) -> Settings:
        return cls(p.target, p.repeat, p.min_repeat_ms, p.trials, tuple(p.energy), p.energy_window_s,
                   p.torch_threads, p.nonprim, p.passes, str(p.tuning_dir), p.busy_load_per_core)

    def header(self) -> dict[str, Any]:
        """What goes into the profile's .yaml (the last run's settings)."""
        return {"repeat": self.repeat, "min_repeat_ms": self.min_repeat_ms, "trials": self.trials,
                "torch_threads": self.torch_threads, "tvm_threads": os.environ.get("TVM_NUM_THREADS", "tvm default"),
                "energy_window_s": self.energy_window_s, "passes": self.passes}


# ---------------------------------------------------------------------------------------------------
# timing PyTorch the way time_evaluator times TVM


def time_callable(fn: Callable[[], Any], *, repeat: int, min_repeat_ms: float,
                  sync: Callable[[], None] = lambda: None) -> Any:
    """Median/p90 over ``repeat`` repeats of ``fn``; each repeat runs ``number`` back-to-back calls, with
    ``number`` grown (as TVM's ``time_evaluator`` does) until one repeat lasts ``min_repeat_ms``."""
    fn()
    sync()  # warm-up: allocator, caches, lazy init
    number = 1
    while True:
        start = time.perf_counter()
        for _ in range(number):
            fn()
        sync()
        elapsed_ms = (time.perf_counter() - start) * 1e3
        if elapsed_ms >= min_repeat_ms or number >= 1 << 20:
            break
        number = max(2 * number, math.ceil(number * min_repeat_ms / max(elapsed_ms, 1e-3)))
    results = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        sync()
        results.append((time.perf_counter() - start) / number)
    return Timing.from_seconds(results, number)


def time_callable_cold(fn: Callable[[], Any], keep_warm: Sequence[Any], *, samples: int,
                       sync: Callable[[], None] = lambda: None) -> Any:
    """Single-call timings of ``fn``, each after :func:`kernels.compiled.evict_private_caches` (``keep_warm``
    read back in): the PyTorch counterpart of ``CompiledKernel.time(cold_weights=True)``."""
    fn()
    sync()
    results = []
    for _ in range(samples):
        evict_private_caches(*keep_warm)
        start = time.perf_counter()
        fn()
        sync()
        results.append(time.perf_counter() - start)
    return Timing.from_seconds(results, 1)


# Rows of these kernels are timed with their weights in L3, not L1/L2 (CompiledKernel.time(cold_weights=True)):
# inside a forward a layer's weights were last read a whole forward ago, and the embedded model's packed
# weights (about 1.8 MB) plus its activations outgrow a core's 2 MB L2 (measured: back-to-back timings
# under-predicted the compiled model by 5-11%). bmm and matadd multiply activations that the layer before
# has just written, so they keep the back-to-back timing.
COLD_WEIGHT_PRIMITIVES = ("matmul", "matshift", "matshift_decode")
COLD_SAMPLES_PER_REPEAT = 8  # single-call samples are noisier than repeats of many calls: take more


# ---------------------------------------------------------------------------------------------------
# measuring one row


@dataclasses.dataclass
class _Runnable:
    """A measurable thing: its timing, a no-argument call and a device sync for energy windows."""

    timing: Any
    call: Callable[[], Any]
    sync: Callable[[], None]
    schedule: str
    tuned_trials: int


class Measurer:
    """Measures :class:`RowSpec` rows on one target with one energy source."""

    def __init__(self, settings: Settings, target: Any, energy_source: Any, target_slug: str, *,
                 eager_probe: Callable[[], Any] | None = None) -> None:
        self.settings = settings
        self.target = target  # tvm.target.Target
        self.source = energy_source
        self.target_slug = target_slug
        self._idle_w: float | None = None

        self.is_cuda = kernels.targets.is_cuda(target)
        self.torch_device = "cuda" if self.is_cuda else "cpu"
        # the model's forward on an empty batch (Inventory.eager_probe): what a ``framework`` row times
        self.eager_probe = eager_probe
        self.remeasured = 0  # rows measured again because their timings looked preempted

    @property
    def measured_energy(self) -> bool:
        return not isinstance(self.source, AnalyticalEnergyModel)

    def idle_power_w(self) -> float | None:
        """Idle power, measured once per session by a meter (None for the analytical model)."""
        if self.measured_energy and self._idle_w is None:
            self._idle_w = self.source.idle_power_w(max(self.settings.energy_window_s, 0.5))
        return self._idle_w

    def _cold_weights(self, spec: RowSpec) -> bool:
        """Whether the row is timed with its weights in L3 (:data:`COLD_WEIGHT_PRIMITIVES`; CPU only)."""
        return spec.kind == "kernel" and spec.primitive in COLD_WEIGHT_PRIMITIVES and not self.is_cuda

    # ---- the three kinds of rows ------------------------------------------------------------------------
    def _tvm_kernel(self, spec: RowSpec) -> _Runnable:
        import tvm


        if self.target.kind.name == "llvm" and spec.primitive in PREPACKABLE and spec.dtype == "float32":
            # as exported: weights packed once at load, a call is the GEMM alone (dse.deploy.graph)
            packed = kernels.PrepackedKernel(spec.primitive, spec.b, spec.m, spec.k, spec.n, self.target)
            packed.load(*kernels.random_inputs(spec.primitive, spec.b, spec.m, spec.k, spec.n, spec.dtype))
            timing = packed.time(repeat=self.settings.repeat * COLD_SAMPLES_PER_REPEAT, cold_weights=True)
            return _Runnable(timing, packed.call, lambda: None, "default", 0)
        kernel = kernels.build(spec.primitive, b=spec.b, m=spec.m, k=spec.k, n=spec.n, target=self.target,
                               dtype=spec.dtype, trials=self.settings.trials, tuning_dir=self.settings.tuning_dir)
        arrays = kernels.random_inputs(spec.primitive, spec.b, spec.m, spec.k, spec.n, spec.dtype)
        cold = self._cold_weights(spec)
        timing = kernel.time(*arrays, min_repeat_ms=self.settings.min_repeat_ms, cold_weights=cold,
                             repeat=self.settings.repeat * (COLD_SAMPLES_PER_REPEAT if cold else 1))
        dev = kernels.targets.device_for(self.target)
        args = [tvm.runtime.tensor(a, dev) for a in kernel.check_args(arrays)]
        out = tvm.runtime.empty(kernel.out_shape, kernel.out_dtype, dev)
        return _Runnable(timing, lambda: kernel.run_into(*args, out), dev.sync, kernel.schedule,
                         int(kernel.tuned_trials))

    def _tvm_nonprim(self, spec: RowSpec) -> _Runnable:
        op = nonprim.build_op(spec.primitive, spec.shape, self.target)
        timing = op.time(repeat=self.settings.repeat, min_repeat_ms=self.settings.min_repeat_ms)
        return _Runnable(timing, op.run, op.sync, "default", 0)

    def _torch(self, spec: RowSpec) -> _Runnable:
        import torch

        threads = self.settings.torch_threads
        previous = torch.get_num_threads()
        if threads > 0:
            torch.set_num_threads(threads)
        try:
            if spec.kind == "framework":
                if self.eager_probe is None or self.is_cuda:
                    raise ProfileError("a framework row times the model's own forward on an empty batch (CPU); "
                                       "measure it through `dse profile` for that model")
                fn = self.eager_probe
            else:
                fn = (nonprim.torch_callable(spec.primitive, spec.shape, self.torch_device)
                      if spec.kind == "nonprim" else self._torch_kernel(spec))
            sync = torch.cuda.synchronize if self.is_cuda else (lambda: None)
            if self._cold_weights(spec):
                timing = time_callable_cold(fn, fn.keep_warm, samples=self.settings.repeat * COLD_SAMPLES_PER_REPEAT,
                                            sync=sync)
            else:
                timing = time_callable(fn, repeat=self.settings.repeat, min_repeat_ms=self.settings.min_repeat_ms,
                                       sync=sync)
        finally:
            torch.set_num_threads(previous)

        def call() -> Any:  # energy windows run with the same thread count
            if threads > 0:
                torch.set_num_threads(threads)
            try:
                return fn()
            finally:
                torch.set_num_threads(previous)

        return _Runnable(timing, call, sync, "eager", 0)

    def _torch_kernel(self, spec: RowSpec) -> Callable[[], Any]:
        """The dense PyTorch op for a kernel shape, on the kernel's own random inputs."""
        import torch


        source = {"matmul": "matmul", "bmm": "bmm", "matadd": "matadd"}[spec.primitive]
        arrays = kernels.random_inputs(source, spec.b, spec.m, spec.k, spec.n)
        a, b = (torch.from_numpy(x).to(self.torch_device) for x in arrays)
        if spec.primitive == "matmul":
            wt = b.t()  # [k, n] view of w[n, k]: BLAS reads it transposed

            def fn() -> Any:
                with torch.inference_mode():
                    return torch.matmul(a, wt)  # [b, m, k] @ [k, n]

            fn.keep_warm = (a,)  # the activation; the weight is what arrives cold in a forward
        elif spec.primitive == "bmm":

            def fn() -> Any:
                with torch.inference_mode():
                    return torch.bmm(a, b)  # [b, m, k] @ [b, k, n]
        else:  # matadd as the PyTorch Hamming attention runs it: a float bmm of the 0/1 mask
            mask_t = a.to(torch.float32).transpose(1, 2)  # [b, m, k]

            def fn() -> Any:
                with torch.inference_mode():
                    return torch.bmm(mask_t, b)
        return fn

    # ---- energy --------------------------------------------------------------------------------------
    def _energy_mj(self, spec: RowSpec, runnable: _Runnable) -> float:
        if not self.measured_energy:
            if spec.kind == "framework":
                return math.nan  # interpreter time: the analytical model counts no arithmetic or traffic in it
            if spec.kind == "nonprim":
                return nonprim.estimate_energy_mj(spec.primitive, spec.shape, self.source.unit_energy_pj)
            # PyTorch's matadd is a float bmm (it multiplies by the 0/1 mask): price it as one.
            prim = "bmm" if (spec.backend == "torch" and spec.primitive == "matadd") else spec.primitive
            dtype = spec.dtype if spec.backend == "tvm" else None
            return self.source.estimate(prim, spec.b, spec.m, spec.k, spec.n, dtype).energy_mj
        reading = self.source.measure(runnable.call, sync=runnable.sync,
                                      min_window_s=self.settings.energy_window_s, idle_s=0,
                                      idle_w=self.idle_power_w())
        return float(reading.energy_mj_per_call)

    def _runnable(self, spec: RowSpec) -> _Runnable:
        if spec.backend == "torch":
            return self._torch(spec)
        if spec.kind == "nonprim":
            return self._tvm_nonprim(spec)
        return self._tvm_kernel(spec)

    def measure(self, spec: RowSpec) -> dict[str, Any]:
        """Measure one row (again, up to :data:`MEASURE_TRIES` times, while its timings look preempted:
        :func:`preempted`); returns it in the store's column layout."""
        runnable = self._runnable(spec)
        for _ in range(MEASURE_TRIES - 1):
            why = preempted(runnable.timing)
            if why is None:
                break
            log.info("%s/%s %s: %s; measuring it again", spec.primitive, spec.backend, spec.shape, why)
            self.remeasured += 1
            again = self._runnable(spec)
            if again.timing.median_ms < runnable.timing.median_ms:
                runnable = again
        energy = self._energy_mj(spec, runnable)
        timing = runnable.timing
        return {
            "primitive": spec.primitive, "backend": spec.backend, "batch": spec.b, "m": spec.m, "k": spec.k,
            "n": spec.n, "dtype": spec.dtype, "latency_ms": float(timing.median_ms),
            "latency_ms_p90": float(timing.p90_ms), "repeats": int(timing.repeats),
            "min_repeat_ms": float(self.settings.min_repeat_ms), "energy_mj": float(energy),
            "energy_source": self.source.name if math.isfinite(energy) else "", "idle_power_w": self.idle_power_w(),
            "target": self.target_slug, "schedule": runnable.schedule, "tuned_trials": runnable.tuned_trials,
            "load_1m": load_1m(), "measured_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        }

    def compile_only(self, spec: RowSpec) -> None:
        """Build the TVM row's kernel or Relax function for the target without running it."""
        if spec.kind == "nonprim":
            nonprim.build_op(spec.primitive, spec.shape, self.target)
        else:
            kernels.build(spec.primitive, b=spec.b, m=spec.m, k=spec.k, n=spec.n, target=self.target,
                          dtype=spec.dtype, trials=0, tuning_dir=self.settings.tuning_dir)


BUSY_LOAD_PER_CORE = 1.25  # the profiler's own threads keep up to one per core busy: only more means other work
PREEMPTED_RATIO = 3.0  # a median this many times the fastest sample: most samples lost the CPU to other work
MEASURE_TRIES = 3


def preempted(timing: Any) -> str | None:
    """Why ``timing`` looks like other work took the CPU in the middle of most samples (its median far above
    its fastest sample: a kernel's own spread on a quiet host stays well inside :data:`PREEMPTED_RATIO`;
    under load, medians landed on multiples of the scheduler's time slice, e.g. a 0.09 ms LayerNorm
    stored at 8 ms), else None."""
    samples = getattr(timing, "results_ms", ())
    if not samples:
        return None
    fastest = min(samples)
    if fastest > 0 and timing.median_ms > PREEMPTED_RATIO * fastest:
        return (f"median {timing.median_ms:.3g} ms is {timing.median_ms / fastest:.1f}x its fastest sample "
                f"({fastest:.3g} ms)")
    return None


def busy(row: Mapping[str, Any], cores: int | None, per_core: float = BUSY_LOAD_PER_CORE) -> bool:
    """Whether ``row`` was measured while other work ran (its ``load_1m`` above ``per_core`` per core)."""
    load = row.get("load_1m")
    return bool(cores) and load is not None and load == load and float(load) > per_core * cores


def load_warning(rows: list[dict[str, Any]], cores: int | None, per_core: float = BUSY_LOAD_PER_CORE) -> str | None:
    """Why ``rows`` should not be trusted when other work ran while they were measured (their stored
    ``load_1m`` above ``per_core`` per core), else None."""
    loads = [float(r["load_1m"]) for r in rows if r.get("load_1m") is not None and r["load_1m"] == r["load_1m"]]
    n_busy = sum(busy(r, cores, per_core) for r in rows)
    if not n_busy:
        return None
    return (f"the 1-min load average reached {max(loads):.1f} on {cores} cores while {n_busy} of these {len(loads)} "
            "rows were measured: other work was running and their timings are too slow; they are not reused: the "
            "next `dse profile` (or `dse run`) measures them again — on a quiet machine")


def busy_host_warning(load: float | None, cores: int | None, command: str) -> str | None:
    """Why a measurement taken at 1-min load ``load`` is not a quiet host's (above :data:`BUSY_LOAD_PER_CORE`
    per core), else None: interleaved contestants keep fair ratios, but absolute times and prediction errors
    do not hold."""
    if not busy({"load_1m": load}, cores):
        return None
    return (f"the 1-min load average was {load:.1f} on {cores} cores (above {BUSY_LOAD_PER_CORE:g} per core): other "
            "work ran meanwhile; ratios of interleaved timings stand, absolute times and prediction errors do not; "
            f"rerun `{command}` on a quiet host")


def load_1m() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------------
# the run


def no_cuda_message() -> str:
    """The one line for ``--target cuda`` on a machine without a GPU, naming the compile-only checks."""
    hints = ["`dse profile --target cuda --compile-only` (builds every kernel and op of the model for CUDA)"]
    bench = Path(__file__).resolve().parents[1] / "kernels" / "bench.py"
    try:
        if "compile-only" in bench.read_text():
            hints.append("`python -m kernels.bench --target cuda --compile-only`")
    except OSError:
        pass
    return ("no CUDA device found on this machine, so CUDA latency and energy cannot be measured here; "
            f"compile-only checks exist: {' and '.join(hints)}; measure on a machine with an NVIDIA GPU")


def check_target_runnable(target: Any) -> None:
    """TargetUnavailableError (one line) if ``target`` is CUDA and no GPU is here."""
    # target_kind_of reads the kind without resolving the target (resolving "cpu" names the host CPU,
    # which needs TVM loaded first)
    if target_kind_of(target) == "cuda" and not kernels.cuda_available():
        raise TargetUnavailableError(no_cuda_message())


@dataclasses.dataclass
class ProfileRun:
    path: Path
    planned: int
    present: int  # already in the file (not measured now)
    measured: int
    by_other: int  # measured meanwhile by another process
    failed: list[str]
    seconds: float
    energy_source: str
    target_slug: str
    rows: list[dict[str, Any]]  # the plan's rows as now in the file
    specs: list[RowSpec]
    cores: int | None
    passes: int = 1
    remeasured: int = 0  # rows measured again because their timings looked preempted (Measurer.measure)
    busy_before: int = 0  # stored rows measured under load, measured again now
    busy_load_per_core: float = BUSY_LOAD_PER_CORE  # the run's threshold for "under load"


_TARGET_CACHE = ".targets.json"


def _cpu_identity() -> str:
    """What LLVM's host-CPU name is a function of: vendor, family, model and feature flags (cpuinfo)."""
    import hashlib

    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return "unknown"
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    parts = [fields.get(k, "") for k in ("vendor_id", "cpu family", "model", "flags", "Features", "CPU part")]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _resolve_target(spec: Any, root: str | Path, device: Any, *, use_cache: bool) -> tuple[dict[str, Any], str, bool]:
    """(target JSON, target slug, from_cache) for ``spec`` on this device.

    Resolving ``"cpu"`` asks LLVM (inside TVM, seconds to import) for the host CPU's name; the answer is
    cached per device folder (``.targets.json``), keyed by the CPU's cpuinfo identity, the usable cores and
    the TVM version, so a rerun with nothing to measure does not load TVM. Rows are only ever measured
    after a fresh resolution (:func:`profile_model` checks the cache against it).
    """
    vers = versions()
    key = json.dumps([spec if isinstance(spec, str) else json.dumps(spec, sort_keys=True), device.kind,
                      device.name, device.cores, _cpu_identity(), vers.get("tvm"), vers.get("tvm_ffi")])
    path = Path(root) / device.slug / _TARGET_CACHE
    if use_cache and device.kind == "cpu":
        try:
            hit = json.loads(path.read_text()).get(key)
        except (OSError, ValueError, AttributeError):
            hit = None
        if isinstance(hit, dict) and isinstance(hit.get("target"), dict) and hit.get("slug"):
            return hit["target"], str(hit["slug"]), True

    tgt = kernels.resolve_target(spec)  # imports TVM first, so "cpu" names the CPU as LLVM does
    target_json = json.loads(json.dumps(kernels.targets.target_to_dict(tgt)))  # plain str/int/list for YAML
    slug = kernels.target_slug(tgt)
    if device.kind == "cpu":
        try:
            with file_lock(path):
                try:
                    data = json.loads(path.read_text())
                except (OSError, ValueError):
                    data = {}
                data = data if isinstance(data, dict) else {}
                data[key] = {"target": target_json, "slug": slug}
                atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True) + "\n")
        except OSError as exc:  # a read-only profile folder still works, just slower next time
            log.debug("cannot cache the target resolution in %s: %s", path, exc)
    return target_json, slug, False


def _satisfied(row: Mapping[str, Any] | None, spec: RowSpec, trials: int, cores: int | None = None,
               busy_per_core: float = BUSY_LOAD_PER_CORE) -> bool:
    """Whether an existing row answers this run: present, not measured under load (:func:`busy`) and, for TVM
    kernels, tuned with >= ``trials``."""
    if row is None or busy(row, cores, busy_per_core):
        return False
    if spec.backend == "tvm" and spec.kind == "kernel" and trials > 0:
        return int(row.get("tuned_trials", 0)) >= trials
    return True


def spec_of_row(row: Mapping[str, Any]) -> RowSpec:
    """The :class:`RowSpec` that measures a stored row again."""
    prim = str(row["primitive"])
    kind = "framework" if prim == eager.FRAMEWORK else "kernel" if prim in kernels.names() else "nonprim"
    return RowSpec(prim, str(row["backend"]), int(row["batch"]), int(row["m"]), int(row["k"]), int(row["n"]),
                   str(row["dtype"]), kind)


def profile_model(inventory: Inventory, settings: Settings, root: str | Path, *, force: bool = False,
                  progress: bool = True, label: str | None = None) -> ProfileRun:
    """Measure every missing row of ``inventory``'s plan into the store under ``root`` (all with ``force``).

    With ``settings.passes = N > 1`` the rows are measured in N passes, each over all of them, so that a
    row's passes lie a whole pass apart, and a row's latency is the median of its passes
    (:func:`dse.profiling.store.merge_passes`); rows that other models or calibration put into the profile get their
    missing passes too (framework rows only through their own model). A rerun measures only missing passes.
    """
    started = time.perf_counter()
    check_target_runnable(settings.target)
    kind = target_kind_of(settings.target)
    device = describe_device(kind)
    label = label or f"{inventory.model} (batch {inventory.batch}, {'x'.join(map(str, inventory.input_size))})"
    specs = plan(inventory, include_nonprim=settings.nonprim)
    if kind == "cuda":  # eager overhead is timed on the CPU model only (dse.profiling.eager)
        specs = [s for s in specs if s.kind != "framework"]
    passes = max(1, int(settings.passes))

    def have(row: Mapping[str, Any] | None, spec: RowSpec) -> int:
        """Passes of ``row`` that count for this run (0: missing, or a TVM kernel tuned with too few trials)."""
        return passes_of(row) if _satisfied(row, spec, settings.trials, device.cores, settings.busy_load_per_core) else 0

    def open_store(use_cache: bool) -> tuple[ProfileStore, dict[Key, int], list[RowSpec], dict[str, Any], str, bool,
                                             int]:
        target_json, slug, cached = _resolve_target(settings.target, root, device, use_cache=use_cache)
        store = ProfileStore(root, device.as_dict(), target_json, slug, versions(), settings.header())
        store.open(force=force, model=label)
        existing = {row_key(r): r for r in store.rows()}
        planned = {s.key for s in specs}
        candidates = list(specs)
        if passes > 1:
            candidates += [spec_of_row(r) for k, r in existing.items()
                           if k not in planned and r["primitive"] != eager.FRAMEWORK]
        # --force re-measures this model's rows, not what others put into the profile
        initial = {s.key: 0 if force and s.key in planned else have(existing.get(s.key), s) for s in candidates}
        busy_before = sum(1 for s in candidates
                          if s.key in existing and busy(existing[s.key], device.cores, settings.busy_load_per_core))
        if busy_before and not force:
            log.warning("%d stored rows were measured under load (1-min load above %.2f per core): measuring them "
                        "again", busy_before, settings.busy_load_per_core)
        todo = [s for s in candidates if initial[s.key] < passes]
        return store, initial, todo, target_json, slug, cached, busy_before

    store, initial, todo, target_json, slug, cached, busy_before = open_store(use_cache=not force)
    if todo and cached:  # about to measure: never on the strength of a cached resolution
        fresh_json, fresh_slug, _ = _resolve_target(settings.target, root, device, use_cache=False)
        if (fresh_json, fresh_slug) != (target_json, slug):
            log.warning("cached target resolution %s was stale (now %s); using the fresh one", slug, fresh_slug)
            store, initial, todo, target_json, slug, _, busy_before = open_store(use_cache=False)
    present = sum(1 for s in specs if initial[s.key] >= passes)
    source = energy.select_source(target_json, list(settings.energy))
    measured, by_other, failed, remeasured = 0, 0, [], 0
    speed: list[float] = []  # the host-speed reference, before and after the rows (dse.profiling.reference)
    try:
        if todo:
            speed.append(reference.time_reference(target_json))
            measurer = Measurer(settings, kernels.resolve_target(target_json), source, slug,
                                eager_probe=inventory.eager_probe)
            for pass_no in range(1, passes + 1):
                desc = slug if passes == 1 else f"{slug} pass {pass_no}/{passes}"
                for spec in _progress([s for s in todo if initial[s.key] < pass_no], progress, desc):
                    # --force replaces each row in the first pass; otherwise another process may have
                    # measured it meanwhile
                    done = 0 if (force and pass_no == 1) else have(store.row(spec.key), spec)
                    if done >= pass_no:
                        by_other += 1
                        continue
                    try:
                        row = measurer.measure(spec)
                    except Exception as exc:  # one broken shape must not lose the others: report at the end
                        log.error("%s %s %s failed: %s", spec.primitive, spec.backend, spec.shape, exc)
                        failed.append(f"{spec.primitive}/{spec.backend} {spec.shape}: {' '.join(str(exc).split())}")
                        continue
                    store.add(row, replace=done == 0, merge=done > 0)
                    measured += 1
        if measured:
            speed.append(reference.time_reference(target_json))
            remeasured = measurer.remeasured
    finally:
        source.close()
        if measured:
            store.touch({reference.META_KEY: reference.record(speed, load_1m())} if speed else None)
    final = {row_key(r): r for r in store.rows()}
    rows = [final[s.key] for s in specs if s.key in final]
    return ProfileRun(store.path, len(specs), present, measured, by_other, failed, time.perf_counter() - started,
                      source.name, slug, rows, specs, device.cores, passes, remeasured, busy_before if not force else 0,
                      settings.busy_load_per_core)


def compile_model(inventory: Inventory, settings: Settings, *, progress: bool = True) -> dict[str, Any]:
    """Build every TVM row of the plan for the target without running anything (no GPU needed)."""
    started = time.perf_counter()

    tgt = kernels.resolve_target(settings.target)
    slug = kernels.target_slug(tgt)
    measurer = Measurer(settings, tgt, AnalyticalEnergyModel(), slug)
    specs = [s for s in plan(inventory, include_nonprim=settings.nonprim) if s.backend == "tvm"]
    failed = []
    for spec in _progress(specs, progress, f"compile {slug}"):
        try:
            measurer.compile_only(spec)
        except Exception as exc:
            failed.append(f"{spec.primitive} {spec.shape}: {' '.join(str(exc).split())}")
    return {"target": slug, "compiled": len(specs) - len(failed), "failed": failed,
            "seconds": round(time.perf_counter() - started, 1)}


def _progress(items: list[RowSpec], enabled: bool, desc: str) -> Iterable[RowSpec]:
    if not enabled:
        return items
    from tqdm import tqdm

    bar = tqdm(items, desc=desc, unit="row", leave=False, dynamic_ncols=True,
               disable=None if os.environ.get("CI") else False)

    def gen() -> Iterable[RowSpec]:
        for spec in bar:
            bar.set_postfix_str(f"{spec.primitive}/{spec.backend} {spec.b}x{spec.m}x{spec.k}x{spec.n}", refresh=False)
            yield spec
        bar.close()

    return gen()


# ---------------------------------------------------------------------------------------------------
# summary


def summary_rows(run: ProfileRun) -> list[dict[str, Any]]:
    """One line per TVM row of the plan: its latency and energy next to the PyTorch row of the same shape."""
    by_key = {row_key(r): r for r in run.rows}
    out = []
    for spec in run.specs:
        if spec.backend != "tvm":
            continue
        row = by_key.get(spec.key)
        base_name = TORCH_BASELINE.get(spec.primitive, spec.primitive)
        base = by_key.get((base_name, "torch", spec.b, spec.m, spec.k, spec.n, "float32"))
        tvm_ms = row["latency_ms"] if row else None
        torch_ms = base["latency_ms"] if base else None
        out.append({
            "primitive": spec.primitive,
            "shape": f"{spec.b}x{spec.m}x{spec.k}x{spec.n}",
            "tvm_ms": tvm_ms,
            "tvm_p90_ms": row["latency_ms_p90"] if row else None,
            "torch_ms": torch_ms,
            "tvm/torch": (tvm_ms / torch_ms) if tvm_ms and torch_ms else None,
            "energy_mj": row["energy_mj"] if row else None,
            "source": row["energy_source"] if row else None,
            "schedule": row["schedule"] if row else None,
            "layers": compact_names(spec.names),
        })
    return out
