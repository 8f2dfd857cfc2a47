"""Non-primitive work: the ops around the kernels (norms, GELU, softmax, residual adds, head reshapes,
hashing, MoE router and dispatch, patch embedding, head), each measurable in PyTorch and in TVM.

Every op is named like a profile primitive and sized by ``(b, m, k, n)``. Unless its entry says
otherwise an op reads ``x[b, m, k]`` and writes ``[b, m, n]``; the exceptions are spelt out below.

=============  ===============================  ======================================================
op             (b, m, k, n)                     work
=============  ===============================  ======================================================
layernorm      (1, tokens, C, C)                LayerNorm over the last axis (affine)
gelu           (1, tokens, H, H)                exact (erf) GELU
softmax        (B·heads, Nq, Nk, Nk)            ``softmax(scale·s)`` over the key axis (scale folded in)
sdpa           (B·heads, Nq, d, Nk)             the whole softmax attention ``softmax(q·kᵀ/√d)·v`` on
                                                ``q[b, Nq, d]``, ``k, v[b, Nk, d]`` -> ``[b, Nq, d]``: one
                                                fused ``F.scaled_dot_product_attention`` in PyTorch (what
                                                timm's ``Attention`` runs when ``fused_attn``), the two
                                                products and the softmax in TVM
residual       (1, tokens, C, C)                ``x + y``
bias           (1, tokens, n, n)                ``x + bias[n]`` (a Linear's bias after its kernel)
pos_embed      (B, N, C, C)                     ``x + pos[1, N, C]`` (the class-token concat is not timed)
split_heads    (B, N, W, G)                     ``[B, N, W] -> [B, G, N, W/G]`` (reshape + permute copy)
merge_heads    (B, N, W, G)                     ``[B, G, N, W/G] -> [B, N, W]``
hash           (B·heads, N, d, 2·nbits)         centre, L2-normalise, project ``[d, nbits]``, sign, and
                                                append the complement: codes ``[B·heads, N, 2·nbits]``
hamming_mix    (B·heads, N, d+1, d)             ``[V, 1]`` for the kv product, then ``num / z``, the mean
                                                and the alpha/beta mix of models/hamming.py
requant        (1, tokens, C_in, C_out)         float -> int32 ``floor(x·2^16)`` on ``[tokens, C_in]``
                                                and int32 -> float ``·2^-16`` on ``[tokens, C_out]``
                                                (around matshift)
quantize       (1, tokens, C_in, C_in)          ``floor(x·2^16)·2^-16`` on ``[tokens, C_in]``: the float
                                                input of matshift_decode put on the same fixed-point grid
router         (1, tokens, C_in, 2)             ``softmax(x·Wᵀ + b)`` with ``W[2, C_in]``
dispatch       (1, tokens, C_in, C_out)         argsort router scores, gather ``x`` rows in that order,
                                                concatenate the two experts' outputs and gather them back
embed          (1, B·patches, C_in·kh·kw, C)    a patch-embedding conv as the GEMM it is (+ bias)
conv           (1, B·pixels, C_in·kh·kw, C)     any other dense conv (PVT's spatial reduction), as a GEMM
head           (1, B, C, classes)               the classifier Linear (+ bias)
dwconv         (B, N, C, kh·kw)                 ``[B, N, C]`` -> depthwise conv (kh×kw, same padding)
                                                on the ``sqrt(N)×sqrt(N)`` grid -> ``[B, N, C]``
=============  ===============================  ======================================================

``embed`` and ``conv`` are timed as their im2col GEMM: exact for non-overlapping patches (kernel =
stride, a reshape away from a GEMM); for PVT's overlapping convs the compiled model runs this GEMM too
(:mod:`kernels.conv_kernels`) after an im2col gather the row does not time.

For each op: ``inputs`` makes seeded NumPy inputs, ``torch_fn`` is the PyTorch computation (what the
dense model runs), ``relax_fn`` emits the same computation into a Relax function that
:func:`compile_relax` builds for a target, and ``op_counts`` gives operations and DRAM bytes keyed
like :data:`dse.hardware.energy.UNIT_ENERGY_PJ` for the analytical energy model. Transcendentals are charged
as the polynomial a vectorised libm evaluates: ``exp`` 8 multiply-adds, ``erf`` 10 (Cephes-style
rational/polynomial approximations of that degree).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

import kernels
from dse.errors import UnknownNameError, UsageError
from dse.hardware.energy import UNIT_ENERGY_PJ
from kernels import relax_pipeline, targets
from kernels.relax_pipeline import fixed_grid_relax
from kernels.torch_ops import fixed_grid, quantize_fixed

if TYPE_CHECKING:
    import tvm

log = logging.getLogger(__name__)

FRAC_BITS = 16  # the fixed point of ShiftLinear / matshift (kernels.primitives.FRAC_BITS)
_EXP_OPS = 8  # multiply-adds per exp (module docstring)
_ERF_OPS = 10  # multiply-adds per erf
_SOFTMAX_SCALE = 0.125  # any constant: the cost does not depend on it

Shape = tuple[int, int, int, int]


@dataclasses.dataclass(frozen=True)
class NonPrimOp:
    """One non-primitive op; see the module docstring for its ``(b, m, k, n)``."""

    name: str
    summary: str
    inputs: Callable[[Shape, np.random.Generator], list[np.ndarray]]
    torch_fn: Callable[..., Any]  # (shape, *tensors) -> tensor or tuple of tensors
    relax_fn: Callable[..., Any]  # (emit, shape, *relax vars) -> relax expr (or tuple of exprs)
    op_counts: Callable[[Shape], dict[str, int]]
    check: Callable[[Shape], str | None] = lambda s: None  # a reason the shape is invalid, or None


_REGISTRY: dict[str, NonPrimOp] = {}


def register(op: NonPrimOp) -> NonPrimOp:
    _REGISTRY[op.name] = op
    return op


def names() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str) -> NonPrimOp:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownNameError(f"unknown non-primitive op {name!r}; known: {', '.join(names())}") from None


def check_shape(name: str, shape: Sequence[int]) -> Shape:
    op = get(name)
    b, m, k, n = (int(v) for v in shape)
    if min(b, m, k, n) < 1:
        raise UsageError(f"{name}: sizes (b, m, k, n) = {(b, m, k, n)} must be positive")
    reason = op.check((b, m, k, n))
    if reason:
        raise UsageError(f"{name}: invalid shape (b, m, k, n) = {(b, m, k, n)}: {reason}")
    return b, m, k, n


# ---------------------------------------------------------------------------------------------------
# helpers


def _f32(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _bytes(*element_counts: int, itemsize: int = 4) -> int:
    return sum(element_counts) * itemsize


def _counts(mult: int = 0, add: int = 0, dram: int = 0) -> dict[str, int]:
    out = {"fp32_mult": int(mult), "fp32_add": int(add), "dram_byte": int(dram)}
    return {key: value for key, value in out.items() if value}


def _const(value: float, dtype: str = "float32") -> Any:
    from tvm import relax

    return relax.const(value, dtype)


def _grid(tokens: int) -> tuple[int, int]:
    """The square grid of a PVT stage (tokens = side²), else one row."""
    side = math.isqrt(tokens)
    return (side, side) if side * side == tokens else (1, tokens)


# ---------------------------------------------------------------------------------------------------
# element-wise and row-wise ops


def _ln_torch(shape: Shape, x, gamma, beta):
    import torch.nn.functional as F

    return F.layer_norm(x, (shape[2],), gamma, beta, 1e-6)


def _ln_relax(emit, shape: Shape, x, gamma, beta):
    from tvm import relax

    return relax.op.nn.layer_norm(x, gamma, beta, axes=[-1], epsilon=1e-6)


register(NonPrimOp(
    name="layernorm",
    summary="LayerNorm over the last axis of [b, m, k]",
    inputs=lambda s, rng: [_f32(rng, s[0], s[1], s[2]), _f32(rng, s[2]), _f32(rng, s[2])],
    torch_fn=_ln_torch,
    relax_fn=_ln_relax,
    # mean, centre, variance, normalise, affine: 4 adds and 3 multiplies per element, one rsqrt per row
    op_counts=lambda s: _counts(3 * s[0] * s[1] * s[2] + 8 * s[0] * s[1], 4 * s[0] * s[1] * s[2],
                                _bytes(2 * s[0] * s[1] * s[2], 2 * s[2])),
    check=lambda s: None if s[2] == s[3] else "layernorm keeps the width (k == n)",
))


def _gelu_torch(shape: Shape, x):
    import torch.nn.functional as F

    return F.gelu(x)


register(NonPrimOp(
    name="gelu",
    summary="exact GELU x·Φ(x) on [b, m, k]",
    inputs=lambda s, rng: [_f32(rng, s[0], s[1], s[2])],
    torch_fn=_gelu_torch,
    relax_fn=lambda emit, s, x: __import__("tvm").relax.op.nn.gelu(x),
    op_counts=lambda s: _counts((3 + _ERF_OPS) * s[0] * s[1] * s[2], (1 + _ERF_OPS) * s[0] * s[1] * s[2],
                                _bytes(2 * s[0] * s[1] * s[2])),
    check=lambda s: None if s[2] == s[3] else "gelu keeps the width (k == n)",
))


def _softmax_torch(shape: Shape, x):
    import torch

    return torch.softmax(x * _SOFTMAX_SCALE, dim=-1)


def _softmax_relax(emit, shape: Shape, x):
    from tvm import relax

    scaled = emit(relax.op.multiply(x, _const(_SOFTMAX_SCALE)))
    return relax.op.nn.softmax(scaled, axis=-1)


register(NonPrimOp(
    name="softmax",
    summary="softmax(scale·s) over the last axis of the scores [b, m, k]",
    inputs=lambda s, rng: [_f32(rng, s[0], s[1], s[2], scale=4.0)],
    torch_fn=_softmax_torch,
    relax_fn=_softmax_relax,
    # scale, max, subtract, exp, sum, divide
    op_counts=lambda s: _counts((2 + _EXP_OPS) * s[0] * s[1] * s[2], (3 + _EXP_OPS) * s[0] * s[1] * s[2],
                                _bytes(2 * s[0] * s[1] * s[2])),
    check=lambda s: None if s[2] == s[3] else "softmax keeps the width (k == n)",
))


register(NonPrimOp(
    name="residual",
    summary="residual add x + y on [b, m, k]",
    inputs=lambda s, rng: [_f32(rng, s[0], s[1], s[2]), _f32(rng, s[0], s[1], s[2])],
    torch_fn=lambda shape, x, y: x + y,
    relax_fn=lambda emit, s, x, y: __import__("tvm").relax.op.add(x, y),
    op_counts=lambda s: _counts(0, s[0] * s[1] * s[2], _bytes(3 * s[0] * s[1] * s[2])),
    check=lambda s: None if s[2] == s[3] else "residual keeps the width (k == n)",
))

register(NonPrimOp(
    name="bias",
    summary="bias add x + bias[k] on [b, m, k]",
    inputs=lambda s, rng: [_f32(rng, s[0], s[1], s[2]), _f32(rng, s[2])],
    torch_fn=lambda shape, x, bias: x + bias,
    relax_fn=lambda emit, s, x, bias: __import__("tvm").relax.op.add(x, bias),
    op_counts=lambda s: _counts(0, s[0] * s[1] * s[2], _bytes(2 * s[0] * s[1] * s[2], s[2])),
    check=lambda s: None if s[2] == s[3] else "bias keeps the width (k == n)",
))

register(NonPrimOp(
    name="pos_embed",
    summary="position embedding add x[B, N, C] + pos[1, N, C]",
    inputs=lambda s, rng: [_f32(rng, s[0], s[1], s[2]), _f32(rng, 1, s[1], s[2])],
    torch_fn=lambda shape, x, pos: x + pos,
    relax_fn=lambda emit, s, x, pos: __import__("tvm").relax.op.add(x, pos),
    op_counts=lambda s: _counts(0, s[0] * s[1] * s[2], _bytes(2 * s[0] * s[1] * s[2], s[1] * s[2])),
    check=lambda s: None if s[2] == s[3] else "pos_embed keeps the width (k == n)",
))


def _sdpa_inputs(s: Shape, rng: np.random.Generator) -> list[np.ndarray]:
    b, m, d, nk = s
    return [_f32(rng, b, m, d), _f32(rng, b, nk, d), _f32(rng, b, nk, d)]


def _sdpa_torch(shape: Shape, q, k, v):
    import torch.nn.functional as F

    # [1, b, N, d]: 4-D, as timm passes [B, H, N, d]; on CPU this is the flash kernel, which never stores the scores
    return F.scaled_dot_product_attention(q[None], k[None], v[None])[0]


def _sdpa_relax(emit, shape: Shape, q, k, v):
    from tvm import relax

    scores = emit(relax.op.matmul(q, relax.op.permute_dims(k, [0, 2, 1])))  # [b, N, Nk]
    scaled = emit(relax.op.multiply(scores, _const(shape[2] ** -0.5)))
    return relax.op.matmul(emit(relax.op.nn.softmax(scaled, axis=-1)), v)  # [b, N, d]


def _sdpa_counts(s: Shape) -> dict[str, int]:
    b, m, d, nk = s
    scores = b * m * nk  # two products of b·m·nk·d multiply-adds around a softmax of the scores
    return _counts(2 * scores * d + (2 + _EXP_OPS) * scores, 2 * scores * d + (3 + _EXP_OPS) * scores,
                   _bytes(b * m * d, 2 * b * nk * d, b * m * d))  # fused: the scores never reach DRAM


register(NonPrimOp(
    name="sdpa",
    summary="softmax attention softmax(q·kᵀ/√d)·v: (b, m, k, n) = (B·heads, Nq, d, Nk)",
    inputs=_sdpa_inputs,
    torch_fn=_sdpa_torch,
    relax_fn=_sdpa_relax,
    op_counts=_sdpa_counts,
))


# ---------------------------------------------------------------------------------------------------
# head reshapes


def _split_torch(shape: Shape, x):
    b, m, k, n = shape
    return x.view(b, m, n, k // n).permute(0, 2, 1, 3).contiguous()  # [B, G, N, W/G]


def _split_relax(emit, shape: Shape, x):
    from tvm import relax

    b, m, k, n = shape
    heads = emit(relax.op.reshape(x, (b, m, n, k // n)))
    return relax.op.permute_dims(heads, [0, 2, 1, 3])


def _merge_torch(shape: Shape, x):
    b, m, k, n = shape
    return x.permute(0, 2, 1, 3).reshape(b, m, k)  # [B, N, W] (a copy: the permuted view is not contiguous)


def _merge_relax(emit, shape: Shape, x):
    from tvm import relax

    b, m, k, n = shape
    tokens = emit(relax.op.permute_dims(x, [0, 2, 1, 3]))
    return relax.op.reshape(tokens, (b, m, k))


def _heads_check(s: Shape) -> str | None:
    return None if s[2] % s[3] == 0 else "the width k must be a multiple of the head count n"


register(NonPrimOp(
    name="split_heads",
    summary="[B, N, W] -> [B, G, N, W/G] with (b, m, k, n) = (B, N, W, G)",
    inputs=lambda s, rng: [_f32(rng, s[0], s[1], s[2])],
    torch_fn=_split_torch,
    relax_fn=_split_relax,
    op_counts=lambda s: _counts(0, 0, _bytes(2 * s[0] * s[1] * s[2])),
    check=_heads_check,
))

register(NonPrimOp(
    name="merge_heads",
    summary="[B, G, N, W/G] -> [B, N, W] with (b, m, k, n) = (B, N, W, G)",
    inputs=lambda s, rng: [_f32(rng, s[0], s[3], s[1], s[2] // s[3])],
    torch_fn=_merge_torch,
    relax_fn=_merge_relax,
    op_counts=lambda s: _counts(0, 0, _bytes(2 * s[0] * s[1] * s[2])),
    check=_heads_check,
))


# ---------------------------------------------------------------------------------------------------
# Hamming attention around the two matadd products (models/hamming.py)


def _hash_inputs(s: Shape, rng: np.random.Generator) -> list[np.ndarray]:
    b, m, k, n = s
    return [_f32(rng, b, m, k), _f32(rng, b, 1, k, scale=0.1), _f32(rng, b, k, n // 2)]


def _hash_torch(shape: Shape, t, center, proj):
    import torch
    import torch.nn.functional as F

    z = torch.matmul(F.normalize(t - center, dim=-1), proj)  # [b, m, d] @ [b, d, nb] -> [b, m, nb]
    hard = (z > 0).to(z.dtype)
    return torch.cat([hard, 1.0 - hard], dim=-1)  # [b, m, 2nb]


def _hash_relax(emit, shape: Shape, t, center, proj):
    from tvm import relax

    centred = emit(relax.op.subtract(t, center))
    sq = emit(relax.op.sum(relax.op.multiply(centred, centred), axis=[-1], keepdims=True))
    unit = emit(relax.op.multiply(centred, relax.op.rsqrt(relax.op.add(sq, _const(1e-12)))))
    z = emit(relax.op.matmul(unit, proj))  # [b, m, nb]
    bits = emit(relax.op.astype(relax.op.greater(z, _const(0.0)), "uint8"))  # the matadd kernel's mask type
    return relax.op.concat([bits, relax.op.subtract(relax.const(1, "uint8"), bits)], axis=-1)


def _hash_counts(s: Shape) -> dict[str, int]:
    b, m, d, n = s
    nb = n // 2
    return _counts(b * m * d * (nb + 2), b * m * d * (nb + 2) + b * m * nb,
                   _bytes(b * m * d, b * d * nb) + b * m * n)  # codes are bytes


register(NonPrimOp(
    name="hash",
    summary="binary codes of queries or keys: (b, m, k, n) = (B·heads, N, d, 2·nbits)",
    inputs=_hash_inputs,
    torch_fn=_hash_torch,
    relax_fn=_hash_relax,
    op_counts=_hash_counts,
    check=lambda s: None if s[3] % 2 == 0 else "n = 2·nbits must be even",
))


def _mix_inputs(s: Shape, rng: np.random.Generator) -> list[np.ndarray]:
    b, m, k, n = s
    qkv = _f32(rng, b, m, k)
    qkv[..., n] = np.abs(qkv[..., n]) * 10 + 1  # the normaliser z > 0
    return [qkv, _f32(rng, b, m, n), _f32(rng, b, 1, 1), _f32(rng, b, 1, 1)]


def _mix_torch(shape: Shape, qkv, v, beta, alpha):
    import torch

    b, m, k, d = shape
    v1 = torch.cat([v, v.new_ones(b, m, 1)], dim=-1)  # [b, m, d+1]: the kv product's values
    num, z = qkv[..., :d], qkv[..., d:]
    o = num / z.clamp_min(1.0)
    v_mean = v.mean(dim=1, keepdim=True)  # [b, 1, d]
    out = v_mean + beta * (o - v_mean) + alpha * (v - v_mean)
    return out, v1


def _mix_relax(emit, shape: Shape, qkv, v, beta, alpha):
    from tvm import relax

    b, m, k, d = shape
    v1 = emit(relax.op.concat([v, relax.op.ones((b, m, 1), "float32")], axis=-1))
    num = emit(relax.op.strided_slice(qkv, axes=[2], begin=[0], end=[d]))
    z = emit(relax.op.strided_slice(qkv, axes=[2], begin=[d], end=[d + 1]))
    o = emit(relax.op.divide(num, relax.op.maximum(z, _const(1.0))))
    v_mean = emit(relax.op.mean(v, axis=[1], keepdims=True))
    mixed = emit(relax.op.add(v_mean, relax.op.multiply(beta, relax.op.subtract(o, v_mean))))
    out = emit(relax.op.add(mixed, relax.op.multiply(alpha, relax.op.subtract(v, v_mean))))
    return relax.Tuple([out, v1])


register(NonPrimOp(
    name="hamming_mix",
    summary="[V, 1] and the normalised alpha/beta mix: (b, m, k, n) = (B·heads, N, d+1, d)",
    inputs=_mix_inputs,
    torch_fn=_mix_torch,
    relax_fn=_mix_relax,
    op_counts=lambda s: _counts(4 * s[0] * s[1] * s[3], 6 * s[0] * s[1] * s[3],
                                _bytes(2 * s[0] * s[1] * s[2], 3 * s[0] * s[1] * s[3])),
    check=lambda s: None if s[2] == s[3] + 1 else "k must be d + 1 and n = d",
))


# ---------------------------------------------------------------------------------------------------
# shift layers and the MoE


def _requant_inputs(s: Shape, rng: np.random.Generator) -> list[np.ndarray]:
    b, m, k, n = s
    acc = rng.integers(-(2**24), 2**24, size=(b, m, n), dtype=np.int32)
    return [_f32(rng, b, m, k, scale=2.0), acc]


def _requant_torch(shape: Shape, x, acc):
    import torch


    return quantize_fixed(x, FRAC_BITS), acc.to(torch.float32) * (2.0**-FRAC_BITS)


def _requant_relax(emit, shape: Shape, x, acc):
    from tvm import relax


    fixed = emit(relax.op.astype(fixed_grid_relax(x, FRAC_BITS), "int32"))
    back = emit(relax.op.multiply(relax.op.astype(acc, "float32"), _const(2.0**-FRAC_BITS)))
    return relax.Tuple([fixed, back])


register(NonPrimOp(
    name="requant",
    summary="fixed-point conversions around matshift: x[b, m, k] -> int32, acc[b, m, n] -> float",
    inputs=_requant_inputs,
    torch_fn=_requant_torch,
    relax_fn=_requant_relax,
    op_counts=lambda s: _counts(s[0] * s[1] * (s[2] + s[3]), 2 * s[0] * s[1] * s[2],
                                _bytes(2 * s[0] * s[1] * s[2], 2 * s[0] * s[1] * s[3])),
))


def _quantize_torch(shape: Shape, x):

    return fixed_grid(x, FRAC_BITS) * (2.0**-FRAC_BITS)


def _quantize_relax(emit, shape: Shape, x):
    from tvm import relax


    return relax.op.multiply(emit(fixed_grid_relax(x, FRAC_BITS)), _const(2.0**-FRAC_BITS))


register(NonPrimOp(
    name="quantize",
    summary="matshift_decode's input on the fixed-point grid: floor(x·2^16)·2^-16 on [b, m, k] (fp32)",
    inputs=lambda s, rng: [_f32(rng, s[0], s[1], s[2], scale=2.0)],
    torch_fn=_quantize_torch,
    relax_fn=_quantize_relax,
    op_counts=lambda s: _counts(2 * s[0] * s[1] * s[2], 2 * s[0] * s[1] * s[2], _bytes(2 * s[0] * s[1] * s[2])),
    check=lambda s: None if s[2] == s[3] else "quantize keeps the width (k == n)",
))


def _gemm_inputs(s: Shape, rng: np.random.Generator) -> list[np.ndarray]:
    b, m, k, n = s
    return [_f32(rng, b, m, k), _f32(rng, n, k, scale=k**-0.5), _f32(rng, n)]


def _gemm_torch(shape: Shape, x, w, bias):
    import torch.nn.functional as F

    return F.linear(x, w, bias)


def _gemm_relax(emit, shape: Shape, x, w, bias):
    from tvm import relax

    return relax.op.add(emit.linear(x, w, shape), bias)


def _gemm_counts(s: Shape) -> dict[str, int]:
    b, m, k, n = s
    return _counts(b * m * k * n, b * m * k * n, _bytes(b * m * k, n * k, n, b * m * n))


for _name, _summary in (
    ("embed", "patch embedding as a GEMM: [b, m, k] · W[n, k]ᵀ + bias"),
    ("conv", "a dense conv as a GEMM: [b, m, k] · W[n, k]ᵀ + bias"),
    ("head", "classifier: [b, m, k] · W[n, k]ᵀ + bias"),
):
    register(NonPrimOp(_name, _summary, _gemm_inputs, _gemm_torch, _gemm_relax, _gemm_counts))


def _router_counts(s: Shape) -> dict[str, int]:
    counts = _gemm_counts(s)
    rows = s[0] * s[1] * s[3]  # softmax over the n logits: scale-free, exp, sum, divide
    counts["fp32_mult"] += (1 + _EXP_OPS) * rows
    counts["fp32_add"] += (2 + _EXP_OPS) * rows
    return counts


def _router_torch(shape: Shape, x, w, bias):
    import torch
    import torch.nn.functional as F

    return torch.softmax(F.linear(x, w, bias), dim=-1)


def _router_relax(emit, shape: Shape, x, w, bias):
    from tvm import relax

    return relax.op.nn.softmax(emit(_gemm_relax(emit, shape, x, w, bias)), axis=-1)


register(NonPrimOp(
    name="router",
    summary="MoE router softmax(x·Wᵀ + b) on [b, m, k] with W[n, k] (n = 2 experts)",
    inputs=_gemm_inputs,
    torch_fn=_router_torch,
    relax_fn=_router_relax,
    op_counts=lambda s: _router_counts(s),
))


def _dispatch_inputs(s: Shape, rng: np.random.Generator) -> list[np.ndarray]:
    b, m, k, n = s
    tokens = b * m
    half = tokens // 2
    p = rng.random(tokens).astype(np.float32)
    return [_f32(rng, tokens, k), _f32(rng, half, n), _f32(rng, tokens - half, n), p]


def _dispatch_torch(shape: Shape, x, y_mult, y_shift, p):
    import torch

    order = torch.argsort(p, descending=True)  # [T] most Mult-inclined first (models/moe.py)
    inverse = torch.argsort(order)
    xs = x.index_select(0, order)  # [T, k] gathered for the experts
    y = torch.cat([y_mult, y_shift], dim=0).index_select(0, inverse)  # [T, n] back in token order
    return xs, y


def _dispatch_relax(emit, shape: Shape, x, y_mult, y_shift, p):
    from tvm import relax

    order = emit(relax.op.argsort(p, axis=0, descending=True, dtype="int64"))
    inverse = emit(relax.op.argsort(order, axis=0, dtype="int64"))
    xs = emit(relax.op.take(x, order, axis=0))
    ys = emit(relax.op.concat([y_mult, y_shift], axis=0))
    return relax.Tuple([xs, emit(relax.op.take(ys, inverse, axis=0))])


def _dispatch_counts(s: Shape) -> dict[str, int]:
    b, m, k, n = s
    tokens = b * m
    sort = 2 * tokens * max(1, math.ceil(math.log2(max(tokens, 2))))  # two comparison sorts
    return _counts(0, sort, _bytes(2 * tokens * k, 4 * tokens * n, 3 * tokens))


register(NonPrimOp(
    name="dispatch",
    summary="MoE static dispatch: argsort, gather x[b·m, k], concat the experts' [·, n] outputs, gather back",
    inputs=_dispatch_inputs,
    torch_fn=_dispatch_torch,
    relax_fn=_dispatch_relax,
    op_counts=_dispatch_counts,
))


# ---------------------------------------------------------------------------------------------------
# PVT's depthwise conv inside the MLP


def _dw_inputs(s: Shape, rng: np.random.Generator) -> list[np.ndarray]:
    b, m, k, n = s
    ks = math.isqrt(n)
    return [_f32(rng, b, m, k), _f32(rng, k, 1, ks, ks, scale=1 / ks), _f32(rng, k)]


def _dw_torch(shape: Shape, x, w, bias):
    import torch.nn.functional as F

    b, m, c, n = shape
    h, wd = _grid(m)
    ks = math.isqrt(n)
    img = x.transpose(1, 2).reshape(b, c, h, wd)  # [B, C, H, W]
    out = F.conv2d(img, w, bias, padding=ks // 2, groups=c)
    return out.flatten(2).transpose(1, 2).contiguous()  # [B, N, C]


def _dw_relax(emit, shape: Shape, x, w, bias):
    from tvm import relax

    b, m, c, n = shape
    h, wd = _grid(m)
    ks = math.isqrt(n)
    img = emit(relax.op.reshape(relax.op.permute_dims(x, [0, 2, 1]), (b, c, h, wd)))
    out = emit(relax.op.nn.conv2d(img, w, padding=ks // 2, groups=c))
    out = emit(relax.op.add(out, relax.op.reshape(bias, (1, c, 1, 1))))
    return relax.op.permute_dims(relax.op.reshape(out, (b, c, m)), [0, 2, 1])


register(NonPrimOp(
    name="dwconv",
    summary="depthwise conv on the token grid: (b, m, k, n) = (B, N, C, kh·kw)",
    inputs=_dw_inputs,
    torch_fn=_dw_torch,
    relax_fn=_dw_relax,
    op_counts=lambda s: _counts(s[0] * s[1] * s[2] * s[3], s[0] * s[1] * s[2] * s[3],
                                _bytes(4 * s[0] * s[1] * s[2], s[2] * (s[3] + 1))),
    check=lambda s: None if math.isqrt(s[3]) ** 2 == s[3] and math.isqrt(s[3]) % 2 == 1
    else "n must be the square of an odd kernel size",
))


# ---------------------------------------------------------------------------------------------------
# building, running, energy


def estimate_energy_mj(name: str, shape: Sequence[int], unit_energy_pj: dict[str, float] | None = None) -> float:
    """Analytical energy of one call (op counts × 45 nm unit energies of :mod:`dse.hardware.energy`)."""
    units = dict(unit_energy_pj or UNIT_ENERGY_PJ)
    counts = get(name).op_counts(check_shape(name, shape))
    return math.fsum(count * units[key] * 1e-9 for key, count in counts.items())  # pJ -> mJ


def make_inputs(name: str, shape: Sequence[int], seed: int = 0) -> list[np.ndarray]:
    shape = check_shape(name, shape)
    return get(name).inputs(shape, np.random.default_rng(seed))


def torch_callable(name: str, shape: Sequence[int], device: str = "cpu", seed: int = 0) -> Callable[[], Any]:
    """A no-argument function running the op in PyTorch on prepared inputs (under inference mode)."""
    import torch

    shape = check_shape(name, shape)
    op = get(name)
    tensors = [torch.from_numpy(a).to(device) for a in make_inputs(name, shape, seed)]

    def run() -> Any:
        with torch.inference_mode():
            return op.torch_fn(shape, *tensors)

    return run


class _Emitter:
    """``bb.emit`` for the ops' Relax functions, plus :meth:`linear`: a GEMM as the exporter compiles it.

    The exporter turns every GEMM of the traced model (Linears, the patch embedding, the router) into a
    ``call_tir`` of the scheduled ``matmul`` kernel (``dse.deploy.graph``), so a GEMM-shaped op is timed through
    that same kernel when a target is known; without one it is a plain Relax ``matmul``.
    """

    def __init__(self, bb: Any, target: Any = None):
        self.bb, self.target = bb, target

    def __call__(self, expr: Any) -> Any:
        return self.bb.emit(expr)

    def linear(self, x: Any, w: Any, shape: Shape) -> Any:
        """``x[b, m, k] · w[n, k]ᵀ`` -> [b, m, n]."""
        from tvm import relax

        if self.target is None:
            return self.bb.emit(relax.op.matmul(x, relax.op.permute_dims(w, [1, 0])))
        b, m, k, n = shape
        func = kernels.build("matmul", b=b, m=m, k=k, n=n, target=self.target).primfunc
        func = (func.without_attr("global_symbol").with_attr("tirx.is_scheduled", True)
                .with_attr("op_pattern", 8))  # opaque, as in the exported graph
        gv = self.bb.add_func(func, f"shiftadd_matmul_b{b}_m{m}_k{k}_n{n}")
        return self.bb.emit(relax.call_tir(gv, [x, w], relax.TensorType((b, m, n), "float32")))


def relax_module(name: str, shape: Sequence[int], target: Any = None) -> tvm.IRModule:
    """The op as a Relax function ``main`` taking the op's inputs (in :func:`make_inputs` order); with a
    ``target``, GEMMs call the scheduled ``matmul`` kernel as in an exported model."""
    from tvm import relax

    shape = check_shape(name, shape)
    op = get(name)
    arrays = make_inputs(name, shape)
    bb = relax.BlockBuilder()
    params = [relax.Var(f"in{i}", relax.TensorType(a.shape, str(a.dtype))) for i, a in enumerate(arrays)]
    with bb.function("main", params):
        with bb.dataflow():
            out = op.relax_fn(_Emitter(bb, target), shape, *params)
            result = bb.emit_output(out)
        bb.emit_func_output(result)
    return bb.get()


def compile_relax(mod: tvm.IRModule, target: Any) -> Any:
    """Compile a Relax module as the exporter does (:func:`kernels.relax_pipeline.compile_relax`), so the profile times
    what the exporter builds."""
    return relax_pipeline.compile_relax(mod, target)


@dataclasses.dataclass
class CompiledOp:
    """A non-primitive op compiled for a target, with device inputs ready."""

    name: str
    shape: Shape
    executable: Any
    target: Any

    def __post_init__(self) -> None:
        self._vm: Any = None
        self._args: list[Any] | None = None
        self._dev: Any = None

    def _ready(self) -> tuple[Any, list[Any]]:
        if self._vm is None:
            import tvm
            from tvm import relax

            self._dev = targets.device_for(self.target)
            self._vm = relax.VirtualMachine(self.executable, self._dev)
            self._args = [tvm.runtime.tensor(a, self._dev) for a in make_inputs(self.name, self.shape)]
        assert self._args is not None
        return self._vm, self._args

    def run(self) -> Any:
        vm, args = self._ready()
        return vm["main"](*args)

    def sync(self) -> None:
        self._ready()
        self._dev.sync()

    def time(self, *, repeat: int, min_repeat_ms: float) -> Any:
        """Median/p90 of ``repeat`` repeats, each at least ``min_repeat_ms`` of back-to-back calls
        (TVM ``time_evaluator``, as ``CompiledKernel.time``)."""
        vm, args = self._ready()
        vm["main"](*args)  # warm-up
        evaluator = vm.time_evaluator("main", self._dev, number=1, repeat=int(repeat),
                                      min_repeat_ms=int(round(min_repeat_ms)))
        return kernels.Timing.from_seconds(list(evaluator(*args).results), 1)


def build_op(name: str, shape: Sequence[int], target: Any) -> CompiledOp:
    """Compile op ``name`` at ``shape`` for ``target`` (compiles without a device; runs need one)."""
    shape = check_shape(name, shape)
    tgt = kernels.resolve_target(target)
    return CompiledOp(name, shape, compile_relax(relax_module(name, shape, tgt), tgt), tgt)
