"""Energy sources: NVML through a fake ``pynvml``, RAPL through a fake sysfs tree, the analytical model
against hand arithmetic, and source selection."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest

from dse.hardware import nvml as dse_nvml
from dse.hardware.energy import (
    UNIT_ENERGY_PJ,
    AnalyticalEnergyModel,
    EnergyError,
    NvmlMeter,
    RaplMeter,
    create_source,
    describe_sources,
    energy_source_names,
    integrate_power_mj,
    measure_energy,
    select_source,
)
from kernels.errors import ConfigError, TargetUnavailableError, UnknownNameError, UsageError
from kernels.targets import target_kind_of
from tests.conftest import ARCH_HOPPER, ARCH_PASCAL, GPU_IS_LOST, LIBRARY_NOT_FOUND, NOT_SUPPORTED, FakeGpu


@pytest.fixture
def gpu(monkeypatch):
    fake = FakeGpu()
    monkeypatch.setitem(sys.modules, "pynvml", fake.module())
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return fake


def busy_workload(gpu: FakeGpu, watts: float, seconds: float = 0.002):
    """fn() for measure(): the first call raises the power to ``watts``; each call takes ``seconds``."""

    def fn() -> None:
        gpu.set_power(watts)
        time.sleep(seconds)

    return fn


# --------------------------------------------------------------------------------------------------
# NVML
# --------------------------------------------------------------------------------------------------
def test_nvml_counter_gives_power_times_window_over_calls(gpu):
    gpu.set_power(40.0)
    with NvmlMeter(0, counter_poll_s=0.02) as meter:
        assert meter.available() and meter.method == "counter"
        reading = meter.measure(busy_workload(gpu, 240.0), min_window_s=0.25, idle_s=0.15)
    assert reading.source == "nvml" and reading.method == "counter"
    assert reading.window_s >= 0.25 and reading.calls >= 2
    # Independent reference: 240 W held for the whole window, split over the calls.
    expected_mj = 240.0 * reading.window_s * 1000 / reading.calls
    assert reading.energy_mj_per_call == pytest.approx(expected_mj, rel=0.03)
    assert reading.idle_power_w == pytest.approx(40.0, rel=0.03)
    # Dynamic = what the work added above idle: (240 - 40) W over the window.
    assert reading.dynamic_energy_mj_per_call == pytest.approx(
        200.0 * reading.window_s * 1000 / reading.calls, rel=0.05
    )
    assert reading.average_power_w == pytest.approx(240.0, rel=0.03)


def test_known_idle_power_skips_the_idle_window(gpu):
    gpu.set_power(90.0)
    meter = NvmlMeter(0)
    reading = meter.measure(lambda: time.sleep(0.001), min_window_s=0.1, idle_s=5.0, idle_w=30.0)
    assert reading.idle_power_w == 30.0 and reading.window_s < 1.0  # no 5 s idle wait
    assert reading.dynamic_energy_mj_per_call == pytest.approx(
        60.0 * reading.window_s * 1000 / reading.calls, rel=0.03
    )


def test_nvml_window_is_synchronised_at_both_ends(gpu):
    events = gpu.log

    def fn() -> None:
        events.append("fn")
        time.sleep(0.001)

    meter = NvmlMeter(0, counter_poll_s=0)  # no poller: the only reads are the window's two ends
    assert meter.available()
    events.clear()  # forget the availability probe's read
    reading = meter.measure(fn, sync=lambda: events.append("sync"), min_window_s=0.05, idle_s=0)
    start = events.index("read")
    assert events[start - 1] == "sync"  # queued warm-up work drained before the window opens
    assert events[start + 1] == "fn" and events[-2:] == ["sync", "read"]  # drained before it closes
    inside = events[start + 1 : -1]
    assert set(inside) == {"fn", "sync"} and inside.count("fn") == reading.calls


def test_asynchronous_launches_do_not_overrun_the_window(gpu):
    """Like a CUDA launch: fn() only queues work; sync() waits until the queue has run."""
    queued = 0

    def launch() -> None:
        nonlocal queued
        queued += 1

    def sync() -> None:
        nonlocal queued
        time.sleep(0.002 * queued)  # 2 ms of device time per queued call
        queued = 0

    gpu.set_power(200.0)
    reading = NvmlMeter(0, counter_poll_s=0.02).measure(launch, sync=sync, min_window_s=0.2, idle_s=0)
    # Host-time alone would queue up to max_calls launches (200 s of device work) before syncing.
    assert 0.2 <= reading.window_s < 0.6 and reading.calls < 300
    assert reading.energy_mj_per_call == pytest.approx(
        200.0 * reading.window_s * 1000 / reading.calls, rel=0.03
    )


def test_nvml_counter_reset_mid_window_is_not_negative(gpu, caplog):
    fn = busy_workload(gpu, 100.0)
    gpu.set_power(100.0)
    gpu.reset_at = time.perf_counter() + 0.12  # driver reload while the window is open
    with caplog.at_level(logging.WARNING, logger="dse.hardware.energy"):
        reading = NvmlMeter(0, counter_poll_s=0.01).measure(fn, min_window_s=0.3, idle_s=0)
    assert any("went backwards" in r.message for r in caplog.records)
    # At most one poll interval (10 ms of 300 ms) is lost; without reset handling this would be
    # hugely negative (the counter dropped by ~987 kJ).
    expected_mj = 100.0 * reading.window_s * 1000 / reading.calls
    assert reading.energy_mj_per_call == pytest.approx(expected_mj, rel=0.1)
    assert reading.energy_mj_per_call <= expected_mj * 1.02


@pytest.mark.parametrize("arch, counter", [(ARCH_PASCAL, False), (ARCH_HOPPER, False)])
def test_nvml_falls_back_to_power_polling(gpu, arch, counter):
    gpu.arch, gpu.counter = arch, counter
    gpu.set_power(50.0)
    meter = NvmlMeter(0, power_poll_s=0.01)
    assert meter.available() and meter.method == "power-polling"
    reading = meter.measure(busy_workload(gpu, 150.0), min_window_s=0.2, idle_s=0.1)
    assert reading.method == "power-polling"
    assert gpu.calls["nvmlDeviceGetPowerUsage"] > 10  # really polled, not two end points
    if arch == ARCH_PASCAL:  # known pre-Volta: the counter is never even tried
        assert "nvmlDeviceGetTotalEnergyConsumption" not in gpu.calls
    assert reading.energy_mj_per_call == pytest.approx(
        150.0 * reading.window_s * 1000 / reading.calls, rel=0.03
    )
    assert reading.idle_power_w == pytest.approx(50.0, rel=0.01)
    assert reading.dynamic_energy_mj_per_call == pytest.approx(
        100.0 * reading.window_s * 1000 / reading.calls, rel=0.05
    )


def test_integrate_power_is_the_trapezoid_rule():
    rng = np.random.default_rng(0)
    t = np.cumsum(rng.uniform(0.01, 0.1, 50))
    p = rng.uniform(30_000, 300_000, 50)  # mW
    assert integrate_power_mj(t.tolist(), p.tolist()) == pytest.approx(np.trapezoid(p, t), rel=1e-12)
    # A linear ramp is integrated exactly: 100 -> 300 W over 2 s is 400 J.
    assert integrate_power_mj([0.0, 0.5, 2.0], [100_000.0, 150_000.0, 300_000.0]) == pytest.approx(400_000.0)


def test_nvml_missing_library_is_one_clear_line(gpu):
    gpu.library_missing = True
    meter = NvmlMeter(0)
    assert meter.available() is False
    reason = meter.unavailable_reason
    assert "\n" not in reason and "NVML Shared Library Not Found" in reason and "'model'" in reason
    with pytest.raises(TargetUnavailableError) as info:
        meter.measure(lambda: None, min_window_s=0.01, idle_s=0)
    assert "\n" not in str(info.value) and "NVML" in str(info.value)


def test_nvml_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` raises ImportError
    meter = NvmlMeter(0)
    assert meter.available() is False
    assert "nvidia-ml-py" in meter.unavailable_reason and "\n" not in meter.unavailable_reason


@pytest.mark.parametrize("counter", [True, False])
def test_nvml_failing_mid_window_is_a_clear_error(gpu, counter):
    gpu.counter = counter
    calls = 0

    def fn() -> None:
        nonlocal calls
        calls += 1
        if calls == 5:
            gpu.lost = True
        time.sleep(0.002)

    meter = NvmlMeter(0, counter_poll_s=0.01, power_poll_s=0.01)
    start = time.perf_counter()
    with pytest.raises(EnergyError) as info:
        meter.measure(fn, min_window_s=2.0, idle_s=0)
    message = str(info.value)
    assert "\n" not in message and "GPU is lost" in message and "during the measurement window" in message
    assert time.perf_counter() - start < 1.5  # the poller's failure ends the window early
    assert not [t for t in threading.enumerate() if t.name.startswith("energy-")]


def test_errors_in_the_work_pass_through_and_stop_the_poller(gpu):
    def fn() -> None:
        raise RuntimeError("kernel crashed")

    with pytest.raises(RuntimeError, match="kernel crashed"):
        NvmlMeter(0, power_poll_s=0.01, force_polling=True).measure(fn, idle_s=0, warmup_calls=0)
    assert not [t for t in threading.enumerate() if t.name.startswith("energy-")]


def test_max_calls_caps_the_window(gpu, caplog):
    with caplog.at_level(logging.WARNING, logger="dse.hardware.energy"):
        reading = NvmlMeter(0).measure(lambda: None, min_window_s=30.0, max_calls=7, idle_s=0)
    assert reading.calls == 7 and reading.window_s < 1.0
    assert any("max_calls" in r.message for r in caplog.records)


def test_bad_measure_arguments_are_usage_errors(gpu):
    meter = NvmlMeter(0)
    for kwargs in ({"min_window_s": 0}, {"max_calls": 0}, {"idle_s": -1}):
        with pytest.raises(UsageError):
            meter.measure(lambda: None, **kwargs)


def test_cuda_visible_devices_maps_to_nvml_indices(monkeypatch):
    mod = types.ModuleType("pynvml")
    mod.NVMLError = type("NVMLError", (Exception,), {})
    mod.nvmlInit = mod.nvmlShutdown = lambda: None
    mod.nvmlDeviceGetCount = lambda: 4
    mod.nvmlDeviceGetHandleByIndex = lambda i: i
    mod.nvmlDeviceGetUUID = lambda h: f"GPU-{'abcd'[h]}{h}-uuid"
    monkeypatch.setitem(sys.modules, "pynvml", mod)
    with dse_nvml.Nvml() as nv:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        assert nv.index_for_cuda_device(2) == 2
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
        assert nv.index_for_cuda_device(1) == 3
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-c2")  # a UUID prefix, as CUDA accepts
        assert nv.index_for_cuda_device(0) == 2
        for visible, index in (("2,3", 2), ("MIG-123", 0), ("7", 0), ("GPU-zz", 0)):
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
            with pytest.raises(dse_nvml.NvmlUnavailableError) as info:
                nv.index_for_cuda_device(index)
            assert "\n" not in str(info.value)


def test_nvml_error_translation(gpu):
    mod = sys.modules["pynvml"]
    not_supported = dse_nvml.translate_error(mod, mod.NVMLError(NOT_SUPPORTED), "read the counter")
    assert isinstance(not_supported, dse_nvml.NvmlNotSupportedError)
    missing = dse_nvml.translate_error(mod, mod.NVMLError(LIBRARY_NOT_FOUND), "initialise NVML")
    assert isinstance(missing, TargetUnavailableError) and missing.code == LIBRARY_NOT_FOUND
    assert dse_nvml.device_count() == 1 and dse_nvml.probe(0) is None
    assert "GPU 3 does not exist" in dse_nvml.probe(3)  # one GPU: a clear reason, not an exception
    lost = dse_nvml.translate_error(mod, mod.NVMLError(GPU_IS_LOST), "read the power")
    assert type(lost) is dse_nvml.NvmlError and str(lost) == "NVML failed to read the power (GPU is lost)"


# --------------------------------------------------------------------------------------------------
# RAPL
# --------------------------------------------------------------------------------------------------
def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # readers never see a half-written counter


def make_rapl(root: Path, zones: dict[str, tuple[str, int, int]]) -> Path:
    """zones: directory -> (name, energy_uj, max_energy_range_uj)."""
    for directory, (name, energy, max_range) in zones.items():
        zone = root / directory
        zone.mkdir(parents=True)
        (zone / "name").write_text(name + "\n")
        (zone / "energy_uj").write_text(f"{energy}\n")
        (zone / "max_energy_range_uj").write_text(f"{max_range}\n")
    return root


def rapl_workload(root: Path, increments_uj: dict[str, int], sleep_s: float = 0.001):
    """fn() that adds energy to each zone's counter, wrapping at its max_energy_range_uj."""

    def fn() -> None:
        for directory, inc in increments_uj.items():
            zone = root / directory
            max_range = int((zone / "max_energy_range_uj").read_text())
            value = (int((zone / "energy_uj").read_text()) + inc) % max_range
            write_atomic(zone / "energy_uj", f"{value}\n")
        time.sleep(sleep_s)

    return fn


