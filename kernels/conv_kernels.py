"""Scheduled CPU convolutions, swapped in for ``relax.nn.conv2d`` by a Relax pass before legalisation.

TOPI's legalised conv2d has no schedule of ours: dlight's fallback runs its outer loops in parallel and the
``C·kh·kw`` reduction as a serial scalar chain. Two lowerings replace it (float32, NCHW/OIHW, static shapes):

* **dense** (``groups == 1``): im2col + the project's pre-packed GEMM
  (:func:`kernels.cpu_schedules.prepacked_gemm`, the kernel the exporter's Linears run). Patches of a
  convolution whose kernel tiles the input (kernel = stride, no padding) are a reshape and a transpose; an
  overlapping one gathers them with :func:`im2col_primfunc` (zero padding computed, not materialised). The
  weight becomes ``w[cout, cin·kh·kw]`` and its packing depends on parameters only, so
  ``LiftTransformParams`` moves it to ``main_transform_params`` as it does the Linears'. The GEMM's rows are
  output pixels, its columns output channels: the result is NHWC and transposed back to NCHW, which fusion
  folds into the consumer (PVT flattens it straight back to tokens).
* **depthwise** (``groups == cin == cout``, stride 1, "same" padding, odd kernel): :func:`depthwise_primfunc`
  on NHWC, vectorised over channels — PVT's ``[B, N, C]`` tokens are NHWC already, so the transposes around
  the call fuse with the producer's bias add and the consumer's activation instead of costing copies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kernels.cpu_schedules import PrepackedGemm, prepacked_gemm
from kernels.relax_passes import OPAQUE, add_func_once, mutator_pass, static_shape
from kernels.targets import vector_lanes

if TYPE_CHECKING:
    import tvm

def _kernel(func: tvm.tirx.PrimFunc) -> tvm.tirx.PrimFunc:
    """A scheduled PrimFunc as a Relax module takes it: opaque to fusion, left alone by dlight."""
    func = func.without_attr("global_symbol") if func.attrs is not None and "global_symbol" in func.attrs else func
    return func.with_attr("tirx.is_scheduled", True).with_attr("op_pattern", OPAQUE)


def depthwise_primfunc(b: int, h: int, w: int, c: int, kh: int, kw: int, lanes: int) -> tvm.tirx.PrimFunc:
    """Depthwise ``kh x kw`` convolution, stride 1, zero "same" padding (``kh//2``, ``kw//2``), on NHWC:
    ``y[b, h, w, c] = Σ_ij x[b, h+i-kh//2, w+j-kw//2, c] · k[i, j, c]`` (weights as ``k[kh, kw, c]``).

    Parallel over image rows; per output pixel, ``CB`` vectors of channels accumulate in registers while the
    ``kh·kw`` taps run, each an FMA of a contiguous ``x`` vector and a contiguous weight vector. Several
    independent accumulators hide the FMA latency (one chain of 9 dependent FMAs per vector would be
    latency-bound). Taps outside the image are skipped by a branch on the pixel, outside the vector loop:
    no padded copy and no per-lane select. ``c`` must be a multiple of ``lanes``.
    """
    from tvm import tirx
    from tvm.script import tirx as T

    if c % lanes:
        raise ValueError(f"depthwise kernel needs channels in whole vectors of {lanes}, got {c}")
    vecs = c // lanes
    cb = next(v for v in (4, 2, 1) if vecs % v == 0)  # vectors per register tile
    ph, pw = kh // 2, kw // 2

    def inside(hy: Any, wx: Any) -> Any:
        return tirx.all(hy >= 0, hy < h, wx >= 0, wx < w)

    @T.prim_func(private=True, s_tir=True)
    def depthwise(x: T.Buffer((b, h, w, c), "float32"), k: T.Buffer((kh, kw, c), "float32"),
                  y: T.Buffer((b, h, w, c), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        with T.sblock("root"):
            for row in T.parallel(b * h):
                acc = T.alloc_buffer((cb * lanes,), "float32", scope="local")
                bi = T.meta_var(row // h)
                hi = T.meta_var(row % h)
                for wi in range(w):
                    for cg in range(vecs // cb):
                        for v in T.unroll(cb):
                            for ln in T.vectorized(lanes):
                                acc[v * lanes + ln] = T.float32(0)
                        for i in T.unroll(kh):
                            for j in T.unroll(kw):
                                if inside(hi + i - ph, wi + j - pw):
                                    for v in T.unroll(cb):
                                        for ln in T.vectorized(lanes):
                                            acc[v * lanes + ln] = acc[v * lanes + ln] + x[
                                                bi, hi + i - ph, wi + j - pw, (cg * cb + v) * lanes + ln
                                            ] * k[i, j, (cg * cb + v) * lanes + ln]
                        for v in T.unroll(cb):
                            for ln in T.vectorized(lanes):
                                y[bi, hi, wi, (cg * cb + v) * lanes + ln] = acc[v * lanes + ln]

    return _kernel(depthwise)


def im2col_primfunc(shape: tuple[int, int, int, int], kernel: tuple[int, int], stride: tuple[int, int],
                    pad: tuple[int, int], out_hw: tuple[int, int]) -> tvm.tirx.PrimFunc:
    """Patches of ``x[B, C, H, W]`` as ``p[B, OH, OW, C, kh, kw]`` (a reshape away from the GEMM's
    ``[B·OH·OW, C·kh·kw]`` rows, in the order of ``w.reshape(cout, -1)``), zero outside the image.

    Parallel over output rows; the ``kw`` taps innermost write contiguously (they read ``x`` with the
    conv's stride). The padding test is a select on indices clamped into the image, so every load is valid.
    """
    from tvm import s_tir, te, tirx

    bsz, c, height, width = shape
    (kh, kw), (sh, sw), (pt, pl), (oh, ow) = kernel, stride, pad, out_hw
    x = te.placeholder(shape, "float32", name="x")

    def body(b, y, xo, ci, i, j):
        hy, wx = y * sh - pt + i, xo * sw - pl + j
        inside = tirx.all(hy >= 0, hy < height, wx >= 0, wx < width)
        value = x[b, ci, tirx.max(tirx.min(hy, height - 1), 0), tirx.max(tirx.min(wx, width - 1), 0)]
        return tirx.Select(inside, value, tirx.const(0.0, "float32"))

    p = te.compute((bsz, oh, ow, c, kh, kw), body, name="patches")
    sch = s_tir.Schedule(te.create_prim_func([x, p]))
    loops = sch.get_loops(sch.get_sblock("patches"))
    sch.parallel(sch.fuse(loops[0], loops[1]))
    return _kernel(sch.mod["main"])


def _conv_geometry(call: Any) -> dict[str, Any] | None:
    """Shapes and attributes of a float32 NCHW/OIHW 2-D conv with static shapes and no dilation, else None."""
    x, w = call.args
    xs, ws = static_shape(x), static_shape(w)
    a = call.attrs
    if (xs is None or ws is None or len(xs) != 4 or len(ws) != 4 or str(x.ty.dtype) != "float32"
            or str(w.ty.dtype) != "float32" or a.data_layout != "NCHW" or a.kernel_layout != "OIHW"
            or a.out_layout != "NCHW" or str(a.out_dtype) not in ("", "void", "None", "float32")
            or any(int(d) != 1 for d in a.dilation)):
        return None
    top, left, bottom, right = (int(p) for p in a.padding)
    sh, sw = (int(s) for s in a.strides)
    bsz, cin, height, width = xs
    cout, cin_g, kh, kw = ws
    oh, ow = (height + top + bottom - kh) // sh + 1, (width + left + right - kw) // sw + 1
    return {"x": x, "w": w, "bsz": bsz, "cin": cin, "h": height, "w_": width, "cout": cout, "cin_g": cin_g,
            "kh": kh, "kw": kw, "sh": sh, "sw": sw, "pad": (top, left, bottom, right), "oh": oh, "ow": ow,
            "groups": int(a.groups)}


def conv_kernels_pass(target: tvm.target.Target) -> Any:
    """Relax pass (CPU): dense float32 convs become im2col + the pre-packed ``matmul`` GEMM and depthwise
    ones :func:`depthwise_primfunc` (module doc); other convs are left to legalisation. Runs before
    ``LiftTransformParams`` so the weight reshapes and packs it emits move out of the forward."""
    import tvm
    from tvm import relax

    lanes = vector_lanes(target)

    @relax.expr_functor.mutator
    class _Mutator(relax.PyExprMutator):
        def __init__(self, mod: tvm.IRModule):
            super().__init__(mod)
            self.funcs: dict[tuple, Any] = {}
            self.gemms: dict[tuple[int, int, int], PrepackedGemm] = {}

        def _func(self, key: tuple, name: str, make: Any) -> Any:
            return add_func_once(self.builder_, self.funcs, key, name, make)

        def visit_call_(self, call: Any) -> Any:  # noqa: N802 (TVM's visitor protocol)
            call = super().visit_call_(call)
            if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.nn.conv2d"):
                return call
            g = _conv_geometry(call)
            if g is None:
                return call
            if g["groups"] == 1:
                return self._dense(g)
            if g["groups"] == g["cin"] == g["cout"] and g["cin_g"] == 1:
                out = self._depthwise(g)
                return call if out is None else out
            return call

        def _dense(self, g: dict[str, Any]) -> Any:
            bb = self.builder_
            bsz, cin, cout, kh, kw, oh, ow = (g[k] for k in ("bsz", "cin", "cout", "kh", "kw", "oh", "ow"))
            m, k = bsz * oh * ow, cin * kh * kw
            top, left, _, _ = g["pad"]
            if (kh, kw) == (g["sh"], g["sw"]) and not any(g["pad"]) and g["h"] == oh * kh and g["w_"] == ow * kw:
                # non-overlapping patches: a reshape and a transpose (fused with the producer)
                patches = relax.op.reshape(g["x"], (bsz, cin, oh, kh, ow, kw))
                patches = relax.op.permute_dims(patches, [0, 2, 4, 1, 3, 5])
            else:
                shape = (bsz, cin, g["h"], g["w_"])
                key = ("im2col", *shape, kh, kw, g["sh"], g["sw"], top, left, oh, ow)
                gv = self._func(key, f"dse_im2col_c{cin}_h{g['h']}_k{kh}x{kw}_s{g['sh']}",
                                lambda: im2col_primfunc(shape, (kh, kw), (g["sh"], g["sw"]), (top, left), (oh, ow)))
                patches = bb.emit(relax.call_tir(gv, [g["x"]], relax.TensorType((bsz, oh, ow, cin, kh, kw),
                                                                                "float32")))
            rows = bb.emit(relax.op.reshape(patches, (1, m, k)))
            key = (m, k, cout)
            if key not in self.gemms:
                self.gemms[key] = prepacked_gemm("matmul", 1, m, k, cout, target)
            split = self.gemms[key]
            gemm_gv = self._func(("gemm", *key), f"dse_conv_matmul_m{m}_k{k}_n{cout}", lambda: _kernel(split.gemm))
            pack_gv = self._func(("pack", k, cout), f"dse_conv_pack_k{k}_n{cout}", lambda: _kernel(split.pack))
            packed_shape = split.packed_shape
            w2 = bb.emit(relax.op.reshape(g["w"], (cout, k)))
            wp = bb.emit(relax.call_tir(pack_gv, [w2], relax.TensorType(packed_shape, "float32")))
            out = bb.emit(relax.call_tir(gemm_gv, [rows, wp], relax.TensorType((1, m, cout), "float32")))
            out = bb.emit(relax.op.reshape(out, (bsz, oh, ow, cout)))
            return relax.op.permute_dims(out, [0, 3, 1, 2])

        def _depthwise(self, g: dict[str, Any]) -> Any:
            bsz, c, height, width, kh, kw = (g[k] for k in ("bsz", "cin", "h", "w_", "kh", "kw"))
            same = (kh // 2, kw // 2, kh // 2, kw // 2)
            vec = next((v for v in (lanes, lanes // 2, lanes // 4) if v >= 2 and c % v == 0), 0)
            if kh % 2 == 0 or kw % 2 == 0 or (g["sh"], g["sw"]) != (1, 1) or g["pad"] != same or not vec:
                return None
            bb = self.builder_
            gv = self._func(("depthwise", bsz, height, width, c, kh, kw, vec), f"dse_depthwise_c{c}_h{height}_k{kh}",
                            lambda: depthwise_primfunc(bsz, height, width, c, kh, kw, vec))
            x_nhwc = bb.emit(relax.op.permute_dims(g["x"], [0, 2, 3, 1]))
            k_hwc = bb.emit(relax.op.permute_dims(relax.op.reshape(g["w"], (c, kh, kw)), [1, 2, 0]))
            y = bb.emit(relax.call_tir(gv, [x_nhwc, k_hwc], relax.TensorType((bsz, height, width, c), "float32")))
            return relax.op.permute_dims(y, [0, 3, 1, 2])

    return mutator_pass("ShiftAddConvKernels", _Mutator)
