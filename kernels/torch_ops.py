"""PyTorch custom ops backed by the TVM kernels: ``shiftadd::matshift``, ``shift_linear``, ``matadd``.

Each op has a fake (meta) registration, so ``torch.export`` keeps it as one node that the exporter
maps back to the TVM kernel, and an autograd formula where training needs one. On CPU the forward
runs the compiled TVM kernel (default schedule, built lazily per shape and cached by
``kernels.build``; torch tensors are passed through DLPack without copies); on other devices, for
float64 inputs, or with the TVM path switched off (``use_tvm(False)`` or the environment variable
``SHIFTADD_TORCH_REFERENCE=1``) it runs the PyTorch reference below, which has the same semantics.

Ops (layouts batch-first, as in ``kernels.primitives``):

- ``matshift(x int32[b,m,k], shift int8[n,k], sign int8[n,k]) -> int32[b,m,n]``, no gradient.
- ``shift_linear(x f32[b,m,k], shift, sign, frac_bits) -> f32[b,m,n]``: ``x`` is quantised to the
  fixed-point grid in fp32 (``floor(x·2^F)``; never in fp16, where ``x·2^16`` overflows), run through matshift and
  scaled back by ``2^-F``. Backward is straight-through in ``x``: ``grad_x = g @ W`` with
  ``W = sign·2^-shift`` (the straight-through estimator of DeepShift, Elhoushi et al. 2021).
- ``matadd(mask f32[b,k,m] in {0,1}, v f32[b,k,n]) -> f32[b,m,n]``, ``out = maskᵀ·v`` computed with
  additions only; the mask is float so a straight-through gradient reaches binary codes:
  ``grad_v = mask @ g`` and ``grad_mask = v @ gᵀ``.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

import torch

from kernels import primitives
from kernels.build import build
from kernels.compiled import ALIGNMENT
from kernels.errors import UsageError

_ENV = "SHIFTADD_TORCH_REFERENCE"
_state = threading.local()


def tvm_enabled() -> bool:
    """Whether CPU calls run the TVM kernels (else the PyTorch reference)."""
    override = getattr(_state, "use_tvm", None)
    if override is not None:
        return override
    return os.environ.get(_ENV, "") not in ("1", "true", "yes")


@contextlib.contextmanager
def use_tvm(enabled: bool = True) -> Iterator[None]:
    """Force the TVM path on or off (per thread) inside the ``with`` block."""
    previous = getattr(_state, "use_tvm", None)
    _state.use_tvm = bool(enabled)
    try:
        yield
    finally:
        _state.use_tvm = previous


def _tvm_ok(*tensors: torch.Tensor) -> bool:
    return tvm_enabled() and all(t.device.type == "cpu" for t in tensors)


def _kernel_arg(t: torch.Tensor) -> torch.Tensor:
    """Contiguous and 64-byte aligned (TVM emits aligned vector loads), copying only if needed."""

    t = t.detach().contiguous()
    if t.data_ptr() % ALIGNMENT:
        t = t.clone()  # a fresh CPU allocation is 64-byte aligned
    return t


def _run_tvm(
    name: str, out_dtype: torch.dtype, b: int, m: int, k: int, n: int, *args: torch.Tensor
) -> torch.Tensor:

    kernel = build(name, b=b, m=m, k=k, n=n, target="cpu")
    out = torch.empty((b, m, n), dtype=out_dtype)
    kernel.run_into(*(_kernel_arg(a) for a in args), out)
    return out


def _check_shift_args(x: torch.Tensor, shift: torch.Tensor, sign: torch.Tensor) -> tuple[int, int, int, int]:
    if x.dim() != 3 or shift.dim() != 2 or shift.shape != sign.shape or x.shape[2] != shift.shape[1]:
        raise UsageError(
            f"expected x[b,m,k], shift[n,k], sign[n,k]; got {tuple(x.shape)}, {tuple(shift.shape)}, {tuple(sign.shape)}"
        )
    if shift.dtype != torch.int8 or sign.dtype != torch.int8:
        raise UsageError(f"shift and sign must be int8, got {shift.dtype} and {sign.dtype}")
    b, m, k = x.shape
    return b, m, k, shift.shape[0]


def shift_weight(shift: torch.Tensor, sign: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight ``W[n,k] = sign·2^-shift`` of a packed shift layer."""
    return sign.to(dtype) * torch.exp2(-shift.to(dtype))


def matshift_reference(x: torch.Tensor, shift: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """``Σ_k sign[n,k]·(x[b,m,k] >> shift[n,k])`` in PyTorch, exact, wrapping modulo 2^32.

    Terms are grouped by shift value, each group a float64 GEMM: exact because
    ``|x >> s| <= 2^31`` and ``k < 2^21`` keep every partial sum an integer below 2^53.
    """
    acc = torch.zeros((*x.shape[:2], shift.shape[0]), dtype=torch.float64, device=x.device)  # [b, m, n]
    sign64 = sign.to(torch.float64)
    for s in torch.unique(shift).tolist():
        w = torch.where(shift == s, sign64, 0.0)  # [n, k]
        acc += torch.matmul((x >> int(s)).to(torch.float64), w.t())
    return acc.to(torch.int64).to(torch.int32)


@torch.library.custom_op("shiftadd::matshift", mutates_args=())
def matshift(x: torch.Tensor, shift: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """``out[b,m,n] = Σ_k sign[n,k]·(x[b,m,k] >> shift[n,k])`` on int32 fixed point."""
    b, m, k, n = _check_shift_args(x, shift, sign)
    if x.dtype != torch.int32:
        raise UsageError(f"matshift takes int32 fixed-point x, got {x.dtype}; quantise with floor(x·2^F)")
    primitives.check_shift_sign(shift.cpu().numpy(), sign.cpu().numpy())
    if _tvm_ok(x, shift, sign):
        return _run_tvm("matshift", torch.int32, b, m, k, n, x, shift, sign)
    return matshift_reference(x, shift, sign)


@matshift.register_fake
def _matshift_fake(x: torch.Tensor, shift: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0], x.shape[1], shift.shape[0]), dtype=torch.int32)


