"""Device description: stable, path-safe slugs; CPU and CUDA (fake NVML / fake torch) descriptions;
versions from package metadata."""

from __future__ import annotations

import importlib.machinery
import importlib.metadata
import os
import platform
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dse.hardware.device import DeviceInfo, cpu_model_name, describe_device, slugify, versions
from kernels.errors import TargetUnavailableError

ROOT = Path(__file__).resolve().parents[3]
SAFE = re.compile(r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$")


@pytest.mark.parametrize(
    "name, slug",
    [
        ("Intel(R) Xeon(R) Processor", "intel-xeon-processor"),
        ("Intel(R) Core(TM) i9-13900K CPU @ 3.00GHz", "intel-core-i9-13900k-cpu-3.00ghz"),
        ("AMD EPYC 7763 64-Core Processor", "amd-epyc-7763-64-core-processor"),
        ("NVIDIA H100 80GB HBM3", "nvidia-h100-80gb-hbm3"),
        ("NVIDIA H100 PCIe", "nvidia-h100-pcie"),
        ("Tesla V100-SXM2-16GB", "tesla-v100-sxm2-16gb"),
        ("../../etc/passwd", "etc-passwd"),
        ("a\\b:c*d?e|f<g>", "a-b-c-d-e-f-g"),
        ("", "unknown"),
        ("...", "unknown"),
    ],
)
def test_slug_examples(name, slug):
    assert slugify(name) == slug


@given(st.text(max_size=300))
def test_slug_is_filesystem_safe_and_deterministic(text):
    slug = slugify(text)
    assert SAFE.match(slug) and len(slug) <= 64 and ".." not in slug
    assert slugify(text) == slug


def test_long_names_keep_distinct_slugs_across_processes():
    a, b = "Vendor " + "x" * 80 + " model A", "Vendor " + "x" * 80 + " model B"
    assert slugify(a) != slugify(b) and len(slugify(a)) <= 64
    # Stable between runs: no per-process hash seed in the suffix.
    code = f"from dse.hardware.device import slugify; print(slugify({a!r}))"
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == slugify(a)


def test_cpu_model_name_parsing():
    x86 = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R)  Xeon(R) Gold 6338\nprocessor\t: 1\n"
    assert cpu_model_name(x86) == "Intel(R) Xeon(R) Gold 6338"
    arm = "processor\t: 0\nBogoMIPS\t: 48.00\nCPU part\t: 0xd0c\n\nHardware\t: BCM2835\nModel\t: Raspberry Pi 4\n"
    assert cpu_model_name(arm) == "BCM2835"

def test_cpu_model_name_without_a_model_line_falls_back_to_platform(monkeypatch):
    """No model line in cpuinfo: platform.processor(), else platform.machine(), else a stated unknown."""
    for processor, machine, expect in (("FakeCPU 9000", "riscv64", "FakeCPU 9000"), ("", "riscv64", "riscv64"),
                                       ("", "", "unknown cpu")):
        monkeypatch.setattr(platform, "processor", lambda p=processor: p)
        monkeypatch.setattr(platform, "machine", lambda m=machine: m)
        assert cpu_model_name("processor : 0\n") == expect


def test_describe_cpu_is_stable():
    first, second = describe_device("cpu"), describe_device({"kind": "llvm", "mcpu": "znver3"})
    assert first == second and first.kind == "cpu"
    assert first.slug == slugify(first.name) and SAFE.match(first.slug)
    assert first.cores is not None and 1 <= first.cores <= (os.cpu_count() or 1)
    assert first.as_dict()["slug"] == first.slug


def fake_pynvml(*, missing: bool = False) -> types.ModuleType:
    mod = types.ModuleType("pynvml")

    class NVMLError(Exception):
        def __init__(self, value):
            super().__init__(value)
            self.value = value

        def __str__(self):
            return "NVML Shared Library Not Found" if self.value == 12 else f"error {self.value}"

    def init():
        if missing:
            raise NVMLError(12)

    mod.NVMLError = NVMLError
    mod.nvmlInit = init
    mod.nvmlShutdown = lambda: None
    mod.nvmlDeviceGetCount = lambda: 2
    mod.nvmlDeviceGetHandleByIndex = lambda i: i
    mod.nvmlDeviceGetName = lambda h: [b"NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe"][h]  # old pynvml: bytes
    mod.nvmlDeviceGetArchitecture = lambda h: 9
    mod.nvmlSystemGetDriverVersion = lambda: "550.54.15"
    mod.nvmlSystemGetCudaDriverVersion = lambda: 12040
    return mod


def test_describe_cuda_through_nvml(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")
    info = describe_device("cuda:sm_90", device_index=1)
    assert info.name == "NVIDIA H100 80GB HBM3"  # CUDA device 1 is NVML device 0 here
    assert info.slug == "nvidia-h100-80gb-hbm3" and info.kind == "cuda" and info.index == 1
    assert (info.arch, info.driver, info.cuda_driver) == ("hopper", "550.54.15", "12.4")
    import torch

    assert info.cuda_runtime == torch.version.cuda  # the CUDA torch was built with (None for a CPU build)
    assert describe_device("cuda", device_index=0).slug == "nvidia-h100-pcie"


def fake_torch(*, gpus: int) -> types.ModuleType:
    torch = types.ModuleType("torch")
    torch.__spec__ = importlib.machinery.ModuleSpec("torch", None)
    torch.version = types.SimpleNamespace(cuda="12.1")
    torch.cuda = types.SimpleNamespace(
        is_available=lambda: gpus > 0,
        device_count=lambda: gpus,
        get_device_name=lambda i: "NVIDIA A100-SXM4-40GB",
        get_device_capability=lambda i: (8, 0),
    )
    return torch


def test_describe_cuda_without_nvml_asks_torch(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(missing=True))
    monkeypatch.setitem(sys.modules, "torch", fake_torch(gpus=1))
    info = describe_device("cuda")
    assert info == DeviceInfo(
        "cuda", "NVIDIA A100-SXM4-40GB", "nvidia-a100-sxm4-40gb", index=0, arch="sm_80", cuda_runtime="12.1"
    )


def test_describe_cuda_without_a_gpu_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(missing=True))
    monkeypatch.setitem(sys.modules, "torch", fake_torch(gpus=0))
    with pytest.raises(TargetUnavailableError) as info:
        describe_device("cuda")
    message = str(info.value)
    assert "\n" not in message and "NVML Shared Library Not Found" in message and "cpu target" in message


def test_versions_come_from_metadata():
    found = versions()
    for key in ("python", "torch", "torchvision", "timm", "tvm", "optuna", "numpy"):
        assert key in found
    assert found["python"] == platform.python_version()
    assert found["numpy"] == np.__version__
    assert found["tvm"] == importlib.metadata.version("apache-tvm")


def test_import_is_quick_and_torch_free():
    code = "import sys, dse.hardware.device, dse.hardware.energy; print('torch' in sys.modules, 'tvm' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["False", "False"]
