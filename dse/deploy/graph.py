"""Build and compile the Relax module of a ShiftAddViT, with the project's kernels in the graph.

Route (chosen over building the graph by hand with ``relax.BlockBuilder``): the PyTorch model is the one
source of truth for the forward pass, so it is traced with ``torch.export`` and imported with TVM's Relax
frontend (``from_exported_program``). Tracing cannot drift from the model the way a second, hand-written
graph builder can (timm blocks, Hamming attention, capacity-routed MoE all come for free), and the
frontend's ``custom_convert_map`` lets every expensive node become a ``call_tir`` of a scheduled kernel:

=========================================  ===============================================================
traced node                                becomes
=========================================  ===============================================================
``dse_export::packed_shift_linear``        fixed-point quantisation + ``matshift`` (int32 shift-and-add)
                                           or ``matshift_decode`` (fp32 GEMM on decoded 2^-s weights),
                                           per layer, as :class:`ShiftPlan` says (the profile's faster)
``shiftadd::matadd``                       ``matadd`` (Hamming attention's two products)
``aten::addmm`` / ``aten::mm`` (Linear)    ``matmul`` (kernels' scheduled GEMM) + bias
``aten::bmm`` (attention products, hash)   ``bmm``
=========================================  ===============================================================

Kernel PrimFuncs come from :func:`kernels.build` (hand CPU schedules, persisted MetaSchedule records
where they measured faster — ``export.tune_trials > 0`` tunes shapes that have none — dlight rules on
CUDA), are named ``shiftadd_<primitive>_b.._m.._k.._n..`` and carry the attributes ``shiftadd.primitive``
and ``tirx.is_scheduled``. They are marked opaque so fusion leaves them whole. Everything else is
legalised, fused and scheduled by :mod:`kernels.relax_pipeline`. The patch embedding (a stride = kernel convolution) is a
``matmul`` over patches; a Linear on a non-contiguous 3-D input (``bmm`` of a broadcast weight) is one
``matmul``; the MoE's inverse permutation (``argsort`` of a permutation) is an O(T) scatter.

Parameters stay function inputs (``keep_params_as_input``): the artifact's ``weights.npz`` is the only
copy of the weights, the library is code only, and shift layers' weights are stored as the int8
``shift``/``sign`` arrays (see :class:`PackedShiftLinear`). On CPU the ``matmul``/``matshift_decode``
kernels come in two parts (:class:`kernels.cpu_schedules.PrepackedGemm`): a packing kernel that lays the
weights out for the GEMM's register tile (decoding ``sign·2^-shift`` exactly) and the GEMM on the packed
weights. The packing depends on parameters only, so ``LiftTransformParams`` moves it into
``main_transform_params``, which the loader runs once (:func:`dse.deploy.artifact.prepare_params`); a forward
runs the GEMMs alone (faster than packing the weights on every call). The profiler times these
rows the same way, so the cost model prices what runs.

The compiled module comes from :func:`kernels.relax_pipeline.compile_relax`, the pipeline the profiler also
times non-primitive ops with, so the cost model prices what the exporter compiles.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

import kernels
from dse.errors import KernelError, ModelError
from kernels.cpu_schedules import PREPACKABLE, prepacked_gemm
from kernels.relax_pipeline import fixed_grid_relax
from kernels.targets import vector_lanes
from kernels.torch_ops import fixed_grid
from models.hamming import HammingAttention
from models.shift import ShiftLinear

if TYPE_CHECKING:
    import tvm

log = logging.getLogger(__name__)

SHIFT_PRIMITIVES = ("matshift", "matshift_decode")
KERNEL_ATTR = "shiftadd.primitive"
KERNEL_PREFIX = "shiftadd_"


# ---------------------------------------------------------------------------------------------------
# The export form of a shift layer


@torch.library.custom_op("dse_export::packed_shift_linear", mutates_args=())
def packed_shift_linear(x: torch.Tensor, shift: torch.Tensor, sign: torch.Tensor, frac_bits: int,
                        primitive: str) -> torch.Tensor:
    """``x [b,m,k]`` through the shift layer ``(shift, sign) [n,k]`` with the arithmetic of ``primitive``.

    * ``matshift``: ``floor(x·2^F)`` to int32, ``Σ sign·(x_int >> shift)``, back by ``2^-F`` — the integer
      shift-and-add of ``shiftadd::shift_linear`` (each term floors, see :mod:`kernels.primitives`);
    * ``matshift_decode``: the fixed-point ``x_q = floor(x·2^F)/2^F`` times the decoded weight
      ``sign·2^-shift`` in fp32 — exactly :class:`models.shift.ShiftLinear`'s training/reference forward.

    The two differ by the per-term floor (up to ``k·2^-F``), which is why the exporter's PyTorch reference
    applies the primitive each layer is compiled with.
    """
    if primitive == "matshift":
        return torch.ops.shiftadd.shift_linear(x, shift, sign, frac_bits)
    if primitive != "matshift_decode":
        raise KernelError(f"unknown shift primitive '{primitive}'; use one of {', '.join(SHIFT_PRIMITIVES)}")
    scale = 2.0**frac_bits
    xq = fixed_grid(x, frac_bits) / scale  # [b, m, k] on the Q grid
    weight = sign.float() * torch.exp2(-shift.float())  # [n, k]
    return F.linear(xq, weight)  # [b, m, n]


@packed_shift_linear.register_fake
def _packed_shift_linear_fake(x, shift, sign, frac_bits, primitive):
    return x.new_empty((x.shape[0], x.shape[1], shift.shape[0]), dtype=torch.float32)


class PackedShiftLinear(nn.Module):
    """Inference form of :class:`ShiftLinear`: int8 ``shift``/``sign`` and an fp32 bias, nothing else.

    They are (frozen) parameters rather than buffers so that ``torch.export`` and the Relax importer treat
    them as model inputs — they are what ``weights.npz`` stores and what the kernel reads.
    """

    def __init__(self, layer: ShiftLinear, primitive: str = "matshift_decode"):
        super().__init__()
        if primitive not in SHIFT_PRIMITIVES:
            raise KernelError(f"unknown shift primitive '{primitive}'; use one of {', '.join(SHIFT_PRIMITIVES)}")
        shift, sign, bias = layer.packed()
        self.shift = nn.Parameter(shift, requires_grad=False)  # [out, in] int8, right-shift amounts >= 0
        self.sign = nn.Parameter(sign, requires_grad=False)  # [out, in] int8 in {-1, 0, 1}
        self.bias = None if bias is None else nn.Parameter(bias.clone(), requires_grad=False)  # [out] fp32
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.frac_bits = layer.frac_bits
        self.primitive = primitive

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        rows = x.reshape(1, -1, self.in_features).float()  # [1, tokens, in]: the profile's (b=1, m=tokens)
        out = packed_shift_linear(rows.contiguous(), self.shift, self.sign, self.frac_bits, self.primitive)
        out = out.reshape(*lead, self.out_features)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"frac_bits={self.frac_bits}, primitive={self.primitive}")


class StableSort(TorchFunctionMode):
    """Every ``argsort`` inside becomes ``stable=True``: ties keep token order.

    Capacity routing sorts tokens by router probability, and identical tokens (the class token of every
    image in block 0) tie exactly; PyTorch's default sort orders ties arbitrarily, so which image's token
    lands on which expert would be unspecified and the compiled graph (TVM's argsort is stable) could
    not match it. Under this mode the PyTorch forward and the traced graph (``aten.sort.stable``) agree.
    """

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        if func is torch.argsort or func is torch.Tensor.argsort:
            kwargs["stable"] = True
        return func(*args, **kwargs)


def _stable_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    with StableSort():
        return type(self).forward(self, *args, **kwargs)


def export_form(model: nn.Module, choose: Callable[[str, ShiftLinear], str] | None = None) -> nn.Module:
    """A deep copy of ``model`` (eval mode) ready for ``torch.export``.

    Every :class:`ShiftLinear` (plain or a MoE's Shift expert) becomes a :class:`PackedShiftLinear` whose
    primitive is ``choose(name, layer)`` (default ``matshift_decode``); Hamming attention's hash state
    (``projection``, ``key_center``) becomes frozen parameters so it travels with the other weights; the
    forward sorts stably (:class:`StableSort`), so capacity routing breaks ties by token order.
    """
    new = copy.deepcopy(model).eval()
    new.forward = types.MethodType(_stable_forward, new)
    for name, module in list(new.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, ShiftLinear):
                primitive = choose(full, child) if choose is not None else "matshift_decode"
                setattr(module, child_name, PackedShiftLinear(child, primitive))
        if isinstance(module, HammingAttention):
            for buf in ("projection", "key_center"):
                value = module._buffers.pop(buf)
                module.register_parameter(buf, nn.Parameter(value.detach().clone(), requires_grad=False))
    return new


# ---------------------------------------------------------------------------------------------------
# Torch -> Relax


@dataclasses.dataclass
class RelaxGraph:
    """An imported model: the Relax module, its parameters in call order, and what the kernels are."""

    mod: tvm.IRModule
    param_names: list[str]  # state-dict names, in the order main() takes them after the input
    params: dict[str, Any]  # name -> numpy array (int8 for shift layers)
    input_shape: tuple[int, ...]
    input_dtype: str
    kernel_calls: dict[str, str]  # PrimFunc name -> primitive
    kernel_shapes: dict[str, tuple[int, int, int, int]]  # PrimFunc name -> (b, m, k, n)


def _shape(expr: Any) -> list[int]:
    return [int(s) for s in expr.ty.shape]


class _KernelEmitter:
    """Adds scheduled kernel PrimFuncs to the importer's BlockBuilder (one per primitive and shape)."""

    def __init__(self, target: tvm.target.Target, tune_trials: int = 0, tuning_dir: str | Path | None = None):
        self.target = target
        self.tune_trials = tune_trials
        self.tuning_dir = tuning_dir
        self.calls: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, int, int, int]] = {}
        self._gvars: dict[str, Any] = {}
        self._packed: dict[str, tuple[int, int, int]] = {}

    def call(self, bb: Any, primitive: str, shape: tuple[int, int, int, int], args: list[Any]) -> Any:
        from tvm import relax

        b, m, k, n = shape
        if self.target.kind.name == "llvm" and primitive in PREPACKABLE:
            return self._prepacked(bb, primitive, shape, args)
        name = f"{KERNEL_PREFIX}{primitive}_b{b}_m{m}_k{k}_n{n}"
        if name not in self._gvars:
            func = kernels.build(primitive, b=b, m=m, k=k, n=n, target=self.target, trials=self.tune_trials,
                                 tuning_dir=self.tuning_dir).primfunc
            self._add(bb, func, name, primitive, shape)
        gv = self._gvars[name]
        out_dtype = kernels.get(primitive).out_dtype(kernels.get(primitive).default_dtype)
        return bb.emit(relax.call_tir(gv, args, relax.TensorType((b, m, n), out_dtype)))

    def _add(self, bb: Any, func: Any, name: str, primitive: str | None = None,
             shape: tuple[int, int, int, int] | None = None) -> None:
        """Add a scheduled PrimFunc as ``name``: opaque to fusion; a kernel (``primitive`` given) is recorded
        with its problem size and tagged :data:`KERNEL_ATTR` (a weight-packing helper is not)."""
        func = func.without_attr("global_symbol").with_attr("tirx.is_scheduled", True)
        func = func.with_attr("op_pattern", 8)  # 8 = kOpaque: never fused
        if primitive is not None:
            func = func.with_attr(KERNEL_ATTR, primitive)
        gv = bb.add_func(func, name)
        self._gvars[name] = gv
        if primitive is not None and shape is not None:
            self.calls[gv.name_hint] = primitive
            self.shapes[gv.name_hint] = shape

    def _prepacked(self, bb: Any, primitive: str, shape: tuple[int, int, int, int], args: list[Any]) -> Any:
        """``wp = pack(weights)``, then the GEMM on ``wp`` (:class:`kernels.cpu_schedules.PrepackedGemm`): the
        pack depends on parameters only, so :func:`kernels.relax_pipeline.relax_pipeline` lifts it out of the forward."""
        from tvm import relax

        b, m, k, n = shape
        name = f"{KERNEL_PREFIX}{primitive}_b{b}_m{m}_k{k}_n{n}"
        pack_name = f"{KERNEL_PREFIX}pack_{primitive}_k{k}_n{n}"
        if name not in self._gvars:
            split = prepacked_gemm(primitive, b, m, k, n, self.target)
            self._add(bb, split.gemm, name, primitive, shape)
            self._packed[name] = split.packed_shape
            if pack_name not in self._gvars:
                self._add(bb, split.pack, pack_name)
        packed = relax.TensorType(self._packed[name], "float32")
        wp = bb.emit(relax.call_tir(self._gvars[pack_name], args[1:], packed))
        return bb.emit(relax.call_tir(self._gvars[name], [args[0], wp], relax.TensorType((b, m, n), "float32")))


