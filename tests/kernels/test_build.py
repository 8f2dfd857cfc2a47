"""Compiled kernels (default schedules) against the NumPy references, CUDA compile-only paths."""

from __future__ import annotations

import numpy as np
import pytest

import kernels
from kernels import primitives

# Shapes exercise batch > 1, tails that are not multiples of the vector width or tile, and a
# size-1 dimension; the last one is a real DeiT-Tiny projection row block.
SHAPES = [(3, 13, 29, 45), (1, 1, 7, 5), (2, 33, 17, 70), (1, 64, 192, 96)]
NAMES = ["matmul", "bmm", "matshift", "matshift_decode", "matadd"]


def _edge_case_matshift(b: int, m: int, k: int, n: int, rng: np.random.Generator):
    """Negative and extreme activations, shift 0 and 15 (and 31), all three signs."""
    x = rng.integers(-(2**31), 2**31, size=(b, m, k), dtype=np.int64).astype(np.int32)
    x[..., 0] = -1  # -1 >> s == -1 for every s: floor rounding, not truncation
    shift = rng.choice(np.array([0, 1, 7, 15, 31], dtype=np.int8), size=(n, k))
    shift[0, :] = 0
    sign = rng.choice(np.array([-1, 0, 1], dtype=np.int8), size=(n, k))
    return x, shift, sign


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", NAMES)
def test_cpu_kernel_matches_reference(name: str, shape: tuple[int, int, int, int]) -> None:
    b, m, k, n = shape
    fn = kernels.build(name, b=b, m=m, k=k, n=n, target="cpu")
    arrays = kernels.random_inputs(name, b, m, k, n, seed=sum(shape))
    out = fn(*arrays)
    ref = kernels.reference(name, *arrays)
    assert out.shape == (b, m, n) and out.dtype == ref.dtype
    if name == "matshift":
        np.testing.assert_array_equal(out, ref)
    else:
        np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5 * np.sqrt(k))