# int32 range representable in fp32: the largest float below 2^31 is 2^31 - 128.
FIXED_MIN, FIXED_MAX = -(2.0**31), 2.0**31 - 128.0


def fixed_grid(x: torch.Tensor, frac_bits: int) -> torch.Tensor:
    """``floor(x·2^F)`` clamped to int32's range, still fp32 (exact: scaling by 2^F only moves the exponent)."""
    return torch.floor(x.to(torch.float32) * (2.0**frac_bits)).clamp(FIXED_MIN, FIXED_MAX)


def quantize_fixed(x: torch.Tensor, frac_bits: int) -> torch.Tensor:
    """``floor(x·2^F)`` as int32 (:func:`fixed_grid`)."""
    return fixed_grid(x, frac_bits).to(torch.int32)


@torch.library.custom_op("shiftadd::shift_linear", mutates_args=())
def shift_linear(x: torch.Tensor, shift: torch.Tensor, sign: torch.Tensor, frac_bits: int) -> torch.Tensor:
    """Shift layer on float activations: quantise to Q(32-F).F, matshift, scale back by 2^-F."""
    _check_shift_args(x, shift, sign)
    if not 0 <= frac_bits <= 30:
        raise UsageError(f"frac_bits must be in [0, 30], got {frac_bits}")
    # int32 -> fp32 rounds once; the division by 2^F is exact.
    return matshift(quantize_fixed(x, frac_bits), shift, sign).to(torch.float32) / (2.0**frac_bits)


@shift_linear.register_fake
def _shift_linear_fake(
    x: torch.Tensor, shift: torch.Tensor, sign: torch.Tensor, frac_bits: int
) -> torch.Tensor:
    return x.new_empty((x.shape[0], x.shape[1], shift.shape[0]), dtype=torch.float32)


def _shift_linear_setup(ctx, inputs, output) -> None:
    x, shift, sign, _ = inputs
    ctx.save_for_backward(shift, sign)
    ctx.x_dtype = x.dtype


def _shift_linear_backward(ctx, grad: torch.Tensor):
    shift, sign = ctx.saved_tensors
    w = shift_weight(shift, sign, grad.dtype)  # [n, k]
    grad_x = torch.matmul(grad, w).to(ctx.x_dtype)  # [b, m, n] @ [n, k] -> [b, m, k]
    return grad_x, None, None, None


torch.library.register_autograd(
    "shiftadd::shift_linear", _shift_linear_backward, setup_context=_shift_linear_setup
)


def matadd_reference(mask: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``out[b,m,n] = Σ_k mask[b,k,m]·v[b,k,n]``; equal to the masked sum for 0/1 masks."""
    return torch.matmul(mask.transpose(1, 2).to(v.dtype), v)


@torch.library.custom_op("shiftadd::matadd", mutates_args=())
def matadd(mask: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``out[b,m,n] = Σ_k (mask[b,k,m] ? v[b,k,n] : 0)`` for a 0/1 float mask."""
    if mask.dim() != 3 or v.dim() != 3 or mask.shape[:2] != v.shape[:2]:
        raise UsageError(f"expected mask[b,k,m] and v[b,k,n], got {tuple(mask.shape)} and {tuple(v.shape)}")
    b, k, m = mask.shape
    n = v.shape[2]
    if _tvm_ok(mask, v) and v.dtype == torch.float32:
        bits = mask != 0
        if not torch.equal(bits.to(mask.dtype), mask):
            raise UsageError("matadd mask must hold only 0 and 1 (binary codes); threshold it first")
        return _run_tvm("matadd", torch.float32, b, m, k, n, bits.to(torch.uint8), v)
    return matadd_reference(mask, v)


@matadd.register_fake
def _matadd_fake(mask: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return v.new_empty((v.shape[0], mask.shape[2], v.shape[2]))


def _matadd_setup(ctx, inputs, output) -> None:
    mask, v = inputs
    ctx.save_for_backward(mask, v)


def _matadd_backward(ctx, grad: torch.Tensor):
    mask, v = ctx.saved_tensors
    grad_mask = grad_v = None
    if ctx.needs_input_grad[0]:
        grad_mask = torch.matmul(v, grad.transpose(1, 2)).to(mask.dtype)  # [b,k,n] @ [b,n,m] -> [b,k,m]
    if ctx.needs_input_grad[1]:
        grad_v = torch.matmul(mask.to(grad.dtype), grad)  # [b,k,m] @ [b,m,n] -> [b,k,n]
    return grad_mask, grad_v


torch.library.register_autograd("shiftadd::matadd", _matadd_backward, setup_context=_matadd_setup)