class _Converters:
    """The importer's ``custom_convert_map``: traced nodes that become calls of the project's kernels.

    Each converter takes ``(node, importer)`` and returns the Relax value of the node. The instance keeps
    the fx nodes known to hold a permutation (the MoE's dispatch order), so a later ``argsort`` of one
    becomes a scatter.
    """

    def __init__(self, emitter: _KernelEmitter):
        self.emitter = emitter
        self.permutations: set[Any] = set()  # fx nodes known to hold a permutation of 0..n-1

    def convert_map(self) -> dict[str, Callable]:
        return {"packed_shift_linear.default": self.shift_linear, "matadd.default": self.matadd,
                "addmm.default": self.addmm, "mm.default": self.mm, "bmm.default": self.bmm,
                "convolution.default": self.convolution, "sort.default": self.sort,
                "sort.stable": self.sort}  # TVM's argsort is stable too

    def shift_linear(self, node: Any, imp: Any) -> Any:
        from tvm import relax

        bb = imp.block_builder
        x, shift, sign = (imp.env[a] for a in node.args[:3])
        frac_bits, primitive = int(node.args[3]), str(node.args[4])
        b, m, k = _shape(x)
        n = _shape(shift)[0]
        rows = bb.emit(relax.op.reshape(x, (1, b * m, k))) if b != 1 else x  # [1, tokens, k]
        scale = float(2.0**frac_bits)
        fixed = fixed_grid_relax(rows, frac_bits)
        if primitive == "matshift":
            x_int = bb.emit(relax.op.astype(fixed, "int32"))
            acc = self.emitter.call(bb, "matshift", (1, b * m, k, n), [x_int, shift, sign])  # int32
            # multiplying by 2^-F is exact, like PyTorch's division by 2^F, and much cheaper than a divide
            out = bb.emit(relax.op.multiply(relax.op.astype(acc, "float32"), relax.const(1.0 / scale, "float32")))
        elif primitive == "matshift_decode":
            x_q = bb.emit(relax.op.multiply(fixed, relax.const(1.0 / scale, "float32")))
            out = self.emitter.call(bb, "matshift_decode", (1, b * m, k, n), [x_q, shift, sign])
        else:
            raise KernelError(f"unknown shift primitive '{primitive}' in the traced graph")
        return bb.emit(relax.op.reshape(out, (b, m, n))) if b != 1 else out

    def matadd(self, node: Any, imp: Any) -> Any:
        from tvm import relax

        bb = imp.block_builder
        mask, v = imp.env[node.args[0]], imp.env[node.args[1]]
        b, k, m = _shape(mask)
        n = _shape(v)[2]
        bits = bb.emit(relax.op.astype(mask, "uint8"))  # the codes are exactly 0.0/1.0
        lanes = vector_lanes(self.emitter.target) if self.emitter.target.kind.name == "llvm" else 0
        main = n - n % lanes if lanes else n
        if not lanes or main in (0, n):
            return self.emitter.call(bb, "matadd", (b, m, k, n), [bits, v])
        # Hamming attention's [V, 1] has d+1 columns: the CPU kernel vectorises over columns and a ragged
        # tail costs it ~3x (measured 321 vs 94 us for 24x32x65, n=33 vs 32), so the lane-multiple part
        # and the tail are two matadd calls; every column is the same sum either way.
        v_main = bb.emit(relax.op.strided_slice(v, axes=[2], begin=[0], end=[main]))
        v_tail = bb.emit(relax.op.strided_slice(v, axes=[2], begin=[main], end=[n]))
        out_main = self.emitter.call(bb, "matadd", (b, m, k, main), [bits, v_main])
        out_tail = self.emitter.call(bb, "matadd", (b, m, k, n - main), [bits, v_tail])
        return bb.emit(relax.op.concat([out_main, out_tail], axis=2))

    @staticmethod
    def _weight_nk(node: Any, imp: Any) -> Any:
        """The [n, k] weight behind a Linear's ``mat2`` (``permute(w, [1, 0])`` after decomposition)."""
        from tvm import relax

        target = str(getattr(node, "target", ""))
        if "permute" in target or target.endswith(".t.default") or "aten.t." in target:
            dims = list(node.args[1]) if len(node.args) > 1 else [1, 0]
            if dims == [1, 0]:
                return imp.env[node.args[0]]
        return imp.block_builder.emit(relax.op.permute_dims(imp.env[node], [1, 0]))

    def _gemm(self, bb: Any, x2: Any, w: Any) -> Any:
        from tvm import relax

        m, k = _shape(x2)
        n = _shape(w)[0]
        x3 = bb.emit(relax.op.reshape(x2, (1, m, k)))
        out = self.emitter.call(bb, "matmul", (1, m, k, n), [x3, w])
        return bb.emit(relax.op.reshape(out, (m, n)))

    def addmm(self, node: Any, imp: Any) -> Any:
        from tvm import relax

        bb = imp.block_builder
        beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
        if beta != 1 or alpha != 1:
            return imp._addmm(node)  # not a Linear: the frontend's own lowering
        bias, x = imp.env[node.args[0]], imp.env[node.args[1]]
        out = self._gemm(bb, x, self._weight_nk(node.args[2], imp))
        return bb.emit(relax.op.add(out, bias))

    def mm(self, node: Any, imp: Any) -> Any:
        return self._gemm(imp.block_builder, imp.env[node.args[0]], self._weight_nk(node.args[1], imp))

    def bmm(self, node: Any, imp: Any) -> Any:
        from tvm import relax

        bb = imp.block_builder
        x, y = imp.env[node.args[0]], imp.env[node.args[1]]
        b, m, k = _shape(x)
        n = _shape(y)[2]
        weight = _broadcast_matrix(node.args[1], imp)
        if weight is not None:  # a Linear on a non-contiguous 3-D input: one GEMM over all rows
            rows = bb.emit(relax.op.reshape(x, (1, b * m, k)))
            out = self.emitter.call(bb, "matmul", (1, b * m, k, n), [rows, weight])
            return bb.emit(relax.op.reshape(out, (b, m, n)))
        return self.emitter.call(bb, "bmm", (b, m, k, n), [x, y])

    def sort(self, node: Any, imp: Any) -> Any:
        """``argsort`` of a permutation (the MoE's inverse order) is a scatter, O(T), not a sort."""
        from tvm import relax

        bb = imp.block_builder
        src = node.args[0]  # sort.default(x, dim, descending) or sort.stable(x, *, stable, dim, descending)
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", -1)
        descending = node.args[2] if len(node.args) > 2 else node.kwargs.get("descending", False)
        x = imp.env[src]
        if (src in self.permutations and not descending and dim in (-1, 0) and len(_shape(x)) == 1):
            (t,) = _shape(x)
            positions = relax.op.arange(0, t, 1, "int64")
            inverse = bb.emit(relax.op.scatter_elements(relax.op.zeros((t,), "int64"), x, positions, axis=0))
            values = bb.emit(relax.op.arange(0, t, 1, str(x.ty.dtype)))  # a permutation sorted
            return bb.emit(relax.Tuple([values, inverse]))
        out = imp._sort(node)
        for user in node.users:  # getitem(sort, 1): the indices, a permutation of 0..T-1
            if len(_shape(x)) == 1 and getattr(user, "args", (None, None))[1] == 1:
                self.permutations.add(user)
        return out

    def convolution(self, node: Any, imp: Any) -> Any:
        """A patch embedding (2-D conv, stride = kernel, no padding/dilation/groups) as a GEMM over
        patches, recorded as a ``matmul`` kernel of the model; any other convolution keeps the frontend's
        ``conv2d``, which the compile pipeline lowers to im2col + GEMM or its depthwise kernel
        (:mod:`kernels.conv_kernels`)."""
        from tvm import relax

        bb = imp.block_builder
        x, w = imp.env[node.args[0]], imp.env[node.args[1]]
        if not _is_patchify(node, _shape(x), _shape(w)):
            return imp._convolution(node)
        bias = imp.env[node.args[2]] if len(node.args) > 2 and node.args[2] is not None else None
        bsz, cin, height, width = _shape(x)
        cout, _, kh, kw = _shape(w)
        gh, gw = height // kh, width // kw
        patches = relax.op.reshape(x, (bsz, cin, gh, kh, gw, kw))
        patches = relax.op.permute_dims(patches, [0, 2, 4, 1, 3, 5])  # [B, gh, gw, cin, kh, kw]
        rows = bb.emit(relax.op.reshape(patches, (1, bsz * gh * gw, cin * kh * kw)))
        w2 = bb.emit(relax.op.reshape(w, (cout, cin * kh * kw)))
        out = self.emitter.call(bb, "matmul", (1, bsz * gh * gw, cin * kh * kw, cout), [rows, w2])
        if bias is not None:
            out = relax.op.add(out, bias)
        out = relax.op.reshape(out, (bsz, gh, gw, cout))
        return bb.emit(relax.op.permute_dims(out, [0, 3, 1, 2]))  # NCHW, as the conv returns


