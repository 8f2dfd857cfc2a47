"""The primitive kernels: TE compute definitions, NumPy references, random inputs and op counts.

Every primitive is described by one :class:`Primitive` in a registry keyed by name. Layouts are
always 3-D with the batch first and are fixed by the problem size ``(b, m, k, n)``:

=================  ====================================================  =====================
primitive          definition                                            arguments
=================  ====================================================  =====================
matmul             ``out[b,m,n] = Σ_k x[b,m,k]·w[n,k]``                  x[b,m,k], w[n,k]
bmm                ``out[b,m,n] = Σ_k x[b,m,k]·y[b,k,n]``                x[b,m,k], y[b,k,n]
matshift           ``out[b,m,n] = Σ_k sign[n,k]·(x[b,m,k] >> shift[n,k])``  x int32, shift/sign int8
matshift_decode    ``out[b,m,n] = Σ_k x[b,m,k]·(sign[n,k]·2^-shift[n,k])``  x float, shift/sign int8
matadd             ``out[b,m,n] = Σ_k (mask[b,k,m] ? v[b,k,n] : 0)``     mask uint8, v[b,k,n]
=================  ====================================================  =====================

Fixed point (matshift). The ShiftAddViT shift layers run on a Q16.16 grid (``round_to_fixed`` in
``deepshift/utils.py`` of the ShiftAddViT release, You et al., NeurIPS 2023): a float activation ``x`` maps to
``x_int = floor(x · 2^F)`` (int32, ``F`` fraction bits, default :data:`FRAC_BITS` = 16) and the
integer result maps back as ``out / 2^F``. The weight ``sign·2^-shift`` is applied as an arithmetic
right shift, ``>>`` rounds toward −∞ exactly as TVM's ``>>`` on int32 and NumPy's ``>>`` on int32,
so ``sign·(x >> s)`` differs from ``x·sign·2^-s`` by the floor of each term (at most one unit in
the last place, 2^-F, per term). ``shift`` must lie in ``[0, 31]`` (a right shift by ≥ 32 is
undefined in LLVM and CUDA) and ``sign`` in ``{-1, 0, +1}``; int32 sums wrap modulo 2^32 in the
kernels and in the reference alike.

The TE functions import TVM lazily: ``import kernels`` must stay cheap (``import tvm`` takes
seconds), and the registry, references and op counts are useful without TVM.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from kernels.errors import KernelError, UnknownNameError, UsageError

if TYPE_CHECKING:
    from tvm import te

FRAC_BITS = 16
MAX_SHIFT = 31

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class OpCounts:
    """Arithmetic operations and compulsory memory traffic of one kernel call.

    Counts are algorithmic (what the definition requires), not what a schedule happens to
    execute: every primitive is dense, so matadd counts one add per ``(b, m, n, k)`` (the kernel
    selects 0 where the code bit is clear) and matshift one shift and one add per term.
    Bytes are each input read once and the output written once.
    """

    mults: int
    adds: int
    shifts: int
    bytes_read: int
    bytes_written: int

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Primitive:
    """One named kernel: its TE definition, reference and metadata.

    ``arg_shapes(b, m, k, n)`` and ``arg_dtypes(dtype)`` describe the inputs in call order;
    ``te_fn`` maps TE placeholders of those shapes to the output tensor.
    """

    name: str
    summary: str
    arg_names: tuple[str, ...]
    arg_shapes: Callable[[int, int, int, int], tuple[Shape, ...]]
    arg_dtypes: Callable[[str], tuple[str, ...]]
    out_dtype: Callable[[str], str]
    dtypes: tuple[str, ...]
    te_fn: Callable[..., te.Tensor]
    reference: Callable[..., np.ndarray]
    random_inputs: Callable[[int, int, int, int, str, np.random.Generator], tuple[np.ndarray, ...]]
    op_counts: Callable[[int, int, int, int, str], OpCounts]

    @property
    def default_dtype(self) -> str:
        return self.dtypes[0]

    def check_dtype(self, dtype: str | None) -> str:
        dtype = dtype or self.default_dtype
        if dtype not in self.dtypes:
            raise UsageError(
                f"primitive {self.name!r} has no dtype {dtype!r}; use one of {list(self.dtypes)}"
            )
        return dtype

    def out_shape(self, b: int, m: int, k: int, n: int) -> Shape:
        return (b, m, n)

    def placeholders(self, b: int, m: int, k: int, n: int, dtype: str | None = None) -> list[te.Tensor]:
        """TE placeholders for the inputs, named after the arguments."""
        from tvm import te

        dtype = self.check_dtype(dtype)
        shapes, dtypes = self.arg_shapes(b, m, k, n), self.arg_dtypes(dtype)
        return [te.placeholder(s, d, name=a) for a, s, d in zip(self.arg_names, shapes, dtypes)]


_REGISTRY: dict[str, Primitive] = {}


def register(prim: Primitive) -> Primitive:
    if prim.name in _REGISTRY:
        raise KernelError(f"primitive {prim.name!r} is registered twice; rename one of them")
    _REGISTRY[prim.name] = prim
    return prim


def names() -> list[str]:
    """Registered primitive names, sorted."""
    return sorted(_REGISTRY)


def get(name: str) -> Primitive:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownNameError(f"unknown primitive {name!r}; choose one of {names()}") from None


def check_shape(b: int, m: int, k: int, n: int) -> None:
    for label, value in (("b", b), ("m", m), ("k", k), ("n", n)):
        if not isinstance(value, int | np.integer) or value < 1:
            raise UsageError(f"problem size {label}={value!r} must be a positive integer")


def reference(name: str, *arrays: np.ndarray) -> np.ndarray:
    """The NumPy reference of primitive ``name`` on ``arrays`` (layouts as in the module doc)."""
    prim = get(name)
    if len(arrays) != len(prim.arg_names):
        raise UsageError(
            f"{name} takes {len(prim.arg_names)} arrays ({', '.join(prim.arg_names)}), got {len(arrays)}"
        )
    return prim.reference(*arrays)


def random_inputs(
    name: str, b: int, m: int, k: int, n: int, dtype: str | None = None, seed: int | np.random.Generator = 0
) -> tuple[np.ndarray, ...]:
    """Realistic random inputs (never all zeros) for primitive ``name`` at size ``(b, m, k, n)``."""
    prim = get(name)
    check_shape(b, m, k, n)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    return prim.random_inputs(b, m, k, n, prim.check_dtype(dtype), rng)


def op_counts(name: str, b: int, m: int, k: int, n: int, dtype: str | None = None) -> OpCounts:
    """Multiplies, adds, shifts and compulsory bytes of one call of ``name`` at ``(b, m, k, n)``."""
    prim = get(name)
    check_shape(b, m, k, n)
    return prim.op_counts(b, m, k, n, prim.check_dtype(dtype))


def _itemsize(dtype: str) -> int:
    return np.dtype(dtype).itemsize


def _gemm_counts(b: int, m: int, k: int, n: int, in_bytes: int, out_bytes: int) -> OpCounts:
    macs = b * m * n * k
    return OpCounts(macs, macs, 0, in_bytes, b * m * n * out_bytes)


# ----------------------------------------------------------------------------------------------
# Validation shared by the references and the compiled kernels' callers.


def check_shift_sign(shift: np.ndarray, sign: np.ndarray) -> None:
    """Raise UsageError unless ``shift`` is in [0, MAX_SHIFT] and ``sign`` in {-1, 0, 1}."""
    if shift.shape != sign.shape:
        raise UsageError(f"shift {shift.shape} and sign {sign.shape} must have the same [n, k] shape")
    if shift.size and (int(shift.min()) < 0 or int(shift.max()) > MAX_SHIFT):
        raise UsageError(
            f"shift values must lie in [0, {MAX_SHIFT}] (a right shift), got [{shift.min()}, {shift.max()}]; "
            "clamp the power-of-two exponent before packing"
        )
    if sign.size and (int(sign.min()) < -1 or int(sign.max()) > 1):
        raise UsageError(f"sign values must be -1, 0 or +1, got [{sign.min()}, {sign.max()}]")


# ----------------------------------------------------------------------------------------------
# matmul / bmm


def _accum_dtype(dtype: str) -> str:
    # fp16 inputs accumulate (and return) in fp32, like cuBLAS/PyTorch's fp32-accumulate GEMMs.
    return "float32"


def matmul_te(x: te.Tensor, w: te.Tensor) -> te.Tensor:
    """``out[b,m,n] = Σ_k x[b,m,k]·w[n,k]`` accumulated in fp32."""
    from tvm import te

    b, m, k = x.shape
    n = w.shape[0]
    acc = _accum_dtype(str(x.dtype))
    r = te.reduce_axis((0, k), name="k")
    return te.compute(
        (b, m, n),
        lambda bi, i, j: te.sum(x[bi, i, r].astype(acc) * w[j, r].astype(acc), axis=r),
        name="matmul",
    )


def _matmul_ref(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    # [b, m, k] @ [k, n] in float64 so the reference is more accurate than any fp32 kernel.
    return np.matmul(x.astype(np.float64), w.astype(np.float64).T).astype(np.float32)


def _normal(rng: np.random.Generator, shape: Shape, dtype: str, scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(dtype)


register(
    Primitive(
        name="matmul",
        summary="dense GEMM out[b,m,n] = Σ_k x[b,m,k]·w[n,k] (fp32, or fp16 in / fp32 out)",
        arg_names=("x", "w"),
        arg_shapes=lambda b, m, k, n: ((b, m, k), (n, k)),
        arg_dtypes=lambda dt: (dt, dt),
        out_dtype=_accum_dtype,
        dtypes=("float32", "float16"),
        te_fn=matmul_te,
        reference=_matmul_ref,
        random_inputs=lambda b, m, k, n, dt, rng: (
            _normal(rng, (b, m, k), dt),
            _normal(rng, (n, k), dt, k**-0.5),
        ),
        op_counts=lambda b, m, k, n, dt: _gemm_counts(b, m, k, n, (b * m * k + n * k) * _itemsize(dt), 4),
    )
)


def bmm_te(x: te.Tensor, y: te.Tensor) -> te.Tensor:
    """``out[b,m,n] = Σ_k x[b,m,k]·y[b,k,n]`` (attention products q·kᵀ, attn·v; ``torch.bmm``) in fp32.

    ``y`` keeps ``torch.bmm``'s layout so that the exported graph passes the operand it already has
    (``kᵀ`` and ``v`` as the attention computes them) instead of transposing a copy for the kernel to
    transpose back while packing."""
    from tvm import te

    b, m, k = x.shape
    n = y.shape[2]
    acc = _accum_dtype(str(x.dtype))
    r = te.reduce_axis((0, k), name="k")
    return te.compute(
        (b, m, n),
        lambda bi, i, j: te.sum(x[bi, i, r].astype(acc) * y[bi, r, j].astype(acc), axis=r),
        name="bmm",
    )


def _bmm_ref(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.matmul(x.astype(np.float64), y.astype(np.float64)).astype(np.float32)


register(
    Primitive(
        name="bmm",
        summary="batched GEMM out[b,m,n] = Σ_k x[b,m,k]·y[b,k,n] (softmax-attention products, torch.bmm)",
        arg_names=("x", "y"),
        arg_shapes=lambda b, m, k, n: ((b, m, k), (b, k, n)),
        arg_dtypes=lambda dt: (dt, dt),
        out_dtype=_accum_dtype,
        dtypes=("float32", "float16"),
        te_fn=bmm_te,
        reference=_bmm_ref,
        random_inputs=lambda b, m, k, n, dt, rng: (_normal(rng, (b, m, k), dt), _normal(rng, (b, k, n), dt)),
        op_counts=lambda b, m, k, n, dt: _gemm_counts(b, m, k, n, (b * m * k + b * n * k) * _itemsize(dt), 4),
    )
)


# ----------------------------------------------------------------------------------------------
# matshift / matshift_decode


def signed_term(value: Any, sign: Any) -> Any:
    """``sign·value`` for ``sign`` in {-1, 0, +1} by select/negate, without a multiply (TIR expr)."""
    from tvm import tirx

    zero = tirx.const(0, value.ty)
    return tirx.Select(sign > 0, value, tirx.Select(sign < 0, zero - value, zero))


def matshift_te(x: te.Tensor, shift: te.Tensor, sign: te.Tensor) -> te.Tensor:
    """``out[b,m,n] = Σ_k sign[n,k]·(x[b,m,k] >> shift[n,k])`` on int32, shifts and adds only."""
    from tvm import te

    b, m, k = x.shape
    n = shift.shape[0]
    r = te.reduce_axis((0, k), name="k")
    return te.compute(
        (b, m, n),
        lambda bi, i, j: te.sum(signed_term(x[bi, i, r] >> shift[j, r].astype("int32"), sign[j, r]), axis=r),
        name="matshift",
    )


def _matshift_ref(x: np.ndarray, shift: np.ndarray, sign: np.ndarray) -> np.ndarray:
    check_shift_sign(shift, sign)
    if x.dtype != np.int32:
        raise UsageError(f"matshift takes int32 fixed-point x (floor(x·2^F)), got {x.dtype}")
    k = x.shape[-1]
    if k >= 2**21:
        raise UsageError(f"matshift reference supports k < 2^21, got k={k}")
    # Group the terms by shift value: each group is an integer GEMM of (x >> s) with the signs.
    # Done in float64 BLAS, which is exact here: |x >> s| <= 2^31 and k < 2^21 keep every
    # partial sum an integer below 2^53.
    acc = np.zeros((*x.shape[:-1], shift.shape[0]), dtype=np.float64)
    sign64 = sign.astype(np.float64)
    for s in np.unique(shift):
        w = np.where(shift == s, sign64, 0.0)  # [n, k]
        if not w.any():
            continue
        acc += np.matmul((x >> np.int32(s)).astype(np.float64), w.T)
    # Wrap to int32 like the kernels' modulo-2^32 accumulation.
    return acc.astype(np.int64).astype(np.int32)


def _shift_weights(rng: np.random.Generator, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Power-of-two weights as a converted Linear would give them (:meth:`models.shift.ShiftLinear.from_linear`).

    ``shift = round(-log2|w|)`` for kaiming-like ``w``, clamped to [0, 15]; ~5% zero signs.
    """
    w = rng.standard_normal((n, k)) * (2.0 / k) ** 0.5
    shift = np.clip(np.round(-np.log2(np.abs(w) + 1e-12)), 0, 15).astype(np.int8)
    sign = np.where(w >= 0, 1, -1).astype(np.int8)
    sign[rng.random((n, k)) < 0.05] = 0
    return shift, sign


