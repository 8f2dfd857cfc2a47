"""What hardware and software we are measuring on: device names, path-safe slugs, versions.

Profiles live at ``profiles/<device-slug>/<target-slug>.csv``, so :func:`slugify` must give the same
slug for the same device on every run and machine. Importing this module is quick: torch is only
imported when describing a CUDA device that NVML cannot see, and versions come from package metadata.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import platform
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dse.hardware.nvml import Nvml, NvmlError, architecture_name
from kernels.errors import TargetUnavailableError
from kernels.targets import target_kind_of

logger = logging.getLogger(__name__)

_SLUG_MAX = 64
# Marketing marks that add nothing to a device's identity.
_NOISE = re.compile(r"\((?:r|tm|c)\)|®|™", re.IGNORECASE)


@dataclass(frozen=True)
class DeviceInfo:
    kind: str  # "cpu" | "cuda"
    name: str  # e.g. "Intel(R) Xeon(R) Processor", "NVIDIA H100 80GB HBM3"
    slug: str  # path-safe, stable: "intel-xeon-processor", "nvidia-h100-80gb-hbm3"
    index: int | None = None  # CUDA device index (torch/TVM numbering)
    cores: int | None = None  # CPU cores this process may use
    arch: str | None = None  # "x86_64" / "hopper"
    driver: str | None = None  # NVIDIA driver version
    cuda_driver: str | None = None  # newest CUDA the driver supports (NVML)
    cuda_runtime: str | None = None  # CUDA that torch was built with

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def slugify(text: str) -> str:
    """Lower-case ``[a-z0-9._-]`` slug, stable for the same text; long names keep a hash suffix."""
    clean = _NOISE.sub(" ", text).lower()
    clean = re.sub(r"(?<![0-9])\.|\.(?![0-9])", " ", clean)  # keep dots only inside numbers: "3.00ghz"
    slug = re.sub(r"[^a-z0-9.]+", "-", clean).strip("-")
    if len(slug) > _SLUG_MAX:
        digest = hashlib.sha1(text.encode()).hexdigest()[:8]
        slug = f"{slug[: _SLUG_MAX - 9].rstrip('-.')}-{digest}"
    return slug or "unknown"


def cpu_model_name(cpuinfo_text: str | None = None) -> str:
    """The CPU model from ``/proc/cpuinfo`` text (x86 ``model name``; ARM ``Hardware``/``Model``),
    else what :mod:`platform` knows."""
    if cpuinfo_text is None:
        try:
            cpuinfo_text = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo_text = ""
    fields: dict[str, str] = {}
    for line in cpuinfo_text.splitlines():
        key, sep, value = line.partition(":")
        if sep and value.strip():
            fields.setdefault(key.strip().lower(), value.strip())
    for key in ("model name", "hardware", "model", "cpu model", "processor"):
        value = fields.get(key, "")
        if value and not value.isdigit():  # x86 "processor" is just the CPU number
            return " ".join(value.split())
    return platform.processor() or platform.machine() or "unknown cpu"


def _usable_cores() -> int | None:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count()


def describe_device(target_kind: str | dict[str, Any], *, device_index: int = 0) -> DeviceInfo:
    """Describe the device a target runs on (``"cpu"``/``"llvm"``, ``"cuda"``, or a target dict)."""
    kind = target_kind_of(target_kind)
    if kind == "cpu":
        name = cpu_model_name()
        return DeviceInfo("cpu", name, slugify(name), cores=_usable_cores(), arch=platform.machine() or None)
    return _describe_cuda(device_index)


def _describe_cuda(device_index: int) -> DeviceInfo:
    try:
        with Nvml() as nv:
            index = nv.index_for_cuda_device(device_index)
            name = nv.name(index)
            arch_code = nv.architecture(index)
            return DeviceInfo(
                "cuda",
                name,
                slugify(name),
                index=device_index,
                arch=None if arch_code is None else architecture_name(arch_code),
                driver=nv.driver_version(),
                cuda_driver=nv.cuda_driver_version(),
                cuda_runtime=_torch_cuda_version(),
            )
    except NvmlError as exc:
        nvml_reason = str(exc)
    # No NVML (e.g. a container without the management library): ask the CUDA runtime via torch.
    torch_reason = "torch is not installed"
    if importlib.util.find_spec("torch") is not None:
        import torch  # noqa: PLC0415 - heavy; only here

        if torch.cuda.is_available() and device_index < torch.cuda.device_count():
            name = torch.cuda.get_device_name(device_index)
            major, minor = torch.cuda.get_device_capability(device_index)
            return DeviceInfo(
                "cuda",
                name,
                slugify(name),
                index=device_index,
                arch=f"sm_{major}{minor}",
                cuda_runtime=torch.version.cuda,
            )
        torch_reason = f"torch sees {torch.cuda.device_count()} CUDA device(s)"
    raise TargetUnavailableError(
        f"no CUDA device {device_index} here (NVML: {nvml_reason}; {torch_reason}); use the cpu target"
    )


def _torch_cuda_version() -> str | None:
    """torch's CUDA version without importing torch (its ``version.py`` is a plain file)."""
    if "torch" in sys.modules:
        return sys.modules["torch"].version.cuda
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    try:
        text = (Path(next(iter(spec.submodule_search_locations))) / "version.py").read_text()
    except OSError:
        return None
    match = re.search(r"^cuda\s*(?::[^=]*)?=\s*['\"]([^'\"]+)['\"]", text, re.MULTILINE)
    return match.group(1) if match else None


# Distribution names for the versions that matter to a profile's validity.
_DISTRIBUTIONS = {
    "torch": ("torch",),
    "torchvision": ("torchvision",),
    "timm": ("timm",),
    "tvm": ("apache-tvm", "tvm"),
    "tvm_ffi": ("apache-tvm-ffi",),
    "optuna": ("optuna",),
    "numpy": ("numpy",),
    "nvidia_ml_py": ("nvidia-ml-py",),
    "shiftadd_dse": ("shiftadd-dse",),
}


def versions() -> dict[str, str | None]:
    """Installed versions (None when missing), read from package metadata without importing."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for key, dists in _DISTRIBUTIONS.items():
        found[key] = None
        for dist in dists:
            try:
                found[key] = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return found
