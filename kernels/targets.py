"""Compilation targets as JSON dicts, the host CPU's name, and whether CUDA can run here.

TVM 0.27 accepts targets only as dicts (``{"kind": "llvm", "mcpu": ..., "num-cores": 2}``); the old
string form is rejected, and so is ``-mcpu=native`` under its LLVM 22. So the CPU target names the
real CPU: TVM's ``tvm.codegen.llvm.GetHostCPUName`` (LLVM's ``sys::getHostCPUName``, the same call
TVM's own ``detect_target_from_device`` makes), falling back to a family guess from /proc/cpuinfo.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kernels.errors import ConfigError, TargetUnavailableError, UnknownNameError, UsageError

if TYPE_CHECKING:
    import tvm

log = logging.getLogger(__name__)

# Short names a user may pass instead of a dict. "cuda" alone means an Ampere-class default.
_CUDA_DEFAULT_ARCH = "sm_80"

# /proc/cpuinfo "model name" patterns → LLVM CPU names, for when LLVM cannot tell (rare).
_CPUINFO_FALLBACK: tuple[tuple[str, str], ...] = (
    (r"EPYC.*(9\d\d4|9\d\d5)", "znver4"),
    (r"EPYC.*7\d\d3", "znver3"),
    (r"EPYC.*7\d\d2", "znver2"),
    (r"AMD", "znver2"),
)


def _cpuinfo_mcpu(text: str) -> str:
    """Best-effort LLVM CPU name from /proc/cpuinfo text: a vendor model or an ISA level."""
    model = re.search(r"^model name\s*:\s*(.*)$", text, re.M)
    name = model.group(1) if model else ""
    for pattern, mcpu in _CPUINFO_FALLBACK:
        if re.search(pattern, name):
            return mcpu
    flags_m = re.search(r"^flags\s*:\s*(.*)$", text, re.M)
    flags = set(flags_m.group(1).split()) if flags_m else set()
    # x86-64 micro-architecture levels (psABI): v4 = AVX-512, v3 = AVX2+FMA, v2 = SSE4.2.
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "x86-64-v4"
    if {"avx2", "fma", "bmi2"} <= flags:
        return "x86-64-v3"
    if {"sse4_2", "popcnt"} <= flags:
        return "x86-64-v2"
    return "x86-64"


@functools.cache
def host_cpu_name() -> str:
    """LLVM's name for the host CPU (e.g. ``znver3``, ``sapphirerapids``)."""
    try:
        import tvm  # noqa: F401  (registers the LLVM codegen functions; without it the lookup below fails)
        from tvm_ffi import get_global_func

        name = str(get_global_func("tvm.codegen.llvm.GetHostCPUName", allow_missing=False)())
        if name and name != "generic":
            return name
    except Exception as exc:  # an LLVM-less TVM build lacks the function
        log.debug("GetHostCPUName unavailable (%s); parsing /proc/cpuinfo", exc)
    try:
        return _cpuinfo_mcpu(Path("/proc/cpuinfo").read_text())
    except OSError:
        return "x86-64"


def host_num_cores() -> int:
    """Cores this process may use (respects CPU affinity, e.g. under taskset or a container)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@functools.cache
def host_l2_caches() -> tuple[int, ...]:
    """Bytes of each distinct L2 cache of this machine's cores (sysfs); empty where it cannot be read."""
    sizes, seen = [], set()
    for cpu in range(os.cpu_count() or 1):
        base = Path(f"/sys/devices/system/cpu/cpu{cpu}/cache/index2")
        try:
            shared = (base / "shared_cpu_list").read_text().strip()
            if shared in seen:
                continue
            seen.add(shared)
            size = (base / "size").read_text().strip().upper()
            sizes.append(int(size[:-1]) * {"K": 1 << 10, "M": 1 << 20}[size[-1]] if size[-1] in "KM" else int(size))
        except (OSError, ValueError, KeyError):
            return ()
    return tuple(sizes)


def cpu_target_dict() -> dict[str, Any]:
    return {"kind": "llvm", "mcpu": host_cpu_name(), "num-cores": host_num_cores()}


def cuda_target_dict(arch: str = _CUDA_DEFAULT_ARCH) -> dict[str, Any]:
    if not re.fullmatch(r"sm_\d+[a-z]?", arch):
        raise ConfigError(
            f"CUDA arch {arch!r} is not of the form sm_<NN> (e.g. sm_80, sm_90); fix the target"
        )
    return {"kind": "cuda", "arch": arch, "host": cpu_target_dict()}


def target_dict(spec: str | dict[str, Any]) -> dict[str, Any]:
    """The JSON dict for a target spec: ``"cpu"``, ``"cuda"``, ``"cuda:sm_80"``, a JSON string or a dict."""
    if isinstance(spec, dict):
        return dict(spec)
    if not isinstance(spec, str):
        raise ConfigError(
            f"target must be 'cpu', 'cuda[:sm_NN]', a JSON string or a dict, got {type(spec).__name__}"
        )
    text = spec.strip()
    if text in ("cpu", "llvm"):
        return cpu_target_dict()
    if text == "cuda":
        return cuda_target_dict()
    if text.startswith("cuda:"):
        return cuda_target_dict(text.split(":", 1)[1])
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"target JSON does not parse ({exc.msg} at char {exc.pos}); fix the target string"
            ) from None
        if not isinstance(value, dict):
            raise ConfigError('target JSON must be an object such as {"kind": "llvm"}')
        return value
    raise ConfigError(
        f"unknown target {spec!r}; use 'cpu', 'cuda', 'cuda:sm_80' or a JSON dict like {{\"kind\": \"llvm\"}}"
    )