def to_fixed(x: np.ndarray, frac_bits: int = FRAC_BITS) -> np.ndarray:
    """Float activations to the int32 fixed-point grid: ``floor(x·2^F)`` (computed in float64)."""
    return np.floor(np.asarray(x, dtype=np.float64) * 2.0**frac_bits).astype(np.int32)


def from_fixed(x_int: np.ndarray, frac_bits: int = FRAC_BITS) -> np.ndarray:
    """Integer results back to float: ``x / 2^F``."""
    return (np.asarray(x_int, dtype=np.float64) / 2.0**frac_bits).astype(np.float32)


def _matshift_inputs(b: int, m: int, k: int, n: int, dt: str, rng: np.random.Generator):
    # Activations are LayerNorm-scale floats on the Q16.16 grid, half of them negative.
    x = to_fixed(rng.standard_normal((b, m, k)) * 2.0)
    return (x, *_shift_weights(rng, n, k))


def _matshift_counts(b: int, m: int, k: int, n: int, dt: str) -> OpCounts:
    terms = b * m * n * k
    return OpCounts(0, terms, terms, b * m * k * 4 + 2 * n * k, b * m * n * 4)


register(
    Primitive(
        name="matshift",
        summary="shift GEMM out[b,m,n] = Σ_k sign[n,k]·(x[b,m,k] >> shift[n,k]) on int32 fixed point",
        arg_names=("x", "shift", "sign"),
        arg_shapes=lambda b, m, k, n: ((b, m, k), (n, k), (n, k)),
        arg_dtypes=lambda dt: ("int32", "int8", "int8"),
        out_dtype=lambda dt: "int32",
        dtypes=("int32",),
        te_fn=matshift_te,
        reference=_matshift_ref,
        random_inputs=_matshift_inputs,
        op_counts=_matshift_counts,
    )
)


