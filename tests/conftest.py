import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

import pytest
import yaml

import kernels
from dse.checkpoints import build_dense
from dse.config import Config
from dse.hardware.device import describe_device
from dse.profiling import profiler
from dse.profiling.inventory import build_inventory
from dse.profiling.profiler import plan
from dse.profiling.store import format_rows, meta_path, profile_path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("CI", "true")  # no progress bars in test output
# No test reads the profiles committed for some host CPU: the default profile root is an empty folder of the
# session's (subprocesses inherit it). A test that needs a profile writes one (the `profile_root` fixtures).
os.environ["DSE_PROFILE_DIR"] = tempfile.mkdtemp(prefix="dse-profiles-")


@pytest.fixture(autouse=True)
def quiet_host(monkeypatch):
    """Rows measured in a test record a quiet host and are measured once: whether the test machine happens to
    be loaded (the profiler re-measures rows taken under load, and preempted timings) must not change what a
    test sees. The tests of that hygiene set the load and the timings themselves."""
    monkeypatch.setattr(profiler, "load_1m", lambda: 0.25)
    monkeypatch.setattr(profiler, "PREEMPTED_RATIO", float("inf"))


def run_dse(*args: str, cwd: Path | None = None, timeout: float = 600, env: dict | None = None):
    """Run the real CLI in a subprocess (exit codes and stderr are what users script against)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "dse", *args], cwd=cwd or ROOT, capture_output=True,
                          text=True, timeout=timeout, env=full_env)


@pytest.fixture
def dse_cli():
    return run_dse


def write_profile(root: Path, *, cfg: Config | None = None, batch: int = 2, device: dict | None = None,
                  target: dict | None = None, seconds_per_mac: float = 2e-9, overhead_ms: float = 0.002) -> Path:
    """Write ``<root>/<device>/<target>.csv`` + ``.yaml``: every row ``dse profile`` would measure for the model
    of ``cfg`` (default: the built-in config's; ``dse.profiling.profiler.plan``), priced by a stated formula instead of a
    measurement, so tests own their data:
    ``latency_ms = overhead_ms + b·m·k·n · seconds_per_mac · 1e3`` (PyTorch rows 1.5× that), energy 0.01 mJ
    (``model``). ``device``/``target`` default to this machine's CPU and target."""
    cfg = cfg or Config()
    model = cfg.model.name
    inventory = build_inventory(build_dense(cfg), batch=batch, nbits=cfg.finetune.nbits, name=model)
    target = json.loads(json.dumps(target or kernels.targets.target_to_dict(kernels.resolve_target("cpu"))))
    device = device or describe_device("cpu").as_dict()
    rows = []
    for spec in plan(inventory):
        ms = overhead_ms + spec.b * spec.m * spec.k * spec.n * seconds_per_mac * 1e3
        ms *= 1.5 if spec.backend == "torch" else 1.0
        rows.append({"primitive": spec.primitive, "backend": spec.backend, "batch": spec.b, "m": spec.m,
                     "k": spec.k, "n": spec.n, "dtype": spec.dtype, "latency_ms": ms, "latency_ms_p90": ms,
                     "repeats": 7, "energy_mj": 0.01, "energy_source": "model", "idle_power_w": None,
                     "target": json.dumps(target), "schedule": "eager" if spec.backend == "torch" else "default",
                     "tuned_trials": 0, "measured_at": "2026-12-01T00:00:00+00:00"})
    slug = kernels.target_slug(target)
    path = profile_path(root, str(device["slug"]), slug)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(format_rows(rows))
    meta = {"format": 1, "device": dict(device), "target": dict(target), "target_slug": slug,
            "versions": {"tvm": "test", "torch": "test"}, "settings": {},
            "models": [f"{model} (batch {batch}, formula rows)"], "created": "2026-12-01T00:00:00+00:00"}
    meta_path(path).write_text(yaml.safe_dump(meta, sort_keys=False))
    return path


GPU_DEVICE = {"kind": "cuda", "name": "NVIDIA H100 80GB HBM3", "slug": "nvidia-h100-80gb-hbm3", "index": 0,
              "cores": None, "arch": "hopper"}
GPU_TARGET = {"kind": "cuda", "arch": "sm_90"}


@pytest.fixture
def profile_root(tmp_path):
    """An empty profile root of the test's own; ``write_profile(root, ...)`` fills it."""
    root = tmp_path / "profiles"
    root.mkdir()
    return root


# NVML return codes and architecture numbers from nvml.h.
NOT_SUPPORTED, LIBRARY_NOT_FOUND, GPU_IS_LOST, INVALID_ARGUMENT = 3, 12, 15, 2
ARCH_PASCAL, ARCH_HOPPER = 4, 9


class FakeGpu:
    """A GPU whose power is piecewise constant in real monotonic time, seen through a fake pynvml.

    ``energy_j()`` is the exact integral of the power; the counter reports it in whole mJ on top of an
    offset (energy "since driver load"), optionally restarting from 0 at ``reset_at``.
    """

    def __init__(self, *, power_w: float = 40.0, arch: int = ARCH_HOPPER, counter: bool = True) -> None:
        self.arch, self.counter = arch, counter
        self.offset_mj = 987_654_321
        self._power_w = power_w
        self._t = time.perf_counter()
        self._energy_j = 0.0
        self._lock = threading.Lock()
        self.reset_at: float | None = None
        self._energy_at_reset_j: float | None = None
        self.lost = False  # every call raises GPU_IS_LOST once set
        self.library_missing = False
        self.log: list[str] = []  # main-thread events, when logging is on
        self.calls: dict[str, int] = {}

    def set_power(self, watts: float) -> None:
        with self._lock:
            self._advance()
            self._power_w = watts

    def _advance(self) -> None:
        now = time.perf_counter()
        self._energy_j += self._power_w * (now - self._t)
        self._t = now
        if self.reset_at is not None and self._energy_at_reset_j is None and now >= self.reset_at:
            # Counter restarts from zero at the reset: approximate the reset time by now.
            self._energy_at_reset_j = self._energy_j

    def energy_j(self) -> float:
        with self._lock:
            self._advance()
            return self._energy_j

    def counter_mj(self) -> int:
        with self._lock:
            self._advance()
            if self._energy_at_reset_j is not None:
                return int((self._energy_j - self._energy_at_reset_j) * 1000)
            return int(self.offset_mj + self._energy_j * 1000)

    def module(self) -> types.ModuleType:
        gpu = self
        mod = types.ModuleType("pynvml")

        class NVMLError(Exception):
            def __init__(self, value: int) -> None:
                super().__init__(value)
                self.value = value

            def __str__(self) -> str:
                return {
                    NOT_SUPPORTED: "Not Supported",
                    LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
                    GPU_IS_LOST: "GPU is lost",
                }.get(self.value, f"error {self.value}")

        def api(name):
            def wrap(fn):
                def call(*args):
                    gpu.calls[name] = gpu.calls.get(name, 0) + 1
                    if gpu.lost:
                        raise NVMLError(GPU_IS_LOST)
                    return fn(*args)

                setattr(mod, name, call)
                return call

            return wrap

        @api("nvmlInit")
        def _init():
            if gpu.library_missing:
                raise NVMLError(LIBRARY_NOT_FOUND)

        @api("nvmlShutdown")
        def _shutdown():
            return None

        @api("nvmlDeviceGetCount")
        def _count():
            return 1

        @api("nvmlDeviceGetHandleByIndex")
        def _handle(i):
            if i != 0:
                raise NVMLError(INVALID_ARGUMENT)
            return ("gpu", i)

        @api("nvmlDeviceGetArchitecture")
        def _arch(h):
            return gpu.arch

        @api("nvmlDeviceGetTotalEnergyConsumption")
        def _energy(h):
            if not gpu.counter or gpu.arch < 5:
                raise NVMLError(NOT_SUPPORTED)
            if threading.current_thread() is threading.main_thread():
                gpu.log.append("read")
            return gpu.counter_mj()

        @api("nvmlDeviceGetPowerUsage")
        def _power(h):
            with gpu._lock:
                return int(gpu._power_w * 1000)

        mod.NVMLError = NVMLError
        mod.NVML_ERROR_NOT_SUPPORTED = NOT_SUPPORTED
        mod.NVML_ERROR_LIBRARY_NOT_FOUND = LIBRARY_NOT_FOUND
        mod.NVML_ERROR_GPU_IS_LOST = GPU_IS_LOST
        mod.NVML_DEVICE_ARCH_VOLTA = 5
        return mod