def _is_patchify(node: Any, xs: list[int], ws: list[int]) -> bool:
    """Whether an ``aten.convolution`` node is a patch embedding: a 2-D conv with stride = kernel and no
    padding, dilation, groups or transposition, over an input the kernel tiles exactly."""
    args = list(node.args) + [None] * (9 - len(node.args))
    stride, padding, dilation = (list(a) if a is not None else None for a in args[3:6])
    transposed, groups = args[6], args[8]
    return (len(xs) == 4 and len(ws) == 4 and not transposed and groups in (None, 1)
            and stride == ws[2:] and all(p == 0 for p in padding or [0])
            and all(d == 1 for d in dilation or [1]) and xs[2] % ws[2] == 0 and xs[3] % ws[3] == 0)


def _var_name(var: Any) -> str:
    name = getattr(var, "name", None)  # relax.Var in TVM 0.27; name_hint before
    return str(name if isinstance(name, str) else var.name_hint)


_VIEW_OPS = ("expand", "view", "reshape", "_unsafe_view", "clone", "alias", "contiguous")


def _broadcast_matrix(node: Any, imp: Any) -> Any:
    """The ``[n, k]`` weight when ``node`` (a bmm's ``[b, k, n]`` operand) is a 2-D ``[k, n]`` matrix
    broadcast over the batch (``expand`` of ``permute(w)``), else None."""
    seen = node
    for _ in range(8):
        target = str(getattr(seen, "target", ""))
        if not any(f"aten.{op}." in target for op in _VIEW_OPS) or not seen.args:
            break
        seen = seen.args[0]
    value = getattr(seen, "meta", {}).get("val")
    if value is None or value.dim() != 2 or seen is node:
        return None
    final = getattr(node, "meta", {}).get("val")
    if final is None or tuple(final.shape[-2:]) != tuple(value.shape):
        return None
    target = str(getattr(seen, "target", ""))
    if ("permute" in target or "aten.t." in target) and list(seen.args[1] if len(seen.args) > 1 else [1, 0]) == [1, 0]:
        return imp.env[seen.args[0]]
    from tvm import relax

    return imp.block_builder.emit(relax.op.permute_dims(imp.env[seen], [1, 0]))