def test_rapl_sums_packages_and_survives_wraparound(tmp_path):
    root = make_rapl(
        tmp_path,
        {
            "intel-rapl:0": ("package-0", 990_000, 1_000_000),  # wraps after two calls
            "intel-rapl:0:0": ("core", 10, 1_000_000),  # a subzone: inside package-0 already
            "intel-rapl:1": ("package-1", 5, 262_143_328_850),
            "intel-rapl:2": ("psys", 0, 1_000_000),  # platform zone: would double count
        },
    )
    fn = rapl_workload(
        root, {"intel-rapl:0": 7_000, "intel-rapl:0:0": 4_000, "intel-rapl:1": 3_000, "intel-rapl:2": 50_000}
    )
    meter = RaplMeter(root, poll_s=0.005)
    assert meter.available() and [z.name for z in meter.zones()] == ["package-0", "package-1"]
    reading = meter.measure(fn, min_window_s=0.1, idle_s=0.03)
    assert reading.source == "rapl" and reading.calls >= 2
    assert int((root / "intel-rapl:0" / "energy_uj").read_text()) < 990_000  # it did wrap
    # Each call adds 7 mJ + 3 mJ to the two packages; nothing happens while idle.
    assert reading.energy_mj_per_call == pytest.approx(10.0, abs=1e-9)
    assert reading.idle_power_w == 0.0
    assert reading.dynamic_energy_mj_per_call == pytest.approx(10.0, abs=1e-9)


