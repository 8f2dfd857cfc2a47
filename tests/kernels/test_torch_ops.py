"""The shiftadd:: custom ops: opcheck, TVM path vs PyTorch reference, gradients, export."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kernels
from kernels import torch_ops
from kernels.torch_ops import use_tvm


def _shift_args(b: int, m: int, k: int, n: int, seed: int = 0):
    x, shift, sign = kernels.random_inputs("matshift", b, m, k, n, seed=seed)
    return torch.from_numpy(x), torch.from_numpy(shift), torch.from_numpy(sign)


def _matadd_args(b: int, m: int, k: int, n: int, seed: int = 0):
    mask, v = kernels.random_inputs("matadd", b, m, k, n, seed=seed)
    return torch.from_numpy(mask).float(), torch.from_numpy(v)


def test_matshift_tvm_matches_numpy_and_torch_reference() -> None:
    x, shift, sign = _shift_args(2, 11, 37, 19)
    with use_tvm(True):
        out = torch.ops.shiftadd.matshift(x, shift, sign)
    with use_tvm(False):
        ref = torch.ops.shiftadd.matshift(x, shift, sign)
    assert out.dtype == torch.int32 and out.shape == (2, 11, 19)
    expected = kernels.reference("matshift", x.numpy(), shift.numpy(), sign.numpy())
    np.testing.assert_array_equal(out.numpy(), expected)
    np.testing.assert_array_equal(ref.numpy(), expected)


def test_matshift_handles_views_and_offsets() -> None:
    x, shift, sign = _shift_args(2, 12, 16, 9)
    x_view = torch.cat([x, x], dim=2)[:, :, 16:]  # non-contiguous
    x_offset = torch.cat([x.reshape(-1)[:1], x.reshape(-1)])[1:].view_as(x)  # 4-byte misaligned
    expected = kernels.reference("matshift", x.numpy(), shift.numpy(), sign.numpy())
    with use_tvm(True):
        np.testing.assert_array_equal(torch.ops.shiftadd.matshift(x_view, shift, sign).numpy(), expected)
        np.testing.assert_array_equal(torch.ops.shiftadd.matshift(x_offset, shift, sign).numpy(), expected)


def test_shift_linear_forward_matches_fixed_point_formula() -> None:
    b, m, k, n = 2, 7, 24, 13
    _, shift, sign = _shift_args(b, m, k, n, seed=2)
    x = torch.randn(b, m, k) * 2
    frac = 12
    with use_tvm(True):
        out = torch.ops.shiftadd.shift_linear(x, shift, sign, frac)
    x_int = np.floor(x.numpy().astype(np.float64) * 2**frac).astype(np.int32)
    expected = kernels.reference("matshift", x_int, shift.numpy(), sign.numpy()) / 2.0**frac
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-6, atol=0)
    # and it approximates the float linear layer to k floor errors of 2^-F
    w = torch_ops.shift_weight(shift, sign, torch.float64)
    dense = x.double() @ w.t()
    assert (out.double() - dense).abs().max() <= (k + 1) * 2.0**-frac


def test_shift_linear_backward_is_straight_through() -> None:
    b, m, k, n = 2, 5, 12, 6
    _, shift, sign = _shift_args(b, m, k, n, seed=3)
    x = torch.randn(b, m, k, requires_grad=True)
    g = torch.randn(b, m, n)
    torch.ops.shiftadd.shift_linear(x, shift, sign, 16).backward(g)
    w = sign.double() * 2.0 ** -shift.double()
    np.testing.assert_allclose(x.grad.numpy(), (g.double() @ w).numpy(), rtol=1e-5, atol=1e-6)


def test_matadd_forward_tvm_and_reference() -> None:
    mask, v = _matadd_args(3, 17, 16, 20)
    with use_tvm(True):
        out = torch.ops.shiftadd.matadd(mask, v)
    with use_tvm(False):
        ref = torch.ops.shiftadd.matadd(mask, v)
    expected = kernels.reference("matadd", mask.numpy().astype(np.uint8), v.numpy())
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ref.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_matadd_rejects_non_binary_mask_on_tvm_path() -> None:
    mask, v = _matadd_args(1, 4, 5, 6)
    with use_tvm(True), pytest.raises(kernels.UsageError, match="0 and 1"):
        torch.ops.shiftadd.matadd(mask * 0.5, v)


def test_matadd_backward_formulas() -> None:
    mask, v = _matadd_args(2, 6, 9, 5, seed=4)
    mask.requires_grad_(True)
    v.requires_grad_(True)
    g = torch.randn(2, 6, 5)
    torch.ops.shiftadd.matadd(mask, v).backward(g)
    # grad_v[b,k,n] = Σ_m mask[b,k,m]·g[b,m,n]; grad_mask[b,k,m] = Σ_n g[b,m,n]·v[b,k,n]
    gv = np.einsum("bkm,bmn->bkn", mask.detach().numpy(), g.numpy())
    gm = np.einsum("bmn,bkn->bkm", g.numpy(), v.detach().numpy())
    np.testing.assert_allclose(v.grad.numpy(), gv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mask.grad.numpy(), gm, rtol=1e-5, atol=1e-5)


def test_matadd_gradcheck_float64() -> None:
    mask, v = _matadd_args(2, 3, 4, 5, seed=5)
    mask = mask.double().requires_grad_(True)
    v = v.double().requires_grad_(True)
    assert torch.autograd.gradcheck(torch.ops.shiftadd.matadd, (mask, v))


@pytest.mark.parametrize("tvm_path", [True, False], ids=["tvm", "reference"])
def test_opcheck(tvm_path: bool) -> None:
    x, shift, sign = _shift_args(2, 5, 8, 3)
    xf = torch.randn(2, 5, 8, requires_grad=True)
    mask, v = _matadd_args(2, 5, 8, 3)
    with use_tvm(tvm_path):
        torch.library.opcheck(torch.ops.shiftadd.matshift.default, (x, shift, sign))
        torch.library.opcheck(torch.ops.shiftadd.shift_linear.default, (xf, shift, sign, 16))
        torch.library.opcheck(
            torch.ops.shiftadd.matadd.default, (mask.requires_grad_(True), v.requires_grad_(True))
        )


def test_env_var_forces_reference(monkeypatch) -> None:
    monkeypatch.setenv("SHIFTADD_TORCH_REFERENCE", "1")
    assert not torch_ops.tvm_enabled()
    with use_tvm(True):
        assert torch_ops.tvm_enabled()
    monkeypatch.delenv("SHIFTADD_TORCH_REFERENCE")
    assert torch_ops.tvm_enabled()


def test_tvm_path_actually_uses_the_compiled_kernel(monkeypatch) -> None:
    calls = []
    real = kernels.CompiledKernel.run_into

    def spy(self, *args):
        calls.append(self.name)
        return real(self, *args)

    monkeypatch.setattr(kernels.CompiledKernel, "run_into", spy)
    x, shift, sign = _shift_args(1, 3, 4, 2)
    with use_tvm(True):
        torch.ops.shiftadd.matshift(x, shift, sign)
    with use_tvm(False):
        torch.ops.shiftadd.matshift(x, shift, sign)
    assert calls == ["matshift"]


def test_ops_survive_torch_export() -> None:
    _, shift, sign = _shift_args(1, 4, 8, 6)

    class Tiny(torch.nn.Module):
        def forward(self, x, mask, v):
            return torch.ops.shiftadd.shift_linear(x, shift, sign, 16), torch.ops.shiftadd.matadd(mask, v)

    mask, v = _matadd_args(1, 4, 8, 6)
    ep = torch.export.export(Tiny(), (torch.randn(1, 4, 8), mask, v))
    targets = {str(node.target) for node in ep.graph.nodes if node.op == "call_function"}
    assert {"shiftadd.shift_linear.default", "shiftadd.matadd.default"} <= targets
