"""The NumPy references and metadata against independent brute-force formulas."""

from __future__ import annotations

import numpy as np
import pytest

import kernels
from kernels import primitives


def brute_force(name: str, *a: np.ndarray) -> np.ndarray:
    """The definitions written as explicit broadcasts (int64 / float64), independent of the references."""
    if name == "matmul":
        x, w = a
        return (x.astype(np.float64)[:, :, None, :] * w.astype(np.float64)[None, None]).sum(-1)
    if name == "bmm":
        x, y = a
        return (x.astype(np.float64)[:, :, None, :] * y.astype(np.float64).transpose(0, 2, 1)[:, None]).sum(-1)
    if name == "matshift":
        x, shift, sign = a
        terms = x.astype(np.int64)[:, :, None, :] >> shift.astype(np.int64)[None, None]  # [b, m, n, k]
        total = (terms * sign.astype(np.int64)[None, None]).sum(-1)
        return ((total + 2**31) % 2**32 - 2**31).astype(np.int32)
    if name == "matshift_decode":
        x, shift, sign = a
        w = sign.astype(np.float64) * 0.5 ** shift.astype(np.float64)
        return (x.astype(np.float64)[:, :, None, :] * w[None, None]).sum(-1)
    if name == "matadd":
        mask, v = a
        b, k, m = mask.shape
        out = np.zeros((b, m, v.shape[2]))
        for bi in range(b):
            for i in range(m):
                out[bi, i] = v[bi][mask[bi, :, i] != 0].astype(np.float64).sum(0)
        return out
    raise AssertionError(name)


def test_names_include_the_three_primitives() -> None:
    assert {"matadd", "matmul", "matshift", "bmm", "matshift_decode"} <= set(kernels.names())


@pytest.mark.parametrize("name", ["matmul", "bmm", "matshift", "matshift_decode", "matadd"])
def test_reference_matches_brute_force(name: str) -> None:
    b, m, k, n = 2, 5, 11, 7
    arrays = kernels.random_inputs(name, b, m, k, n, seed=1)
    ref = kernels.reference(name, *arrays)
    assert ref.shape == (b, m, n)
    expected = brute_force(name, *arrays)
    if name == "matshift":
        np.testing.assert_array_equal(ref, expected)
    else:
        np.testing.assert_allclose(ref, expected, rtol=1e-6, atol=1e-6)


def test_random_inputs_are_realistic() -> None:
    x, shift, sign = kernels.random_inputs("matshift", 2, 16, 64, 32, seed=0)
    assert x.dtype == np.int32 and shift.dtype == np.int8 and sign.dtype == np.int8
    assert (x < 0).any() and (x > 0).any()
    assert set(np.unique(sign)) == {-1, 0, 1}
    assert shift.min() >= 0 and shift.max() <= 15 and len(np.unique(shift)) > 3
    mask, v = kernels.random_inputs("matadd", 2, 16, 64, 32, seed=0)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1} and v.std() > 0.5


def test_matshift_reference_wraps_like_int32() -> None:
    x = np.full((1, 1, 4), 2**30, dtype=np.int32)
    shift = np.zeros((1, 4), dtype=np.int8)
    sign = np.ones((1, 4), dtype=np.int8)
    assert kernels.reference("matshift", x, shift, sign)[0, 0, 0] == np.int32(0)  # 4·2^30 mod 2^32


def test_fixed_point_round_trip() -> None:
    x = np.array([-1.5, -(2**-17), 0.0, 0.75, 3.0 + 2**-16])
    x_int = kernels.to_fixed(x)
    np.testing.assert_array_equal(x_int, [-98304, -1, 0, 49152, 196609])  # floor(x·2^16)
    np.testing.assert_allclose(kernels.from_fixed(x_int), np.floor(x * 2**16) / 2**16)


def test_reference_rejects_bad_shift_and_sign() -> None:
    x, shift, sign = kernels.random_inputs("matshift", 1, 2, 3, 4)
    with pytest.raises(kernels.UsageError, match="shift"):
        kernels.reference("matshift", x, np.full_like(shift, 32), sign)
    with pytest.raises(kernels.UsageError, match="sign"):
        kernels.reference("matshift", x, shift, np.full_like(sign, 2))


def test_unknown_name_lists_choices() -> None:
    with pytest.raises(kernels.UnknownNameError, match="matshift"):
        kernels.get("matmult")


def test_op_counts() -> None:
    c = kernels.op_counts("matmul", 2, 3, 4, 5)
    assert (c.mults, c.adds, c.shifts) == (120, 120, 0)
    assert c.bytes_read == (2 * 3 * 4 + 5 * 4) * 4 and c.bytes_written == 2 * 3 * 5 * 4
    s = kernels.op_counts("matshift", 2, 3, 4, 5)
    assert (s.mults, s.adds, s.shifts) == (0, 120, 120)
    assert s.bytes_read == 2 * 3 * 4 * 4 + 2 * 5 * 4
    a = kernels.op_counts("matadd", 2, 3, 4, 5)
    assert (a.mults, a.shifts, a.adds) == (0, 0, 120)
    h = kernels.op_counts("matmul", 1, 2, 2, 2, dtype="float16")
    assert h.bytes_read == (4 + 4) * 2
    with pytest.raises(kernels.UsageError):
        kernels.op_counts("matmul", 0, 1, 1, 1)


def test_import_is_cheap() -> None:
    import subprocess
    import sys

    code = "import sys, kernels; kernels.names(); print('tvm' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_primitive_dtype_check() -> None:
    with pytest.raises(kernels.UsageError, match="dtype"):
        primitives.get("matshift").check_dtype("float32")
