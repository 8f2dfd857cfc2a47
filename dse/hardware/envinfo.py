"""What this machine offers: versions, devices, usable TVM targets, energy sources (``dse env``)."""

from __future__ import annotations

import logging
from typing import Any

import kernels
from dse.hardware import energy, nvml
from dse.hardware.device import describe_device, versions

log = logging.getLogger(__name__)


def _can_compile(target: str) -> tuple[bool, str | None]:
    """Compile a tiny matmul for the target; returns (ok, reason-if-not)."""
    try:
        kernels.build("matmul", b=1, m=4, k=8, n=4, target=target)
        return True, None
    except Exception as exc:  # report, don't fail: env is a diagnostic
        return False, " ".join(str(exc).split())[:200]


def environment(check_targets: bool = True, cuda_arch: str | None = None) -> dict[str, Any]:
    """Versions, devices, targets and energy sources; the CUDA target is the one ``dse export`` compiles for
    (``cuda_arch``, from ``export.cuda_arch``), TVM's default arch without it."""
    import torch


    cuda = torch.cuda.is_available()
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
    nvml_reason = nvml.probe()
    nvml_ok = nvml_reason is None
    targets: dict[str, Any] = {}
    specs = {"cpu": "cpu", "cuda": f"cuda:{cuda_arch}" if cuda_arch else "cuda"}
    for name, runnable in (("cpu", True), ("cuda", kernels.cuda_available())):
        entry: dict[str, Any] = {"runs_here": bool(runnable)}
        try:
            entry["target"] = str(kernels.resolve_target(specs[name]))
        except Exception as exc:
            entry["target"], entry["error"] = None, " ".join(str(exc).split())[:200]
        if check_targets and entry.get("target"):
            entry["compiles"], reason = _can_compile(specs[name])
            if reason:
                entry["error"] = reason
        targets[name] = entry
    sources = energy.describe_sources()
    return {
        "versions": versions(),
        "cpu": describe_device("cpu").as_dict(),
        "torch_threads": torch.get_num_threads(),
        "cuda_available": cuda,
        "gpus": gpus,
        "nvml": {"available": nvml_ok, "reason": nvml_reason},
        "targets": targets,
        "energy_sources": {k: ("usable" if v is None else f"unavailable: {v}") for k, v in sources.items()},
    }


def render(env: dict[str, Any]) -> str:
    v = env["versions"]
    lines = ["versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val)]
    cpu = env["cpu"]
    lines.append(f"cpu: {cpu['name']} ({cpu.get('cores')} cores usable; torch threads {env['torch_threads']})")
    lines.append(f"cuda: {'yes: ' + ', '.join(env['gpus']) if env['cuda_available'] else 'no GPU visible'}")
    nv = env["nvml"]
    lines.append(f"nvml: {'available' if nv['available'] else 'unavailable (' + str(nv['reason']) + ')'}")
    for name, t in env["targets"].items():
        state = {True: "compiles", False: "does not compile"}.get(t.get("compiles"), "not test-compiled (--no-compile)")
        run = "runs here" if t["runs_here"] else "compile-only here"
        lines.append(f"target {name}: {t.get('target')}  [{state}, {run}]"
                     + (f"  ({t['error']})" if t.get("error") else ""))
    for name, state in env["energy_sources"].items():
        lines.append(f"energy {name}: {state}")
    return "\n".join(lines)
