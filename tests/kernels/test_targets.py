"""Target specs, slugs and the host CPU name."""

from __future__ import annotations

import json

import pytest

import kernels
from kernels import targets


def test_cpu_target_names_a_real_cpu_and_cores() -> None:
    t = kernels.resolve_target("cpu")
    assert str(t.kind.name) == "llvm"
    mcpu = str(t.attrs["mcpu"])
    assert mcpu and mcpu not in ("native", "generic")
    assert int(t.attrs["num-cores"]) == targets.host_num_cores() >= 1


def test_cuda_targets_and_arch() -> None:
    t = kernels.resolve_target("cuda:sm_90")
    assert str(t.kind.name) == "cuda" and str(t.attrs["arch"]) == "sm_90"
    assert str(t.host.kind.name) == "llvm"
    assert str(kernels.resolve_target("cuda").attrs["arch"]) == "sm_80"
    with pytest.raises(kernels.ConfigError, match="sm_"):
        kernels.resolve_target("cuda:ampere")


def test_json_and_dict_specs() -> None:
    spec = {"kind": "llvm", "mcpu": "znver3", "num-cores": 4}
    assert kernels.target_slug(kernels.resolve_target(json.dumps(spec))) == "llvm-znver3-4c"
    assert kernels.target_slug(spec) == "llvm-znver3-4c"
    with pytest.raises(kernels.ConfigError, match="JSON"):
        kernels.resolve_target("{not json")
    with pytest.raises(kernels.ConfigError, match="unknown target"):
        kernels.resolve_target("tpu")


def test_slug_is_stable_and_filesystem_safe() -> None:
    a = kernels.target_slug("cpu")
    assert a == kernels.target_slug(kernels.resolve_target("cpu"))
    assert all(c.isalnum() or c in "-._" for c in a)
    assert kernels.target_slug("cuda:sm_80") == "cuda-sm_80"


def test_cpuinfo_fallback() -> None:
    text = "model name\t: AMD EPYC 7763 64-Core Processor\nflags\t: fpu avx2 fma bmi2\n"
    assert targets._cpuinfo_mcpu(text) == "znver3"
    intel = "model name\t: Intel(R) Xeon(R)\nflags\t: fpu avx2 fma bmi2 sse4_2 popcnt\n"
    assert targets._cpuinfo_mcpu(intel) == "x86-64-v3"


def test_cuda_available_follows_the_tvm_device_probe(monkeypatch) -> None:
    """True exactly when TVM's CUDA device 0 exists; a probe that raises (no CUDA runtime) is False."""
    import types

    import tvm

    kernels.cuda_available.cache_clear()  # cached per process; each probe below must run
    for exist, expect in ((1, True), (0, False)):
        monkeypatch.setattr(tvm, "cuda", lambda _i=0, exist=exist: types.SimpleNamespace(exist=exist))
        kernels.cuda_available.cache_clear()
        assert kernels.cuda_available() is expect

    def broken(_i=0):
        raise RuntimeError("CUDA runtime not found")

    monkeypatch.setattr(tvm, "cuda", broken)
    kernels.cuda_available.cache_clear()
    assert kernels.cuda_available() is False
    monkeypatch.undo()
    kernels.cuda_available.cache_clear()  # later tests see the real probe again