def test_rapl_unavailable_cases(tmp_path):
    missing = RaplMeter(tmp_path / "nope")
    assert not missing.available() and "does not exist" in missing.unavailable_reason
    # root is told that privileges will not help; anyone else how to get them
    assert ("run as root" in missing.unavailable_reason) == (os.geteuid() != 0)

    only_psys = RaplMeter(make_rapl(tmp_path / "psys", {"intel-rapl:0": ("psys", 1, 10)}))
    assert not only_psys.available() and "no RAPL package zones" in only_psys.unavailable_reason

    locked_root = make_rapl(tmp_path / "locked", {"intel-rapl:0": ("package-0", 1, 10)})
    (locked_root / "intel-rapl:0" / "energy_uj").unlink()
    (locked_root / "intel-rapl:0" / "energy_uj").mkdir()  # unreadable even as root
    locked = RaplMeter(locked_root)
    assert not locked.available()
    assert "not readable" in locked.unavailable_reason and "\n" not in locked.unavailable_reason
    with pytest.raises(TargetUnavailableError):
        locked.measure(lambda: None, idle_s=0)


def test_rapl_failing_mid_window_is_a_clear_error(tmp_path):
    root = make_rapl(tmp_path, {"intel-rapl:0": ("package-0", 0, 1_000_000)})
    calls = 0

    def fn() -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            (root / "intel-rapl:0" / "energy_uj").unlink()
        time.sleep(0.002)

    with pytest.raises(EnergyError) as info:
        RaplMeter(root, poll_s=0.005).measure(fn, min_window_s=0.1, idle_s=0)
    assert "\n" not in str(info.value) and "rapl" in str(info.value) and "energy_uj" in str(info.value)


