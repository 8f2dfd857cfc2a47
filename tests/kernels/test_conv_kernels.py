"""kernels.conv_kernels: convs lowered to im2col + GEMM and the depthwise kernel, against PyTorch's F.conv2d
through the project's compile pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kernels
from kernels.conv_kernels import conv_kernels_pass
from kernels.relax_pipeline import PROJECT_PIPELINE, compile_relax_recorded


def _import(module: nn.Module, x: torch.Tensor, params_as_input: bool = False):
    from tvm.relax.frontend.torch import from_exported_program

    with torch.no_grad():
        ep = torch.export.export(module.eval(), (x,))
    return from_exported_program(ep, keep_params_as_input=params_as_input)


def _functions(mod) -> set[str]:
    return {gv.name_hint for gv in mod.functions}


def _run(mod, *args: np.ndarray) -> np.ndarray:
    import tvm
    from tvm import relax

    compiled = compile_relax_recorded(mod, "cpu")
    assert compiled.pipeline == PROJECT_PIPELINE, compiled.fallback_reason
    vm = relax.VirtualMachine(compiled.executable, tvm.cpu())
    tensors = [tvm.runtime.tensor(a) for a in args]
    out = vm["main"](*tensors)
    return (out[0] if not hasattr(out, "numpy") else out).numpy()


# (cin, cout, kernel, stride, pad, size): PVT's overlapping patch embedding (7x7 s4 p3) and stage
# downsampling (3x3 s2 p1, odd input), a non-overlapping patchify (kernel = stride, a reshape), and a
# kernel = stride conv whose windows do not tile the input (gathered)
DENSE = [(3, 32, 7, 4, 3, 30), (16, 24, 3, 2, 1, 13), (8, 16, 4, 4, 0, 16), (8, 16, 4, 4, 0, 18)]


@pytest.mark.parametrize("cin,cout,k,stride,pad,size", DENSE)
def test_dense_conv_is_a_gemm_and_matches_torch(cin: int, cout: int, k: int, stride: int, pad: int, size: int
                                                ) -> None:
    conv = nn.Conv2d(cin, cout, k, stride, pad)
    x = torch.randn(2, cin, size, size, generator=torch.Generator().manual_seed(size))
    mod = _import(conv, x)
    rewritten = conv_kernels_pass(kernels.resolve_target("cpu"))(mod)
    names = _functions(rewritten)
    out_side = (size + 2 * pad - k) // stride + 1
    assert f"dse_conv_matmul_m{2 * out_side * out_side}_k{cin * k * k}_n{cout}" in names
    assert any(n.startswith("dse_im2col") for n in names) == (k != stride or pad != 0 or size % k != 0)
    got = _run(mod, x.numpy())
    with torch.no_grad():
        ref = F.conv2d(x, conv.weight, conv.bias, stride=stride, padding=pad).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("c,k,size", [(32, 3, 9), (48, 3, 7), (64, 5, 6)])
def test_depthwise_conv_kernel_matches_torch(c: int, k: int, size: int) -> None:
    conv = nn.Conv2d(c, c, k, 1, k // 2, groups=c)
    x = torch.randn(2, c, size, size, generator=torch.Generator().manual_seed(c))
    mod = _import(conv, x)
    assert any(n.startswith("dse_depthwise") for n in _functions(conv_kernels_pass(kernels.resolve_target("cpu"))(mod)))
    got = _run(mod, x.numpy())
    with torch.no_grad():
        ref = F.conv2d(x, conv.weight, conv.bias, padding=k // 2, groups=c).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_other_convs_are_left_to_legalisation() -> None:
    """A strided depthwise conv and a grouped (not depthwise) one keep TOPI's lowering, and still compile."""
    tgt = kernels.resolve_target("cpu")
    for conv in (nn.Conv2d(32, 32, 3, 2, 1, groups=32), nn.Conv2d(32, 32, 3, 1, 1, groups=4)):
        x = torch.randn(1, 32, 8, 8)
        mod = _import(conv, x)
        assert not any(n.startswith("dse_") for n in _functions(conv_kernels_pass(tgt)(mod)))
        with torch.no_grad():
            np.testing.assert_allclose(_run(mod, x.numpy()), conv(x).numpy(), rtol=1e-5, atol=1e-5)


class _PvtLike(nn.Module):
    """PVT v2's conv use in miniature: overlapping patch embedding, spatial-reduction conv on the tokens'
    grid, and the MLP's depthwise conv between two Linears."""

    def __init__(self, c: int = 32):
        super().__init__()
        self.embed = nn.Conv2d(3, c, 7, 4, 3)
        self.sr = nn.Conv2d(c, c, 2, 2)
        self.fc1 = nn.Linear(c, 2 * c)
        self.dw = nn.Conv2d(2 * c, 2 * c, 3, 1, 1, groups=2 * c)
        self.fc2 = nn.Linear(2 * c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)  # [B, N, C] tokens
        hidden = self.fc1(t)
        grid = hidden.transpose(1, 2).reshape(b, 2 * c, h, w)
        hidden = F.gelu(self.dw(grid).flatten(2).transpose(1, 2))
        reduced = self.sr(t.transpose(1, 2).reshape(b, c, h, w)).flatten(2).mean(-1)  # [B, C]
        return self.fc2(hidden) + reduced[:, None, :]


def test_pvt_like_module_compiles_with_the_project_pipeline_and_lifts_weight_packs() -> None:
    """With the weights as inputs (the exporter's form), the compile keeps the project pipeline, the conv
    weight packs move to ``main_transform_params``, and the result matches PyTorch."""
    import tvm
    from tvm import relax

    torch.manual_seed(0)
    model = _PvtLike().eval()
    x = torch.randn(2, 3, 32, 32)
    mod = _import(model, x, params_as_input=True)
    tgt = kernels.resolve_target("cpu")
    lifted = relax.transform.LiftTransformParams()(conv_kernels_pass(tgt)(mod))
    calls = []
    relax.analysis.post_order_visit(lifted["main"], lambda e: calls.append(getattr(getattr(e, "args", [None])[0],
                                                                                        "name_hint", "")))
    assert not any(c.startswith("dse_conv_pack") for c in calls)
    assert any(c.startswith("dse_conv_matmul") for c in calls) and any(c.startswith("dse_depthwise") for c in calls)

    compiled = compile_relax_recorded(mod, "cpu")
    assert compiled.pipeline == PROJECT_PIPELINE, compiled.fallback_reason
    vm = relax.VirtualMachine(compiled.executable, tvm.cpu())
    params = [tvm.runtime.tensor(p.detach().numpy()) for p in model.parameters()]
    params = list(vm["main_transform_params"](params))
    out = vm["main"](tvm.runtime.tensor(x.numpy()), *params)
    got = (out[0] if not hasattr(out, "numpy") else out).numpy()
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), rtol=1e-4, atol=1e-5)
