import numpy as np
import pytest
import torch
from torch import nn

from models import ops
from models.errors import ModelError
from models.shift import ShiftLinear, min_exponent


def numpy_shift_linear(x, w, b, e_min=-14, frac_bits=16):
    """ShiftAddViT's shift layer, written from the method text: Q16.16 floor input, PoT weight, fp64."""
    xq = np.floor(x.astype(np.float64) * 2.0**frac_bits) / 2.0**frac_bits
    mag = np.abs(w.astype(np.float64))
    exponent = np.clip(np.round(np.log2(np.maximum(mag, 1e-300))), e_min, 0)
    sign = np.sign(w) * (mag >= 2.0 ** (e_min - 1))
    return xq @ (sign * 2.0**exponent).T + (0 if b is None else b)


def wide_range_weights(out_f, in_f, seed=0):
    """Magnitudes 2^U(-17, 1): below the zero threshold, inside [-14, 0], and above 1."""
    g = torch.Generator().manual_seed(seed)
    mag = torch.exp2(torch.empty(out_f, in_f).uniform_(-17, 1, generator=g))
    sign = torch.where(torch.rand(out_f, in_f, generator=g) < 0.5, -1.0, 1.0)
    return mag * sign


def make_layer(in_f=24, out_f=10, bias=True):
    layer = ShiftLinear(in_f, out_f, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(wide_range_weights(out_f, in_f))
    return layer


@pytest.mark.parametrize("bias", [True, False])
def test_output_equals_formula(bias):
    layer = make_layer(bias=bias)
    x = torch.randn(3, 7, 24) * 4
    expected = numpy_shift_linear(x.numpy(), layer.weight.detach().numpy(),
                                  None if layer.bias is None else layer.bias.detach().numpy())
    out = layer(x)
    assert out.dtype == torch.float32 and out.shape == (3, 7, 10)
    np.testing.assert_allclose(out.detach().numpy(), expected, rtol=1e-5, atol=1e-5)
    with ops.kernel_ops("off"):  # eval on the reference path is the same function
        np.testing.assert_allclose(layer.eval()(x).detach().numpy(), expected, rtol=1e-5, atol=1e-5)


def test_exponent_range_follows_weight_bits():
    assert min_exponent(5) == -14
    assert min_exponent(4) == -6
    with pytest.raises(ModelError, match="weight_bits"):
        ShiftLinear(4, 4, weight_bits=9)


def test_from_linear_gives_exact_powers_of_two_in_range():
    dense = nn.Linear(32, 16)
    with torch.no_grad():
        dense.weight.copy_(wide_range_weights(16, 32, seed=1))
    layer = ShiftLinear.from_linear(dense)
    wq = layer.quantized_weight().detach().double()
    nz = wq != 0
    exponents = torch.log2(wq[nz].abs())
    assert torch.equal(exponents, exponents.round())  # exact powers of two
    assert exponents.min() >= -14 and exponents.max() <= 0
    w = dense.weight.detach().double()
    assert torch.equal(torch.sign(wq[nz]), torch.sign(w[nz]))  # sign = sign(W)
    # shift = round(log2|W|) inside the range; saturation above 1; zero below half the smallest magnitude
    inside = (w.abs() >= 2.0**-14) & (w.abs() <= 1)
    assert torch.equal(torch.log2(wq[inside].abs()), torch.log2(w[inside].abs()).round().clamp(-14, 0))
    assert torch.all(wq[w.abs() > 1.5].abs() == 1)
    assert torch.all(wq[w.abs() < 2.0**-15] == 0)
    assert torch.equal(layer.bias, dense.bias)


def test_packed_reconstructs_the_weight():
    layer = make_layer()
    shift, sign, bias = layer.packed()
    assert shift.dtype == torch.int8 and sign.dtype == torch.int8
    assert int(shift.min()) >= 0 and int(shift.max()) <= 14
    assert set(sign.unique().tolist()) <= {-1, 0, 1}
    rebuilt = sign.double() * torch.exp2(-shift.double())
    assert torch.equal(rebuilt, layer.quantized_weight().detach().double())
    assert torch.equal(bias, layer.bias.detach())


def test_straight_through_gradients():
    layer = make_layer()
    x = (torch.randn(5, 24) * 3).requires_grad_(True)
    g = torch.randn(5, 10)
    (layer(x) * g).sum().backward()
    xq = torch.floor(x.detach() * 2**16) / 2**16
    wq = layer.quantized_weight().detach()
    torch.testing.assert_close(layer.weight.grad, g.t() @ xq)  # d/dW passes d/dW_q through unchanged
    torch.testing.assert_close(x.grad, g @ wq)  # d/dx passes d/dx_q through unchanged
    torch.testing.assert_close(layer.bias.grad, g.sum(0))


def test_fixed_point_rounding_is_fp32_under_autocast():
    layer = make_layer()
    x = (torch.randn(4, 24) * 50).to(torch.bfloat16)  # |x| >> 1: the fp16 overflow case of the release
    expected = numpy_shift_linear(x.float().numpy(), layer.weight.detach().numpy(), layer.bias.detach().numpy())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.detach().numpy(), expected, rtol=1e-5, atol=1e-4)


def test_eval_op_path_equals_training_reference(op_registered):
    if not op_registered("shift_linear"):
        pytest.skip("kernels.torch_ops has no shift_linear op")
    layer = make_layer(in_f=48, out_f=12)
    x = torch.randn(2, 9, 48) * 3
    train_out = layer.train()(x).detach()
    with ops.kernel_ops("on"):
        eval_out = layer.eval()(x)
    # The op shifts each integer term right (floor): each of the k terms may differ by < 2^-16.
    bound = 48 * 2.0**-16 + 1e-5
    assert (eval_out - train_out).abs().max() <= bound
    # 2-D inputs go through the op as [1, m, k]
    with ops.kernel_ops("on"):
        flat = layer(x.reshape(-1, 48))
    torch.testing.assert_close(flat, eval_out.reshape(-1, 12))


def test_eval_through_tvm_kernel_matches_reference(op_registered):
    if not op_registered("shift_linear"):
        pytest.skip("kernels.torch_ops has no shift_linear op")
    from kernels.torch_ops import use_tvm

    layer = make_layer(in_f=8, out_f=4).eval()
    x = torch.randn(1, 3, 8) * 3
    with ops.kernel_ops("on"), use_tvm(True):
        tvm_out = layer(x)
    with ops.kernel_ops("off"):
        ref_out = layer(x)
    assert (tvm_out - ref_out).abs().max() <= 8 * 2.0**-16 + 1e-5


def test_op_counts_count_nonzero_weights():
    layer = make_layer()
    nnz = int((layer.quantized_weight() != 0).sum())
    counts = layer.op_counts(tokens=5)
    assert counts["mul"] == 0
    assert counts["add"] == 5 * nnz + 5 * 10
    assert counts["shift"] == 5 * (nnz + 24 + 10)