# --------------------------------------------------------------------------------------------------
# analytical model (45 nm: fp32 mult 3.7, fp32 add 0.9, int32 add 0.1, shift 0.13, fp16 mult 1.1 pJ;
# DRAM 160 pJ per byte read or written)
# --------------------------------------------------------------------------------------------------
def test_model_matmul_by_hand():
    # b=1, m=2, k=3, n=4: 1·2·4·3 = 24 multiplies and 24 adds.
    # bytes: x 1·2·3·4 B = 24, w 4·3·4 B = 48, out 1·2·4·4 B = 32 -> 104 B.
    # 24·3.7 + 24·0.9 + 104·160 = 88.8 + 21.6 + 16640 = 16750.4 pJ.
    est = AnalyticalEnergyModel().estimate("matmul", 1, 2, 3, 4)
    assert est.energy_mj == pytest.approx(16750.4e-9, rel=1e-12)
    assert est.counts == {"fp32_mult": 24, "fp32_add": 24, "dram_byte": 104}
    assert est.breakdown["fp32_mult"] == pytest.approx(88.8e-9)
    assert sum(est.breakdown.values()) == pytest.approx(est.energy_mj)


def test_model_matshift_by_hand():
    # b=2, m=3, k=4, n=5: 2·3·5·4 = 120 shifts and 120 int32 adds, no multiplies.
    # bytes: x int32 2·3·4·4 = 96, shift + sign int8 2·5·4 = 40, out int32 2·3·5·4 = 120 -> 256 B.
    # 120·0.13 + 120·0.1 + 256·160 = 15.6 + 12 + 40960 = 40987.6 pJ.
    est = AnalyticalEnergyModel().estimate("matshift", 2, 3, 4, 5)
    assert est.energy_mj == pytest.approx(40987.6e-9, rel=1e-12)
    assert est.counts == {"shift32": 120, "int32_add": 120, "dram_byte": 256}


