"""Hand-scheduled CPU kernels for the row-wise non-primitive ops: LayerNorm and softmax over the last axis.

Both are small next to the GEMMs but run once per block on every token, and TVM's generic schedules
leave them slow on a CPU: a reduction summed in one scalar chain, a ragged row (65 tokens with a class
token) left unvectorised. Each kernel here keeps a row's partial results in one vector register and
reduces it by halving; the softmax covers a ragged row with an overlapping last vector instead of a
scalar tail. The Relax passes swap them in for ``relax.nn.layer_norm`` / ``relax.nn.softmax`` before
legalisation, in the exporter's and the profiler's pipeline alike (:func:`kernels.relax_pipeline.relax_pipeline`), so
the cost model prices the code the exporter ships.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from kernels.relax_passes import OPAQUE, add_func_once, mutator_pass, static_shape
from kernels.targets import vector_lanes

if TYPE_CHECKING:
    import tvm



def fast_exp(v: Any) -> Any:
    """``exp(v)`` for float32 as TOPI's ``fast_exp`` computes it (Cephes' degree-6 polynomial on the
    reduced argument times ``2^n`` built in the exponent bits): vectorisable, where libm's ``expf`` is a
    scalar call per lane. Same expression ``relax.transform.FastMathTransform`` emits."""
    from tvm import tirx

    def c(value: float) -> Any:
        return tirx.const(value, "float32")

    x = tirx.max(tirx.min(v, c(88.376266479492188)), c(-88.376258850097656))
    n = tirx.floor(x * c(1.4426950216293335) + c(0.5))  # round(x / ln 2)
    f = x - n * c(0.69314718246459961)
    p = c(0.00019875691214110702)
    for coef in (0.0013981999363750219, 0.008333452045917511, 0.041665796190500259, 0.1666666567325592, 0.5):
        p = p * f + c(coef)
    p = p * f * f + f + c(1.0)
    pow2n = tirx.reinterpret("float32", (n + c(127.0)).astype("int32") << 23)
    return tirx.max(pow2n * p, v)


def _rows_per_task(rows: int) -> int:
    return next(r for r in (8, 4, 2, 1) if rows % r == 0)


def softmax_primfunc(rows: int, c: int, lanes: int) -> tvm.tirx.PrimFunc:
    """Scheduled CPU softmax over the last axis of ``x[rows, c]`` (``c >= lanes``), with
    ``_safe_softmax``'s rule that a row of only ``-inf`` gives zeros (what PyTorch's attention returns
    for a fully masked row, and the guard ``torch.export`` decomposes SDPA into).

    Per row: the max, ``exp(x - max)`` stored and summed, and a multiply by ``1/sum``, each over
    ``c // lanes`` full vectors plus one overlapping vector ``[c - lanes, c)`` that covers the ragged
    end. The overlap recomputes a few exponentials already stored — identical values — and only its
    new lanes enter the sum. A scalar tail instead would cost a dependent chain of ~30 scalar ops per
    row (measured: no faster than TVM's generic schedule, 80 us for 1560 x 65 on 2 cores; this kernel 38).
    """
    from tvm import tirx
    from tvm.script import tirx as T

    if c < lanes:
        raise ValueError(f"softmax kernel needs at least {lanes} columns, got {c}")
    groups, tail = divmod(c, lanes)
    last = c - lanes  # start of the overlapping last vector
    rb = _rows_per_task(rows)
    half = [w for w in (8, 4, 2) if 2 * w <= lanes]  # widths of the halving reduction steps

    def vmax(a: Any, b: Any) -> Any:
        return tirx.max(a, b)

    # TVMScript evaluates the halving steps' Python ``if`` at parse time: one vector step per width.
    @T.prim_func(private=True, s_tir=True)
    def softmax(x: T.Buffer((rows, c), "float32"), y: T.Buffer((rows, c), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        with T.sblock("root"):
            for ro in T.parallel(rows // rb):
                acc = T.alloc_buffer((lanes,), "float32", scope="local")  # a row's partial max, then sum
                tail_e = T.alloc_buffer((lanes,), "float32", scope="local")  # exp of the overlapping vector
                mx = T.alloc_buffer((1,), "float32", scope="local")
                for ri in range(rb):
                    r = T.meta_var(ro * rb + ri)
                    for ln in T.vectorized(lanes):
                        acc[ln] = x[r, last + ln]
                    for g in range(groups):
                        for ln in T.vectorized(lanes):
                            acc[ln] = vmax(acc[ln], x[r, g * lanes + ln])
                    if 8 in half:
                        for ln in T.vectorized(8):
                            acc[ln] = vmax(acc[ln], acc[ln + 8])
                    if 4 in half:
                        for ln in T.vectorized(4):
                            acc[ln] = vmax(acc[ln], acc[ln + 4])
                    if 2 in half:
                        for ln in T.vectorized(2):
                            acc[ln] = vmax(acc[ln], acc[ln + 2])
                    mx[0] = vmax(acc[0], acc[1])
                    for ln in T.vectorized(lanes):
                        tail_e[ln] = fast_exp(x[r, last + ln] - mx[0])
                        acc[ln] = T.Select(ln >= lanes - tail, tail_e[ln], T.float32(0))
                    for g in range(groups):
                        for ln in T.vectorized(lanes):
                            y[r, g * lanes + ln] = fast_exp(x[r, g * lanes + ln] - mx[0])
                            acc[ln] = acc[ln] + y[r, g * lanes + ln]
                    if 8 in half:
                        for ln in T.vectorized(8):
                            acc[ln] = acc[ln] + acc[ln + 8]
                    if 4 in half:
                        for ln in T.vectorized(4):
                            acc[ln] = acc[ln] + acc[ln + 4]
                    if 2 in half:
                        for ln in T.vectorized(2):
                            acc[ln] = acc[ln] + acc[ln + 2]
                    # 1/sum, or 0 for a row of only -inf (its max): _safe_softmax's zeros
                    acc[0] = T.Select(mx[0] == T.float32("-inf"), T.float32(0), T.float32(1) / (acc[0] + acc[1]))
                    for g in range(groups):
                        for ln in T.vectorized(lanes):
                            y[r, g * lanes + ln] = T.Select(acc[0] == T.float32(0), T.float32(0),
                                                            y[r, g * lanes + ln] * acc[0])
                    for ln in T.vectorized(lanes):
                        y[r, last + ln] = T.Select(acc[0] == T.float32(0), T.float32(0), tail_e[ln] * acc[0])

    return softmax.with_attr("op_pattern", OPAQUE)


def layer_norm_primfunc(rows: int, c: int, eps: float, lanes: int) -> tvm.tirx.PrimFunc:
    """Scheduled CPU LayerNorm over the last axis of ``x[rows, c]`` (``c % lanes == 0``).

    Two-pass mean and variance as PyTorch computes them, with each row's sums kept in ``lanes``
    partial sums (a vector register) instead of one scalar chain: dlight's CPU reduction rule sums
    serially and took ~7x longer (measured 170 vs 25 us for 520 x 96 on one core).
    """
    from tvm import s_tir, te, tirx

    x = te.placeholder((rows, c), "float32", name="x")
    gamma = te.placeholder((c,), "float32", name="gamma")
    beta = te.placeholder((c,), "float32", name="beta")
    groups = c // lanes
    o1 = te.reduce_axis((0, groups), name="o1")
    part = te.compute((rows, lanes), lambda r, ln: te.sum(x[r, o1 * lanes + ln], axis=o1), name="part")
    l1 = te.reduce_axis((0, lanes), name="l1")
    msum = te.compute((rows,), lambda r: te.sum(part[r, l1], axis=l1), name="msum")
    mean = te.compute((rows,), lambda r: msum[r] / float(c), name="mean")
    o2 = te.reduce_axis((0, groups), name="o2")
    dpart = te.compute((rows, lanes), lambda r, ln: te.sum(
        (x[r, o2 * lanes + ln] - mean[r]) * (x[r, o2 * lanes + ln] - mean[r]), axis=o2), name="dpart")
    l2 = te.reduce_axis((0, lanes), name="l2")
    vsum = te.compute((rows,), lambda r: te.sum(dpart[r, l2], axis=l2), name="vsum")
    y = te.compute((rows, c), lambda r, j: (x[r, j] - mean[r]) * tirx.rsqrt(vsum[r] / float(c) + eps)
                   * gamma[j] + beta[j], name="y")
    sch = s_tir.Schedule(te.create_prim_func([x, gamma, beta, y]))
    r, j = sch.get_loops(sch.get_sblock("y"))
    ro, ri = sch.split(r, [None, 4] if rows % 4 == 0 else [None, 1])
    _, ji = sch.split(j, [None, lanes])
    sch.vectorize(ji)
    sch.parallel(ro)
    for name in ("vsum", "dpart", "mean", "msum", "part"):
        sch.compute_at(sch.get_sblock(name), ri)
    for name in ("part", "dpart"):
        blk = sch.get_sblock(name)
        lane, outer = sch.get_loops(blk)[-2:]
        sch.reorder(outer, lane)
        sch.vectorize(lane)
        sch.decompose_reduction(blk, outer)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True).with_attr("op_pattern", OPAQUE)


def _op_name(value: Any) -> str | None:
    import tvm

    op = getattr(value, "op", None)
    return op.name if isinstance(op, tvm.ir.Op) else None


def _bindings(func: Any) -> dict[Any, Any]:
    """``{var: bound value}`` of a Relax function's blocks."""
    out = {}
    body = getattr(func, "body", None)
    for block in getattr(body, "blocks", []):
        for binding in block.bindings:
            out[binding.var] = binding.value
    return out


def _is_softmax_guard(where: Any, bound: dict[Any, Any]) -> Any:
    """The softmax input ``x`` when ``where`` is ``_safe_softmax``'s guard as the PyTorch frontend
    imports it — ``where(not(any(x != -inf, axis=-1)), zeros_like(s), s)`` with ``s = softmax(x, -1)``,
    ``any`` spelt ``astype(max(astype(·, int8)), bool)`` — else None."""
    import math

    def value(e: Any) -> Any:
        return bound.get(e, e)

    def chain(e: Any, *ops: str) -> Any:
        for op in ops:
            e = value(e)
            if _op_name(e) != op:
                return None
            e = e.args[0]
        return e

    cond, zeros, s = where.args
    sm = value(s)
    if _op_name(sm) != "relax.nn.softmax" or int(sm.attrs.axis) not in (-1, len(static_shape(sm) or [0]) - 1):
        return None
    x = sm.args[0]
    z = value(zeros)
    if _op_name(z) != "relax.full_like" or not _is_zero(z.args[1]):
        return None
    reduced = chain(cond, "relax.logical_not", "relax.astype")
    mx = value(reduced) if reduced is not None else None
    if _op_name(mx) != "relax.max" or [int(a) for a in mx.attrs.axis] not in ([-1], [len(static_shape(x) or [0]) - 1]):
        return None
    eq = chain(mx.args[0], "relax.astype", "relax.logical_not")
    eq = value(eq) if eq is not None else None
    if _op_name(eq) != "relax.equal" or not eq.args[0].same_as(x):
        return None
    limit = _scalar(eq.args[1])
    return x if limit is not None and math.isinf(limit) and limit < 0 else None


def _scalar(expr: Any) -> float | None:
    """The value of a scalar Relax constant (``GenericConst.value`` in TVM 0.27, ``Constant.data`` before)."""
    data = getattr(expr, "value", None)
    data = getattr(expr, "data", None) if data is None else data
    if data is None or not hasattr(data, "numpy"):
        return None
    arr = np.asarray(data.numpy())
    return float(arr.reshape(-1)[0]) if arr.size == 1 else None


def _is_zero(expr: Any) -> bool:
    return _scalar(expr) == 0.0


def row_kernels_pass(target: tvm.target.Target) -> Any:
    """Relax pass (CPU): last-axis float32 LayerNorms and softmaxes with static shapes become calls of
    :func:`layer_norm_primfunc` / :func:`softmax_primfunc`; a softmax's ``_safe_softmax`` guard (see
    :func:`_is_softmax_guard`) folds into the kernel, which applies the same rule."""
    from tvm import relax

    lanes = vector_lanes(target)

    @relax.expr_functor.mutator
    class _Mutator(relax.PyExprMutator):
        def __init__(self, mod: tvm.IRModule):
            super().__init__(mod)
            self.funcs: dict[tuple, Any] = {}
            self.bound: dict[Any, Any] = {}

        def _call(self, key: tuple, name: str, make: Any, args: list[Any], shape: list[int]) -> Any:
            gv = add_func_once(self.builder_, self.funcs, key, name, make)
            rows, c = int(np.prod(shape[:-1])), shape[-1]
            x2 = [self.builder_.emit(relax.op.reshape(args[0], (rows, c))), *args[1:]]
            out = self.builder_.emit(relax.call_tir(gv, x2, relax.TensorType((rows, c), "float32")))
            return relax.op.reshape(out, shape)

        def _softmax(self, x: Any) -> Any:
            shape = static_shape(x)
            if shape is None or str(x.ty.dtype) != "float32" or shape[-1] < lanes:
                return None
            rows, c = int(np.prod(shape[:-1])), shape[-1]
            return self._call(("softmax", rows, c), f"dse_softmax_r{rows}_c{c}",
                              lambda: softmax_primfunc(rows, c, lanes), [x], shape)

        def visit_call_(self, call: Any) -> Any:  # noqa: N802 (TVM's visitor protocol)
            name = _op_name(call)
            if name == "relax.where":
                x = _is_softmax_guard(call, self.bound)
                if x is not None:
                    out = self._softmax(self.visit_expr(x))
                    if out is not None:
                        return out
            call = super().visit_call_(call)
            name = _op_name(call)
            if name == "relax.nn.softmax":
                shape = static_shape(call.args[0])
                if shape is not None and int(call.attrs.axis) in (-1, len(shape) - 1):
                    out = self._softmax(call.args[0])
                    if out is not None:
                        return out
            if name == "relax.nn.layer_norm":
                return self._layer_norm(call)
            return call

        def _layer_norm(self, call: Any) -> Any:
            x = call.args[0]
            shape = static_shape(x)
            if shape is None:
                return call
            axes = [int(a) % len(shape) for a in call.attrs.axes]
            if (str(x.ty.dtype) != "float32" or axes != [len(shape) - 1] or not call.attrs.center
                    or not call.attrs.scale):
                return call
            c = shape[-1]
            # at least two vectors per row: with one, the partial-sum loop has extent 1 and cannot be reordered
            vec = next((v for v in (lanes, lanes // 2, lanes // 4) if v >= 2 and c % v == 0 and c > v), 0)
            if not vec:
                return call
            rows, eps = int(np.prod(shape[:-1])), float(call.attrs.epsilon)
            return self._call(("layer_norm", rows, c, eps, vec), f"dse_layer_norm_r{rows}_c{c}",
                              lambda: layer_norm_primfunc(rows, c, eps, vec), list(call.args), shape)

    def prepare(mutator: Any, func: Any) -> None:
        mutator.bound = _bindings(func)

    return mutator_pass("ShiftAddRowKernels", _Mutator, prepare)
