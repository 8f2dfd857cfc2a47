"""kernels.row_kernels: the CPU softmax/LayerNorm kernels against NumPy/PyTorch, and the Relax pass's rewrites."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kernels
from kernels.relax_pipeline import compile_relax
from kernels.row_kernels import row_kernels_pass, softmax_primfunc
from kernels.targets import vector_lanes


def _softmax_ref(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("rows,c", [(24, 65), (12, 16), (7, 33), (40, 197)])
def test_softmax_kernel_matches_numpy(rows: int, c: int) -> None:
    import tvm

    tgt = kernels.resolve_target("cpu")
    lanes = vector_lanes(tgt)
    if c < lanes:
        pytest.skip("narrower than a vector")
    x = (np.random.default_rng(rows * c).standard_normal((rows, c)) * 4).astype("float32")
    x[0] = -np.inf  # a fully masked row: _safe_softmax gives zeros
    x[1, ::2] = -np.inf  # a partly masked row: those entries are 0
    lib = tvm.compile(tvm.IRModule({"softmax": softmax_primfunc(rows, c, lanes).with_attr("global_symbol", "softmax")}),
                      target=tgt)
    y = tvm.runtime.tensor(np.full_like(x, np.nan))
    lib["softmax"](tvm.runtime.tensor(x), y)
    got = y.numpy()
    ref = _softmax_ref(x[2:].astype(np.float64))
    np.testing.assert_allclose(got[2:], ref, rtol=2e-6, atol=1e-7)
    assert np.all(got[0] == 0.0)
    np.testing.assert_allclose(got[1], _softmax_ref(x[1:2].astype(np.float64))[0], rtol=2e-6, atol=1e-30)


def _import(module: torch.nn.Module, *inputs: torch.Tensor):
    from tvm.relax.frontend.torch import from_exported_program

    with torch.no_grad():
        ep = torch.export.export(module.eval(), tuple(inputs))
    return from_exported_program(ep)


class _Attention(torch.nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def _op_names(mod) -> set[str]:
    import tvm

    names = set()

    def visit(e) -> None:
        op = getattr(e, "op", None)
        if isinstance(op, tvm.ir.Op):
            names.add(op.name)

    from tvm import relax

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return names


def test_attention_guard_folds_into_the_kernel_and_matches_torch() -> None:
    import tvm
    from tvm import relax

    rng = np.random.default_rng(0)
    q, k, v = (torch.from_numpy(rng.standard_normal((2, 3, 33, 16)).astype("float32")) for _ in range(3))
    mod = _import(_Attention(), q, k, v)
    assert "relax.where" in _op_names(mod)  # the frontend's _safe_softmax guard
    rewritten = relax.transform.DeadCodeElimination()(row_kernels_pass(kernels.resolve_target("cpu"))(mod))
    names = _op_names(rewritten)
    assert "relax.nn.softmax" not in names and "relax.where" not in names and "relax.equal" not in names
    assert any(gv.name_hint.startswith("dse_softmax_r198_c33") for gv in rewritten.functions)
    exe = compile_relax(mod, "cpu")
    out = relax.VirtualMachine(exe, tvm.cpu())["main"](*(tvm.runtime.tensor(t.numpy()) for t in (q, k, v)))
    got = (out[0] if not hasattr(out, "numpy") else out).numpy()
    np.testing.assert_allclose(got, _Attention()(q, k, v).numpy(), rtol=1e-5, atol=1e-6)


def test_unguarded_softmax_and_narrow_rows() -> None:
    """A plain softmax is rewritten too; one narrower than a vector (a 2-expert router) is left alone."""
    from tvm import relax

    wide = _import(torch.nn.Softmax(dim=-1), torch.zeros(4, 40))
    narrow = _import(torch.nn.Softmax(dim=-1), torch.zeros(4, 2))
    tgt = kernels.resolve_target("cpu")
    assert "relax.nn.softmax" not in _op_names(relax.transform.DeadCodeElimination()(row_kernels_pass(tgt)(wide)))
    assert "relax.nn.softmax" in _op_names(row_kernels_pass(tgt)(narrow))