def decode_pow2(shift: Any, sign: Any, dtype: str) -> Any:
    """The float weight ``sign·2^-shift`` built from its exponent bits (TIR expr, no multiply).

    ``2^-s`` is the IEEE-754 float32 with biased exponent ``127 - s`` and a zero mantissa.
    """
    from tvm import tirx

    bits = (tirx.const(127, "int32") - shift.astype("int32")) << tirx.const(23, "int32")
    mag = tirx.reinterpret("float32", bits).astype(dtype)
    return signed_term(mag, sign)


def matshift_decode_te(x: te.Tensor, shift: te.Tensor, sign: te.Tensor) -> te.Tensor:
    """``out[b,m,n] = Σ_k x[b,m,k]·w[n,k]`` with ``w = sign·2^-shift`` decoded inside the kernel."""
    from tvm import te

    b, m, k = x.shape
    n = shift.shape[0]
    acc = _accum_dtype(str(x.dtype))
    w = te.compute((n, k), lambda j, r: decode_pow2(shift[j, r], sign[j, r], acc), name="decode")
    r = te.reduce_axis((0, k), name="k")
    return te.compute(
        (b, m, n),
        lambda bi, i, j: te.sum(x[bi, i, r].astype(acc) * w[j, r], axis=r),
        name="matshift_decode",
    )