@pytest.mark.parametrize("shape", [(1, 520, 96, 384), (2, 19, 37, 50), (1, 40, 64, 33)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", ["matmul", "matshift_decode"])
def test_prepacked_gemm_matches_reference(name: str, shape: tuple[int, int, int, int]) -> None:
    """The exporter's split form (weights packed once, then the GEMM) computes the primitive."""
    arrays = kernels.random_inputs(name, *shape)
    kernel = kernels.PrepackedKernel(name, *shape, target="cpu")
    kernel.load(*arrays)
    got = kernel.run()
    ref = kernels.reference(name, *arrays)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    assert kernel.time(min_repeat_ms=1, repeat=2).median_ms > 0


@pytest.mark.parametrize("name", ["matmul", "bmm", "matshift_decode", "matadd"])
def test_row_blocked_gemm_matches_reference(name: str, monkeypatch) -> None:
    """Weights larger than a core's L2 switch the GEMMs to row blocks; pretend L2 is 4 KiB to take that path
    at a small shape (ragged rows and columns, several blocks per thread)."""
    from kernels import cpu_schedules

    monkeypatch.setattr(cpu_schedules, "_l2_per_core", lambda: 4 << 10)
    b, m, k, n = 2, 75, 40, 45
    tile = cpu_schedules._gemm_tile(16, n, m)
    assert cpu_schedules._row_block_tiles(-(-m // tile.mr), tile.mr, k, 48) > 1
    kernels.clear_cache()  # build() caches per shape: neither reuse nor leave a kernel built for a fake L2
    try:
        fn = kernels.build(name, b=b, m=m, k=k, n=n, target="cpu")
        arrays = kernels.random_inputs(name, b, m, k, n, seed=5)
        out = fn(*arrays)
    finally:
        kernels.clear_cache()
    np.testing.assert_allclose(out, kernels.reference(name, *arrays), rtol=2e-5, atol=2e-5 * np.sqrt(k))


def test_tiled_shape_is_the_padded_register_tile() -> None:
    from kernels.cpu_schedules import tile_padding, tile_steps, tiled_shape

    # AVX-512 (16 fp32 lanes): n=24 runs one 16-wide vector per row, padded to 32 columns; 13 rows per
    # tile pad 49 rows to 52 where 16 would compute 64
    assert tiled_shape("bmm", 24, 49, 58, 24, 16) == (24, 52, 58, 32)
    # n=384 divides the widest tile (4 vectors = 64 columns, 4 rows): 197 rows pad to 200 (3 rows per
    # tile would save 2 of them, not worth the lost reuse)
    assert tiled_shape("matmul", 8, 197, 192, 384, 16) == (8, 200, 192, 384)
    # matshift tiles rows in vectors (2 x 16 rows) and 8 columns
    assert tiled_shape("matshift", 1, 50, 9, 13, 16) == (1, 64, 9, 16)
    # tile steps: one per row, k and column tile (GEMMs); per row tile, k and column (matshift)
    assert tile_steps("bmm", 24, 49, 58, 24, 16) == 24 * 52 * 58 * 2
    assert tile_steps("matmul", 8, 197, 192, 384, 16) == 8 * 200 * 192 * 6
    assert tile_steps("matshift", 1, 50, 9, 13, 16) == 2 * 9 * 16
    pad = tile_padding(kernels.resolve_target("cpu"))
    assert pad("layernorm", 1, 7, 8, 9) == (1, 7, 8, 9, 0)  # not a kernel: passes through
    assert tile_padding(kernels.resolve_target("cuda")) is None


@pytest.mark.parametrize("shape", [(2, 19, 37, 50), (1, 40, 64, 33)], ids=lambda s: "x".join(map(str, s)))
def test_matshift_edge_cases_exact(shape: tuple[int, int, int, int]) -> None:
    b, m, k, n = shape
    arrays = _edge_case_matshift(b, m, k, n, np.random.default_rng(7))
    fn = kernels.build("matshift", b=b, m=m, k=k, n=n)
    np.testing.assert_array_equal(fn(*arrays), kernels.reference("matshift", *arrays))


def test_matshift_float_mapping() -> None:
    """Float activations through the Q16.16 grid approximate x·W within k ulps of 2^-16."""
    b, m, k, n = 2, 9, 24, 10
    rng = np.random.default_rng(3)
    x = rng.standard_normal((b, m, k)) * 3
    _, shift, sign = kernels.random_inputs("matshift", b, m, k, n, seed=3)
    out = kernels.from_fixed(kernels.build("matshift", b=b, m=m, k=k, n=n)(kernels.to_fixed(x), shift, sign))
    w = sign * 2.0 ** -shift.astype(np.float64)
    np.testing.assert_allclose(out, x @ w.T, atol=(k + 1) * 2.0**-16)


def test_matadd_ignores_masked_values() -> None:
    b, m, k, n = 2, 6, 9, 17
    mask, v = kernels.random_inputs("matadd", b, m, k, n, seed=5)
    v_poisoned = np.where(mask.transpose(0, 2, 1).any(1)[:, :, None], v, np.nan).astype(np.float32)
    # rows k never selected by any m hold NaN; a multiply-by-zero kernel would propagate it
    out = kernels.build("matadd", b=b, m=m, k=k, n=n)(mask, v_poisoned)
    np.testing.assert_allclose(
        out, kernels.reference("matadd", mask, np.nan_to_num(v_poisoned)), rtol=1e-5, atol=1e-5
    )


def test_fp16_matmul_cpu() -> None:
    b, m, k, n = 2, 17, 40, 24
    x, w = kernels.random_inputs("matmul", b, m, k, n, dtype="float16", seed=2)
    fn = kernels.build("matmul", b=b, m=m, k=k, n=n, dtype="float16")
    out = fn(x, w)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, kernels.reference("matmul", x, w), rtol=1e-4, atol=1e-3)


def test_build_is_cached_and_describes_itself() -> None:
    a = kernels.build("matmul", b=1, m=8, k=8, n=8)
    assert kernels.build("matmul", b=1, m=8, k=8, n=8) is a
    assert a.schedule in ("default", "tuned") and a.tuned_trials >= 0
    assert str(a.target.kind.name) == "llvm"
    row = a.describe()
    assert (row["primitive"], row["batch"], row["m"], row["k"], row["n"]) == ("matmul", 1, 8, 8, 8)


def test_call_validates_arguments() -> None:
    fn = kernels.build("matshift", b=1, m=4, k=8, n=4)
    x, shift, sign = kernels.random_inputs("matshift", 1, 4, 8, 4)
    with pytest.raises(kernels.UsageError, match="shape"):
        fn(x[:, :3], shift, sign)
    with pytest.raises(kernels.UsageError, match="int32"):
        fn(x.astype(np.float32), shift, sign)
    with pytest.raises(kernels.UsageError, match="shift"):
        fn(x, np.full_like(shift, 40), sign)
    with pytest.raises(kernels.UsageError, match="takes 3"):
        fn(x, shift)


def test_timing_fields() -> None:
    fn = kernels.build("matadd", b=2, m=16, k=16, n=32)
    t = fn.time(min_repeat_ms=1, repeat=4)
    assert t.repeats == 4 and len(t.results_ms) == 4
    assert 0 < min(t.results_ms) <= t.median_ms <= t.p90_ms <= max(t.results_ms)


def test_cpu_export_library_round_trip(tmp_path) -> None:
    import tvm

    b, m, k, n = 2, 5, 12, 9
    fn = kernels.build("matshift", b=b, m=m, k=k, n=n)
    path = fn.export_library(tmp_path / "matshift.so")
    lib = tvm.runtime.load_module(str(path))
    x, shift, sign = kernels.random_inputs("matshift", b, m, k, n)
    out = np.empty((b, m, n), dtype=np.int32)
    lib["main"](x, shift, sign, out)
    np.testing.assert_array_equal(out, kernels.reference("matshift", x, shift, sign))


def test_te_compute_and_scheduled_primfunc() -> None:
    import tvm
    from tvm import te

    prim = primitives.get("matadd")
    args = prim.placeholders(1, 4, 6, 8)
    out = kernels.te_compute("matadd")(*args)
    assert tuple(int(s) for s in out.shape) == (1, 4, 8)
    func = kernels.scheduled_primfunc("matadd", 1, 4, 6, 8, "cpu")
    assert isinstance(func, tvm.tirx.PrimFunc)
    assert isinstance(te.create_prim_func([*args, out]), tvm.tirx.PrimFunc)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("name", NAMES)
def test_cuda_compiles_and_exports(name: str, arch: str, tmp_path) -> None:
    b, m, k, n = 2, 33, 40, 70
    try:
        fn = kernels.build(name, b=b, m=m, k=k, n=n, target=f"cuda:{arch}")
    except kernels.KernelError as exc:  # pragma: no cover - only where TVM lacks CUDA codegen
        if "cuda" in str(exc).lower() and "not enabled" in str(exc).lower():
            pytest.skip(f"TVM here has no CUDA codegen: {exc}")
        raise
    assert fn.is_cuda and fn.target.attrs["arch"] == arch
    path = fn.export_library(tmp_path / f"{name}_{arch}.so")
    assert path.stat().st_size > 0


def test_fp16_cuda_compiles() -> None:
    fn = kernels.build("matmul", b=1, m=64, k=64, n=64, target="cuda:sm_80", dtype="float16")
    assert fn.dtype == "float16"


@pytest.mark.skipif(kernels.cuda_available(), reason="a CUDA device is present")
def test_cuda_call_without_gpu_raises() -> None:
    fn = kernels.build("matshift", b=1, m=4, k=8, n=4, target="cuda:sm_80")
    arrays = kernels.random_inputs("matshift", 1, 4, 8, 4)
    with pytest.raises(kernels.TargetUnavailableError, match="compile-only"):
        fn(*arrays)
    with pytest.raises(kernels.TargetUnavailableError):
        fn.time(*arrays)


@pytest.mark.gpu
@pytest.mark.skipif(not kernels.cuda_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", NAMES)
def test_cuda_kernel_matches_reference(name: str) -> None:  # pragma: no cover - GPU machines only
    b, m, k, n = 2, 33, 40, 70
    arrays = kernels.random_inputs(name, b, m, k, n, seed=4)
    out = kernels.build(name, b=b, m=m, k=k, n=n, target="cuda")(*arrays)
    np.testing.assert_allclose(out, kernels.reference(name, *arrays), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_canonical_definition_on_cpu(name: str) -> None:
    """The canonical TE (what te_compute exports and MetaSchedule tunes) under the generic schedule."""
    from kernels import schedules
    from kernels.compiled import compile_primfunc

    b, m, k, n = 2, 9, 21, 35
    tgt = kernels.resolve_target("cpu")
    func = schedules.generic_cpu_schedule(schedules.canonical_primfunc(name, b, m, k, n), tgt)
    exe = compile_primfunc(func, tgt)
    arrays = kernels.random_inputs(name, b, m, k, n, seed=11)
    prim = primitives.get(name)
    kernel = kernels.CompiledKernel(name, (b, m, k, n), prim.default_dtype, tgt, exe, func, "default", 0)
    np.testing.assert_allclose(kernel(*arrays), kernels.reference(name, *arrays), rtol=2e-5, atol=1e-4)


@pytest.mark.skipif(kernels.cuda_available(), reason="a CUDA device is present")
def test_tuning_cuda_without_gpu_raises(tmp_path) -> None:
    with pytest.raises(kernels.TargetUnavailableError):
        kernels.tune("matmul", 1, 8, 8, 8, target="cuda:sm_80", trials=2, tuning_dir=tmp_path)


def test_kernels_embed_in_a_relax_graph() -> None:
    """The export path: the scheduled PrimFunc via call_tir and the TE definition via emit_te."""
    import tvm
    from tvm import relax

    b, m, k, n = 2, 9, 24, 10
    func = kernels.scheduled_primfunc("matshift", b, m, k, n, "cpu")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((b, m, k), "int32"))
    shift = relax.Var("shift", relax.TensorType((n, k), "int8"))
    sign = relax.Var("sign", relax.TensorType((n, k), "int8"))
    with bb.function("main", [x, shift, sign]):
        gv = bb.add_func(func, "matshift_kernel")
        with bb.dataflow():
            y = bb.emit(relax.call_tir(gv, [x, shift, sign], relax.TensorType((b, m, n), "int32")))
            z = bb.emit_te(kernels.te_compute("matshift"), x, shift, sign)
            out = bb.emit_output(relax.Tuple([y, z]))
        bb.emit_func_output(out)
    exe = tvm.compile(bb.get(), target=kernels.resolve_target("cpu"))
    vm = relax.VirtualMachine(exe, tvm.cpu())
    arrays = kernels.random_inputs("matshift", b, m, k, n, seed=9)
    res = vm["main"](*[tvm.runtime.tensor(a) for a in arrays])
    ref = kernels.reference("matshift", *arrays)
    np.testing.assert_array_equal(res[0].numpy(), ref)
    np.testing.assert_array_equal(res[1].numpy(), ref)


def test_cold_weight_timing_takes_single_call_samples() -> None:
    """``cold_weights``: one call per sample, each after the private caches were flushed to L3 (the input
    read back in); the eviction buffer is twice the machine's L2 as sysfs reports it."""
    from kernels.compiled import evict_private_caches, l2_total_bytes

    assert l2_total_bytes() >= 1 << 16
    x = np.ones((4, 8), np.float32)
    evict_private_caches(x)  # accepts NumPy (and DLPack) arrays to keep warm
    kernel = kernels.build("matshift", b=1, m=8, k=16, n=8, target="cpu")
    timing = kernel.time(repeat=5, cold_weights=True)
    assert timing.repeats == 5 and timing.number == 1 and timing.median_ms > 0
    packed = kernels.PrepackedKernel("matmul", 1, 8, 16, 8)
    packed.load(*kernels.random_inputs("matmul", 1, 8, 16, 8))
    assert packed.time(repeat=4, cold_weights=True).repeats == 4