def test_model_other_primitives_by_hand():
    model = AnalyticalEnergyModel()
    # matadd b=1, m=2, k=3, n=4: 24 fp32 adds (every k counted); mask 6 B + v 48 B + out 32 B = 86 B.
    # 24·0.9 + 86·160 = 21.6 + 13760 = 13781.6 pJ.
    assert model.estimate("matadd", 1, 2, 3, 4).energy_mj == pytest.approx(13781.6e-9, rel=1e-12)
    # matshift_decode b=2, m=3, k=4, n=5: 20 decode shifts, 120 fp32 mult + 120 add, 256 B (as matshift).
    # 20·0.13 + 120·3.7 + 120·0.9 + 256·160 = 2.6 + 444 + 108 + 40960 = 41514.6 pJ.
    assert model.estimate("matshift_decode", 2, 3, 4, 5).energy_mj == pytest.approx(41514.6e-9, rel=1e-12)
    # fp16 matmul b=1, m=2, k=3, n=4: fp16 products, fp32 accumulation and output:
    # 24·1.1 + 24·0.9 + (12·2 + 6·2 + 8·4)·160 = 26.4 + 21.6 + 68·160 = 10928 pJ.
    assert model.estimate("matmul", 1, 2, 3, 4, "float16").energy_mj == pytest.approx(10928e-9, rel=1e-12)


def test_model_overrides_and_errors():
    compute_only = AnalyticalEnergyModel({"dram_byte": 0})
    # Without memory, a multiply-accumulate costs 3.7 + 0.9 = 4.6 pJ and a shift-add 0.23 pJ: 20x.
    mult = compute_only.estimate("matmul", 2, 8, 16, 4).energy_mj
    shift = compute_only.estimate("matshift", 2, 8, 16, 4).energy_mj
    assert mult / shift == pytest.approx(4.6 / 0.23)
    assert AnalyticalEnergyModel({"fp32_mult": 0}).unit_energy_pj["fp32_add"] == UNIT_ENERGY_PJ["fp32_add"]
    with pytest.raises(ConfigError, match="valid keys"):
        AnalyticalEnergyModel({"fp64_mult": 1.0})
    with pytest.raises(ConfigError):
        AnalyticalEnergyModel({"fp32_mult": -1.0})
    with pytest.raises(UnknownNameError):
        AnalyticalEnergyModel().estimate("conv2d", 1, 1, 1, 1)
    with pytest.raises(UsageError):
        AnalyticalEnergyModel().estimate("matshift", 1, 1, 1, 1, dtype="float32")
    with pytest.raises(UsageError):
        AnalyticalEnergyModel().estimate("matmul", 0, 1, 1, 1)