def _matshift_decode_ref(x: np.ndarray, shift: np.ndarray, sign: np.ndarray) -> np.ndarray:
    check_shift_sign(shift, sign)
    w = sign.astype(np.float64) * np.exp2(-shift.astype(np.float64))  # [n, k]
    return np.matmul(x.astype(np.float64), w.T).astype(np.float32)


register(
    Primitive(
        name="matshift_decode",
        summary="float GEMM with power-of-two weights sign·2^-shift decoded in the kernel (matshift_fake)",
        arg_names=("x", "shift", "sign"),
        arg_shapes=lambda b, m, k, n: ((b, m, k), (n, k), (n, k)),
        arg_dtypes=lambda dt: (dt, "int8", "int8"),
        out_dtype=_accum_dtype,
        dtypes=("float32", "float16"),
        te_fn=matshift_decode_te,
        reference=_matshift_decode_ref,
        random_inputs=lambda b, m, k, n, dt, rng: (
            _normal(rng, (b, m, k), dt, 2.0),
            *_shift_weights(rng, n, k),
        ),
        op_counts=lambda b, m, k, n, dt: dataclasses.replace(
            _gemm_counts(b, m, k, n, b * m * k * _itemsize(dt) + 2 * n * k, 4), shifts=n * k
        ),
    )
)


