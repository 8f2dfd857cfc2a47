"""Bit-shift linear layer: power-of-two weights on fixed-point activations (ShiftAddViT, You et al.,
NeurIPS 2023; after DeepShift).

Weight parameterisation — the *Q mode* of DeepShift (Elhoushi et al., "DeepShift", 2021; ShiftAddViT
``deepshift/modules_q.py``), with a ternary sign:

* the layer keeps a real latent ``weight`` [out, in], exactly like ``nn.Linear``;
* forward uses ``W_q = t * 2^e`` with ``e = clamp(round(log2|W|), e_min, 0)`` and
  ``t = sign(W) * [|W| >= 2^(e_min - 1)]`` — a weight below half the smallest magnitude is nearer to 0 than
  to ``2^e_min`` and becomes an exact zero (so ``t`` is ternary, as in DeepShift-PS);
* both roundings are straight-through: the gradient of ``W_q`` is passed to ``W`` unchanged.

``weight_bits = b`` gives ``e_min = -(2^(b-1) - 2)``, ShiftAddViT's range (b=5 -> [-14, 0]): ``b - 1`` bits
hold 2^(b-1) codes, 2^(b-1)-1 exponents plus one code for zero, and one bit holds the sign.
Weights with ``|W| > 1`` saturate at ``±1`` (exponent 0, the largest representable) — the kernels only shift
right; pretrained ViT weights are almost all well inside (-1, 1), so this is rare; the latent weight keeps
its value and its gradient (no clamping of the stored parameter, unlike DeepShift's in-place clamp).

Why Q mode and not PS mode (separate trainable ``shift`` and ``sign`` tensors): the latent lives in the
weight domain with ``nn.Linear``'s shape, so (1) a converted layer and the Mult expert of a MoE start from
the same tensor and take the same optimiser settings, (2) a step of size ``lr`` moves a weight by ``lr``, so
rounding decisions keep changing at fine-tuning learning rates (PS-mode's log-domain latent moves an
exponent by ~``lr`` per Adam step and practically freezes at 1e-4), (3) the parameter count is that of
``nn.Linear``, not twice it.

Activations go onto the fixed-point grid ``floor(x * 2^F) / 2^F`` (DeepShift's ``round_to_fixed``, floor
rounding, straight-through), clamped so ``x * 2^F`` fits int32, always in fp32 — the original release did
this in fp16 under AMP, which overflows for |x| >= 1. The bias is added in fp32 after the shift-accumulate
(an addition, so it needs no fixed-point grid of its own).

Training runs the differentiable reference (``F.linear`` on the quantised tensors); eval runs the kernel op
``torch.ops.shiftadd.shift_linear`` (integer shift-and-add) when available, see :mod:`models.ops`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models import ops
from models.errors import ModelError


def min_exponent(weight_bits: int) -> int:
    """Smallest weight exponent for ``weight_bits`` (DeepShift ``modules.py``: -(2^(b-1) - 2))."""
    return -(2 ** (weight_bits - 1) - 2)


def power_of_two(weight: torch.Tensor, e_min: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(exponent, ternary sign) of the nearest-in-log2 power of two; no gradient (see module docstring)."""
    mag = weight.detach().abs()
    exponent = torch.log2(mag.clamp_min(2.0 ** (e_min - 2))).round().clamp(e_min, 0)  # [out, in]
    sign = torch.sign(weight.detach()) * (mag >= 2.0 ** (e_min - 1))  # [out, in] in {-1, 0, 1}
    return exponent, sign


def quantize_activation(x: torch.Tensor, frac_bits: int) -> torch.Tensor:
    """``floor(x * 2^F) / 2^F`` clamped to the int32 range, straight-through; x must be fp32."""
    scale = 2.0**frac_bits
    limit = 2.0 ** (31 - frac_bits)
    q = torch.clamp(torch.floor(x * scale) / scale, -limit, limit - 1.0 / scale)
    return x + (q - x).detach()


class ShiftLinear(nn.Module):
    """``y = x_q @ W_q^T + b`` with power-of-two ``W_q`` and fixed-point ``x_q`` (see module docstring)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, weight_bits: int = 5,
                 frac_bits: int = 16, device: torch.device | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        if not 2 <= weight_bits <= 8:
            raise ModelError(f"weight_bits={weight_bits} is outside 2..8; the packed shift is an int8")
        if not 0 <= frac_bits <= 30:
            raise ModelError(f"frac_bits={frac_bits} is outside 0..30; activations are int32 fixed point")
        self.in_features = in_features
        self.out_features = out_features
        self.weight_bits = weight_bits
        self.frac_bits = frac_bits
        self.e_min = min_exponent(weight_bits)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's initialisation, so an unconverted layer starts like a dense one.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_linear(cls, linear: nn.Linear, weight_bits: int = 5, frac_bits: int = 16) -> ShiftLinear:
        """Convert a dense layer: ``shift = round(log2|W|)``, ``sign = sign(W)`` (ShiftAddViT utils.py)."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, weight_bits, frac_bits,
                    device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(linear.weight)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def quantized_weight(self) -> torch.Tensor:
        """``sign * 2^exponent`` in fp32 with a straight-through gradient to ``weight``."""
        w = self.weight.float()
        exponent, sign = power_of_two(w, self.e_min)
        q = sign * torch.exp2(exponent)  # [out, in]
        return w + (q - w).detach()

    def packed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(right-shift amount int8 >= 0, sign int8 in {-1,0,1}, fp32 bias or None) for kernels/export.

        The weight is ``sign * 2^-shift``; zero weights have sign 0 and shift 0.
        """
        exponent, sign = power_of_two(self.weight.float(), self.e_min)
        shift = torch.where(sign != 0, -exponent, torch.zeros_like(exponent))
        bias = None if self.bias is None else self.bias.detach().float()
        return shift.to(torch.int8), sign.to(torch.int8), bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Fixed-point rounding must happen in fp32 (fp16 overflows at |x| >= 1 for F=16), so autocast is off.
        with ops.fp32_region(x.device.type):
            x = x.float()
            op = ops.resolve("shift_linear", self.training)
            if op is None:
                out = F.linear(quantize_activation(x, self.frac_bits), self.quantized_weight())
            else:
                out = self._kernel_forward(op, x)
            if self.bias is not None:
                out = out + self.bias.float()
        return out

    def _kernel_forward(self, op, x: torch.Tensor) -> torch.Tensor:
        shift, sign, _ = self.packed()
        lead = x.shape[:-1]
        x3 = x.reshape(1, -1, self.in_features) if x.dim() != 3 else x  # the op takes [b, m, k]
        out = op(x3.contiguous(), shift, sign, self.frac_bits)  # [b, m, n]
        return out.reshape(*lead, self.out_features)

    def op_counts(self, tokens: int) -> dict[str, int]:
        """Operations for ``tokens`` rows: one shift and one add per non-zero weight per row, the bias adds,
        and the scaling to/from fixed point (multiplying by 2^±F is a shift)."""
        nnz = int((self.packed()[1] != 0).sum())
        add = tokens * nnz + (tokens * self.out_features if self.bias is not None else 0)
        return {"mul": 0, "add": add, "shift": tokens * (nnz + self.in_features + self.out_features)}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, weight_bits={self.weight_bits}, frac_bits={self.frac_bits}, "
                f"exponent_range=[{self.e_min}, 0]")