# --------------------------------------------------------------------------------------------------
# registry and selection
# --------------------------------------------------------------------------------------------------
def test_registry_names_and_target_kinds():
    assert energy_source_names() == ["nvml", "rapl", "model"]
    assert [
        target_kind_of(t) for t in ("cpu", "llvm", "cuda", "cuda:sm_90", {"kind": "llvm", "mcpu": "znver3"})
    ] == [
        "cpu",
        "cpu",
        "cuda",
        "cuda",
        "cpu",
    ]
    assert target_kind_of('{"kind": "cuda", "arch": "sm_90"}') == "cuda"
    with pytest.raises(UnknownNameError):
        target_kind_of("metal")
    with pytest.raises(UnknownNameError):
        create_source("joulemeter")


def test_select_source_prefers_measurement_then_model(gpu, tmp_path):
    rapl_root = make_rapl(tmp_path / "rapl", {"intel-rapl:0": ("package-0", 0, 1_000_000)})
    assert isinstance(select_source("cuda"), NvmlMeter)
    assert isinstance(select_source("cpu", rapl_root=rapl_root), RaplMeter)
    assert isinstance(select_source("cpu", rapl_root=tmp_path / "none"), AnalyticalEnergyModel)
    assert isinstance(select_source("cuda", ["rapl", "model"]), AnalyticalEnergyModel)  # rapl: wrong kind
    assert isinstance(select_source("llvm", ["nvml", "rapl", "model"], rapl_root=rapl_root), RaplMeter)
    gpu.library_missing = True
    assert isinstance(select_source("cuda"), AnalyticalEnergyModel)
    with pytest.raises(TargetUnavailableError) as info:
        select_source("cuda", "nvml")  # asked for explicitly: an error, not a silent substitute
    assert "\n" not in str(info.value) and "NVML Shared Library Not Found" in str(info.value)
    with pytest.raises(TargetUnavailableError):
        select_source("cuda", ["nvml"])
    with pytest.raises(UsageError, match="measures cuda energy"):
        select_source("cpu", "nvml")
    with pytest.raises(UsageError, match="suits a cpu target"):
        select_source("cpu", ["nvml"])


def test_describe_sources_and_measure_energy(gpu, tmp_path):
    gpu.library_missing = True
    report = describe_sources(rapl_root=tmp_path)
    assert report["model"] is None and "NVML" in report["nvml"] and "RAPL" in report["rapl"]

    model = AnalyticalEnergyModel()
    reading = measure_energy(model, lambda: None, primitive="matmul", b=1, m=2, k=3, n=4)
    assert reading.source == "model" and reading.method == "analytical"
    assert reading.energy_mj_per_call == model.estimate("matmul", 1, 2, 3, 4).energy_mj
    assert reading.dynamic_energy_mj_per_call == reading.energy_mj_per_call and reading.idle_power_w is None

    root = make_rapl(tmp_path / "rapl", {"intel-rapl:0": ("package-0", 0, 1_000_000)})
    measured = measure_energy(
        RaplMeter(root, poll_s=0.01),
        rapl_workload(root, {"intel-rapl:0": 2_500}),
        primitive="matmul",
        b=1,
        m=2,
        k=3,
        n=4,
        min_window_s=0.05,
        idle_s=0,
    )
    assert measured.source == "rapl" and measured.energy_mj_per_call == pytest.approx(2.5)


def test_real_pynvml_probe_never_raises(monkeypatch):
    """With the installed pynvml: usable on a GPU machine, a one-line reason everywhere else."""
    monkeypatch.delitem(sys.modules, "pynvml", raising=False)  # import the real module afresh
    meter = NvmlMeter(0)
    try:
        usable = meter.available()
        assert usable or ("\n" not in meter.unavailable_reason and meter.unavailable_reason)
        assert (dse_nvml.probe(0) is None) == usable
    finally:
        meter.close()