# ----------------------------------------------------------------------------------------------
# matadd


def matadd_te(mask: te.Tensor, v: te.Tensor) -> te.Tensor:
    """``out[b,m,n] = Σ_k (mask[b,k,m] ? v[b,k,n] : 0)``: additions selected by code bits.

    The cleared-bit value is -0.0, the additive identity of IEEE floats (x + -0.0 == x for every
    x, unlike +0.0), so LLVM may turn ``acc + select(c, v, -0)`` into a masked add.
    """
    from tvm import te, tirx

    b, k, m = mask.shape
    n = v.shape[2]
    r = te.reduce_axis((0, k), name="k")
    neg_zero = tirx.const(-0.0, v.dtype)
    return te.compute(
        (b, m, n),
        lambda bi, i, j: te.sum(tirx.Select(mask[bi, r, i] != 0, v[bi, r, j], neg_zero), axis=r),
        name="matadd",
    )


def _matadd_ref(mask: np.ndarray, v: np.ndarray) -> np.ndarray:
    bits = (mask != 0).astype(np.float64).transpose(0, 2, 1)  # [b, m, k]
    return np.matmul(bits, v.astype(np.float64)).astype(np.float32)


register(
    Primitive(
        name="matadd",
        summary="masked accumulation out[b,m,n] = Σ_k (mask[b,k,m] ? v[b,k,n] : 0), additions only",
        arg_names=("mask", "v"),
        arg_shapes=lambda b, m, k, n: ((b, k, m), (b, k, n)),
        arg_dtypes=lambda dt: ("uint8", dt),
        out_dtype=lambda dt: dt,
        dtypes=("float32",),
        te_fn=matadd_te,
        reference=_matadd_ref,
        random_inputs=lambda b, m, k, n, dt, rng: (
            (rng.random((b, k, m)) < 0.5).astype(np.uint8),
            _normal(rng, (b, k, n), dt),
        ),
        op_counts=lambda b, m, k, n, dt: OpCounts(
            0, b * m * n * k, 0, b * k * m + b * k * n * 4, b * m * n * 4
        ),
    )
)