def _param_order(ep: Any, mod: tvm.IRModule) -> list[str]:
    """State-dict names of main()'s parameter inputs, in call order."""
    by_arg = {spec.arg.name: spec.target for spec in ep.graph_signature.input_specs
              if getattr(spec, "target", None) is not None}
    num_input = int(mod["main"].attrs["num_input"])
    names = []
    for var in mod["main"].params[num_input:]:
        name = by_arg.get(_var_name(var))
        if name is None:
            raise KernelError(f"cannot map the Relax parameter '{_var_name(var)}' back to a model weight")
        names.append(name)
    return names


def to_relax(model: nn.Module, example: torch.Tensor, target: Any = "cpu", tune_trials: int = 0,
             tuning_dir: str | Path | None = None) -> RelaxGraph:
    """Trace ``model`` (an :func:`export_form`, eval mode) on ``example`` and import it with the kernels.

    The graph is static: batch, token count and every MoE capacity are those of ``example``.
    ``tune_trials > 0`` MetaSchedule-tunes kernels without a persisted record (``kernels.build``).
    """
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    tgt = kernels.resolve_target(target)
    model = model.eval()
    with torch.no_grad():
        try:
            ep = torch.export.export(model, (example,))
        except Exception as exc:  # torch.export reports unsupported Python in many exception types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"torch.export cannot trace the model ({first}); export supports timm "
                             "ViT/PVTv2 ShiftAddViTs with static MoE capacity") from None
    emitter = _KernelEmitter(tgt, tune_trials, tuning_dir)
    mod = from_exported_program(ep, keep_params_as_input=True, custom_convert_map=_Converters(emitter).convert_map())
    mod = relax.transform.DeadCodeElimination(["main"])(mod)
    names = _param_order(ep, mod)
    state = dict(ep.state_dict)
    params = {n: state[n].detach().cpu().contiguous().numpy() for n in names}
    mod["main"] = mod["main"].without_attr("params")  # the arrays travel in weights.npz, not the module
    calls = kernel_functions(mod)
    shapes = {name: emitter.shapes[name] for name in calls}
    return RelaxGraph(mod, names, params, tuple(example.shape), str(example.dtype).replace("torch.", ""), calls,
                      shapes)


