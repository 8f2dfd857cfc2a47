"""The Relax compile pipeline of the project: legalise, fuse and schedule a Relax module for a target.

The exporter compiles a whole model with it (:mod:`dse.deploy.graph`) and the profiler compiles single
non-primitive ops with it (:mod:`dse.profiling.nonprim`), so the cost model prices what the exporter
compiles. Everything that is not one of the project's kernels is legalised, fused (``FuseOps``/``FuseTIR``)
and scheduled: convolutions by :mod:`kernels.conv_kernels` (CPU), LayerNorm and softmax by
:mod:`kernels.row_kernels`, GELU with TOPI's vectorisable ``fast_erf``, the MoE's row gathers made
fusible, then two CPU rules (:func:`schedule_rules`): softmax-like row reductions computed row by row under a parallel loop, and a parallel + vectorised rule for the rest.
On CUDA the fused functions go through dlight's GPU rules.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import TYPE_CHECKING, Any

from kernels import conv_kernels, row_kernels
from kernels.errors import KernelError
from kernels.relax_passes import mutator_pass
from kernels.targets import resolve_target, target_slug, vector_lanes
from kernels.torch_ops import FIXED_MAX, FIXED_MIN

if TYPE_CHECKING:
    import tvm

log = logging.getLogger(__name__)


def fixed_grid_relax(x: Any, frac_bits: int) -> Any:
    """``floor(x·2^F)`` clamped to int32's range, in fp32: the Relax form of :func:`kernels.torch_ops.fixed_grid`."""
    from tvm import relax

    scaled = relax.op.multiply(x, relax.const(float(2.0**frac_bits), "float32"))
    return relax.op.clip(relax.op.floor(scaled), FIXED_MIN, FIXED_MAX)



# Below this many output elements a parallel launch costs more than it saves (TVM's thread pool wakes
# its workers per parallel loop: a few microseconds).
PARALLEL_MIN_ELEMENTS = 4096


def _extent(sch: Any, loop: Any) -> int | None:
    from tvm import tirx

    value = sch.get(loop).extent
    return int(value) if isinstance(value, tirx.IntImm) else None


# Parallel loops are made of as few leading loops as give this many iterations: fusing every spatial loop
# into one counter costs a div/mod chain per iteration (measured 10x slower for a [3,8,3,65,32] transpose).
PARALLEL_MIN_ITERATIONS = 16


def _fuse_leading(sch: Any, loops: list[Any], extents: list[int | None]) -> Any:
    """Fuse the leading loops until their product reaches :data:`PARALLEL_MIN_ITERATIONS`."""
    count, product = 0, 1
    for extent in extents:
        count += 1
        if extent is None:
            break
        product *= extent
        if product >= PARALLEL_MIN_ITERATIONS:
            break
    return sch.fuse(*loops[:count]) if count > 1 else loops[0]


def _inline_single_use(sch: Any, blocks: list[Any]) -> None:
    """Inline injective stages that feed exactly one consumer (inlining a stage with several consumers
    recomputes it in each — twice the exponentials of a softmax)."""
    for block in reversed(blocks):
        with contextlib.suppress(Exception):
            if len(sch.get_consumers(block)) == 1:
                sch.compute_inline(block)


