"""Default (untuned) schedules: hand-written CPU schedules and dlight rules for CUDA.

``default_primfunc(name, b, m, k, n, dtype, target)`` returns a scheduled PrimFunc ready for
``tvm.compile``. On CPU (llvm) each primitive may register a hand schedule in ``kernels.cpu_schedules.CPU_SCHEDULES``
(``kernels.cpu_schedules``), which can use its own equivalent compute formulation (packed weight
layouts, see that module); anything without one gets :func:`generic_cpu_schedule`. On CUDA the
canonical compute goes through ``s_tir.dlight``'s GPU rules.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

from kernels import primitives
from kernels.cpu_schedules import CPU_SCHEDULES
from kernels.errors import KernelError
from kernels.targets import is_cuda, vector_lanes

if TYPE_CHECKING:
    import tvm

log = logging.getLogger(__name__)

# Bump when a default schedule changes: tuned-vs-default choices recorded against an older
# default are measured again.
VERSION = "2"

def canonical_primfunc(
    name: str, b: int, m: int, k: int, n: int, dtype: str | None = None
) -> tvm.tirx.PrimFunc:
    """The unscheduled PrimFunc of the primitive's definition (what MetaSchedule tunes)."""
    from tvm import te

    prim = primitives.get(name)
    args = prim.placeholders(b, m, k, n, dtype)
    out = prim.te_fn(*args)
    return te.create_prim_func([*args, out]).with_attr("global_symbol", "main")


def generic_cpu_schedule(func: tvm.tirx.PrimFunc, target: tvm.target.Target) -> tvm.tirx.PrimFunc:
    """Parallel rows, vectorised output columns, reduction outside the vector loop.

    Works for any single-reduction ``[b, m, n]`` output; the hand schedules beat it by keeping
    accumulators in registers.
    """
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    root = sch.get_sblock("root")
    blocks = sch.get_child_blocks(root)
    main = blocks[-1]
    for blk in blocks[:-1]:
        with contextlib.suppress(Exception):  # a reduction producer stays a separate stage
            sch.compute_inline(blk)
    loops = sch.get_loops(main)
    if len(loops) != 4:
        raise KernelError(f"generic CPU schedule expects 4 loops (b, m, n, k), got {len(loops)}")
    b, i, j, r = loops
    bi = sch.fuse(b, i)
    lanes = vector_lanes(target)
    n = int(sch.get(j).extent)
    if n >= lanes:
        jo, ji = sch.split(j, [None, lanes])
        sch.reorder(bi, jo, r, ji)
        sch.vectorize(ji)
    sch.parallel(bi)
    sch.decompose_reduction(main, r)
    return sch.mod["main"]


def cuda_schedule(func: tvm.tirx.PrimFunc, target: tvm.target.Target) -> tvm.tirx.PrimFunc:
    """dlight's default GPU rules (Matmul → GEMV → Reduction → Fallback)."""
    import tvm
    from tvm.s_tir import dlight as dl

    mod = tvm.IRModule({"main": func})
    with target:
        mod = dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.Fallback())(
            mod
        )
    return mod["main"]


def default_primfunc(
    name: str, b: int, m: int, k: int, n: int, dtype: str | None, target: tvm.target.Target
) -> tvm.tirx.PrimFunc:
    """The default-scheduled PrimFunc of primitive ``name`` at ``(b, m, k, n)`` for ``target``."""
    prim = primitives.get(name)
    dtype = prim.check_dtype(dtype)
    if is_cuda(target):
        return cuda_schedule(canonical_primfunc(name, b, m, k, n, dtype), target)
    hand = CPU_SCHEDULES.get(name)
    if hand is not None:
        return hand(b, m, k, n, dtype, target)
    return generic_cpu_schedule(canonical_primfunc(name, b, m, k, n, dtype), target)
