"""Primitive kernels of ShiftAddViT in Apache TVM: matmul, bmm, matshift, matshift_decode, matadd.

Public API::

    kernels.names()                                   # registered primitives
    fn = kernels.build("matshift", b=1, m=197, k=192, n=768, target="cpu")
    out = fn(x, shift, sign)                          # NumPy in, NumPy out
    kernels.reference("matshift", x, shift, sign)     # the same semantics in NumPy
    kernels.op_counts("matshift", 1, 197, 192, 768)   # mults/adds/shifts/bytes for energy models

``import kernels`` does not import TVM or torch (both take seconds); TVM loads on the first
``build``/``resolve_target``; ``kernels.torch_ops`` (custom PyTorch ops) is imported explicitly.
"""

from __future__ import annotations

from kernels.compiled import CompiledKernel, Timing
from kernels.errors import (
    ConfigError,
    KernelError,
    ShiftAddError,
    TargetUnavailableError,
    UnknownNameError,
    UsageError,
)
from kernels.primitives import (
    FRAC_BITS,
    OpCounts,
    from_fixed,
    get,
    names,
    op_counts,
    random_inputs,
    reference,
    to_fixed,
)
from kernels.targets import cuda_available, resolve_target, target_slug
from kernels.tuning import tune, tuning_root

# Imported last on purpose: the function ``build`` must shadow the submodule ``kernels.build``
# (the import system binds the submodule to this name when it first loads it).
from kernels.build import (  # noqa: E402  isort: skip
    PrepackedKernel,
    build,
    clear_cache,
    scheduled_primfunc,
    te_compute,
)

__all__ = [
    "FRAC_BITS",
    "CompiledKernel",
    "ConfigError",
    "KernelError",
    "OpCounts",
    "PrepackedKernel",
    "ShiftAddError",
    "TargetUnavailableError",
    "Timing",
    "UnknownNameError",
    "UsageError",
    "build",
    "clear_cache",
    "cuda_available",
    "from_fixed",
    "get",
    "names",
    "op_counts",
    "random_inputs",
    "reference",
    "resolve_target",
    "scheduled_primfunc",
    "target_slug",
    "te_compute",
    "to_fixed",
    "tune",
    "tuning_root",
]