def _vectorize_ragged(sch: Any, loop: Any, extent: int | None, lanes: int) -> None:
    """Vectorise ``loop`` by the widest lane count that divides it; a ragged loop stays serial for LLVM's own
    vectoriser (a predicated TVM vector loop is scalarised whole: measured slower than no schedule)."""
    if not extent or extent < 2:
        return
    vec = next((v for v in (lanes, lanes // 2, lanes // 4) if v >= 2 and extent % v == 0), 0)
    if vec:
        sch.vectorize(sch.split(loop, [None, vec])[1] if extent > vec else loop)


def _product(values: list[int | None]) -> int | None:
    """The product of loop extents; None when any is not a constant."""
    out = 1
    for v in values:
        if v is None:
            return None
        out *= v
    return out


# The two rules below are duck-typed dlight ``ScheduleRule``s: ``dl.ApplyDefaultSchedule`` only calls
# ``apply(func, target, tunable)``, and subclassing ``dl.ScheduleRule`` here would import TVM with this module.


class RowReduction:
    """Softmax-like functions: reductions along the innermost axis of the output's rows.

    Injective stages are inlined first (dlight's CPU reduction rule keeps each stage as a full-size
    buffer), then every stage is computed row by row under a parallel loop over the leading rows;
    innermost loops are vectorised where the lanes divide them and otherwise left to LLVM (a
    predicated vector loop is scalarised). Refused where a reduction does not run along the output's
    rows — there this structure would repeat it once per output row.
    """

    def apply(self, func: tvm.tirx.PrimFunc, target: tvm.target.Target, _tunable: bool) -> Any:
        from tvm import s_tir, tirx
        from tvm.s_tir.dlight.analysis import normalize_prim_func

        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        lead = self._row_axes(sch, infos)
        if lead is None:
            return None
        _inline_single_use(sch, [i.block_rv for i in infos if i.is_injective()][:-1] if infos[-1].is_injective()
                           else [])
        infos = normalize_prim_func(sch) or infos
        self._compute_per_row(sch, infos, lead)
        self._vectorize_stages(sch, infos, vector_lanes(target))
        return sch

    @staticmethod
    def _row_axes(sch: Any, infos: list[Any] | None) -> int | None:
        """How many leading spatial axes make the rows, or None where the function is not a row reduction."""
        if infos is None or len(infos) < 2 or all(i.is_injective() for i in infos):
            return None
        if not infos[-1].is_injective():
            return None
        # one reduction axis per reduction stage (softmax, norms); a conv's window (two axes) is not a
        # row reduction, and this structure computed a depthwise conv wrongly (tests/dse/profiling/test_nonprim.py)
        if any(i.dom_kind().count("R") != 1 for i in infos if not i.is_injective()):
            return None
        lead = min(len(k) - len(k.lstrip("S")) for k in (i.dom_kind() for i in infos))
        # rows need an axis of their own in the last stage: where it has none (a GEMM followed by an
        # elementwise op, as in Hamming attention's hash) each "row" is one element and vectorising it fails
        if lead == 0 or len(infos[-1].dom_kind()) <= lead:
            return None
        last_loops = sch.get_loops(infos[-1].block_rv)
        rows = _product([_extent(sch, lp) for lp in last_loops[:lead]])
        for info in infos:
            if info.is_injective():
                continue
            loops = sch.get_loops(info.block_rv)
            spatial = _product([_extent(sch, lp) for lp, kd in zip(loops, info.dom_kind()) if kd == "S"])
            if rows is None or spatial is None or spatial < rows:
                return None
        return lead

    @staticmethod
    def _compute_per_row(sch: Any, infos: list[Any], lead: int) -> None:
        """A parallel loop over the last stage's rows, with every other stage computed inside it."""
        last = infos[-1].block_rv
        loops = sch.get_loops(last)
        row_loops = loops[:lead]
        extents = [_extent(sch, lp) for lp in row_loops]
        par = _fuse_leading(sch, row_loops, extents)
        sch.parallel(par)
        inner_loops = len(loops) - lead  # unchanged by fusing the row loops
        attach = sch.get_loops(last)[-inner_loops - 1]  # the innermost row loop
        for info in reversed(infos[:-1]):
            sch.compute_at(info.block_rv, attach, preserve_unit_loops=True)

    @staticmethod
    def _vectorize_stages(sch: Any, infos: list[Any], lanes: int) -> None:
        for info in infos:
            block = info.block_rv
            inner = sch.get_loops(block)[-1]
            extent = _extent(sch, inner)
            if info.is_injective():
                _vectorize_ragged(sch, inner, extent, lanes)
            else:  # the reduction axis is innermost (normalised form): hoist its init before it
                with contextlib.suppress(Exception):
                    sch.decompose_reduction(block, inner)


class CpuElementwise:
    """Fallback CPU rule: inline what can be inlined; then per remaining block run the outer spatial
    loops in parallel (when the block is big enough) and vectorise the innermost spatial loop, keeping
    the loop nest (fusing everything into one loop would index through div/mod and defeat LLVM's
    vectoriser). Blocks with a reduction run their spatial loops in parallel and reduce serially."""

    def apply(self, func: tvm.tirx.PrimFunc, target: tvm.target.Target, _tunable: bool) -> Any:
        from tvm import s_tir, tirx
        from tvm.s_tir.dlight.analysis import normalize_prim_func
        from tvm.s_tir.dlight.base import try_inline

        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None:
            return None
        infos = try_inline(sch, infos)
        lanes = vector_lanes(target)
        reductions = []
        for info in infos:
            reduction = self._schedule_block(sch, info, lanes)
            if reduction is not None:
                reductions.append(reduction)
        for block, r_loop in reductions:
            # an init that cannot be hoisted stays inside the loop nest
            with contextlib.suppress(Exception):
                sch.decompose_reduction(block, r_loop)
        return sch

    @staticmethod
    def _schedule_block(sch: Any, info: Any, lanes: int) -> tuple[Any, Any] | None:
        """Parallelise and vectorise one block; returns (block, first reduction loop) for a reduction block."""
        block = info.block_rv
        loops = sch.get_loops(block)
        kinds = info.dom_kind()
        if not loops or len(loops) != len(kinds):
            return None
        s_loops = [lp for lp, kd in zip(loops, kinds) if kd == "S"]
        other = [lp for lp, kd in zip(loops, kinds) if kd != "S"]
        if not s_loops:
            return None
        extents = [_extent(sch, lp) for lp in s_loops]
        total = _product(extents)
        sch.reorder(*s_loops, *other)
        if other:  # a reduction (or opaque) block: parallel outer rows, serial reduction
            if total is None or total >= 2:
                sch.parallel(_fuse_leading(sch, s_loops, extents))
            return (block, other[0]) if any(kd == "R" for kd in kinds) else None
        inner, inner_extent = s_loops[-1], extents[-1]
        vec = 0
        if inner_extent is not None:
            vec = next((v for v in (lanes, lanes // 2, lanes // 4) if v >= 2 and inner_extent % v == 0), 0)
        if vec and inner_extent > vec:
            io, ii = sch.split(inner, [None, vec])
            sch.vectorize(ii)
            loops, loop_extents = [*s_loops[:-1], io], [*extents[:-1], inner_extent // vec]
        elif vec:
            sch.vectorize(inner)
            loops, loop_extents = s_loops[:-1], extents[:-1]
        else:  # an odd-sized innermost loop stays serial (LLVM may still vectorise it)
            loops, loop_extents = s_loops[:-1] or [inner], extents[:-1] or [inner_extent]
        if loops and total is not None and total >= PARALLEL_MIN_ELEMENTS:
            sch.parallel(_fuse_leading(sch, loops, loop_extents))
        return None


def schedule_rules(target: tvm.target.Target) -> list[Any]:
    """dlight rules for the non-kernel PrimFuncs of ``target`` (kernels arrive already scheduled)."""
    from tvm.s_tir import dlight as dl

    if target.kind.name == "cuda":
        return [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]
    return [RowReduction(), CpuElementwise()]


def _fast_gelu_pass() -> Any:
    """Relax pass: exact GELU ``x·(1 + erf(x/√2))/2`` with TOPI's ``fast_erf`` (a rational approximation
    accurate to a few float32 ulp, from Eigen) instead of libm's scalar ``erff``, which LLVM cannot
    vectorise (measured: ~50 ns per element against ~0.2 ns for a vectorised multiply)."""
    import tvm
    from tvm import relax, te, topi

    def gelu_te(x: te.Tensor) -> te.Tensor:
        erf = topi.fast_erf(topi.multiply(x, 0.7071067811865476))
        return te.compute(x.shape, lambda *i: x(*i) * (0.5 + erf(*i) * 0.5), name="gelu")

    @relax.expr_functor.mutator
    class _Mutator(relax.PyExprMutator):
        def visit_call_(self, call: Any) -> Any:  # noqa: N802 (TVM's visitor protocol)
            call = super().visit_call_(call)
            if (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.nn.gelu"
                    and call.args[0].ty.dtype == "float32"):
                return self.builder_.call_te(gelu_te, call.args[0], primfunc_name_hint="gelu")
            return call

    return mutator_pass("FastGelu", _Mutator)


def _fusible_gathers_pass() -> Any:
    """Mark the legalised ``take`` (row gathers: a MoE's dispatch and un-dispatch) injective, so fusion
    folds them into their neighbours — the rows are gathered straight into the expert's sliced, quantised
    input, and the concatenated expert outputs (with their bias adds) are read back in token order by the
    consumer — instead of each gather writing a full copy. ``AnnotateTIROpPattern`` calls a data-dependent
    index opaque; a gather is still a pure function of its output index."""
    import tvm
    from tvm import tirx

    @tvm.transform.module_pass(opt_level=0, name="FusibleGathers")
    def _pass(mod: tvm.IRModule, _ctx: Any) -> tvm.IRModule:
        for gv, func in list(mod.functions_items()):
            if (isinstance(func, tirx.PrimFunc) and gv.name_hint.rstrip("0123456789") == "take"
                    and func.attrs is not None and int(func.attrs.get("op_pattern", -1)) == 8):
                mod[gv] = func.with_attr("op_pattern", 2)  # kInjective
        return mod

    return _pass


def relax_pipeline(target: tvm.target.Target) -> Any:
    """The default Relax pipeline of the target's backend, with :func:`schedule_rules` after fusion."""
    import tvm
    from tvm import relax
    from tvm.s_tir import dlight as dl

    backend = relax.backend.cuda.pipeline if target.kind.name == "cuda" else relax.backend.cpu_generic.pipeline
    cpu_only = [] if target.kind.name == "cuda" else [row_kernels.row_kernels_pass(target)]
    legalize = [
        # convs to im2col + pre-packed GEMM / the depthwise kernel, ahead of the lift so their weight packs move
        *([] if target.kind.name == "cuda" else [conv_kernels.conv_kernels_pass(target)]),
        # parameter-only work (weight packing, weight transposes) moves to ``main_transform_params``, which
        # the loader runs once (dse.deploy.artifact); a no-op for functions without ``num_input``
        relax.transform.LiftTransformParams(),
        *cpu_only,
        _fast_gelu_pass(),
        relax.transform.FastMathTransform(),  # softmax/exp/tanh/erf -> TOPI's vectorisable fast_* forms
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        _fusible_gathers_pass(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        relax.transform.DeadCodeElimination(),
        dl.ApplyDefaultSchedule(*schedule_rules(target)),
    ]

    @tvm.transform.module_pass(opt_level=0, name="ShiftAddPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx: Any) -> tvm.IRModule:
        with target:
            seq = tvm.transform.Sequential(
                backend.library_dispatch_passes(target) + legalize
                + backend.dataflow_lower_passes(target) + backend.finalize_passes(target)
            )
            return seq(mod)

    return _pipeline


PROJECT_PIPELINE = "project"  # legalise, fuse, this module's schedule rules, lower
TVM_DEFAULT_PIPELINE = "tvm-default"  # TVM's own default Relax pipeline: the fallback


@dataclasses.dataclass(frozen=True)
class CompiledRelax:
    """A compiled Relax module and which pipeline produced it (``fallback_reason``: why not the project's)."""

    executable: Any
    pipeline: str
    fallback_reason: str | None = None


def compile_relax(mod: tvm.IRModule, target: Any) -> Any:
    """Compile a Relax module for ``target`` (spec, JSON dict or Target) with the exporter's pipeline:
    legalise, fuse, schedule (see :func:`schedule_rules`), lower. Returns a ``relax.Executable``;
    run it with ``tvm.relax.VirtualMachine(exe, device)``. Stable API (the profiler uses it);
    :func:`compile_relax_recorded` also says which pipeline produced it."""
    return compile_relax_recorded(mod, target).executable


def compile_relax_recorded(mod: tvm.IRModule, target: Any) -> CompiledRelax:
    """:func:`compile_relax`, recording whether the project's pipeline or TVM's default (the fallback when a
    schedule rule rejects the module) built it: the two differ in speed, and an artifact must say which."""
    import tvm

    tgt = resolve_target(target)
    try:
        with tgt:
            return CompiledRelax(tvm.compile(mod, target=tgt, relax_pipeline=relax_pipeline(tgt)), PROJECT_PIPELINE)
    except Exception as first:
        # A schedule rule can reject an unusual shape; TVM's default pipeline still yields correct
        # (slower) code on CPU, so keep the measurement rather than lose the row.
        reason = " ".join(str(first).split())[-200:]
        log.warning("scheduled compile failed (%s); retrying with TVM's default pipeline", reason)
    try:
        with tgt:
            return CompiledRelax(tvm.compile(mod, target=tgt), TVM_DEFAULT_PIPELINE, reason)
    except Exception as exc:
        lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
        raise KernelError(f"TVM failed to compile the model for {target_slug(tgt)}: "
                          f"{lines[-1] if lines else type(exc).__name__}") from exc
