"""Every non-primitive op the profiler times: the compiled TVM version computes what its PyTorch version
computes (so both backends' rows price the same work), and GEMM-shaped ops run the exporter's kernel."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dse.profiling import nonprim

# A small valid shape per op (the (b, m, k, n) convention of each op's docstring in dse/profiling/nonprim.py).
SHAPES = {
    "layernorm": (1, 24, 16, 16), "gelu": (1, 24, 32, 32), "softmax": (6, 9, 9, 9), "sdpa": (6, 9, 8, 5),
    "residual": (1, 24, 16, 16),
    "bias": (1, 24, 32, 32), "pos_embed": (2, 9, 16, 16), "split_heads": (2, 9, 48, 6), "merge_heads": (2, 9, 16, 2),
    "hash": (4, 9, 8, 8), "hamming_mix": (4, 9, 9, 8), "requant": (1, 24, 16, 32), "quantize": (1, 24, 16, 16), "embed": (1, 32, 48, 16),
    "conv": (1, 32, 27, 16), "head": (1, 2, 16, 10), "router": (1, 24, 16, 2), "dispatch": (1, 24, 16, 32),
    "dwconv": (2, 16, 8, 9),
}


def _flat(out) -> list[np.ndarray]:
    if isinstance(out, torch.Tensor):
        return [out.numpy()]
    if isinstance(out, (tuple, list)) or type(out).__name__ == "Array":
        return [a for o in out for a in _flat(o)]
    return [out.numpy()]  # a TVM tensor


def test_every_registered_op_has_a_shape_here():
    assert set(nonprim.names()) <= set(SHAPES), sorted(set(nonprim.names()) - set(SHAPES))


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_tvm_op_matches_pytorch(name):
    if name not in nonprim.names():
        pytest.skip(f"{name} is not registered")
    try:
        shape = nonprim.check_shape(name, SHAPES[name])
    except Exception as exc:  # noqa: BLE001 - a wrong test shape should say so, not fail obscurely
        pytest.fail(f"test shape for {name} is invalid: {exc}")
    want = _flat(nonprim.torch_callable(name, shape)())
    got = _flat(nonprim.build_op(name, shape, "cpu").run())
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        np.testing.assert_allclose(g.astype(np.float64), w.astype(np.float64), rtol=2e-3, atol=2e-4)


@pytest.mark.parametrize("name", ["embed", "head", "router"])
def test_gemm_ops_call_the_matmul_kernel(name):
    import kernels

    mod = nonprim.relax_module(name, SHAPES[name], kernels.resolve_target("cpu"))
    kernels_called = [gv.name_hint for gv in mod.functions if gv.name_hint.startswith("shiftadd_matmul_")]
    b, m, k, n = SHAPES[name]
    assert kernels_called == [f"shiftadd_matmul_b{b}_m{m}_k{k}_n{n}"]
    assert not [gv for gv in nonprim.relax_module(name, SHAPES[name]).functions
                if gv.name_hint.startswith("shiftadd_")]  # no target: a plain Relax matmul


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_op_compiles_with_the_exporters_schedules(name):
    """No op may need TVM's default pipeline (``compile_relax``'s fallback): its row would then time code the
    exporter never runs. The hash (a GEMM then a compare) once did, and was priced 2x its in-model time."""
    import tvm

    from kernels import relax_pipeline

    if name not in nonprim.names():
        pytest.skip(f"{name} is not registered")
    target = relax_pipeline.resolve_target("cpu")
    mod = nonprim.relax_module(name, nonprim.check_shape(name, SHAPES[name]), target)
    with target:
        tvm.compile(mod, target=target, relax_pipeline=relax_pipeline.relax_pipeline(target))


def test_dwconv_row_times_the_exporters_depthwise_kernel():
    """The profiled depthwise conv (PVT v2's MLP) runs the kernel the exporter swaps in, not TOPI's conv (its
    Relax form once carried out_dtype=None, which the conv pass did not recognise: rows 9x the in-model time)."""
    from kernels import relax_pipeline
    from kernels.compiled import library_functions

    target = relax_pipeline.resolve_target("cpu")
    exe = relax_pipeline.compile_relax(nonprim.relax_module("dwconv", SHAPES["dwconv"], target), target)
    assert any(f.startswith("dse_depthwise_") for f in library_functions(exe))