def kernel_functions(mod: tvm.IRModule) -> dict[str, str]:
    """``{PrimFunc name: primitive}`` of the project's kernels in ``mod``."""
    return {gv.name_hint: str(f.attrs[KERNEL_ATTR]) for gv, f in mod.functions_items()
            if f.attrs is not None and KERNEL_ATTR in f.attrs}


def call_tir_targets(mod: tvm.IRModule, func: str = "main") -> list[str]:
    """Names of the PrimFuncs that ``func`` calls through ``call_tir``, in program order (before lowering)."""
    import tvm

    call_tir = tvm.ir.Op.get("relax.call_tir")
    found = []
    for block in mod[func].body.blocks:
        for binding in block.bindings:
            value = binding.value
            if getattr(value, "op", None) is not None and value.op.same_as(call_tir):
                found.append(value.args[0].name_hint)
    return found


def fastest_shift(shape: tuple[int, int, int, int], latencies: Mapping[str, float]) -> str:
    """The shift primitive with the lowest latency (ties go to the integer ``matshift``)."""
    known = {p: latencies[p] for p in SHIFT_PRIMITIVES if p in latencies}
    if not known:
        raise KernelError(f"no latency for matshift or matshift_decode at shape {shape}")
    return min(SHIFT_PRIMITIVES, key=lambda p: (known.get(p, float("inf")), p != "matshift"))