def resolve_target(spec: str | dict[str, Any] | tvm.target.Target) -> tvm.target.Target:
    """A ``tvm.target.Target`` from a spec (see :func:`target_dict`) or an existing Target."""
    import tvm

    if isinstance(spec, tvm.target.Target):
        return spec
    d = target_dict(spec)
    if d.get("kind") == "cuda" and "host" not in d:
        d["host"] = cpu_target_dict()
    try:
        return tvm.target.Target(d)
    except Exception as exc:
        raise ConfigError(f"TVM rejects target {json.dumps(d)}: {str(exc).splitlines()[-1]}") from None


def vector_lanes(target: tvm.target.Target, itemsize: int = 4) -> int:
    """SIMD lanes of ``itemsize`` bytes in one vector register of the CPU target (AVX-512: 64-byte registers)."""
    from tvm.target import codegen

    try:
        feats = codegen.llvm_get_cpu_features(target)
    except Exception:  # a non-LLVM target (CUDA) or a TVM without the query: no features known
        feats = set()
    # without AVX: 16-byte (128-bit) registers, the SSE2/NEON width every x86-64 and AArch64 CPU has
    width = 64 if "avx512f" in feats else 32 if ("avx2" in feats or "avx" in feats) else 16
    return max(1, width // itemsize)


def is_cuda(target: tvm.target.Target) -> bool:
    return str(target.kind.name) == "cuda"


def _plain(value: Any) -> Any:
    """tvm_ffi Map/Array (from ``Target.export()``) to plain dicts and lists."""
    if hasattr(value, "items"):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    try:
        return [_plain(v) for v in value]
    except TypeError:
        return str(value)


def target_to_dict(target: tvm.target.Target) -> dict[str, Any]:
    """The JSON-able dict of a Target (what TVM would accept back)."""
    return _plain(target.export())


def _slug_part(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9._]+", "-", str(value)).strip("-")


def target_slug(target: str | dict[str, Any] | tvm.target.Target) -> str:
    """A stable, filesystem-safe name: kind plus the attributes that change generated code.

    ``llvm-rocketlake-2c``, ``cuda-sm_80``. Used as the tuning-database folder, because
    MetaSchedule's JSON database does not record the target.
    """
    if isinstance(target, str | dict):
        d = target_dict(target)
    else:
        d = target_to_dict(target)
    kind = d.get("kind", "unknown")
    if kind == "cuda":
        return "cuda-" + _slug_part(d.get("arch", "unknown"))
    parts = [kind]
    if d.get("mcpu"):
        parts.append(_slug_part(d["mcpu"]))
    if d.get("mattr"):
        mattr = d["mattr"]
        parts.append(_slug_part("".join(mattr) if isinstance(mattr, list | tuple) else mattr))
    if d.get("num-cores"):
        parts.append(f"{int(d['num-cores'])}c")
    return "-".join(parts)


@functools.cache
def cuda_available() -> bool:
    """Whether a CUDA device can run kernels here (a runtime check; compiling needs none)."""
    try:
        import tvm

        return bool(tvm.cuda(0).exist)
    except Exception as exc:
        log.debug("CUDA runtime probe failed: %s", exc)
        return False


def require_runnable(target: tvm.target.Target) -> None:
    """Raise TargetUnavailableError if kernels for ``target`` cannot run on this machine."""
    if is_cuda(target) and not cuda_available():
        raise TargetUnavailableError(
            "no CUDA device found on this machine; CUDA kernels can still be compiled (compile-only) "
            "and exported, run them on a machine with an NVIDIA GPU or use target 'cpu'"
        )


def device_for(target: tvm.target.Target) -> Any:
    """The TVM runtime device that runs ``target`` (after :func:`require_runnable`)."""
    import tvm

    require_runnable(target)
    return tvm.cuda(0) if is_cuda(target) else tvm.cpu(0)


_KIND_ALIASES = {"cuda": "cuda", "gpu": "cuda", "nvptx": "cuda", "cpu": "cpu", "llvm": "cpu"}


def target_kind_of(target: str | Mapping[str, Any]) -> str:
    """``"cuda"`` or ``"cpu"`` for a target: a kind (``"cpu"``, ``"cuda:sm_90"``) or a TVM target dict
    (``{"kind": "llvm", ...}``, also as a JSON string)."""
    if isinstance(target, str) and target.lstrip().startswith("{"):
        try:
            target = json.loads(target)
        except json.JSONDecodeError as exc:
            raise UsageError(f"target {target!r} is not valid JSON ({exc.msg})") from exc
    kind = target.get("kind") if isinstance(target, Mapping) else target
    normal = _KIND_ALIASES.get(str(kind).lower().split(":")[0].strip())
    if normal is None:
        raise UnknownNameError(f"unknown target kind {kind!r}; known: {', '.join(_KIND_ALIASES)}")
    return normal
